"""The controller's events file, joined to the capture by Community ID: what the capture
sidecar knows of a connection only the controller saw, its interface, its workload, and
the statuses of an HTTP/2 or gRPC connection.

The sidecar records the debug interface, where every connection arrives through one
interface; which monitored interface (and so which pod) it came from is in the
controller's error events. When the sidecar can read the controller's events file
(`mirror capture --events-file PATH`: a volume both containers mount, or one host), it
follows it (mirror.events.tail.FileFollower: across its rotations) and gives each index
row and extract the interface and workload attributes of the connection's events,
matched by `community_id`. Without the file, or for a connection whose event is not in
it, the row's `iface` stays null and it names no workload: the sidecar works the same.

Statuses: the capture reads HTTP/1.x status lines itself (mirror.capture.flow), but not an
h2c :status or a gRPC grpc-status: those are HPACK-coded against a table whose start the
ring may not hold. The controller read them (it follows each connection's HPACK table)
and each error event says one, with the protocol that carried it. So a row in which the
capture read no status takes `proto`, `status` (and `grpc_status`, as events name it) of
the connection's first error event, and its `statuses` from the HTTP/2 events; gRPC codes
go into `grpc_statuses` (kept apart: grpc-status 14 is no HTTP status). `mirror capture
--extract --status` selects on both (statuses_of). A status the controller did not make
an event of (not in its trigger, or held back by its events budget) stays unknown.

Bounded: the events of the last MAX_CONNECTIONS connections are kept."""
from __future__ import annotations

import collections
import json

from ..events.record import grpc_name
from ..events.tail import EventLines, FileFollower, open_if_there
from ..trigger import GRPC_MAX, MAX_CODE, MIN_CODE
from ..workload.model import NETNS_ATTRIBUTE, STATE_ATTRIBUTE

MAX_CONNECTIONS = 65536

# The event fields that describe where a connection was seen (mirror.workload's
# OpenTelemetry attribute names, and the interface).
WORKLOAD_FIELDS = ("container.runtime.name", "k8s.namespace.name", "k8s.pod.name",
                   "mirror.pod.name", "k8s.pod.uid", "k8s.container.name", "container.name",
                   "container.id", NETNS_ATTRIBUTE)


def where_seen(event: dict) -> dict:
    """The interface and workload attributes of an event (a pending answer names none)."""
    out = {"iface": event.get("iface")} if isinstance(event.get("iface"), str) else {}
    if event.get(STATE_ATTRIBUTE) != "pending":
        out.update((k, event[k]) for k in WORKLOAD_FIELDS if isinstance(event.get(k), str))
    return out


def _status_of(event: dict) -> tuple[str, int] | None:
    """("grpc", code) or ("http", code) for an event's status; None for one that is not a
    status of its protocol (a line another program wrote, a null)."""
    status = event.get("status")
    if not isinstance(status, int) or isinstance(status, bool):
        return None
    if event.get("proto") == "grpc":
        return ("grpc", status) if 0 <= status <= GRPC_MAX else None
    return ("http", status) if MIN_CODE <= status <= MAX_CODE else None


def statuses_of(events: list[dict]) -> tuple[set[int], set[int]]:
    """The HTTP and the gRPC statuses that a connection's events, or its index rows
    (their `statuses` and `grpc_statuses` lists too), name."""
    http: set[int] = set()
    grpc: set[int] = set()
    for event in events:
        found = _status_of(event)
        if found:
            (grpc if found[0] == "grpc" else http).add(found[1])
        for name, into, lo, hi in (("statuses", http, MIN_CODE, MAX_CODE),
                                   ("grpc_statuses", grpc, 0, GRPC_MAX)):
            values = event.get(name)
            if isinstance(values, list):
                into.update(v for v in values if isinstance(v, int)
                            and not isinstance(v, bool) and lo <= v <= hi)
    return http, grpc


def add_statuses(record: dict, events: list[dict]) -> dict:
    """An index row with the statuses of its connection's error events, where the capture
    read none (h2c, gRPC): see the module's docstring. A row whose status line the
    capture read keeps it; its `proto` is then h1."""
    errors = [(e, found) for e in events if (found := _status_of(e))]
    if not errors:
        return record
    first, (kind, code) = errors[0]
    if record.get("status") is None:
        record["status"] = code
        record["proto"] = first.get("proto")
        if kind == "grpc":
            record["grpc_status"] = grpc_name(code)
    if not record.get("statuses"):
        record["statuses"] = [c for _, (k, c) in errors if k == "http"]
    record["grpc_statuses"] = [c for _, (k, c) in errors if k == "grpc"]
    return record


class EventJoin:
    """The events of the controller's events file by Community ID."""

    def __init__(self, path: str):
        self.path = path
        self.by_id: collections.OrderedDict[str, list[dict]] = collections.OrderedDict()
        self.events = 0
        self.skipped = 0
        rotated = open_if_there(path + ".1")
        if rotated is not None:
            with rotated:
                self._add(EventLines(rotated).read())
        self.follower = FileFollower(path)
        self.refresh()                  # what the file holds now; appended lines later

    def refresh(self) -> None:
        """Reads what the controller appended since the last call."""
        self._add(self.follower.poll())

    def _add(self, lines) -> None:
        for raw in lines:
            try:
                event = json.loads(raw)
            except ValueError:
                event = None
            cid = event.get("community_id") if isinstance(event, dict) else None
            if not isinstance(cid, str):
                self.skipped += 1
                continue
            self.by_id.setdefault(cid, []).append(event)
            self.by_id.move_to_end(cid)
            self.events += 1
            while len(self.by_id) > MAX_CONNECTIONS:
                self.by_id.popitem(last=False)

    def of(self, community_id: str | None) -> list[dict]:
        return self.by_id.get(community_id, []) if community_id else []

    def enrich(self, record: dict) -> dict:
        """An index row with the interface and workload of its connection's latest event
        whose workload was known (fields already set are kept), and the statuses of its
        error events where the capture read none (add_statuses)."""
        events = self.of(record.get("community_id"))
        for event in reversed(events):
            seen = where_seen(event)
            if seen:
                for k, v in seen.items():
                    if record.get(k) is None:
                        record[k] = v
                break
        return add_statuses(record, events)

    def close(self) -> None:
        self.follower.close()
