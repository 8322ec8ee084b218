"""Crafted Ethernet frames for the per-packet microbenchmark, IPv4 and IPv6.

Checksums are left zero: no classifier here verifies them, and BPF_PROG_TEST_RUN hands
the frame to the program as it is."""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD
IPPROTO_TCP, IPPROTO_UDP = 6, 17
TCP_SYN, TCP_ACK, TCP_PSH = 0x02, 0x10, 0x08

CLIENT = {4: "198.18.0.1", 6: "2001:db8::1"}
SERVER = {4: "198.18.0.2", 6: "2001:db8::2"}
CLIENT_PORT, SERVER_PORT = 40000, 80

REQUEST = b"GET /ok HTTP/1.1\r\nHost: 198.18.0.2\r\nUser-Agent: h2load nghttp2/1.52.0\r\n\r\n"
RESPONSE_200 = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nContent-Type: text/plain\r\n"
                b"Content-Length: 23\r\nConnection: keep-alive\r\n\r\nerrorxxxxxxxxxxxxxxxxxx")
RESPONSE_500 = (b"HTTP/1.1 500 Internal Server Error\r\nServer: nginx/1.22.1\r\n"
                b"Content-Type: text/plain\r\nContent-Length: 5\r\nConnection: keep-alive\r\n"
                b"\r\nerror")


def ethernet(ethertype: int, payload: bytes) -> bytes:
    return b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01" + \
        struct.pack("!H", ethertype) + payload


def ip_packet(family: int, src: str, dst: str, proto: int, l4: bytes) -> bytes:
    s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    if family == 4:
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0x4000, 64, proto, 0, s, d)
        return ethernet(ETH_P_IP, hdr + l4)
    hdr = struct.pack("!IHBB16s16s", 6 << 28, len(l4), proto, 64, s, d)
    return ethernet(ETH_P_IPV6, hdr + l4)


# The sequence number of every segment; a server's SYN-ACK one below it, so that the
# server's segment after it is where its HTTP/2 frames start.
SEQ = 1000


def tcp_segment(sport: int, dport: int, payload: bytes, flags: int = TCP_ACK | TCP_PSH,
                seq: int = SEQ) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, seq, 2000, 5 << 4, flags, 65535, 0, 0) + \
        payload


def udp_datagram(sport: int, dport: int, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def to_server(family: int, payload: bytes, port: int = CLIENT_PORT) -> bytes:
    return ip_packet(family, CLIENT[family], SERVER[family], IPPROTO_TCP,
                     tcp_segment(port, SERVER_PORT, payload))


def to_server_from(family: int, client: str, port: int, payload: bytes,
                   flags: int = TCP_ACK | TCP_PSH) -> bytes:
    return ip_packet(family, client, SERVER[family], IPPROTO_TCP,
                     tcp_segment(port, SERVER_PORT, payload, flags))


def syn(family: int, port: int = CLIENT_PORT) -> bytes:
    """The client's SYN that opens the connection (the classifier learns who the client
    is from it: only then do the server's statuses count)."""
    return to_server_from(family, CLIENT[family], port, b"", TCP_SYN)


def to_client(family: int, payload: bytes, port: int = CLIENT_PORT) -> bytes:
    return ip_packet(family, SERVER[family], CLIENT[family], IPPROTO_TCP,
                     tcp_segment(SERVER_PORT, port, payload))


def synack(family: int, port: int = CLIENT_PORT) -> bytes:
    """The server's SYN-ACK: a classifier that follows the server's HPACK state starts
    following it here (its next byte is SEQ)."""
    return ip_packet(family, SERVER[family], CLIENT[family], IPPROTO_TCP,
                     tcp_segment(SERVER_PORT, port, b"", TCP_SYN | TCP_ACK, SEQ - 1))


def h2_frame(ftype: int, flags: int, stream: int, body: bytes) -> bytes:
    return len(body).to_bytes(3, "big") + bytes([ftype, flags]) + stream.to_bytes(4, "big") + body


# HPACK blocks written out (RFC 7541): an indexed :status, literals with incremental
# indexing of static names (content-type 31, content-length 28, server 54) or new names.
_SERVER = b"\x76\x0cnginx/1.22.1"
_GRPC_TYPE = b"\x5f\x10application/grpc"
H2C_200 = (h2_frame(1, 0x04, 1, b"\x88" + _SERVER + b"\x5f\x0atext/plain" + b"\x5c\x0223")
           + h2_frame(0, 0x01, 1, b"errorxxxxxxxxxxxxxxxxxx"))
H2C_204 = h2_frame(1, 0x05, 1, b"\x89" + _SERVER)
GRPC_TRAILERS_ONLY = h2_frame(1, 0x05, 1, b"\x88" + _GRPC_TYPE + b"\x40\x0bgrpc-status\x0214"
                              + b"\x40\x0cgrpc-message\x09failed 14")
GRPC_CALL = (h2_frame(1, 0x04, 1, b"\x88" + _GRPC_TYPE)
             + h2_frame(0, 0x00, 1, b"\x00\x00\x00\x00\x02ok")
             + h2_frame(1, 0x05, 1, b"\x40\x0bgrpc-status\x010"))


@dataclass
class FrameClass:
    """One row of the microbenchmark. `marked`: the flow is marked before the timed runs
    (by running `RESPONSE_500` once) and stays marked; `fresh`: the flow is unmarked
    before every single run, so each run is the one that marks it. `others_marked`:
    another connection is marked, so the flow map is not empty (a classifier may skip
    its lookup while it knows the map is empty); otherwise the maps start empty.
    `large_map`: the maps also hold many other flows (bench/bigmaps.py, 90 % of their
    size); `one_flow` then names the row timing the same packet without them."""
    name: str
    family: int
    frame: bytes
    marked: bool = False
    fresh: bool = False
    server_start: bool = False      # before each run, the server's SYN-ACK too (h2 rows)
    h2: bool = False                # an h2c or gRPC row (the thesis reads none)
    direction: str = "ingress"       # the hook this packet crosses on the server's veth
    others_marked: bool = True
    large_map: bool = False
    one_flow: str | None = None

    @property
    def key(self) -> str:
        return f"ipv{self.family} {self.name}"


EMPTY, OTHERS = "no flow marked", "other flows marked"
LARGE = "maps 90 % full"


def frame_classes() -> list[FrameClass]:
    """Every row: both families with one flow (or none) in the maps, then the large-map
    rows."""
    out = []
    for fam in (4, 6):
        out.append(FrameClass("non-TCP (UDP)", fam, ip_packet(fam, CLIENT[fam], SERVER[fam],
                              IPPROTO_UDP, udp_datagram(5353, 5353, b"\0" * 40)),
                              others_marked=False))
        for others in (False, True):
            out += unmarked_flow_classes(fam, OTHERS if others else EMPTY,
                                         others_marked=others)
        out += [
            FrameClass("HTTP 500 response, marks the flow", fam, to_client(fam, RESPONSE_500),
                       fresh=True),
            FrameClass("HTTP 500 response, flow marked", fam, to_client(fam, RESPONSE_500),
                       marked=True),
            marked_flow_class(fam),
        ]
        out += h2_classes(fam)
    return out + large_map_classes()


def h2_classes(fam: int) -> list[FrameClass]:
    """A server's h2c and gRPC segments, each timed twice: as the first segment after the
    server's SYN-ACK (a fresh connection every run: a classifier that follows the
    server's HPACK state walks it in step), and over and over on a connection whose
    SYN-ACK went unseen (a classifier that follows nothing there reads what it reads
    without state)."""
    rows = [("h2c 200 response (HEADERS + DATA)", H2C_200),
            ("h2c 204 response (bodiless, END_STREAM)", H2C_204),
            ("gRPC trailers-only response (14)", GRPC_TRAILERS_ONLY),
            ("gRPC call (HEADERS + DATA + trailers, 0)", GRPC_CALL)]
    return [FrameClass(f"{name}, {how}", fam, to_client(fam, payload), fresh=fresh,
                       server_start=fresh, others_marked=False, h2=True)
            for name, payload in rows
            for how, fresh in (("in step", True), ("not followed", False))]


def unmarked_flow_classes(fam: int, state: str, **kw) -> list[FrameClass]:
    """Request, ACK and 200 of a flow that is not marked."""
    return [
        FrameClass(f"TCP data (request), {state}", fam, to_server(fam, REQUEST),
                   direction="egress", **kw),
        FrameClass(f"TCP ACK (no payload), {state}", fam, to_server(fam, b""),
                   direction="egress", **kw),
        FrameClass(f"HTTP 200 response, {state}", fam, to_client(fam, RESPONSE_200), **kw),
    ]


def marked_flow_class(fam: int, suffix: str = "", **kw) -> FrameClass:
    return FrameClass(f"packet of a marked flow (request){suffix}", fam,
                      to_server(fam, REQUEST), marked=True, direction="egress", **kw)


def large_map_classes() -> list[FrameClass]:
    """The packets whose cost a full map could change, timed with the maps 90 % full:
    lookups that miss (an unmarked flow's request, ACK and 200), the insert that marks a
    flow, and a lookup that hits. IPv4 only: the thesis parses nothing else, and the
    mirror's flow key is the same 40 bytes for both families. Each names its one-flow
    counterpart."""
    fam = 4
    misses = unmarked_flow_classes(fam, LARGE, large_map=True)
    for fc in misses:
        fc.one_flow = f"ipv{fam} {fc.name.replace(LARGE, OTHERS)}"
    marks = FrameClass(f"HTTP 500 response, marks the flow, {LARGE}", fam,
                       to_client(fam, RESPONSE_500), fresh=True, large_map=True,
                       one_flow=f"ipv{fam} HTTP 500 response, marks the flow")
    hit = marked_flow_class(fam, f", {LARGE}", large_map=True)
    hit.one_flow = f"ipv{fam} packet of a marked flow (request)"
    return misses + [marks, hit]


def marking_frame(family: int) -> bytes:
    return to_client(family, RESPONSE_500)


def other_marking_frame(family: int) -> bytes:
    """Marks a connection other than the measured one."""
    return to_client(family, RESPONSE_500, port=CLIENT_PORT + 1)
