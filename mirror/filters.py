"""What the readers select by, one syntax wherever it is asked for: `mirror events` (on
event objects) and `mirror capture --extract` (on the ring's connections and the index).

  statuses       the trigger's syntax (mirror.trigger): 500, 5xx, 500-504, and gRPC codes
                 after grpc: (grpc:14, grpc:unavailable, grpc-error)
  times          RFC 3339 (a time without an offset is UTC), epoch seconds, or a time
                 before now: 30s, 10m, 2h, 1d (as `kubectl logs --since` and
                 `journalctl --since -10m` read it)
  community_id   a Community ID v1 (mirror.communityid), checked for its shape
  workload       shell patterns (fnmatch, as `mirror run --iface`) on the workload's
                 Kubernetes namespace, pod and container, and on the interface: the names
                 `kubectl -n NS` and `kubectl logs POD -c CONTAINER` take

A wrong value is a UsageError naming the flag and the syntax."""
from __future__ import annotations

import base64
import binascii
import fnmatch
import math
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from .errors import UsageError
from .trigger import GRPC_MAX, parse_trigger
from .workload.model import Workload

_AGO = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str, flag: str, now: float | None = None) -> float:
    """Seconds since the epoch of `text`: RFC 3339, epoch seconds, or a duration before
    `now` (10m); UsageError otherwise."""
    stripped = text.strip()
    ago = _AGO.match(stripped.lower())
    if ago:
        value = (time.time() if now is None else now) - \
            float(ago.group(1)) * _UNIT_SECONDS[ago.group(2)]
    else:
        try:
            value = float(stripped)
        except ValueError:
            try:
                when = datetime.fromisoformat(stripped.replace("Z", "+00:00")
                                              .replace("z", "+00:00"))
            except ValueError:
                raise UsageError(f"{flag} {text!r}: use RFC 3339 (2025-01-01T12:00:00Z), "
                                 "epoch seconds, or a time before now (30s, 10m, 2h, 1d)") \
                    from None
            if when.tzinfo is None:
                when = when.replace(tzinfo=timezone.utc)
            value = when.timestamp()
    if not math.isfinite(value):
        raise UsageError(f"{flag} {text!r}: not a finite time")
    return value


def time_window(since: str | None, until: str | None,
                now: float | None = None) -> tuple[float | None, float | None]:
    """(since, until) in epoch seconds (None where not given); UsageError when the
    window runs backwards."""
    # An empty value given is a wrong value, not an absent one.
    lo = parse_time(since, "--since", now) if since is not None else None
    hi = parse_time(until, "--until", now) if until is not None else None
    if lo is not None and hi is not None and lo > hi:
        raise UsageError("--since is after --until")
    return lo, hi


def check_community_id(text: str) -> str:
    try:
        ok = text.startswith("1:") and len(base64.b64decode(text[2:], validate=True)) == 20
    except (binascii.Error, ValueError):
        ok = False
    if not ok:
        raise UsageError(f"--community-id {text!r}: a Community ID v1 is '1:' and the "
                         "base64 of 20 bytes, e.g. 1:LQU9qZlK+B5F3KDmev6m5PMibrg=")
    return text


@dataclass(frozen=True)
class Statuses:
    """A --status selection: HTTP codes (100-599) and gRPC codes (0-16), told apart by the
    protocol that carried them (an event's proto, "grpc" or not)."""
    http: frozenset
    grpc: frozenset

    @classmethod
    def parse(cls, spec: str) -> "Statuses":
        try:
            codes = parse_trigger(spec)
        except UsageError as exc:
            raise UsageError(f"--status: {str(exc).replace('trigger spec', 'status')}") \
                from None
        if not codes:
            raise UsageError(f"--status {spec!r} selects nothing; give codes such as 5xx")
        return cls(frozenset(c for c in codes if c > GRPC_MAX),
                   frozenset(c for c in codes if c <= GRPC_MAX))

    def matches(self, status, proto: str | None = None) -> bool:
        if not isinstance(status, int) or isinstance(status, bool):
            return False
        return status in (self.grpc if proto == "grpc" else self.http)


@dataclass(frozen=True)
class WorkloadPatterns:
    """Shell patterns on a connection's workload and interface; each list matches when
    any of its patterns does, and every list given must match. A pod's `container` is the
    comma-separated names of its containers (mirror.workload): one that matches is
    enough. `pod` matches a podman pod too (mirror.pod.name), `container` a Docker or
    podman container's name (container.name)."""
    namespace: tuple[str, ...] = ()
    pod: tuple[str, ...] = ()
    container: tuple[str, ...] = ()
    iface: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.namespace or self.pod or self.container or self.iface)

    @property
    def names_workload(self) -> bool:
        return bool(self.namespace or self.pod or self.container)

    def matches(self, attrs: dict | None, iface: str | None) -> bool:
        """`attrs`: the workload's attributes (OpenTelemetry names, as events carry them;
        None or {} when unknown); `iface`: the interface's name."""
        w = Workload.from_attributes(attrs or {})
        containers = (w.container or "").split(",") if w.container else []
        return (_any(self.namespace, [w.namespace]) and _any(self.pod, [w.pod])
                and _any(self.container, containers) and _any(self.iface, [iface]))


def _any(patterns: tuple[str, ...], values: list) -> bool:
    if not patterns:
        return True
    return any(isinstance(v, str) and fnmatch.fnmatchcase(v, p)
               for p in patterns for v in values)


@dataclass(frozen=True)
class EventFilter:
    """What `mirror events` shows: every criterion given must hold."""
    workload: WorkloadPatterns = WorkloadPatterns()
    statuses: Statuses | None = None
    since: float | None = None
    until: float | None = None
    community_id: str | None = None

    def matches(self, event: dict) -> bool:
        when = event.get("time_unix")
        return ((self.statuses is None
                 or self.statuses.matches(event.get("status"), event.get("proto")))
                and (self.community_id is None
                     or event.get("community_id") == self.community_id)
                and (self.since is None or (isinstance(when, (int, float))
                                            and when >= self.since))
                and (self.until is None or (isinstance(when, (int, float))
                                            and when <= self.until))
                and (not self.workload
                     or self.workload.matches(event, event.get("iface"))))


def event_filter(namespace=(), pod=(), container=(), iface=(), status=None, since=None,
                 until=None, community_id=None, now: float | None = None) -> EventFilter:
    """The filter of `mirror events`' options (UsageError for a wrong one)."""
    lo, hi = time_window(since, until, now)
    return EventFilter(
        workload=WorkloadPatterns(tuple(namespace or ()), tuple(pod or ()),
                                  tuple(container or ()), tuple(iface or ())),
        statuses=Statuses.parse(status) if status is not None else None, since=lo, until=hi,
        community_id=check_community_id(community_id) if community_id is not None else None)
