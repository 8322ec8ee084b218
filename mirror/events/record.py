"""An error event as the kernel hands it over (struct error_event, mirror.abi), and the
JSON object an operator reads: time and time_unix, client, server, iface, community_id
(mirror.connection), the workload, direction, proto (h1, h2, grpc: then status is the
grpc-status code and grpc_status its name), status, method, target, host,
response_seconds, and a few more facts."""
from __future__ import annotations

from dataclasses import dataclass

from ..abi import APP_PROTOS, DIRECTIONS, EVENT_HEAD, cut_reasons
from ..connection import conn_fields, time_fields
from ..flowkey import FlowKey
from ..http1 import METHODS
from ..trigger import GRPC_MAX, GRPC_NAMES

HEAD_SIZE = EVENT_HEAD.size


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
    request_frame_len: int
    request: bytes                  # the request frame's first bytes (b"": none)
    cut: int = 0                    # the connection's cut_reason bits at the response

    @classmethod
    def from_record(cls, raw: bytes) -> "Event":
        (resp_ns, req_ns, key, ifindex, status, direction, proto, new_flow, server_lo, cut,
         _req_dir, req_frame_len, req_len) = EVENT_HEAD.unpack_from(raw)
        request = raw[HEAD_SIZE:HEAD_SIZE + req_len] if req_ns and len(raw) > HEAD_SIZE else b""
        return cls(resp_ns, ifindex, status, DIRECTIONS[direction & 1], bool(new_flow),
                   APP_PROTOS.get(proto, str(proto)), key, bool(server_lo),
                   req_ns if request else 0, req_frame_len, request, cut)

    @property
    def key(self) -> FlowKey:
        """The flow's addresses, decoded when an event is read rather than when it is
        counted: in an error storm most events are only counted."""
        return FlowKey.from_bytes(self.key_raw)

    @property
    def server(self) -> str:
        return conn_fields(self.key, not self.server_is_lo)["server"]

    @property
    def client(self) -> str:
        return conn_fields(self.key, not self.server_is_lo)["client"]

    def to_json(self, iface: str, realtime_offset_ns: int, budget: dict | None = None,
                workload: dict | None = None) -> dict:
        """The event's JSON object, in the connection vocabulary of mirror.connection.
        `budget`: the budgets in force (--max-*), added as is; "capture_cut" names the
        budgets that had already skipped clones of this connection when the response was
        cloned or skipped (an event is emitted at the response, so a cut after it is not
        in the event: see `mirror flows`); `workload`: the workload behind the interface
        (mirror.workload attributes)."""
        method, target, host = describe_request(self.request)
        return {
            **time_fields((self.response_ns + realtime_offset_ns) / 1e9),
            **conn_fields(self.key, not self.server_is_lo, iface),
            **(workload or {}),
            "direction": self.direction, "proto": self.proto, "status": self.status,
            **({"grpc_status": grpc_name(self.status)} if self.proto == "grpc" else {}),
            "method": method, "target": target, "host": host,
            "response_seconds": (round((self.response_ns - self.request_ns) / 1e9, 9)
                                 if self.request else None),
            "new_flow": self.new_flow,
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
