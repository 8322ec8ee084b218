"""The reloadable settings file of `mirror run --config`: `key = value` lines for the
settings that can change without reloading the classifier (trigger, idle_timeout). Read
at start, over the flags, and again on SIGHUP."""
from __future__ import annotations

from .errors import UsageError
from .trigger import parse_trigger


def read_config(path: str) -> dict:
    """The settings in `path`; UsageError naming the line when one is wrong."""
    out = {}
    try:
        lines = open(path).read().splitlines()
    except OSError as exc:
        raise UsageError(f"cannot read config {path}: {exc.strerror}") from None
    for n, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, value = (s.strip() for s in line.partition("="))
        value = value.strip("'\"")
        if not sep or key not in ("trigger", "idle_timeout"):
            raise UsageError(f"{path}:{n}: expected 'trigger = SPEC' or "
                             f"'idle_timeout = SECONDS', got {line!r}")
        if key == "trigger":
            parse_trigger(value)
            out[key] = value
        else:
            try:
                out[key] = float(value)
            except ValueError:
                raise UsageError(f"{path}:{n}: idle_timeout must be seconds, got {value!r}") \
                    from None
            if out[key] <= 0:
                raise UsageError(f"{path}:{n}: idle_timeout must be positive")
    return out
