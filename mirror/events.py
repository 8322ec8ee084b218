"""Error events: one per trigger status, from the kernel's ring buffer to the operator.

The classifier hands each trigger response to user space with the request it answered
(bpf/mirror.h, struct error_event): the request snapshot's frame bytes and times. Here
each record becomes:
- one JSON object (`Event.to_json()`): time, iface, direction, client, server, method,
  target, host, status, response_ns, new_flow, proto (h1, h2, grpc: then status is
  the grpc-status code and grpc_status its name), and a few more facts;
- a line in the events file (`--events-file PATH`, mode 0600, rotated to PATH.1 past its
  size bound) or on standard output (`-`), where a log pipeline collects it;
- an entry in the recent events that `mirror events` asks for over the control socket;
- counts and a response-time histogram for the metrics;
- the request frame written onto the debug interface (an AF_PACKET socket), so that the
  capture holds the request of every error response. It arrives there after the
  response's clone: the capture sidecar restores the order in its files. When a budget
  skipped the response's clone, its request is not written either.

The reader never slows the datapath: the kernel side never waits on a full ring buffer
(the event is lost and counted in the `events_lost` counter)."""
from __future__ import annotations

import bisect
import collections
import json
import logging
import os
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass

from .bpfprog import cut_reasons
from .flowkey import FlowKey, endpoint
from .http1 import METHODS
from .trigger import GRPC_MAX, GRPC_NAMES

log = logging.getLogger("mirror")

DIRECTIONS = ("ingress", "egress")
PROTOS = {1: "h1", 2: "h2", 3: "grpc"}    # grpc: status is the grpc-status code
# struct error_event up to data[] (bpf/mirror.h): response part, key, request part.
_HEAD = struct.Struct("=QIHBBBBB5x40sQIBBHII")
HEAD_SIZE = _HEAD.size
assert HEAD_SIZE == 88
RECENT = 1000                           # events kept for `mirror events`
RESPONSE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0, 60.0)


@dataclass
class Event:
    response_ns: int                # CLOCK_MONOTONIC
    ifindex: int
    status: int
    direction: str
    new_flow: bool
    proto: str
    key_raw: bytes                  # struct flow_key as the kernel wrote it: see `key`
    server_is_lo: bool
    request_ns: int                 # 0: no request kept
    request_ifindex: int
    request_frame_len: int
    request: bytes                  # the request frame's first bytes (b"": none)
    cut: int = 0                    # the flow's cut_reason bits on the response's CPU

    @classmethod
    def from_record(cls, raw: bytes) -> "Event":
        (resp_ns, ifindex, status, direction, new_flow, proto, server_lo, cut, key, req_ns,
         req_ifindex, _req_dir, _req_lo, _pad, req_frame_len, req_len) = _HEAD.unpack_from(raw)
        request = raw[HEAD_SIZE:HEAD_SIZE + req_len] if req_ns and len(raw) > HEAD_SIZE else b""
        return cls(resp_ns, ifindex, status, DIRECTIONS[direction & 1], bool(new_flow),
                   PROTOS.get(proto, str(proto)), key, bool(server_lo),
                   req_ns if request else 0, req_ifindex, req_frame_len, request, cut)

    @property
    def key(self) -> FlowKey:
        """The flow's addresses, decoded when an event is read rather than when it is
        counted: in an error storm most events are only counted."""
        return FlowKey.from_bytes(self.key_raw)

    @property
    def server(self) -> str:
        k = self.key
        return endpoint(k.addr_lo, k.port_lo) if self.server_is_lo else \
            endpoint(k.addr_hi, k.port_hi)

    @property
    def client(self) -> str:
        k = self.key
        return endpoint(k.addr_hi, k.port_hi) if self.server_is_lo else \
            endpoint(k.addr_lo, k.port_lo)

    def to_json(self, iface: str, realtime_offset_ns: int, budget: dict | None = None) -> dict:
        """The event's JSON object. `budget`: the budgets in force (--max-*), added as
        is; "capture_cut" names the budgets that had already skipped clones of this
        connection on the response's CPU when the response was cloned or skipped (an
        event is emitted at the response, so a cut after it is not in the event: see
        `mirror flows`)."""
        method, target, host = describe_request(self.request)
        wall = (self.response_ns + realtime_offset_ns) / 1e9
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall))
        return {
            "time": f"{stamp}.{int(wall % 1 * 1e6):06d}Z",
            "iface": iface, "direction": self.direction,
            "client": self.client, "server": self.server,
            "method": method, "target": target, "host": host,
            "status": self.status,
            **({"grpc_status": grpc_name(self.status)} if self.proto == "grpc" else {}),
            "response_ns": self.response_ns - self.request_ns if self.request else None,
            "new_flow": self.new_flow, "proto": self.proto,
            "request_bytes": len(self.request),
            "request_truncated": bool(self.request) and
            len(self.request) < self.request_frame_len,
            "capture_cut": cut_reasons(self.cut),
            **({"budget": budget} if budget is not None else {}),
        }


def grpc_name(code: int) -> str:
    """A grpc-status code's name, as gRPC writes it (UNAVAILABLE)."""
    return GRPC_NAMES[code].upper() if 0 <= code <= GRPC_MAX else str(code)


def status_label(ev: Event) -> str:
    """The status as the metrics label it: "503", or "grpc:14" for a gRPC code."""
    return f"grpc:{ev.status}" if ev.proto == "grpc" else str(ev.status)


def payload_offset(frame: bytes) -> int | None:
    """Where the TCP payload starts in an Ethernet frame (one VLAN tag, IPv4 or IPv6 with
    extension headers), or None when the headers are not all there."""
    try:
        off, ethertype = 14, int.from_bytes(frame[12:14], "big")
        if ethertype in (0x8100, 0x88A8):
            ethertype, off = int.from_bytes(frame[16:18], "big"), 18
        if ethertype == 0x0800:
            l4 = off + (frame[off] & 0x0F) * 4
        elif ethertype == 0x86DD:
            nexthdr, l4 = frame[off + 6], off + 40
            while nexthdr in (0, 43, 60, 44):
                nexthdr, size = frame[l4], (8 if nexthdr == 44 else (frame[l4 + 1] + 1) * 8)
                l4 += size
        else:
            return None
        start = l4 + (frame[l4 + 12] >> 4) * 4
    except IndexError:
        return None
    return start if start <= len(frame) else None


def describe_request(frame: bytes) -> tuple[str | None, str | None, str | None]:
    """(method, target, host) of a request frame; None for what the bytes do not hold
    (a frame cut before the Host header gives host None)."""
    off = payload_offset(frame) if frame else None
    if off is None:
        return None, None, None
    head = frame[off:]
    line, _, rest = head.partition(b"\r\n")
    parts = line.split(b" ")
    if len(parts) < 2 or parts[0] not in METHODS:
        return None, None, None
    method, target = parts[0].decode(), parts[1].decode("latin-1")
    host = None
    for header in rest.split(b"\r\n"):
        name, sep, value = header.partition(b":")
        if sep and name.strip().lower() == b"host":
            host = value.strip().decode("latin-1")
            break
        if not header:
            break
    return method, target, host


class EventsFile:
    """JSON lines appended to PATH (mode 0600), moved to PATH.1 once PATH passes
    `max_bytes` (one rotated file: at most about twice max_bytes on disk); "-" writes to
    standard output instead."""

    def __init__(self, path: str, max_bytes: int = 16 << 20):
        self.path, self.max_bytes = path, max_bytes
        self._file = None

    def write(self, line: str) -> None:
        if self.path == "-":
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
            return
        if self._file is None:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._file = os.fdopen(fd, "a", buffering=1)
        self._file.write(line + "\n")
        if self._file.tell() >= self.max_bytes:
            self._file.close()
            self._file = None
            os.replace(self.path, self.path + ".1")

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None


class RequestWriter:
    """Writes request frames onto the debug interface (AF_PACKET, needs CAP_NET_RAW), where
    the sink drops them like clones after the capture has seen them."""

    def __init__(self):
        self._sock: socket.socket | None = None
        self._ifindex = 0
        self.written = 0
        self.failed = 0

    def write(self, frame: bytes, ifindex: int) -> None:
        try:
            if self._sock is None or ifindex != self._ifindex:
                self.close()
                self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
                self._sock.bind((socket.if_indextoname(ifindex), 0))
                self._ifindex = ifindex
            self._sock.send(frame)
            self.written += 1
        except OSError as exc:
            self.failed += 1
            self.close()
            if self.failed == 1 or self.failed % 1000 == 0:
                log.warning("cannot write a request frame to the debug interface (%d so "
                            "far): %s", self.failed, exc)

    def close(self) -> None:
        if self._sock:
            self._sock.close()
            self._sock = None


class EventStream:
    """Reads the classifier's ring buffer in a thread and hands each event on."""

    def __init__(self, classifier, ifname_of, debug_ifindex, events_file: EventsFile | None,
                 budget: dict | None = None):
        """`classifier`: whose `events` ring buffer to read (mirror.bpfprog.Classifier);
        `ifname_of(ifindex)` names an interface; `debug_ifindex()` is where request frames
        go (0: nowhere); `budget`: the budgets in force, copied into every event."""
        self.classifier = classifier
        self.ifname_of = ifname_of
        self.debug_ifindex = debug_ifindex
        self.file = events_file
        self.budget = budget
        self.writer = RequestWriter()
        self.recent: collections.deque = collections.deque(maxlen=RECENT)
        self.seq = 0
        self.by_iface_status: collections.Counter = collections.Counter()
        self.bucket_counts = [0] * (len(RESPONSE_BUCKETS) + 1)
        self.response_sum = 0.0
        self.response_count = 0
        self.errors = 0                 # records that could not be handled
        self.realtime_offset_ns = time.time_ns() - time.monotonic_ns()
        self._names: dict[int, tuple[str, float]] = {}     # ifindex -> (name, when asked)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "EventStream":
        self.classifier.on_events(self._on_record)
        self._thread = threading.Thread(target=self._poll, name="events", daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.classifier.poll_events(100)

    def _on_record(self, raw: bytes) -> None:
        try:
            self.handle(raw)
        except Exception as exc:        # one bad record must not stop the stream
            self.errors += 1
            log.error("error event dropped: %s", exc)

    def handle(self, raw: bytes) -> Event:
        """Counts an event and keeps it; its JSON object is built only when someone reads
        it (the events file, `mirror events`): in an error storm this thread handles every
        error response, so what it does per event is kept to the metrics' needs."""
        ev = Event.from_record(raw)
        iface = self._ifname(ev.ifindex)
        # A response whose clone a budget skipped (the rate, or a byte budget smaller
        # than the response's packet) goes without its request frame too: the
        # capture would hold a request with no answer, and the frames written from
        # here stay bounded by the clone rate in an error storm.
        if ev.request and ev.new_flow and not ev.cut:
            ifindex = self.debug_ifindex()
            if ifindex:
                # Cut frames go out as cut, their IP lengths kept (as `tcpdump -s` cuts):
                # the sidecar marks the record's original length when it reorders, and
                # tshark then takes it for a frame cut at capture, dissectable.
                self.writer.write(ev.request, ifindex)
        # Written before it is counted: a reader that waits for the count of events
        # read (the lab, the tests) then finds the line in the file.
        if self.file:
            self.file.write(json.dumps(self.render(ev, iface), separators=(", ", ": ")))
        with self._lock:
            self.seq += 1
            self.recent.append((self.seq, ev, iface))
            self.by_iface_status[(iface, status_label(ev))] += 1
            if ev.request:
                seconds = (ev.response_ns - ev.request_ns) / 1e9
                self.response_sum += seconds
                self.response_count += 1
                self.bucket_counts[_bucket(seconds)] += 1
        return ev

    def _ifname(self, ifindex: int) -> str:
        """The interface's name, asked of the controller at most once a second per
        ifindex (a rename shows within a second)."""
        now = time.monotonic()
        cached = self._names.get(ifindex)
        if cached and now - cached[1] < 1.0:
            return cached[0]
        name = self.ifname_of(ifindex) or f"ifindex{ifindex}"
        self._names[ifindex] = (name, now)
        return name

    def render(self, ev: Event, iface: str) -> dict:
        return ev.to_json(iface, self.realtime_offset_ns, self.budget)

    def since(self, seq: int) -> list[dict]:
        """Recent events after `seq`, each with its sequence number."""
        with self._lock:
            kept = [(s, ev, iface) for s, ev, iface in self.recent if s > seq]
        return [dict(self.render(ev, iface), seq=s) for s, ev, iface in kept]

    def histogram(self) -> tuple[list[int], float, int]:
        """Cumulative bucket counts (le each of RESPONSE_BUCKETS, then +Inf), sum, count."""
        with self._lock:
            cumulative, total = [], 0
            for n in self.bucket_counts:
                total += n
                cumulative.append(total)
            return cumulative, self.response_sum, self.response_count

    def close(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(2)
        self.classifier.on_events(None)
        self.writer.close()
        if self.file:
            self.file.close()


def _bucket(seconds: float) -> int:
    """Index of the first bucket whose bound is at least `seconds` (+Inf: the last)."""
    return bisect.bisect_left(RESPONSE_BUCKETS, seconds)
