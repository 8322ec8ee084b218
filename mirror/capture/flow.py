"""A TCP connection as the capture sees it: the packets its frames hold, and what is read
from them (the index, the reorder, the demo, the bench and the tests all use these).

Packet: the TCP facts of one captured frame, decoded by dpkt (Ethernet or Linux cooked,
IPv4 or IPv6: dpkt skips VLAN tags and walks IPv6 extension headers). Flow: a
connection's packets accumulated: first and last packet time, packets, bytes, the files
holding it, FIN and RST, and each direction's data segments by sequence number. The
index keeps no more than that (a flow may stay open for a minute, the packets' headers
would be most of its memory); a whole-file read (read_flows) also keeps every packet, in
capture order, for whoever compares captures packet by packet.

TCP is read the way a retransmission or reordering cannot fool: status and request lines
are taken from segment starts deduplicated by sequence number and ordered by sequence
number (32-bit wrap-around aware), not by capture order; packets and bytes count every
captured frame, retransmissions included.

Bounded memory (the index's flows, `Limits`): a connection may stay open for a minute and
a peer may send anything in it, so what the index keeps of it is capped. Of each data
segment only what is read later is kept: a status line's first bytes, a request's head,
another segment's first line (the rest of a request line split over segments), each at
most MAX_LINE bytes; at most `Limits.payload_bytes` of them per connection (past that a
segment starting a status or request line keeps its first MIN_KEEP bytes, enough for the
status code and the method, so that the budget may be passed by MIN_KEEP bytes a segment,
and any other keeps nothing: `segments_cut`), and at most
`Limits.segments` segments per direction (past that a new segment is not read at all,
its retransmissions not told apart: `segments_dropped`). A whole-file read (read_flows)
has no limits."""
from __future__ import annotations

import ipaddress
import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property

import dpkt

from ..flowkey import FlowKey
from ..http1 import METHODS, is_request_line, starts_request, status_line
from .pcap import LINKTYPE_LINUX_SLL, read_file
from .request import answered, parse_request

MAX_LINE = 8192
# What a segment that starts a status or request line keeps once its connection's payload
# budget is spent: the status code, or the method and the start of the target.
MIN_KEEP = 16
STATUS_KEEP = 64            # of a status line: the code and the reason's first bytes


@dataclass(frozen=True)
class Limits:
    """Caps on what an open connection holds in memory (the index's flows)."""
    segments: int = 128             # data segments tracked per direction
    payload_bytes: int = 32768      # payload bytes kept per connection


def kept_part(payload: bytes) -> bytes:
    """What is read later of a segment's payload: a status line's first bytes, a
    request's head, or another segment's first line (it may end a split request line)."""
    if status_line(payload):
        return payload[:STATUS_KEEP]
    if starts_request(payload):
        end = payload.find(b"\r\n\r\n", 0, MAX_LINE)
        return payload[:end + 4 if end >= 0 else MAX_LINE]
    end = payload.find(b"\r\n", 0, MAX_LINE)
    return payload[:end + 2 if end >= 0 else MAX_LINE]


def ntoa(raw: bytes) -> str:
    return str(ipaddress.ip_address(raw))


@dataclass
class Packet:
    ts: float
    src: str
    sport: int
    dst: str
    dport: int
    flags: int
    seq: int
    ack: int
    payload: bytes
    length: int             # of the frame as captured (what the index counts as bytes)

    @classmethod
    def decode(cls, linktype: int, ts: float, frame) -> "Packet | None":
        """The TCP packet in a frame, None when it holds no IP + TCP (or too little of
        them to tell)."""
        frame = bytes(frame)
        try:
            if linktype == LINKTYPE_LINUX_SLL:
                ip = dpkt.sll.SLL(frame).data
            else:
                ip = dpkt.ethernet.Ethernet(frame).data     # VLAN tags are skipped by dpkt
        except (dpkt.NeedData, dpkt.UnpackError):
            return None
        tcp = getattr(ip, "data", None)
        if not isinstance(ip, (dpkt.ip.IP, dpkt.ip6.IP6)) or \
                not isinstance(tcp, dpkt.tcp.TCP):
            return None
        return cls(ts, ntoa(ip.src), tcp.sport, ntoa(ip.dst), tcp.dport, tcp.flags, tcp.seq,
                   tcp.ack, bytes(tcp.data), len(frame))

    @cached_property
    def key(self) -> FlowKey:
        return FlowKey.from_endpoints(self.src, self.sport, self.dst, self.dport)

    @property
    def source(self) -> tuple[str, int]:
        return self.src, self.sport

    @property
    def dest(self) -> tuple[str, int]:
        return self.dst, self.dport


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

    def add(self, seq: int, payload: bytes, ts: float = 0.0, ack: int = 0) -> int:
        """Stores a data segment (a retransmission keeps the longer copy); returns how
        many more payload bytes are stored."""
        if self.first_seq is None:
            self.first_seq = seq
        old = self.segments.get(seq)
        self.first_seen.setdefault(seq, (ts, ack))
        if old is None or len(payload) > len(old):
            self.segments[seq] = payload
            return len(payload) - len(old or b"")
        return 0

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
    """One connection's packets, accumulated as they are read (from one file or several:
    a connection may span ring files)."""
    key: FlowKey
    first_ts: float = math.inf
    last_ts: float = -math.inf
    packet_count: int = 0
    bytes: int = 0
    retransmissions: int = 0
    files: list[str] = field(default_factory=list)
    dirs: dict[tuple[str, int], Direction] = field(default_factory=dict)
    fin_from: set = field(default_factory=set)
    rst: bool = False
    last_update: float = field(default_factory=time.time)
    packets: list[Packet] | None = None     # every packet in capture order, when kept
    limits: Limits | None = None            # None: every payload kept whole
    payload_kept: int = 0                   # bytes of payload stored in `dirs`
    segments_dropped: int = 0               # not read: past Limits.segments
    segments_cut: int = 0                   # kept shorter: past Limits.payload_bytes

    def add(self, packet: Packet, fname: str) -> None:
        """Adds a packet of this connection read from the file named `fname`."""
        self.first_ts = min(self.first_ts, packet.ts)
        self.last_ts = max(self.last_ts, packet.ts)
        self.packet_count += 1
        self.bytes += packet.length
        if fname not in self.files:
            self.files.append(fname)
        d = self.dirs.setdefault(packet.source, Direction())
        if packet.payload:
            self._add_segment(d, packet)
        if packet.flags & dpkt.tcp.TH_FIN:
            self.fin_from.add(packet.source)
        if packet.flags & dpkt.tcp.TH_RST:
            self.rst = True
        if self.packets is not None:
            self.packets.append(packet)
        self.last_update = time.time()

    def _add_segment(self, d: Direction, packet: Packet) -> None:
        """Stores a data segment, within the limits when there are some."""
        seen = packet.seq in d.segments
        if seen:
            self.retransmissions += 1
        payload, limits = packet.payload, self.limits
        if limits is not None:
            if not seen and len(d.segments) >= limits.segments:
                self.segments_dropped += 1
                return
            payload = kept_part(payload)
            room = limits.payload_bytes - self.payload_kept
            if len(payload) > room:
                self.segments_cut += 1
                start = status_line(payload) or starts_request(payload)
                payload = payload[:MIN_KEEP] if start else b""
        self.payload_kept += d.add(packet.seq, payload, packet.ts, packet.ack)

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

    @property
    def statuses(self) -> list[int]:
        """The server's status codes, in sequence order."""
        d = self.dirs.get(self.endpoints()[1])
        return d.statuses() if d else []

    @property
    def requests(self) -> list[str]:
        """The client's request lines, in sequence order."""
        d = self.dirs.get(self.endpoints()[0])
        return d.request_lines() if d else []

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


def read_packets(path: str | os.PathLike) -> list[Packet]:
    """The TCP packets of a whole pcap file, in capture order (a last record cut short is
    left out)."""
    contents = read_file(path)
    header = contents.header
    decoded = (Packet.decode(header.linktype, header.timestamp(rec), rec.frame)
               for rec in contents.records)
    return [p for p in decoded if p is not None]


def flows_of(packets: Iterable[Packet], fname: str = "") -> dict[FlowKey, Flow]:
    """Packets (read from the file named `fname`) grouped into connections, each keeping
    its packets."""
    flows: dict[FlowKey, Flow] = {}
    for p in packets:
        flows.setdefault(p.key, Flow(p.key, packets=[])).add(p, fname)
    return flows


def read_flows(path: str | os.PathLike) -> dict[FlowKey, Flow]:
    """The connections of a whole pcap file, each keeping its packets."""
    return flows_of(read_packets(path), os.path.basename(path))
