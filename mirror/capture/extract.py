"""`mirror capture --extract`: the packets of the connections of the sidecar's ring that
match (a Community ID, statuses, a time window, a workload: all the criteria given) into
one pcapng file, each request before its response, annotated like a recording
(mirror.capture.annotate) with what the index says of each connection.

Two passes over the ring's files, oldest first, one file in memory at a time: the first
sums up every connection (its Community ID, the HTTP/1.x statuses its server sent, its
first and last packet time), the second writes the packets of those that match, through
the reorder's Holder (size-bounded, no time bound), so that a request still after its
response (in the file tcpdump is writing, not yet reordered, or in the next ring file)
is put before it. A file the ring overwrites between the passes gives what it holds by
then.

Selector.extra holds further criteria, predicates on a connection's Summary that must
all hold: the workload (--namespace/--pod/--container, mirror.filters.WorkloadPatterns),
matched on what is known of the connection's interface and workload: its index rows
(named when the sidecar joined the controller's events file) and, with --events-file,
the controller's events of its Community ID (mirror.capture.eventjoin).

Statuses (--status, the trigger's syntax: 5xx, grpc:14) match what the ring's HTTP/1.x
status lines say and what is known of the connection as for the workload: the statuses
of its controller's events, or of its index rows (which the sidecar took from those
events). An h2c :status and a gRPC grpc-status are HPACK-coded, which the capture does
not follow: those connections are selected by status only through the events."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..communityid import of_flow
from ..errors import UsageError
from ..filters import Statuses, WorkloadPatterns, check_community_id, time_window
from ..flowkey import FlowKey, key_of
from ..http1 import status_line
from .annotate import AnnotatedWriter, open_output
from .eventjoin import EventJoin, statuses_of, where_seen
from .flow import Packet
from .index import CorruptIndex, read_index
from .pcap import read_file, timestamp_ns
from .reorder import Frame, Holder
from .ring import list_pcaps
from .sidecar import INDEX_NAME, STATUS_NAME

log = logging.getLogger("mirror")


@dataclass
class Summary:
    """A connection of the ring, as the first pass saw it."""
    key: FlowKey
    community_id: str
    statuses: set = field(default_factory=set)         # HTTP codes
    grpc_statuses: set = field(default_factory=set)
    first_ts: float = math.inf
    last_ts: float = -math.inf


@dataclass(frozen=True)
class Selector:
    community_id: str | None = None
    statuses: Statuses | None = None
    since: float | None = None
    until: float | None = None
    extra: tuple[Callable[[Summary], bool], ...] = ()

    def matches(self, s: Summary) -> bool:
        return ((self.community_id is None or s.community_id == self.community_id)
                and (self.statuses is None or bool(s.statuses & self.statuses.http)
                     or bool(s.grpc_statuses & self.statuses.grpc))
                and (self.since is None or s.last_ts >= self.since)
                and (self.until is None or s.first_ts <= self.until)
                and all(check(s) for check in self.extra))


def selector_of(community_id, status, since, until) -> Selector:
    lo, hi = time_window(since, until)
    return Selector(community_id=check_community_id(community_id) if community_id else None,
                    statuses=Statuses.parse(status) if status is not None else None,
                    since=lo, until=hi)


def summarise(files) -> dict[FlowKey, Summary]:
    """The first pass: every connection of the ring's files."""
    out: dict[FlowKey, Summary] = {}
    for f in files:
        for packet in _packets(f.path):
            s = out.get(packet.key)
            if s is None:
                s = out[packet.key] = Summary(packet.key, of_flow(packet.key))
            s.first_ts = min(s.first_ts, packet.ts)
            s.last_ts = max(s.last_ts, packet.ts)
            if packet.payload and status_line(packet.payload):
                s.statuses.add(int(packet.payload[9:12]))
    return out


def _packets(path):
    try:
        contents = read_file(path)
    except FileNotFoundError:
        return                          # overwritten or pruned meanwhile
    except (OSError, ValueError) as exc:
        log.warning("extract: cannot read %s: %s", path.name, exc)
        return
    for rec in contents.records:
        packet = Packet.decode(contents.header.linktype, contents.header.timestamp(rec),
                               rec.frame)
        if packet is not None:
            yield packet


def index_events(directory: Path) -> dict[FlowKey, list[dict]]:
    """What the index says of each connection, as event-like dicts for the comments."""
    try:
        records = read_index(directory / INDEX_NAME)
    except (CorruptIndex, OSError) as exc:
        log.warning("extract: the index is not read (%s): no request names in the comments",
                    exc)
        return {}
    out: dict[FlowKey, list[dict]] = {}
    for r in records:
        try:
            key = key_of(r["client"], r["server"])
        except ValueError:
            continue
        out.setdefault(key, []).append({"status": r.get("status"), "proto": r.get("proto"),
                                        "statuses": r.get("statuses"),
                                        "grpc_statuses": r.get("grpc_statuses"),
                                        "method": r.get("method"),
                                        "target": r.get("target"), "host": r.get("host"),
                                        "time": r.get("time"), **where_seen(r)})
    return out


def extract_command(directory: Path, out_path: str, community_id, status, since,
                    until, workload: WorkloadPatterns = WorkloadPatterns(),
                    events_file: str | None = None) -> int:
    selector = selector_of(community_id, status, since, until)
    if not directory.is_dir():
        raise UsageError(f"no capture directory {directory} (--dir)")
    joined = None
    if events_file:
        try:
            joined = EventJoin(events_file)
        except OSError as exc:
            raise UsageError(f"--events-file {events_file}: {exc.strerror}") from None
    indexed = index_events(directory)

    def events_of(key: FlowKey) -> list[dict]:
        """The controller's events of the connection when known (they carry its
        protocol), else what the index says of it."""
        return (joined.of(of_flow(key)) if joined else []) or indexed.get(key, [])

    if workload:
        selector = dataclasses.replace(selector, extra=(
            lambda s: any(workload.matches(e, e.get("iface")) for e in events_of(s.key)),))
    files = list_pcaps(directory)
    summaries = summarise(files)
    if selector.statuses is not None:
        for s in summaries.values():
            http, grpc = statuses_of(events_of(s.key))
            s.statuses |= http
            s.grpc_statuses |= grpc
    keys = {k for k, s in summaries.items() if selector.matches(s)}
    if not keys:
        named = any(where_seen(e) for k in summaries for e in events_of(k))
        log.error("extract: no connection of the %d in %s matches; nothing written%s",
                  len(summaries), directory,
                  "" if not workload or named else
                  " (no connection's workload is known: run the sidecar with the "
                  "controller's --events-file, or give it here)")
        return 1
    out = open_output(out_path)
    holder = Holder(hold=math.inf)
    writer: AnnotatedWriter | None = None
    debug = _debug_iface(directory)
    try:
        for f in files:
            try:
                contents = read_file(f.path)
            except (OSError, ValueError):
                continue
            header = contents.header
            if writer is None:
                writer = AnnotatedWriter(out, debug, header.linktype, events_of)
            elif header.linktype != writer.linktype:
                log.warning("extract: %s has another link type; left out", f.name)
                continue
            for rec in contents.records:
                packet = Packet.decode(header.linktype, header.timestamp(rec), rec.frame)
                if packet is None or packet.key not in keys:
                    continue
                holder.add(Frame(timestamp_ns(header, rec), bytes(rec.frame), rec.orig_len,
                                 header.linktype, packet=packet))
                for frame in holder.due(0.0):
                    writer.write(frame)
        for frame in holder.due(0.0, everything=True):
            writer.write(frame)
    finally:
        try:
            out.close()
        except BrokenPipeError:
            pass
    log.info("extract: %d connections, %d packets into %s (%d requests moved before their "
             "responses)", len(keys), writer.frames if writer else 0,
             "standard output" if out_path == "-" else out_path, holder.moved)
    return 0


def _debug_iface(directory: Path) -> str:
    """The interface the ring recorded, as its status.json says."""
    try:
        name = json.loads((directory / STATUS_NAME).read_text()).get("iface")
    except (OSError, ValueError, AttributeError):
        name = None
    return name if isinstance(name, str) else "debug interface"
