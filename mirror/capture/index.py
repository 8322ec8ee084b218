"""The capture index: what the capture sidecar recorded, one JSON line per error flow.

The sidecar hands the pcap files tcpdump writes to an Indexer, which reads them with
dpkt, incrementally (a Cursor remembers where each file's last read stopped, and which
generation of a ring file it was), and accumulates per-connection facts: first and last
packet time, packets, bytes, the HTTP status codes and request lines seen, and the files
holding the connection. A connection is written to the index (appended, one JSON object
per line) once it is over: closed by FIN from both sides or by a RST and nothing new of
it read for `linger_seconds` (so that the last ACK joins it), idle for `idle_seconds`, or
when the sidecar stops.

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

TCP is read the way a retransmission or reordering cannot fool: status and request lines
are taken from segment starts deduplicated by sequence number and ordered by sequence
number (32-bit wrap-around aware), not by capture order; packets and bytes count every
captured frame, retransmissions included."""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import dpkt

from ..flowkey import FlowKey
from ..http1 import METHODS, is_request_line, status_line
from .request import answered, parse_request

log = logging.getLogger("mirror")

MAX_LINE = 8192


def _seq_order(seqs, base: int) -> list[int]:
    """Sequence numbers sorted by their distance from `base`, modulo 2**32."""
    def rel(s):
        d = (s - base) & 0xFFFFFFFF
        return d - (1 << 32) if d >= 1 << 31 else d
    return sorted(seqs, key=rel)


@dataclass
class Direction:
    """One direction of a connection: its data segments by sequence number, and when
    each was first captured with which acknowledgement number."""
    segments: dict[int, bytes] = field(default_factory=dict)
    first_seen: dict[int, tuple[float, int]] = field(default_factory=dict)
    first_seq: int | None = None

    def add(self, seq: int, payload: bytes, ts: float = 0.0, ack: int = 0) -> bool:
        """Stores a data segment; False if that sequence number was already seen (a
        retransmission; the longer copy is kept)."""
        if self.first_seq is None:
            self.first_seq = seq
        old = self.segments.get(seq)
        if old is None or len(payload) > len(old):
            self.segments[seq] = payload
        self.first_seen.setdefault(seq, (ts, ack))
        return old is None

    def ordered(self) -> list[tuple[int, bytes]]:
        if self.first_seq is None:
            return []
        return [(s, self.segments[s]) for s in _seq_order(self.segments, self.first_seq)]

    def statuses(self) -> list[int]:
        return [int(p[9:12]) for _, p in self.ordered() if status_line(p)]

    def first_response(self) -> tuple[int, bytes] | None:
        """The first status-line segment in sequence order: behind the mirror, the
        response that made it clone the connection."""
        return next(((s, p) for s, p in self.ordered() if status_line(p)), None)

    def request_starts(self) -> list[tuple[int, bytes]]:
        return [(s, p) for s, p in self.ordered() if parse_request(p) is not None]

    def request_lines(self, skip: frozenset[int] = frozenset()) -> list[str]:
        """Request lines starting a segment (but those at the `skip` sequence numbers),
        completed from the following contiguous segments when a line is split across
        segments."""
        segs = self.ordered()
        out = []
        for i, (seq, payload) in enumerate(segs):
            if payload.split(b" ", 1)[0] not in METHODS or seq in skip:
                continue
            line, end = payload, (seq + len(payload)) & 0xFFFFFFFF
            for nseq, npayload in segs[i + 1:]:
                if b"\r\n" in line or len(line) > MAX_LINE or nseq != end:
                    break
                line += npayload
                end = (nseq + len(npayload)) & 0xFFFFFFFF
            line = line.split(b"\r\n", 1)[0]
            if is_request_line(line[:MAX_LINE]):
                out.append(line.decode("latin-1"))
        return out


@dataclass
class Flow:
    key: FlowKey
    first_ts: float
    last_ts: float
    packets: int = 0
    bytes: int = 0
    retransmissions: int = 0
    files: list[str] = field(default_factory=list)
    dirs: dict[tuple[str, int], Direction] = field(default_factory=dict)
    fin_from: set = field(default_factory=set)
    rst: bool = False
    last_update: float = field(default_factory=time.time)

    def add(self, ts: float, length: int, src: tuple[str, int], tcp: dpkt.tcp.TCP,
            fname: str) -> None:
        self.first_ts = min(self.first_ts, ts)
        self.last_ts = max(self.last_ts, ts)
        self.packets += 1
        self.bytes += length
        if fname not in self.files:
            self.files.append(fname)
        d = self.dirs.setdefault(src, Direction())
        if tcp.data and not d.add(tcp.seq, bytes(tcp.data), ts, tcp.ack):
            self.retransmissions += 1
        if tcp.flags & dpkt.tcp.TH_FIN:
            self.fin_from.add(src)
        if tcp.flags & dpkt.tcp.TH_RST:
            self.rst = True
        self.last_update = time.time()

    @property
    def finished(self) -> bool:
        return self.rst or len(self.fin_from) >= 2

    def endpoints(self) -> tuple[tuple[str, int], tuple[str, int]]:
        """(client, server): the server sends status lines, the client request lines;
        failing both, the lower port is taken for the server."""
        lo = (self.key.addr_lo, self.key.port_lo)
        hi = (self.key.addr_hi, self.key.port_hi)
        for ep, d in self.dirs.items():
            if d.statuses():
                return (hi if ep == lo else lo), ep
        for ep, d in self.dirs.items():
            if d.request_lines():
                return ep, (hi if ep == lo else lo)
        return (lo, hi) if lo[1] > hi[1] else (hi, lo)

    def error_request(self, client, server) -> dict:
        """The first response (the error: the capture starts at it) and the request it
        answered, paired by acknowledgement number (mirror.capture.request), wherever
        the capture put the request. response_ms is None when no request was captured,
        and also when the request's capture time is not when it was sent: captured
        after its response (the controller writes the request's snapshot after the
        kernel cloned the response) or exactly 1 us before it (where the sidecar's
        reorder put it)."""
        out = {"method": None, "target": None, "host": None, "status": None,
               "response_ms": None, "request_seq": None}
        srv, cli = self.dirs.get(server), self.dirs.get(client)
        first = srv.first_response() if srv else None
        if first is None:
            return out
        resp_ts, ack = srv.first_seen[first[0]]
        out["status"] = int(first[1][9:12])
        pair = answered(cli.request_starts(), ack) if cli else None
        if pair is None:
            return out
        head = parse_request(pair[1])
        req_ts = cli.first_seen[pair[0]][0]
        if round((resp_ts - req_ts) * 1e6) > 1:
            out["response_ms"] = round((resp_ts - req_ts) * 1000, 3)
        out.update(method=head.method, target=head.target, host=head.host,
                   request_seq=pair[0])
        return out

    def record(self, reason: str) -> dict:
        client, server = self.endpoints()
        error = self.error_request(client, server)
        paired = error.pop("request_seq")
        statuses, requests = [], []
        if server in self.dirs:
            statuses = self.dirs[server].statuses()
        if client in self.dirs:
            skip = frozenset() if paired is None else frozenset([paired])
            requests = self.dirs[client].request_lines(skip)
        return {**error,
            "family": self.key.family,
            "client": client[0], "client_port": client[1],
            "server": server[0], "server_port": server[1],
            "first": round(self.first_ts, 6), "last": round(self.last_ts, 6),
            "first_utc": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.first_ts))
            + f".{int(self.first_ts * 1e6) % 1000000:06d}Z",
            "packets": self.packets, "bytes": self.bytes,
            "retransmissions": self.retransmissions,
            "statuses": statuses, "requests": requests,
            "files": list(self.files), "end": reason,
        }


@dataclass
class FileStats:
    packets: int = 0
    tcp: int = 0
    skipped: int = 0        # not Ethernet/SLL + IP + TCP
    partial: bool = False   # ends in an incomplete record (being written, or cut short)
    new_generation: bool = False    # the file was rewritten since the cursor was taken


@dataclass
class Cursor:
    """How far a pcap file has been read: `first` identifies the file's generation (the
    header of its first record: a ring file rewritten by tcpdump starts with another
    packet), `offset` is where the next unread record starts."""
    first: str = ""
    offset: int = 0

    def to_json(self) -> dict:
        return {"first": self.first, "offset": self.offset}

    @classmethod
    def from_json(cls, data: dict) -> "Cursor":
        return cls(str(data.get("first", "")), int(data.get("offset", 0)))


FILE_HDR = 24
REC_HDR = 16
MAGICS = {0xA1B2C3D4: ("<", 1e-6), 0xA1B23C4D: ("<", 1e-9),
           0xD4C3B2A1: (">", 1e-6), 0x4D3CB2A1: (">", 1e-9)}


def ntoa(raw: bytes) -> str:
    return str(ipaddress.ip_address(raw))


def decode_tcp(link: int, buf: bytes):
    """(ip, tcp) of a frame decoded with dpkt, or None when it is not IP + TCP."""
    try:
        if link == dpkt.pcap.DLT_LINUX_SLL:
            ip = dpkt.sll.SLL(buf).data
        else:
            ip = dpkt.ethernet.Ethernet(buf).data     # VLAN tags are skipped by dpkt
    except (dpkt.NeedData, dpkt.UnpackError):
        return None
    tcp = getattr(ip, "data", None)
    if isinstance(ip, (dpkt.ip.IP, dpkt.ip6.IP6)) and isinstance(tcp, dpkt.tcp.TCP):
        return ip, tcp
    return None


def read_tcp(f, cursor: Cursor | None, stats: FileStats):
    """Yields (ts, frame length, ip, tcp) for the TCP packets of an open pcap file from
    `cursor` on (the whole file when None or of another generation), stopping at an
    incomplete record; the cursor is updated in place as records are consumed.
    Frames are decoded by dpkt: Ethernet or Linux cooked, IPv4 or IPv6 (dpkt walks the
    extension headers). Records are framed here, so a file can be read while tcpdump
    is still appending to it (-U writes whole records) and resumed at an offset."""
    head = f.read(FILE_HDR)
    if len(head) < FILE_HDR:
        stats.partial = True
        return
    magic = struct.unpack("<I", head[:4])[0]
    if magic not in MAGICS:
        raise ValueError(f"not a pcap file (magic {magic:#x})")
    endian, unit = MAGICS[magic]
    link = struct.unpack(endian + "I", head[20:24])[0]
    first = f.read(REC_HDR).hex()
    if cursor.first != first or cursor.offset < FILE_HDR:
        stats.new_generation = bool(cursor.first) and cursor.first != first
        cursor.first, cursor.offset = first, FILE_HDR
    f.seek(cursor.offset)
    rec = struct.Struct(endian + "IIII")
    while True:
        hdr = f.read(REC_HDR)
        if len(hdr) < REC_HDR:
            stats.partial = bool(hdr)
            return
        sec, frac, caplen, _origlen = rec.unpack(hdr)
        buf = f.read(caplen)
        if len(buf) < caplen:
            stats.partial = True
            return
        cursor.offset += REC_HDR + caplen
        stats.packets += 1
        decoded = decode_tcp(link, buf)
        if decoded is None:
            stats.skipped += 1
            continue
        stats.tcp += 1
        yield sec + frac * unit, len(buf), decoded[0], decoded[1]


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
            for ts, length, ip, tcp in read_tcp(f, cursor, stats):
                src, dst = ntoa(ip.src), ntoa(ip.dst)
                key = FlowKey.from_endpoints(src, tcp.sport, dst, tcp.dport)
                flow = self.flows.get(key)
                if flow is None:
                    flow = self.flows[key] = Flow(key, ts, ts)
                flow.add(ts, length, (src, tcp.sport), tcp, fname)
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
            done.append(flow.record(reason))
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
