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
triggered), `response_ms`; the pairing is by acknowledgement number
(mirror.capture.request), so it holds whatever the order of the frames in the files and
across two files. `response_ms` is the response's capture time less the request's, and
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

Status and request lines are read by sequence number, as a retransmission or reordering
cannot fool (mirror.capture.flow); packets and bytes count every captured frame."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..flowkey import FlowKey
from .flow import Flow, Packet
from .pcap import Cursor, read_new


def index_record(flow: Flow, reason: str) -> dict:
    """A finished flow's line in the index; `reason` says how it ended."""
    client, server = flow.endpoints()
    error = flow.error_request(client, server)
    paired = error.pop("request_seq")
    statuses, requests = [], []
    if server in flow.dirs:
        statuses = flow.dirs[server].statuses()
    if client in flow.dirs:
        skip = frozenset() if paired is None else frozenset([paired])
        requests = flow.dirs[client].request_lines(skip)
    return {**error,
        "family": flow.key.family,
        "client": client[0], "client_port": client[1],
        "server": server[0], "server_port": server[1],
        "first": round(flow.first_ts, 6), "last": round(flow.last_ts, 6),
        "first_utc": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(flow.first_ts))
        + f".{int(flow.first_ts * 1e6) % 1000000:06d}Z",
        "packets": flow.packet_count, "bytes": flow.bytes,
        "retransmissions": flow.retransmissions,
        "statuses": statuses, "requests": requests,
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
                 linger_seconds: float = 2.0):
        self.index_path = Path(index_path)
        self.idle_seconds = idle_seconds
        self.linger_seconds = linger_seconds
        self.flows: dict[FlowKey, Flow] = {}
        self.reads = 0
        self.flows_written = 0
        self.packets_indexed = 0

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
                flow = self.flows[packet.key] = Flow(packet.key)
            flow.add(packet, fname)
        self.packets_indexed += stats.packets
        return stats

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
        done.sort(key=lambda r: r["first"])
        return done

    def flush(self, final: bool = False, now: float | None = None) -> int:
        """Appends the finished flows to the index file; returns how many."""
        records = self.take_done(final, now)
        if records:
            fd = os.open(self.index_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "a") as f:
                for r in records:
                    f.write(json.dumps(r, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self.flows_written += len(records)
        return len(records)


def read_index(path: str | os.PathLike) -> list[dict]:
    """The records of an index file; a torn last line (a crash mid-write) is skipped."""
    out = []
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
