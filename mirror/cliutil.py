"""What the commands share: defaults taken from the environment (for containers), argument
types, and the Prometheus endpoint that `mirror run` and `mirror capture` both serve."""
from __future__ import annotations

import argparse
import os
import socket

from .config import parse_seconds
from .errors import UsageError


def env(name: str, default=None):
    """The environment variable's value, or `default` when it is unset or empty."""
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def positive_seconds(text: str) -> float:
    """argparse type: a positive, finite number of seconds (mirror.config.parse_seconds)."""
    try:
        return parse_seconds(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def count(minimum: int | None = None):
    """argparse type: a whole number, at least `minimum` when given."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") \
                from None
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}")
        return value
    return parse


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


def table(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows of strings as lines of left-aligned columns (the first row: the headings)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def printable(text) -> str:
    """`text` with every character a terminal would act on (C0 and C1 controls, DEL, and
    the other non-printing ones such as bidirectional overrides) written as a Python
    escape: what a packet put there reaches the operator's eyes, not their terminal."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else
                   (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
                   for c in text)
