"""What the commands share: defaults taken from the environment (for containers), argument
types, and the Prometheus endpoint that `mirror run` and `mirror capture` both serve."""
from __future__ import annotations

import argparse
import os
import re
import socket

from .config import parse_seconds
from .errors import UsageError


class EnvText(str):
    """An option's value taken from an environment variable (`var`): the argument types
    below name the variable, not the flag, when it is wrong, since the flag is not what
    the user wrote."""
    var = ""


def env(name: str, default=None):
    """The environment variable's value, or `default` when it is unset or empty (compose
    files and manifests write `X=` for "not set")."""
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    text = EnvText(value)
    text.var = name
    return text


def checked(parse):
    """An argparse type from `parse(text)`, which raises ValueError, ArgumentTypeError
    or UsageError with the reason. A wrong value from the environment is a UsageError
    naming the variable (argparse lets it through, and the CLI prints it as one line);
    a wrong flag is argparse's usual error naming the flag."""
    def parse_checked(text: str):
        try:
            return parse(text)
        except (ValueError, argparse.ArgumentTypeError, UsageError) as exc:
            if isinstance(text, EnvText):
                raise UsageError(f"{text.var}={str(text)!r} (from the environment): {exc}") \
                    from None
            raise argparse.ArgumentTypeError(str(exc)) from None
    parse_checked.__name__ = getattr(parse, "__name__", "value")
    return parse_checked


# argparse type: a positive, finite number of seconds (mirror.config.parse_seconds).
positive_seconds = checked(parse_seconds)

_WHOLE = re.compile(r"-?[0-9]+")


def count(minimum: int | None = None, maximum: int | None = None):
    """argparse type: a whole number (ASCII digits, an optional minus: not "1_000" or
    "1e3"), within [minimum, maximum] where given."""
    def whole_number(text: str) -> int:
        if not _WHOLE.fullmatch(text.strip()):
            raise ValueError(f"expected a whole number, got {str(text)!r}")
        value = int(text)
        if minimum is not None and value < minimum:
            raise ValueError(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ValueError(f"must be at most {maximum}, got {value}")
        return value
    return checked(whole_number)


def text_checked(check):
    """argparse type: the text itself, after `check(text)` raised nothing."""
    def check_text(text: str) -> str:
        check(text)
        return text
    check_text.__name__ = getattr(check, "__name__", "value")
    return checked(check_text)


def add_workload_selectors(parser, prefix: str, what: str) -> None:
    """-n/--namespace, --pod and --container, shell patterns on the workload
    (mirror.filters.WorkloadPatterns), worded the same for `mirror events` and
    `mirror capture --extract`: `prefix` starts each help ("" or "with --extract: "),
    `what` names what is selected ("events", "connections")."""
    parser.add_argument("-n", "--namespace", action="append", metavar="PATTERN",
                        help=f"{prefix}{what} of pods in a Kubernetes namespace matching "
                        "this (shell pattern)")
    parser.add_argument("--pod", action="append", metavar="PATTERN",
                        help=f"{prefix}{what} of a pod whose name matches this ('checkout-*')")
    parser.add_argument("--container", action="append", metavar="PATTERN",
                        help=f"{prefix}{what} of a pod with a container, or of a container, "
                        "whose name matches this")


def parse_metrics_addr(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"bad --metrics-addr {text!r}: use HOST:PORT, e.g. 127.0.0.1:9464 "
                         "or [::]:9464")
    return host.strip("[]") or "0.0.0.0", int(port)


def serve_metrics(collector, addr: str):
    """Serves one Prometheus collector (read at scrape time) on HOST:PORT in a thread;
    returns (server, thread) as prometheus_client does."""
    from prometheus_client import CollectorRegistry, start_http_server
    host, port = parse_metrics_addr(addr)
    registry = CollectorRegistry()
    registry.register(collector)
    try:
        return start_http_server(port, addr=host, registry=registry)
    except (OSError, socket.gaierror) as exc:
        raise UsageError(f"cannot serve metrics on {addr}: {exc}") from None


def printable(text) -> str:
    """`text` safe to print on a terminal: every character Python does not call
    printable (C0 and C1 controls, DEL, Unicode format characters such as bidirectional
    overrides, separators other than the space) becomes \\xNN or \\uNNNN, and a
    backslash is doubled so that the escapes cannot be faked. A request target or Host
    header comes from the network: an ESC, CSI or CR in it would otherwise drive the
    operator's terminal. None stays None."""
    if text is None:
        return None
    text = str(text)
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(_escape(c) for c in text)


def _escape(c: str) -> str:
    if c == "\\":
        return "\\\\"
    if c.isprintable():
        return c
    return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"


def table(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows of strings as lines of left-aligned columns (the first row: the headings)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]

