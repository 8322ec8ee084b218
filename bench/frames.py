"""Crafted Ethernet frames for the per-packet microbenchmark, IPv4 and IPv6.

Checksums are left zero: no classifier here verifies them, and BPF_PROG_TEST_RUN hands
the frame to the program as it is."""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD
IPPROTO_TCP, IPPROTO_UDP = 6, 17
TCP_ACK, TCP_PSH = 0x10, 0x08

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


def tcp_segment(sport: int, dport: int, payload: bytes, flags: int = TCP_ACK | TCP_PSH) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1000, 2000, 5 << 4, flags, 65535, 0, 0) + \
        payload


def udp_datagram(sport: int, dport: int, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def to_server(family: int, payload: bytes) -> bytes:
    return ip_packet(family, CLIENT[family], SERVER[family], IPPROTO_TCP,
                     tcp_segment(CLIENT_PORT, SERVER_PORT, payload))


def to_client(family: int, payload: bytes) -> bytes:
    return ip_packet(family, SERVER[family], CLIENT[family], IPPROTO_TCP,
                     tcp_segment(SERVER_PORT, CLIENT_PORT, payload))


@dataclass
class FrameClass:
    """One row of the microbenchmark. `marked`: the flow is marked before the timed runs
    (by running `RESPONSE_500` once) and stays marked; `fresh`: the flow is unmarked
    before every single run, so each run is the one that marks it."""
    name: str
    family: int
    frame: bytes
    marked: bool = False
    fresh: bool = False
    direction: str = "ingress"       # the hook this packet crosses on the server's veth

    @property
    def key(self) -> str:
        return f"ipv{self.family} {self.name}"


def frame_classes() -> list[FrameClass]:
    out = []
    for fam in (4, 6):
        out += [
            FrameClass("non-TCP (UDP)", fam, ip_packet(fam, CLIENT[fam], SERVER[fam],
                       IPPROTO_UDP, udp_datagram(5353, 5353, b"\0" * 40))),
            FrameClass("TCP data (request)", fam, to_server(fam, REQUEST), direction="egress"),
            FrameClass("TCP ACK (no payload)", fam, to_server(fam, b""), direction="egress"),
            FrameClass("HTTP 200 response", fam, to_client(fam, RESPONSE_200)),
            FrameClass("HTTP 500 response, marks the flow", fam, to_client(fam, RESPONSE_500),
                       fresh=True),
            FrameClass("HTTP 500 response, flow marked", fam, to_client(fam, RESPONSE_500),
                       marked=True),
            FrameClass("packet of a marked flow (request)", fam, to_server(fam, REQUEST),
                       marked=True, direction="egress"),
        ]
    return out


def marking_frame(family: int) -> bytes:
    return to_client(family, RESPONSE_500)
