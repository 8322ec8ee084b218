"""The capture index: what the capture sidecar recorded, one JSON line per error flow.

The sidecar hands the pcap files tcpdump writes to an Indexer, which reads them
incrementally (mirror.capture.pcap: a Cursor remembers where each file's last read
stopped, and which generation of a ring file it was) and accumulates each connection's
packets into a mirror.capture.flow.Flow: first and last packet time, packets, bytes, the
HTTP status codes and request lines seen, and the files holding the connection. A
connection is written to the index (appended, one JSON object per line) once it is over:
closed by FIN from both sides or by a RST and nothing new of it read for
`linger_seconds` (so that the last ACK joins it), idle for `idle_seconds`, or when the
sidecar stops.

Only what the mirror sent is in the pcaps: packets from the error response on, and the
request that got that response, which the controller writes onto the debug interface
after the response (the kernel's snapshot of its first bytes, perhaps cut). Each record
names that request and its response: `method`, `target`, `host` (null when absent),
`status` (of the connection's first response: behind the mirror, the one that
triggered), `response_seconds`; the pairing is by acknowledgement number
(mirror.capture.request), so it holds whatever the order of the frames in the files and
across two files. `response_seconds` is the response's capture time less the request's, and
null when no request was captured or when the request's capture time is not its send
time (see Flow.error_request): behind the mirror that is the rule, since the request
frame is written after the response; the time the server took is in the controller's
error events. `requests` lists the other request lines: those sent after the trigger on
the same keep-alive connection.

Rewritten files: the sidecar reorders a file once tcpdump has closed it
(mirror.capture.reorder), only after reading it to its end here; the rewrite keeps the
records (their order and one timestamp change) and the size, and the sidecar then sets
the file's cursor to the new file's signature and first record, so the file is not read
again: no packet is counted twice and no flow indexed twice, and what the index holds is
what the file held before the reorder.

`statuses` are HTTP status codes, `grpc_statuses` gRPC ones; `proto` says which protocol
carried `status` (h1, h2, grpc), null when nothing says: an h2c or gRPC connection's come
from the controller's events (mirror.capture.eventjoin), where the sidecar reads them.

Status and request lines are read by sequence number, as a retransmission or reordering
cannot fool (mirror.capture.flow); packets and bytes count every captured frame. Each
record carries the connection's `community_id` (mirror.communityid), the string that
joins it with the controller's events and with other tools' logs.

Bounds, whatever the traffic:
- memory: at most `max_open` open flows (a new one past that writes out the least
  recently read one, `end` "evicted": `flows_evicted`), each within mirror.capture.flow's
  Limits (`segments_dropped`, `segments_cut`, per record and in total);
- a record: at most MAX_REQUESTS request lines (`requests_dropped`), each at most
  MAX_LINE bytes, and a target and a host of at most MAX_LINE: a few tens of KB;
- disk: with `max_bytes`, index.jsonl is renamed index.jsonl.1 (replacing the one
  before) when the next record would take it past `max_bytes`, so that the two together
  never hold more than 2 x max_bytes (`rotations`). read_index reads both, older first.

Corrupt input: read_index raises CorruptIndex for a line that is not a record (a torn last
line, a crash mid-write, is skipped), so that a reader says so instead of showing nothing."""
from __future__ import annotations

import collections
import errno
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..communityid import of_flow
from ..connection import time_fields
from ..flowkey import FlowKey, endpoint
from .flow import MAX_LINE, Flow, Limits, Packet
from .pcap import Cursor, read_new

MAX_REQUESTS = 16           # request lines listed in one record
MAX_OPEN_FLOWS = 1024
ROTATED_SUFFIX = ".1"


def index_record(flow: Flow, reason: str) -> dict:
    """A finished flow's line in the index; `reason` says how it ended."""
    client, server = flow.endpoints()
    error = flow.error_request(client, server)
    paired = error.pop("request_seq")
    for name in ("target", "host"):
        if error[name] is not None:
            error[name] = error[name][:MAX_LINE]
    statuses, requests = [], []
    if server in flow.dirs:
        statuses = flow.dirs[server].statuses()
    if client in flow.dirs:
        skip = frozenset() if paired is None else frozenset([paired])
        requests = flow.dirs[client].request_lines(skip)
    ms = error.pop("response_ms")
    return {
        # The connection vocabulary of mirror.connection: the same names as the events
        # and `mirror flows`. The capture does not know the interface: the controller's
        # events file, when the sidecar reads it, does (Indexer.enrich).
        **time_fields(flow.first_ts), "last_unix": round(flow.last_ts, 6),
        "client": endpoint(*client), "server": endpoint(*server), "iface": None,
        "community_id": of_flow(flow.key), "family": flow.key.family,
        **error, "response_seconds": None if ms is None else round(ms / 1000, 6),
        # What the capture reads is HTTP/1.x; an h2c or gRPC connection's protocol and
        # statuses come from the controller's events, when joined (eventjoin.add_statuses).
        "proto": "h1" if error["status"] is not None or statuses else None,
        "packets": flow.packet_count, "bytes": flow.bytes,
        "retransmissions": flow.retransmissions,
        "statuses": statuses, "grpc_statuses": [], "requests": requests[:MAX_REQUESTS],
        "requests_dropped": max(0, len(requests) - MAX_REQUESTS),
        "segments_dropped": flow.segments_dropped, "segments_cut": flow.segments_cut,
        "files": list(flow.files), "end": reason,
    }


@dataclass
class FileStats:
    packets: int = 0
    tcp: int = 0
    skipped: int = 0        # not Ethernet/SLL + IP + TCP
    partial: bool = False   # ends in an incomplete record (being written, or cut short)
    new_generation: bool = False    # the file was rewritten since the cursor was taken


class Indexer:
    """Accumulates flows from pcap files, read whole or incrementally, and appends the
    finished ones to the index."""

    def __init__(self, index_path: str | os.PathLike, idle_seconds: float = 60.0,
                 linger_seconds: float = 2.0, max_bytes: int | None = None,
                 max_open: int = MAX_OPEN_FLOWS, limits: Limits = Limits(),
                 enrich: Callable[[dict], dict] | None = None):
        """`enrich(record)`: what else is known of a connection, added to its record
        before it is written (the interface and workload from the controller's events:
        mirror.capture.eventjoin)."""
        self.index_path = Path(index_path)
        self.enrich = enrich
        self.idle_seconds = idle_seconds
        self.linger_seconds = linger_seconds
        self.max_bytes = max_bytes
        self.max_open = max_open
        self.limits = limits
        # Least recently read first: the one a new flow evicts when max_open are open.
        self.flows: collections.OrderedDict[FlowKey, Flow] = collections.OrderedDict()
        self.reads = 0
        self.flows_written = 0
        self.packets_indexed = 0
        self.flows_evicted = 0
        self.rotations = 0
        self.segments_dropped = 0       # of the flows written (and the open ones: dropped())
        self.segments_cut = 0
        self.requests_dropped = 0

    def add_file(self, path: str | os.PathLike) -> FileStats:
        """Reads a whole pcap file into the open flows."""
        return self.read(path, Cursor())

    def read(self, path: str | os.PathLike, cursor: Cursor) -> FileStats:
        """Reads the records of `path` after `cursor` (updated in place)."""
        path = str(path)
        fname = os.path.basename(path)
        stats = FileStats()
        self.reads += 1
        with open(path, "rb") as f:
            new = read_new(f, cursor)
        stats.partial, stats.new_generation = new.partial, new.new_generation
        for rec in new.records:
            stats.packets += 1
            packet = Packet.decode(new.header.linktype, new.header.timestamp(rec), rec.frame)
            if packet is None:
                stats.skipped += 1
                continue
            stats.tcp += 1
            flow = self.flows.get(packet.key)
            if flow is None:
                if len(self.flows) >= self.max_open:
                    self._evict()
                flow = self.flows[packet.key] = Flow(packet.key, limits=self.limits)
            else:
                self.flows.move_to_end(packet.key)
            flow.add(packet, fname)
        self.packets_indexed += stats.packets
        return stats

    def _evict(self) -> None:
        """Writes out the least recently read open flow, to make room for a new one."""
        _, flow = self.flows.popitem(last=False)
        self.flows_evicted += 1
        self._write([index_record(flow, "evicted")])

    @property
    def payload_kept(self) -> int:
        """Payload bytes the open flows hold."""
        return sum(f.payload_kept for f in self.flows.values())

    def take_done(self, final: bool = False, now: float | None = None) -> list[dict]:
        """Removes and returns the records of the flows that are over: closed by FIN/FIN
        or RST and nothing new read for `linger_seconds` (the last ACK joins), idle for
        `idle_seconds`, or all of them if `final`."""
        now = time.time() if now is None else now
        done = []
        for key, flow in list(self.flows.items()):
            quiet = now - flow.last_update
            if final:
                reason = ("rst" if flow.rst else "fin") if flow.finished else "stop"
            elif flow.finished and quiet >= self.linger_seconds:
                reason = "rst" if flow.rst else "fin"
            elif quiet > self.idle_seconds:
                reason = "idle"
            else:
                continue
            done.append(index_record(flow, reason))
            del self.flows[key]
        done.sort(key=lambda r: r["time_unix"])
        return done

    def flush(self, final: bool = False, now: float | None = None) -> int:
        """Appends the finished flows to the index file; returns how many."""
        records = self.take_done(final, now)
        self._write(records)
        return len(records)

    def _write(self, records: list[dict]) -> None:
        """Appends records to the index, rotating it first when one would take it past
        max_bytes. O_NOFOLLOW: the index is never written through a symbolic link."""
        if not records:
            return
        if self.enrich is not None:
            records = [self.enrich(r) for r in records]
        lines = [(json.dumps(r, sort_keys=True) + "\n").encode() for r in records]
        fd = _open_index(self.index_path)
        try:
            size = os.fstat(fd).st_size
            for line, record in zip(lines, records):
                if self.max_bytes is not None and size and size + len(line) > self.max_bytes:
                    os.fsync(fd)
                    os.close(fd)
                    fd = -1
                    os.replace(self.index_path, rotated(self.index_path))
                    self.rotations += 1
                    fd = _open_index(self.index_path)
                    size = 0
                os.write(fd, line)
                size += len(line)
                self.flows_written += 1
                self.segments_dropped += record["segments_dropped"]
                self.segments_cut += record["segments_cut"]
                self.requests_dropped += record["requests_dropped"]
            os.fsync(fd)
        finally:
            if fd >= 0:
                os.close(fd)


def _open_index(path: Path) -> int:
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                       | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(exc.errno, f"{path} is a symbolic link; not written") from None
        raise


def rotated(path: str | os.PathLike) -> Path:
    """Where the index's previous generation is kept."""
    path = Path(path)
    return path.with_name(path.name + ROTATED_SUFFIX)


class CorruptIndex(ValueError):
    """A line of an index file is not a record the sidecar writes."""


# The fields a reader of the index relies on, with their types (others are optional or
# newer than some records: a record without them still reads).
REQUIRED = {"client": str, "server": str, "time": str, "time_unix": (int, float),
            "packets": int, "bytes": int}
OPTIONAL = {"files": list, "statuses": list, "requests": list, "method": (str, type(None)),
            "target": (str, type(None)), "host": (str, type(None)),
            "status": (int, type(None)), "response_seconds": (int, float, type(None)),
            "community_id": str, "end": str, "proto": (str, type(None)),
            "grpc_statuses": list}


def check_record(record, where: str) -> dict:
    """The record if it has the shape the sidecar writes; CorruptIndex otherwise."""
    if not isinstance(record, dict):
        raise CorruptIndex(f"{where}: not a JSON object")
    for name, kind in REQUIRED.items():
        if not isinstance(record.get(name), kind) or isinstance(record.get(name), bool):
            raise CorruptIndex(f"{where}: field {name!r} missing or of the wrong type")
    for name, kind in OPTIONAL.items():
        if name in record and (not isinstance(record[name], kind)
                               or isinstance(record[name], bool)):
            raise CorruptIndex(f"{where}: field {name!r} of the wrong type")
    for name, kind in (("files", str), ("statuses", int), ("grpc_statuses", int),
                       ("requests", str)):
        if not all(isinstance(v, kind) and not isinstance(v, bool)
                   for v in record.get(name, [])):
            raise CorruptIndex(f"{where}: field {name!r} holds a value of the wrong type")
    return record


def read_index(path: str | os.PathLike) -> list[dict]:
    """The records of an index (its previous generation, index.jsonl.1, first); none when
    there is no index. A torn last line (a crash mid-write) is skipped; any other line
    that is not a record raises CorruptIndex."""
    out = []
    for p in (rotated(path), Path(path)):
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            continue
        # What follows the last newline is a torn line, or nothing.
        for number, line in enumerate(data.split(b"\n")[:-1], 1):
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                raise CorruptIndex(f"{p} line {number}: not JSON") from None
            out.append(check_record(record, f"{p} line {number}"))
    return out
