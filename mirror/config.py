"""The reloadable settings file of `mirror run --config`: `key = value` lines for the
settings that can change without reloading the classifier (trigger, idle_timeout). Which
source wins over which is said in one place, mirror.options.resolve(), at start and on
SIGHUP alike; this module only reads and checks the file."""
from __future__ import annotations

import errno
import math
import os
import stat
from dataclasses import dataclass

from .errors import UsageError
from .trigger import parse_trigger

# Durations (--idle-timeout, idle_timeout, --flow-idle) are kept to what the kernel's
# nanosecond clocks and the sweep can hold: a finite number of seconds, at most 30 days.
MAX_SECONDS = 30 * 86400


def parse_seconds(text: str) -> float:
    """A positive, finite number of seconds up to MAX_SECONDS; ValueError (with the reason
    as its message) otherwise. "nan", "inf" and 1e308 are refused: each stopped a running
    controller or a sidecar's flush somewhere downstream."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"expected seconds, got {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number of seconds, got {text!r}")
    if not 0 < value <= MAX_SECONDS:
        raise ValueError(f"must be more than 0 and at most {MAX_SECONDS} seconds (30 days), "
                         f"got {text!r}")
    return value


@dataclass(frozen=True)
class FileSettings:
    """What the file says; None where it says nothing (the flag's value stands)."""
    trigger: str | None = None
    codes: frozenset[int] | None = None     # the trigger, parsed
    idle_timeout: float | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in (("trigger", self.trigger),
                                  ("idle_timeout", self.idle_timeout)) if v is not None}


MAX_CONFIG_BYTES = 64 << 10


def _read_text(path: str) -> str:
    """The file's text. Only a regular file (a ConfigMap's symbolic link to one is fine)
    of at most MAX_CONFIG_BYTES: /dev/zero or a named pipe given by mistake would
    otherwise be read forever, or block the reload."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise OSError(errno.EFBIG, f"larger than {MAX_CONFIG_BYTES} bytes")
    return data.decode("utf-8")


def read_config(path: str) -> FileSettings:
    """The settings in `path`; UsageError naming the line when one is wrong."""
    trigger = codes = idle = None
    try:
        lines = _read_text(path).splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not a text file"
        raise UsageError(f"cannot read config {path}: {reason}") from None
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
            try:
                codes = parse_trigger(value)
            except UsageError as exc:
                raise UsageError(f"{path}:{n}: {exc}") from None
            trigger = value
        else:
            try:
                idle = parse_seconds(value)
            except ValueError as exc:
                raise UsageError(f"{path}:{n}: idle_timeout {exc}") from None
    return FileSettings(trigger, codes, idle)
