"""The controller's events file, joined to the capture by Community ID: what the capture
sidecar knows of a connection only the controller saw, its interface and its workload.

The sidecar records the debug interface, where every connection arrives through one
interface; which monitored interface (and so which pod) it came from is in the
controller's error events. When the sidecar can read the controller's events file
(`mirror capture --events-file PATH`: a volume both containers mount, or one host), it
follows it (mirror.events.tail.FileFollower: across its rotations) and gives each index
row and extract the interface and workload attributes of the connection's events,
matched by `community_id`. Without the file, or for a connection whose event is not in
it, the row's `iface` stays null and it names no workload: the sidecar works the same.

Bounded: the events of the last MAX_CONNECTIONS connections are kept."""
from __future__ import annotations

import collections
import json

from ..events.tail import EventLines, FileFollower, open_if_there
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
        whose workload was known (fields already set are kept)."""
        for event in reversed(self.of(record.get("community_id"))):
            seen = where_seen(event)
            if seen:
                for k, v in seen.items():
                    if record.get(k) is None:
                        record[k] = v
                break
        return record

    def close(self) -> None:
        self.follower.close()
