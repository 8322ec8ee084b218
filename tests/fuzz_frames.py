"""The differential fuzz's frames: realistic HTTP/1.1, HTTP/2 and gRPC conversations over
every kind of link and network layer (most opened by a SYN and SYN-ACK, some whose start
went unseen), status lines and their near misses, HTTP/2 and gRPC header blocks, hostile
segments (a client's status, a lone spoofed segment, a server's address travelling the
client's way, a 4-tuple reused), crowds of connections that share a bucket of the
classifier's slots, structural and byte-level mutations, and the seeded Generator that
mixes them (with truncation sweeps) into the stream tests/test_fuzz.py feeds to the
harness (tests/fuzz_harness.py), each frame on a hook, some egress ones forwarded from a
monitored interface. Pure Python: frames are built with tests/frames.py.

Every address the classifier could read lies in 198.18.0.0/15 or 2001:db8::/32
(addresses_allowed), and a seed's stream does not depend on its length."""
from __future__ import annotations

import dataclasses
import ipaddress
import random
import struct
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

from hpack import Encoder

import frames as F
import reference as R
from frames import (TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, dest_opts, eth, fragment,
                    hop_by_hop, ipv4, ipv4_options, ipv6, routing, tcp, tcp_options)
from mirror.abi import DIRECTIONS
from mirror.flowkey import FlowKey


# --- realistic frames ------------------------------------------------------------------

SRV4 = ["198.18.0.80", "198.18.0.81", "198.19.200.1"]
SRV6 = ["2001:db8::80", "2001:db8::81", "2001:db8:ffff::1"]
SYN_OPTS = (struct.pack("!BBH", 2, 4, 1460) + b"\x04\x02" + struct.pack("!BBII", 8, 10, 1, 0)
            + b"\x01" + b"\x03\x03\x07")
TS_OPTS = b"\x01\x01" + struct.pack("!BBII", 8, 10, 1234567, 7654321)
REASONS = {100: b"Continue", 101: b"Switching Protocols", 200: b"OK", 201: b"Created",
           204: b"No Content", 206: b"Partial Content", 301: b"Moved Permanently",
           302: b"Found", 304: b"Not Modified", 400: b"Bad Request", 401: b"Unauthorized",
           403: b"Forbidden", 404: b"Not Found", 418: b"I'm a teapot",
           429: b"Too Many Requests", 500: b"Internal Server Error", 502: b"Bad Gateway",
           503: b"Service Unavailable", 504: b"Gateway Timeout", 599: b"Network Timeout"}
CODE_WEIGHTS = [(200, 40), (404, 10), (500, 10), (503, 6), (502, 5), (301, 4), (304, 4),
                (204, 3), (100, 2), (401, 2), (403, 2), (429, 2), (504, 2), (599, 1),
                (201, 2), (206, 1), (101, 1), (418, 1), (0, 1), (99, 1), (600, 1), (999, 1)]
PATHS_REQ = [b"/", b"/index.html", b"/api/v1/items?id=42", b"/static/app.js", b"/health",
             b"/login", b"/images/logo.png"]


def request(rng: random.Random, host: str) -> bytes:
    method = rng.choice([b"GET", b"GET", b"GET", b"POST", b"HEAD", b"PUT"])
    body = b'{"name":"x","qty":3}' if method in (b"POST", b"PUT") else b""
    head = (method + b" " + rng.choice(PATHS_REQ) + b" HTTP/1.1\r\nHost: " + host.encode()
            + b"\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n")
    if body:
        head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
    return head + b"\r\n" + body


def response(code: int, version: bytes = b"1.1", body_len: int = 60, reason=True) -> bytes:
    body = (b"<html><head><title>%03d</title></head><body>" % code
            + b"x" * max(0, body_len - 60) + b"</body></html>\n")[:body_len]
    line = b"HTTP/%s %03d" % (version, code)
    line += (b" " + REASONS.get(code, b"Unknown")) if reason else b""
    return (line + b"\r\nServer: nginx/1.22.1\r\nDate: Mon, 02 Jun 2025 10:00:00 GMT\r\n"
            b"Content-Type: text/html\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n"
            % len(body) + body)


@dataclass(frozen=True)
class Conn:
    family: int
    cli: str
    cport: int
    srv: str
    sport: int
    vlans: tuple = ()
    ext: tuple = ()         # IPv6 extension headers on every packet
    ipopts: bytes = b""     # IPv4 options on every packet


def random_addr(rng: random.Random, family: int) -> str:
    """An address of 198.18.0.0/15 or 2001:db8::/32; a third of them share all but the
    last bits with the servers, so the flow key's order is decided late in the address."""
    near = rng.random() < 0.33
    if family == 4:
        if near:
            return f"198.18.0.{rng.randrange(1, 255)}"
        return f"198.{rng.choice((18, 19))}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
    if near:
        return f"2001:db8::{rng.randrange(0x10000):x}"
    words = ["2001", "db8"] + [f"{rng.randrange(0x10000):x}" for _ in range(6)]
    return ":".join(words)


def random_conn(rng: random.Random) -> Conn:
    family = 4 if rng.random() < 0.6 else 6
    srv = rng.choice(SRV4 if family == 4 else SRV6)
    r = rng.random()
    vlans = () if r < 0.7 else ((rng.randrange(1, 4095),) if r < 0.9
                                else ((F.ETH_P_8021AD, rng.randrange(1, 4095)),))
    ext, opts = (), b""
    if family == 6 and rng.random() < 0.1:
        ext = tuple(rng.choice([[hop_by_hop()], [dest_opts(1)], [fragment(0, False)],
                                [hop_by_hop(), routing(1)]]))
    if family == 4 and rng.random() < 0.05:
        opts = ipv4_options(4 * rng.randrange(1, 11))
    cli, cport, sport = random_addr(rng, family), rng.randrange(32768, 61000), 80
    if rng.random() < 0.08:
        # A host talking to itself: only the ports order the key, in network byte order
        # (256 < 511 < 512, although 0x0002 < 0x0001 when the bytes are swapped).
        cli = srv
        sport, cport = rng.choice([(511, 512), (512, 511), (256, 1), (1, 256), (8080, 80),
                                   (80, 8080), (rng.randrange(1, 65536), rng.randrange(65536))])
    else:
        sport = rng.choice((80, 80, 8080))
    return Conn(family, cli, cport, srv, sport, vlans, ext, opts)


def tcp_spec(conn: Conn, from_client: bool, payload: bytes = b"", flags: int = TCP_ACK,
             options: bytes = TS_OPTS, seq: int = 1000, ack: int = 2000,
             window: int = 502) -> dict:
    src, sport, dst, dport = ((conn.cli, conn.cport, conn.srv, conn.sport) if from_client
                              else (conn.srv, conn.sport, conn.cli, conn.cport))
    ip = {"ext": list(conn.ext)} if conn.family == 6 else {"options": conn.ipopts, "df": True}
    return {"family": conn.family, "l4": "tcp", "src": src, "sport": sport, "dst": dst,
            "dport": dport, "payload": payload, "flags": flags, "options": options,
            "seq": seq, "ack": ack, "window": window, "doff": None, "vlans": list(conn.vlans),
            "ip": ip, "trailer": b""}


def non_tcp_specs(rng: random.Random) -> list:
    """Realistic frames of other protocols."""
    a4, b4 = random_addr(rng, 4), rng.choice(SRV4)
    a6, b6 = random_addr(rng, 6), rng.choice(SRV6)
    dns = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07example\x03com\x00\x00\x01\x00\x01"
    base = {"vlans": [], "trailer": b"", "ip": {}}
    return [
        dict(base, family=4, l4="udp", src=a4, sport=53000, dst=b4, dport=53, payload=dns),
        dict(base, family=6, l4="udp", src=a6, sport=53000, dst=b6, dport=53, payload=dns),
        dict(base, family=4, l4="udp", src=b4, sport=80, dst=a4, dport=40000,
             payload=b"HTTP/1.1 500 Internal Server Error\r\n\r\n"),
        dict(base, family=4, l4="raw", proto=F.IPPROTO_ICMP, src=a4, dst=b4,
             payload=b"\x08\x00\xf7\xfe\x00\x01\x00\x01" + b"abcdefgh" * 4),
        dict(base, family=6, l4="raw", proto=F.IPPROTO_ICMPV6, src=a6, dst=b6,
             payload=b"\x80\x00\x00\x00\x00\x01\x00\x01" + b"abcdefgh" * 4),
        dict(base, family=6, l4="raw", proto=F.IPPROTO_ICMPV6, src=a6, dst=b6,
             ip={"ext": [hop_by_hop()]},
             payload=b"\x87\x00\x00\x00\x00\x00\x00\x00" + ipaddress.IPv6Address(b6).packed),
        dict(base, family=0, ethertype=F.ETH_P_ARP, payload=F.arp(a4, b4, 1)),
        dict(base, family=0, ethertype=F.ETH_P_ARP, payload=F.arp(b4, a4, 2), vlans=[10]),
        dict(base, family=0, ethertype=F.ETH_P_LLDP, payload=b"\x02\x07\x04" + b"\x02" * 6
             + b"\x04\x03\x05\x65\x30\x06\x02\x00\x78\x00\x00"),
    ]


def build(s: dict) -> tuple[bytes, int | None]:
    """The frame a spec describes, and the offset of its TCP header (None if none)."""
    fam = s["family"]
    l4 = s.get("l4")
    if l4 == "tcp":
        seg = tcp(s["sport"], s["dport"], s["payload"], flags=s["flags"], seq=s["seq"],
                  ack=s["ack"], options=s["options"], doff=s["doff"], window=s["window"],
                  pseudo=F._pseudo(s["src"], s["dst"], F.IPPROTO_TCP))
        proto = F.IPPROTO_TCP
    elif l4 == "udp":
        seg = F.udp(s["sport"], s["dport"], s["payload"],
                    pseudo=F._pseudo(s["src"], s["dst"], F.IPPROTO_UDP))
        proto = F.IPPROTO_UDP
    else:
        seg = s["payload"]
        proto = s.get("proto", 0)
    prefix = s.get("l4_prefix", b"")
    proto = s.get("proto_override", proto)
    if fam == 4:
        body, et = ipv4(prefix + seg, s["src"], s["dst"], proto, **s["ip"]), F.ETH_P_IP
    elif fam == 6:
        body, et = ipv6(prefix + seg, s["src"], s["dst"], proto, **s["ip"]), F.ETH_P_IPV6
    else:
        body, et = seg, s["ethertype"]
    frame = eth(body, s.get("ethertype_override", et), vlans=s["vlans"], trailer=s["trailer"])
    l4off = len(frame) - len(s["trailer"]) - len(seg) if l4 == "tcp" else None
    return frame, l4off


def copy_spec(s: dict) -> dict:
    c = dict(s)
    c["ip"] = dict(s["ip"])
    if "ext" in c["ip"]:
        c["ip"]["ext"] = list(c["ip"]["ext"])
    c["vlans"] = list(s["vlans"])
    return c


def addresses_allowed(frame: bytes) -> bool:
    """Whatever the classifier could read as an IP address lies in 198.18.0.0/15 or
    2001:db8::/32 (a mutated ethertype or VLAN tag makes it read other bytes)."""
    off, et = 14, int.from_bytes(frame[12:14], "big")
    if et in R.VLAN_TPIDS and len(frame) >= 18:
        off, et = 18, int.from_bytes(frame[16:18], "big")
    if et == F.ETH_P_IP and len(frame) >= off + 20:
        return all(frame[a] == 198 and frame[a + 1] in (18, 19) for a in (off + 12, off + 16))
    if et == F.ETH_P_IPV6 and len(frame) >= off + 40:
        return all(frame[a:a + 4] == b"\x20\x01\x0d\xb8" for a in (off + 8, off + 24))
    if et == F.ETH_P_ARP and len(frame) >= off + 28:
        return all(frame[a] == 198 and frame[a + 1] in (18, 19) for a in (off + 14, off + 24))
    return True


# --- status lines ----------------------------------------------------------------------

STATUS_BASES = [b"HTTP/1.1 500 Internal Server Error\r\n", b"HTTP/1.0 503 Service Unavailable\r\n",
                b"HTTP/1.1 502\r\n", b"HTTP/1.1 404 Not Found\r\n", b"HTTP/1.1 200 OK\r\n",
                b"HTTP/1.1 599 \r\n"]
NEAR_MISSES = [
    b"HTTP/1.1 50", b"HTTP/1.1 500", b"HTTP/2 500 ", b"HTTP/2 500 Internal Server Error\r\n",
    b"HTTP/2.0 500 Internal\r\n", b"HTTP/3 500 x\r\n", b"HTTP/1.1 5000", b"HTTP/1.1 5000 x\r\n",
    b"http/1.1 500 ", b"Http/1.1 500 Internal\r\n", b"HTTP/1.2 500 ", b"HTTP/1.  500 ",
    b"HTTP/0.9 500 ", b"HTTP/11 500 x\r\n", b"HTTP/1,1 500 ", b"HTTPS/1.1 500 ",
    b" HTTP/1.1 500 ", b"\r\nHTTP/1.1 500 x", b"\0HTTP/1.1 500 ", b"HTTP/1.1 5x0 ",
    b"HTTP/1.1 50x ", b"HTTP/1.1 x00 ", b"HTTP/1.1 5 0 ", b"HTTP/1.1 -50 ", b"HTTP/1.1 5\xb00 ",
    b"HTTP/1.1 500\n", b"HTTP/1.1 500\t", b"HTTP/1.1 500-", b"HTTP/1.1 500:", b"HTTP/1.1  500 ",
    b"HTTP/1.1\t500 ", b"HTTP/1.1\r500 ", b"HTTP/1.1 500\0", b"GET /500 HTTP/1.1\r\n\r\n",
    b"HTTP/1.1 \xd9\xd0\xd0 ", b"HTTP/1.1 500\r", b"HTTP/1.0 500 ", b"HTTP/1.1 000 x\r\n",
    b"HTTP/1.1 \xd9\xa1\xd9\xa2\xd9\xa3 ", b"HTTP/1.1 +50 ", b"HTTP/1.1 5.0 ", b"HTTP/1.1 50\r\n\r\n",
]
ALPHABET = b"0123456789 \r\n\t./HTPhtp12x\x00\xff\xb0-:;"


def status_payload(rng: random.Random) -> bytes:
    """A valid status line, or a near miss of one, with or without headers after it."""
    op = rng.randrange(8)
    line = bytearray(rng.choice(STATUS_BASES))
    if op == 0:
        line[rng.randrange(13)] = rng.choice(ALPHABET)
    elif op == 1:
        del line[rng.randrange(13)]
    elif op == 2:
        line.insert(rng.randrange(14), rng.choice(ALPHABET))
    elif op == 3:
        i = rng.randrange(13)
        line[i:i + 1] = bytes(line[i:i + 1]).swapcase()
    elif op == 4:
        line = line[:rng.randrange(9, 16)]
    elif op == 5:
        line = bytearray(rng.choice(NEAR_MISSES))
    else:
        line = bytearray(b"HTTP/1.%c %03d%c" % (rng.choice(b"01"), rng.randrange(1000),
                                                rng.choice(b"   \r\r\n\t\0x")))
    tail = rng.choice([b"", b"", b"\r\n", b"Reason\r\nServer: nginx\r\n\r\n",
                       response(404)[12:]])
    return bytes(line) + tail


def h2_frame(ftype: int, flags: int, stream: int, body: bytes) -> bytes:
    return len(body).to_bytes(3, "big") + bytes([ftype, flags]) + stream.to_bytes(4, "big") + body


def h2_block(rng: random.Random) -> bytes:
    """A response header block from hpack's encoder (a fresh one, or one that already
    sent the status: a dynamic reference), or a hand-made :status form."""
    code = rng.choice([c for c, _ in CODE_WEIGHTS])
    enc = Encoder()
    if rng.random() < 0.2:
        enc.encode([(":status", str(code))])
    if rng.random() < 0.15:
        enc.header_table_size = rng.choice([0, 4096])
    block = enc.encode([(":status", str(code)), ("server", "fuzz")],
                       huffman=rng.random() < 0.5)
    if rng.random() < 0.3:
        value = str(code).encode()
        form = rng.choice([b"\x40", b"\x00", b"\x10"])
        name = rng.choice([bytes([form[0] | 8]), bytes([form[0] | 14]),
                           form + b"\x07:status", form + b"\x85\xb8\x84\x8d\x36\xa3"])
        block = name + bytes([len(value)]) + value
        if rng.random() < 0.3:       # a Huffman-flagged value of random bits
            n = rng.choice([1, 2, 2, 3, 3, 4])
            block = name + bytes([0x80 | n]) + rng.randbytes(n)
    if rng.random() < 0.1:
        block = rng.choice([b"\x20", b"\x3f\xe1\x1f"]) * rng.randrange(1, 4) + block
    return block


GRPC_BEFORE = [b"", b"", b"\x88", b"\x88\xc0", b"\x88\x5f\x10application/grpc", b"\xbf",
               b"\x40\x03x-a\x01" + b"v" * 40 + b"\x00\x02x-b\x011"]


def grpc_block(rng: random.Random) -> bytes:
    """A gRPC trailers (or trailers-only) block: a few fields, then grpc-status as a new
    name (raw or Huffman) in one of the literal forms, its value raw, Huffman (hpack's
    encoder), out of range or random bits; or a dynamic reference in its place."""
    code = str(rng.choice([0, 0, 1, 2, 5, 13, 14, 16, 17, 99])).encode()
    form = rng.choice([b"\x40", b"\x00", b"\x10"])
    name = rng.choice([b"\x0bgrpc-status", bytes.fromhex("889acac8b21234da8f")] * 2 +
                      [b"\x0bgrpc-statux"])
    value = Encoder().encode([("v", code.decode())], huffman=rng.random() < 0.5)[3:]
    if rng.random() < 0.15:
        value = bytes([0x80 | rng.choice([1, 2, 3])]) + rng.randbytes(3)
    field = rng.choice([form + name + value] * 4 + [b"\xbe", b"\x7f\x00\x0214"])
    return rng.choice(GRPC_BEFORE) + field + rng.choice([b"", b"\x00\x0cgrpc-message\x02no"])


def h2_payload(rng: random.Random) -> bytes:
    """Server frames around a response HEADERS frame, mutated: a byte set or flipped in
    a frame header or the block, a cut, random bytes before it (a segment starting
    mid-frame), or a wrong length."""
    frames = [rng.choice([h2_frame(4, 0, 0, b"\x00\x03\x00\x00\x00\x80"), h2_frame(4, 1, 0, b""),
                          h2_frame(8, 0, 0, b"\x00\x00\xff\xff"), h2_frame(6, 1, 0, b"8bytes!!"),
                          h2_frame(0, 0, 1, b"<html>x</html>")])
              for _ in range(rng.randrange(3))]
    grpc = rng.random() < 0.4
    block = grpc_block(rng) if grpc else h2_block(rng)
    flags = 0x04 | rng.choice([0, 0, 1, 8, 0x20, 0x29])
    if grpc and rng.random() < 0.8:
        flags |= 0x01                   # trailers end the stream

    body = block
    if flags & 0x20:
        body = b"\x00\x00\x00\x03\x10" + body
    if flags & 0x08:
        pad = rng.randrange(4)
        body = bytes([pad]) + body + b"\x00" * pad
    frames.append(h2_frame(1, flags, rng.choice([1, 1, 3, 2, 0]), body))
    frames.append(h2_frame(0, 1, 1, b"body" * rng.randrange(10)))
    out = bytearray(b"".join(frames))
    op = rng.randrange(6)
    if op == 0:
        out[rng.randrange(len(out))] = rng.choice(INTERESTING + [0x01, 0x04, 0x8e, 0x48, 0x82])
    elif op == 1:
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    elif op == 2:
        out = out[:rng.randrange(len(out) + 1)]
    elif op == 3:
        out = bytearray(rng.randbytes(rng.randrange(1, 12))) + out
    elif op == 4:
        out = out[rng.randrange(1, len(out)):]
    return bytes(out)


# --- conversations ---------------------------------------------------------------------

# How a conversation's start was seen: the whole handshake, only the SYN-ACK (the SYN went
# by before the capture: since a SYN-ACK names no side, the same as unseen but for the
# SYN-ACK's own packet), or nothing of it (the connection was under way already).
HANDSHAKE, SYNACK_ONLY, UNSEEN = "handshake", "synack-only", "unseen"
STARTS = [(HANDSHAKE, 80), (SYNACK_ONLY, 8), (UNSEEN, 12)]


def random_start(rng: random.Random) -> str:
    return rng.choices([s for s, _ in STARTS], [w for _, w in STARTS])[0]


class Talk:
    """The segments of one connection, (spec, from_client) in order, with each side's
    sequence numbers kept."""

    def __init__(self, rng: random.Random, conn: Conn):
        self.conn = conn
        self.seq = {True: rng.randrange(1 << 32), False: rng.randrange(1 << 32)}
        self.out: list = []

    def send(self, from_client: bool, payload: bytes = b"", flags: int = TCP_ACK, **kw):
        spec = tcp_spec(self.conn, from_client, payload, flags, seq=self.seq[from_client],
                        ack=self.seq[not from_client], **kw)
        grow = len(payload) + (1 if flags & (TCP_SYN | TCP_FIN) else 0)
        self.seq[from_client] = (self.seq[from_client] + grow) & 0xFFFFFFFF
        self.out.append((spec, from_client))

    def c(self, payload: bytes = b"", flags: int = TCP_ACK, **kw):
        self.send(True, payload, flags, **kw)

    def s(self, payload: bytes = b"", flags: int = TCP_ACK, **kw):
        self.send(False, payload, flags, **kw)

    def start(self, how: str) -> None:
        if how == HANDSHAKE:
            self.c(flags=TCP_SYN, options=SYN_OPTS, window=64240)
        if how != UNSEEN:
            self.s(flags=TCP_SYN | TCP_ACK, options=SYN_OPTS, window=65160)
            self.c(flags=TCP_ACK)

    def close(self, rng: random.Random) -> None:
        if rng.random() < 0.8:
            self.c(flags=TCP_FIN | TCP_ACK)
            self.s(flags=TCP_FIN | TCP_ACK)
            self.c(flags=TCP_ACK)
        else:
            self.s(flags=TCP_RST | TCP_ACK, options=b"")


def random_codes(rng: random.Random) -> list:
    return [rng.choices([x for x, _ in CODE_WEIGHTS], [w for _, w in CODE_WEIGHTS])[0]
            for _ in range(rng.randrange(1, 4))]


def conversation(rng: random.Random, conn: Conn, codes=None, start: str = HANDSHAKE,
                 close: bool = True) -> list:
    """(spec, from_client) for an HTTP/1.1 connection: its start as `start` says, 1-3
    exchanges, close (FIN or RST)."""
    t = Talk(rng, conn)
    t.start(start)
    for code in list(codes) if codes else random_codes(rng):
        t.c(request(rng, conn.srv), TCP_PSH | TCP_ACK)
        if rng.random() < 0.3:
            t.s(flags=TCP_ACK)
        if code == 100:
            t.s(b"HTTP/1.1 100 Continue\r\n\r\n", TCP_PSH | TCP_ACK)
            code = 200
        version = b"1.0" if rng.random() < 0.1 else b"1.1"
        body = response(code, version, rng.choice((0, 60, 120, 300)), rng.random() < 0.95)
        if len(body) > 400 and rng.random() < 0.5:
            t.s(body[:300], TCP_ACK)
            t.s(body[300:], TCP_PSH | TCP_ACK)
        else:
            t.s(body, TCP_PSH | TCP_ACK)
        t.c(flags=TCP_ACK)
    if close:
        t.close(rng)
    return t.out


H2_SETTINGS = h2_frame(4, 0, 0, b"\x00\x03\x00\x00\x00\x64\x00\x04\x00\x00\xff\xff")
H2_SETTINGS_ACK = h2_frame(4, 1, 0, b"")


def h2_request_block(rng: random.Random, host: str) -> bytes:
    """A request's header block: hpack's encoding (its first field :method, static 2 or
    3), sometimes after a size update, or starting with :authority as a literal (name
    index 1), or with a dynamic reference (a later request of the connection: no
    pseudo-header to see)."""
    method = rng.choice(["GET", "GET", "POST"])
    fields = [(":method", method), (":scheme", "https"),
              (":path", rng.choice(PATHS_REQ).decode()), (":authority", host)]
    if rng.random() < 0.2:
        fields.insert(0, fields.pop())
    block = Encoder().encode(fields + [("user-agent", "fuzz/1")], huffman=rng.random() < 0.5)
    r = rng.random()
    if r < 0.1:
        block = rng.choice([b"\x20", b"\x3f\xe1\x1f"]) + block
    elif r < 0.15:
        block = b"\xbe" + block
    return block


def h2_response_frames(rng: random.Random, stream: int, grpc: bool) -> list:
    """The server's segments answering one stream: HEADERS (a :status, hpack's or hand
    made) and DATA, or for gRPC HEADERS, DATA and trailers (grpc-status)."""
    if grpc:
        head = h2_frame(1, 0x04, stream, b"\x88\x5f\x10application/grpc")
        trailers = h2_frame(1, 0x05, stream, grpc_block(rng))
        if rng.random() < 0.3:                   # trailers-only
            return [h2_frame(1, 0x05, stream, b"\x88" + grpc_block(rng))]
        return [head + h2_frame(0, 0, stream, b"\x00\x00\x00\x00\x02\x08\x01"), trailers]
    block = h2_block(rng)
    if rng.random() < 0.5:
        return [h2_frame(1, 0x04, stream, block) + h2_frame(0, 1, stream, b"<html>x</html>")]
    return [h2_frame(1, 0x05 if rng.random() < 0.3 else 0x04, stream, block),
            h2_frame(0, 1, stream, b"body" * rng.randrange(1, 20))]


def h2_conversation(rng: random.Random, conn: Conn, start: str = HANDSHAKE,
                    grpc: bool = False, close: bool = True) -> list:
    """(spec, from_client) for an HTTP/2 (or gRPC) connection: its start as `start`
    says, the preface and SETTINGS (not when the connection was under way already, mostly),
    1-3 streams, close."""
    t = Talk(rng, conn)
    t.start(start)
    if start != UNSEEN or rng.random() < 0.3:
        t.c(R.H2_PREFACE + H2_SETTINGS, TCP_PSH | TCP_ACK)
        t.s(H2_SETTINGS + H2_SETTINGS_ACK, TCP_PSH | TCP_ACK)
        if rng.random() < 0.7:
            t.c(H2_SETTINGS_ACK, TCP_PSH | TCP_ACK)
    for stream in (1, 3, 5)[:rng.randrange(1, 4)]:
        request_frames = h2_frame(1, 0x04 if grpc else 0x05, stream,
                                  h2_request_block(rng, conn.srv))
        if grpc:
            request_frames += h2_frame(0, 1, stream, b"\x00\x00\x00\x00\x02\x08\x01")
        t.c(request_frames, TCP_PSH | TCP_ACK)
        for payload in h2_response_frames(rng, stream, grpc):
            t.s(payload, TCP_PSH | TCP_ACK)
        t.c(flags=TCP_ACK)
    if close:
        t.close(rng)
    return t.out


# gRPC codes a channel's calls end with: mostly OK.
CHANNEL_CODES = [0] * 10 + [1, 2, 4, 5, 8, 13, 14, 16]
# A server segment's payload at most (the test run takes frames up to 3712 bytes).
MSS = 1400


def grpc_call_frames(rng: random.Random, server: Encoder, stream: int, code: int,
                     huffman: bool) -> bytes:
    """The server's frames answering one call on a channel, through the channel's one
    encoder: a trailers-only response, or headers, a message and trailers; random
    metadata in either (request ids, whose new values keep the dynamic table turning
    over), grpc-message with an error."""
    def metadata():
        return [(rng.choice(["x-request-id", "x-trace", "x-shard", "server-timing"]),
                 rng.choice(["a", "b", "%x" % rng.getrandbits(rng.choice([8, 32, 64]))]))
                for _ in range(rng.choice([0, 0, 1, 1, 2, 3]))]
    error = [("grpc-message", rng.choice(["failed %d" % code, "deadline", "x" * 40]))] \
        if code else []
    if code and rng.random() < 0.5:
        fields = [(":status", "200"), ("content-type", "application/grpc"),
                  ("grpc-status", str(code))] + error + metadata()
        return h2_frame(1, 0x05, stream, server.encode(fields, huffman=huffman))
    head = server.encode([(":status", "200"), ("content-type", "application/grpc")]
                         + metadata(), huffman=huffman)
    size = rng.choice([2, 2, 20, 300]) if rng.random() < 0.98 else rng.randrange(1500, 5000)
    message = b"\x00" + size.to_bytes(4, "big") + bytes(size)
    trailers = server.encode([("grpc-status", str(code))] + error + metadata(),
                             huffman=huffman)
    return (h2_frame(1, 0x04, stream, head) + h2_frame(0, 0, stream, message)
            + h2_frame(1, 0x05, stream, trailers))


def grpc_channel(rng: random.Random, conn: Conn, start: str = HANDSHAKE, close: bool = True,
                 calls: int | None = None) -> list:
    """(spec, from_client) for a long-lived gRPC channel: one connection whose calls all
    go through one HPACK encoder per side (hpack's), so that later trailers refer to the
    grpc-status entries of earlier ones: the server's state that the classifier
    follows. Now and then the server's table size changes (as after a client's
    SETTINGS_HEADER_TABLE_SIZE: a size update, 0 empties it), the server answers several
    calls in one write, or a message spans segments."""
    t = Talk(rng, conn)
    t.start(start)
    server, client = Encoder(), Encoder()
    if start != UNSEEN or rng.random() < 0.3:
        t.c(R.H2_PREFACE + H2_SETTINGS, TCP_PSH | TCP_ACK)
        t.s(H2_SETTINGS + H2_SETTINGS_ACK, TCP_PSH | TCP_ACK)
        t.c(H2_SETTINGS_ACK, TCP_PSH | TCP_ACK)
    written = b""
    calls = calls if calls is not None else rng.randrange(1, 60)
    for n in range(calls):
        stream = 2 * n + 1
        huffman = rng.random() < 0.8
        request = client.encode([(":method", "POST"), (":scheme", "http"),
                                 (":path", "/t.S/Call"), (":authority", conn.srv),
                                 ("content-type", "application/grpc"), ("te", "trailers")],
                                huffman=huffman)
        t.c(h2_frame(1, 0x04, stream, request) + h2_frame(0, 1, stream, b"\x00\x00\x00\x00\x00"),
            TCP_PSH | TCP_ACK)
        if rng.random() < 0.04:
            server.header_table_size = rng.choice([0, 0, 64, 256, 4096])
        written += grpc_call_frames(rng, server, stream, rng.choice(CHANNEL_CODES), huffman)
        if n == calls - 1 or rng.random() < 0.7:
            for at in range(0, len(written), MSS):
                t.s(written[at:at + MSS], TCP_PSH | TCP_ACK)
            written = b""
            t.c(flags=TCP_ACK)
    if close:
        t.close(rng)
    return t.out


# --- mutations -------------------------------------------------------------------------

def _ext_kinds(rng):
    return rng.choice([hop_by_hop, routing, dest_opts])(rng.randrange(4))


def tcp_header_len(s: dict) -> int:
    """The real length of the spec's TCP header (whatever its data offset says)."""
    if s.get("l4") != "tcp":
        return 8 if s.get("l4") == "udp" else 0
    return 20 + len(s["options"]) + (-len(s["options"]) % 4)


def mutate_spec(rng: random.Random, s: dict) -> str:
    """Applies one random structural mutation to `s` (in place); returns its name."""
    fam, is_tcp = s["family"], s.get("l4") == "tcp"
    choices = ["vlans", "ethertype", "trailer"]
    if fam in (4, 6):
        choices += ["version", "proto"]
    if fam == 4:
        choices += ["ihl", "ihl", "tot_len", "tot_len", "frag4", "frag4", "ipopts"]
    if fam == 6:
        choices += ["plen", "plen", "ext_lie", "ext_lie", "frag6", "frag6", "ext_chain",
                    "ext_chain", "ah"]
    if is_tcp:
        choices += ["doff", "doff", "window0", "flags", "flags", "status", "status", "status",
                    "topts", "ports", "swap", "h2", "h2", "h2"]
    m = rng.choice(choices)
    ip = s["ip"]
    if m == "vlans":
        tpids = (F.ETH_P_8021Q, F.ETH_P_8021AD, 0x9100, F.ETH_P_8021Q)
        s["vlans"] = [(rng.choice(tpids), rng.randrange(4096)) for _ in range(rng.randrange(4))]
    elif m == "ethertype":
        s["ethertype_override"] = rng.choice([F.ETH_P_IP, F.ETH_P_IPV6, F.ETH_P_ARP,
                                              F.ETH_P_LLDP, F.ETH_P_8021Q, F.ETH_P_8021AD,
                                              0x0600, 0x05DC, 0x0000, 0xFFFF,
                                              rng.randrange(0x10000)])
    elif m == "trailer":
        s["trailer"] = rng.choice([b"\0" * rng.randrange(1, 40), b" OK\r\n",
                                   bytes(rng.randrange(256) for _ in range(rng.randrange(1, 20))),
                                   b"HTTP/1.1 500 Internal Server Error\r\n"])
    elif m == "version":
        ip["version"] = rng.randrange(16)
    elif m == "proto":
        s["proto_override"] = rng.choice([F.IPPROTO_UDP, F.IPPROTO_ICMP, F.IPPROTO_ICMPV6, 51,
                                          50, 59, 0, 43, 44, 60, 132, rng.randrange(256)])
    elif m == "ihl":
        ip["ihl"] = rng.randrange(16)
        if rng.random() < 0.3:
            ip["options"] = ipv4_options(4 * rng.randrange(11))
    elif m == "tot_len":
        opts = ip.get("options", b"")
        ihl = 20 + len(opts) + (-len(opts) % 4)
        real = len(build(s)[0]) - 14 - 4 * len(s["vlans"]) - len(s["trailer"])
        th = tcp_header_len(s)
        ip["tot_len"] = rng.choice([0, 1, 19, 20, ihl - 1, ihl, ihl + 19, ihl + 20, ihl + th - 1,
                                    ihl + th, ihl + th + 12, ihl + th + 13, real - 1, real + 1,
                                    real + 100, 65535, rng.randrange(65536)])
    elif m == "frag4":
        ip["frag_offset"] = rng.choice([0, 0, 1, 2, 185, 0x1000, 0x1FFF, rng.randrange(8192)])
        ip["mf"] = rng.random() < 0.5
        ip["df"] = rng.random() < 0.5
    elif m == "ipopts":
        ip["options"] = ipv4_options(4 * rng.randrange(11))
    elif m == "plen":
        body = len(build(s)[0]) - 14 - 4 * len(s["vlans"]) - 40 - len(s["trailer"])
        chain = sum(len(e.pack(0)) for e in ip.get("ext", [])) + len(s.get("l4_prefix", b""))
        th = tcp_header_len(s)
        ip["payload_len"] = rng.choice([0, 1, 7, 8, 19, 20, chain, chain + th - 1, chain + th,
                                        chain + th + 12, chain + th + 13, body - 1, body + 1,
                                        body + 100, 65535, rng.randrange(65536)])
    elif m == "ext_lie":
        ext = ip.setdefault("ext", [])
        if not ext or rng.random() < 0.3:
            ext.insert(rng.randrange(len(ext) + 1), _ext_kinds(rng))
        i = rng.randrange(len(ext))
        if ext[i].kind == F.IPPROTO_FRAGMENT:
            ext[i] = _ext_kinds(rng)
        e = ext[i]
        ext[i] = F.Ext(e.kind, units=e.units, hdrlen=rng.choice(
            [0, 1, 2, e.units + 1, max(0, e.units - 1), 255, rng.randrange(256)]))
    elif m == "frag6":
        ext = ip.setdefault("ext", [])
        ext.insert(rng.randrange(len(ext) + 1),
                   fragment(rng.choice([0, 0, 1, 2, 0x1FFF, rng.randrange(8192)]),
                            rng.random() < 0.5))
    elif m == "ext_chain":
        ip["ext"] = [rng.choice([hop_by_hop, routing, dest_opts, lambda u: fragment(0, True),
                                 lambda u: fragment(rng.randrange(3), False)])(rng.randrange(3))
                     for _ in range(rng.randrange(9))]
    elif m == "ah":
        nh = F.IPPROTO_TCP if is_tcp else rng.randrange(256)
        s["l4_prefix"] = bytes([nh, 4, 0, 0]) + b"\0" * 20
        s["proto_override"] = 51
    elif m == "doff":
        s["doff"] = rng.randrange(16)
    elif m == "window0":
        s["window"] = 0
    elif m == "flags":
        s["flags"] = rng.randrange(256)
    elif m == "status":
        s["payload"] = status_payload(rng)
    elif m == "h2":
        s["payload"] = h2_payload(rng)
    elif m == "topts":
        s["options"] = tcp_options(4 * rng.randrange(11))
    elif m == "ports":
        s["sport"], s["dport"] = rng.choice([(s["dport"], s["sport"]), (80, 80),
                                             (rng.randrange(65536), rng.randrange(65536)),
                                             (0, 0), (65535, 0), (511, 512), (512, 511)])
        if rng.random() < 0.3:
            s["dst"] = s["src"]  # one host talking to itself: the ports decide the order
    elif m == "swap":
        s["src"], s["dst"] = s["dst"], s["src"]
        s["sport"], s["dport"] = s["dport"], s["sport"]
    return m


INTERESTING = [0x00, 0xFF, 0x45, 0x4F, 0x60, 0x06, 0x11, 0x2C, 0x3C, 0x2B, 0x81, 0x88, 0x86,
               0xDD, 0x08, 0x50, 0xF0, 0x48]


def mutate_bytes(rng: random.Random, frame: bytes, l4: int | None) -> tuple[bytes, str]:
    m = rng.choice(["cut", "cut", "flip", "flip", "set", "append", "tcpres"])
    b = bytearray(frame)
    if not b and m in ("flip", "set"):
        m = "append"
    if m == "cut":
        return frame[:rng.randrange(len(frame) + 1)], m
    if m == "flip":
        for _ in range(rng.randrange(1, 5)):
            i = rng.randrange(min(len(b), 120) if rng.random() < 0.8 else len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif m == "set":
        b[rng.randrange(min(len(b), 120))] = rng.choice(INTERESTING)
    elif m == "append":
        b += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 30)))
    elif m == "tcpres" and l4 is not None and l4 + 12 < len(b):
        b[l4 + 12] = (b[l4 + 12] & 0xF0) | rng.randrange(16)  # reserved bits and AE/NS
    return bytes(b), m


# --- the generator ---------------------------------------------------------------------

# A truncation sweep (one realistic frame cut at every offset) starts every this many
# frames until all are done: within the default 100,000 frames.
SWEEP_EVERY = 900
# Shares of the frames that are not truncation sweeps.
SHARES = {"mutation": 0.4, "conversation": 0.3, "channel": 0.08, "hostile": 0.1,
          "flag": 0.07, "crowd": 0.05}
# skb->ingress_ifindex of egress packets: FORWARDED_FROM is an interface the fuzz puts in
# the `monitored` map (a packet forwarded from it was seen before), NOT_MONITORED is not.
FORWARDED_FROM = 1001
NOT_MONITORED = 1002
# Shares of the conversations that are HTTP/2, and of those, gRPC.
H2_SHARE, GRPC_SHARE = 0.25, 0.4
HOSTILE = ("client-status", "client-h2-status", "lone", "wrong-direction", "reuse",
           "synack-from-client", "server-request")


class Item(NamedTuple):
    """One frame of the stream: what to feed on which hook; `what` made it."""
    frame: bytes
    direction: str
    what: str
    ingress_ifindex: int = 0


def other(direction: str) -> str:
    return "ingress" if direction == "egress" else "egress"


class Generator:
    """The seeded stream of Items. `slots`: the classifier's connection slots; the
    stream's crowds (connections that share a bucket) are computed for them and for
    hash_seed, which the test sets in the classifier (config.hash_seed) before feeding
    the stream."""

    def __init__(self, seed: int, total: int, slots: int = 4096):
        self.rng = rng = random.Random(seed)
        self.total = total
        self.slots = slots
        self.hash_seed = random.Random(f"conns-{seed}").getrandbits(32)
        self.conns = [random_conn(rng) for _ in range(400)]
        # The realistic set that every offset of is tried: the same exchanges over each
        # kind of link and network layer.
        kinds = [Conn(4, "198.19.7.10", 40000, "198.18.0.80", 80),
                 Conn(4, "198.19.7.11", 40001, "198.18.0.80", 80, vlans=(100,)),
                 Conn(4, "198.19.7.12", 40002, "198.18.0.80", 80, ipopts=ipv4_options(12)),
                 Conn(6, "2001:db8:7::10", 40000, "2001:db8::80", 80),
                 Conn(6, "2001:db8:7::11", 40001, "2001:db8::80", 8080,
                      vlans=((F.ETH_P_8021AD, 200),)),
                 Conn(6, "2001:db8:7::12", 40002, "2001:db8::80", 80,
                      ext=(hop_by_hop(), dest_opts(1), fragment(0, True)))]
        self.sweep_base = []
        for i, conn in enumerate(kinds):
            codes = [(200, 404, 500)[i % 3], (503, 200, 301)[i % 3]]
            self.sweep_base += [build(s)[0] for s, _ in conversation(rng, conn, codes)]
            self.sweep_base += [build(s)[0] for s, _ in h2_conversation(rng, conn)][3:6]
        self.sweep_base += [build(s)[0] for s in non_tcp_specs(rng)]
        self.templates = [s for c in self.conns for s, _ in conversation(rng, c)]
        self.templates += [s for c in self.conns[:100]
                           for s, _ in h2_conversation(rng, c, grpc=rng.random() < 0.5)]
        self.non_tcp = [s for _ in range(20) for s in non_tcp_specs(rng)]

    def __iter__(self):
        """Yields Items, and None at episode boundaries. The stream does not depend on
        `total` (which only ends it): the first N frames of a seed are the same in a run
        of N frames as in a longer one."""
        rng = self.rng
        sweeps = list(self.sweep_base)
        rng.shuffle(sweeps)
        self.sweeps_done = 0
        made = 0
        next_sweep = 0
        made_by = Counter()
        while made < self.total:
            if sweeps and made >= next_sweep:
                next_sweep += SWEEP_EVERY
                frame = sweeps.pop()
                self.sweeps_done += 1
                direction = rng.choice(DIRECTIONS)
                offsets = list(range(len(frame) + 1))
                if rng.random() < 0.5:
                    offsets.reverse()
                episode = [Item(frame[:n], direction, "sweep") for n in offsets]
            else:
                # The kind furthest behind its share of the frames made so far.
                kind = max(SHARES, key=lambda k: SHARES[k] * (made_by[""] + 1) - made_by[k])
                episode = getattr(self, f"{kind}_episode")()
                made_by[""] += len(episode)
                made_by[kind] += len(episode)
            for item in episode:
                if made >= self.total:
                    return
                yield item
                made += 1
            yield None  # episode boundary: a checkpoint may run here

    def ingress_ifindex(self, direction: str, forwarded: bool) -> int:
        """skb->ingress_ifindex for a packet on `direction`: at egress of a forwarded
        connection, mostly the monitored interface it came in through; else mostly 0 (the
        host's own packets), now and then either index (which means nothing at ingress)."""
        r = self.rng.random()
        if forwarded and direction == "egress":
            return FORWARDED_FROM if r < 0.9 else 0
        if r < 0.02:
            return self.rng.choice((FORWARDED_FROM, NOT_MONITORED))
        return 0

    def place(self, talk: list, what: str, mutate: float = 0.1) -> list:
        """Items for a connection's segments: the client's on one hook (either), the
        server's on the other; a few on the wrong one, a few mutated. A segment given as
        (spec, from_client, "flip") goes on the other side's hook."""
        rng = self.rng
        client_dir = rng.choice(DIRECTIONS)
        forwarded = rng.random() < 0.15
        out = []
        for spec, from_client, *flip in talk:
            d = client_dir if from_client else other(client_dir)
            w = what
            if flip or rng.random() < 0.02:
                d, w = other(d), "wrong-direction"
            if rng.random() < mutate:
                frame, w = self.mutated(spec, 1, rng.randrange(2))
            else:
                frame = build(spec)[0]
            out.append(Item(frame, d, w, self.ingress_ifindex(d, forwarded)))
        return out

    def mutated(self, spec: dict, structural: int, byte_level: int) -> tuple[bytes, str]:
        rng = self.rng
        for _ in range(20):
            s = copy_spec(spec)
            names = [mutate_spec(rng, s) for _ in range(structural)]
            frame, l4 = build(s)
            for _ in range(byte_level):
                frame, m = mutate_bytes(rng, frame, l4)
                names.append(m)
            if addresses_allowed(frame):
                return frame, "+".join(names) or "plain"
        return build(spec)[0], "plain"

    def talk(self, conn: Conn, start: str | None = None, close: bool = True, codes=None):
        """A random conversation of `conn`: HTTP/1.1, HTTP/2 or gRPC."""
        rng = self.rng
        start = start or random_start(rng)
        if codes is None and rng.random() < H2_SHARE:
            return h2_conversation(rng, conn, start, grpc=rng.random() < GRPC_SHARE,
                                   close=close), "h2-conversation"
        return conversation(rng, conn, codes, start, close), "conversation"

    def conversation_episode(self) -> list:
        talk, what = self.talk(self.rng.choice(self.conns))
        return self.place(talk, what)

    def channel_episode(self) -> list:
        """A long-lived gRPC channel (grpc_channel), now and then a segment mutated."""
        rng = self.rng
        talk = grpc_channel(rng, rng.choice(self.conns), random_start(rng))
        return self.place(talk, "grpc-channel", mutate=0.01)

    def hostile_episode(self) -> list:
        """A connection with a hostile segment in it, or a lone one (see HOSTILE)."""
        rng = self.rng
        kind = rng.choice(HOSTILE)
        conn = rng.choice(self.conns)
        talk, _ = self.talk(conn, close=False)
        at = rng.randrange(min(3, len(talk)), len(talk) + 1)
        if kind == "client-status":
            # The client sends a status line (its own data, or an attempt to trigger).
            payload = rng.choice([response(500), response(503), status_payload(rng)])
            talk.insert(at, (tcp_spec(conn, True, payload, TCP_PSH | TCP_ACK), True))
        elif kind == "client-h2-status":
            payload = h2_frame(1, 0x04, 1, rng.choice([b"\x8e", b"\x48\x03503", h2_block(rng)]))
            talk.insert(at, (tcp_spec(conn, True, payload, TCP_PSH | TCP_ACK), True))
        elif kind == "lone":
            # A segment of a 4-tuple nobody opened, either way, then maybe an ACK back.
            lone = random_conn(rng)
            from_client = rng.random() < 0.3
            payload = rng.choice([response(500), response(502), h2_payload(rng),
                                  h2_frame(1, 0x04, 1, b"\x8e"), request(rng, lone.srv)])
            talk = [(tcp_spec(lone, from_client, payload, TCP_PSH | TCP_ACK), from_client)]
            if rng.random() < 0.5:
                talk.append((tcp_spec(lone, not from_client), not from_client))
        elif kind == "wrong-direction":
            # The server's address on a segment travelling the client's way: spoofed.
            payload = rng.choice([response(500), response(503), h2_frame(1, 0x04, 1, b"\x8e")])
            talk.insert(at, (tcp_spec(conn, False, payload, TCP_PSH | TCP_ACK), False, "flip"))
        elif kind == "reuse":
            # The 4-tuple reused: a new SYN after a request (kept, when the snapshot is
            # on) and maybe its error; the new connection's response may come without a
            # request, or the old server may be the new client.
            talk, _ = self.talk(conn, HANDSHAKE, close=False, codes=[rng.choice((500, 200))])
            again = conn if rng.random() < 0.7 else Conn(conn.family, conn.srv, conn.sport,
                                                         conn.cli, conn.cport, conn.vlans,
                                                         conn.ext, conn.ipopts)
            second = conversation(rng, again, [503], HANDSHAKE)
            if rng.random() < 0.5:
                second = [x for x in second if not request_start_spec(x[0])]
            talk = talk + second
        elif kind == "synack-from-client":
            # A SYN, then a SYN-ACK from the same side (a client's own, or spoofed): it
            # names no side, and the SYN's stands.
            talk.insert(at, (tcp_spec(conn, True, b"", TCP_SYN | TCP_ACK, options=SYN_OPTS),
                             True))
        else:  # server-request: a request start, or a request's HEADERS, from the server
            payload = rng.choice([request(rng, conn.cli),
                                  h2_frame(1, 0x05, 1, h2_request_block(rng, conn.cli))])
            talk.insert(at, (tcp_spec(conn, False, payload, TCP_PSH | TCP_ACK), False))
        return self.place(talk, kind, mutate=0.03)

    def colliding(self, n: int) -> list:
        """Up to n connections (one client and server, client ports varied) whose states
        share a bucket of the classifier's slots."""
        rng = self.rng
        base = rng.choice(self.conns)
        buckets: dict[int, list] = {}
        for port in rng.sample(range(1024, 65536), 2 * self.slots // R.CONN_WAYS):
            c = dataclasses.replace(base, cport=port)
            key = FlowKey.from_endpoints(c.cli, c.cport, c.srv, c.sport)
            bucket = R.conn_bucket(key, R.LOOPBACK_IFINDEX, self.hash_seed, self.slots)
            buckets.setdefault(bucket, []).append(c)
        return max(buckets.values(), key=len)[:n]

    def crowd_episode(self) -> list:
        """Five to seven connections of one bucket, their segments interleaved: each new
        state past the fourth takes the slot of the one touched longest ago (marked or
        not), whose next segments then find no state, or start another."""
        rng = self.rng
        talks = [self.talk(c, codes=[rng.choice((500, 503, 200, 404))])[0]
                 for c in self.colliding(rng.randrange(5, 8))]
        merged = []
        while any(talks):
            for t in talks:
                if t:
                    merged.append(t.pop(0))
        return self.place(merged, "crowd", mutate=0.02)

    def flag_episode(self) -> list:
        """Every TCP flag byte on a response and on a bare segment of one flow."""
        rng = self.rng
        conn = rng.choice(self.conns)
        out = []
        flags = list(range(256))
        rng.shuffle(flags)
        for fl in flags[:rng.randrange(16, 65)]:
            payload = rng.choice([b"", response(rng.choice((200, 500, 503, 404))),
                                  request(rng, conn.srv)])
            spec = tcp_spec(conn, rng.random() < 0.5, payload, fl,
                            window=rng.choice((0, 0, 502, 65535)))
            d = rng.choice(DIRECTIONS)
            out.append(Item(build(spec)[0], d, "flags", self.ingress_ifindex(d, False)))
        return out

    def mutation_episode(self) -> list:
        rng = self.rng
        spec = rng.choice(self.non_tcp if rng.random() < 0.15 else self.templates)
        structural = rng.choice((0, 1, 1, 1, 2, 2, 3))
        byte_level = rng.choice((0, 0, 1, 1, 2)) if structural else rng.randrange(1, 4)
        frame, what = self.mutated(spec, structural, byte_level)
        d = rng.choice(DIRECTIONS)
        out = [Item(frame, d, what, self.ingress_ifindex(d, False))]
        if spec.get("l4") == "tcp" and rng.random() < 0.5:
            # A later packet of the same flow, the other way: was the flow marked?
            back = tcp_spec(Conn(spec["family"], spec["dst"], spec["dport"], spec["src"],
                                 spec["sport"], tuple(spec["vlans"])), True, b"")
            out.append(Item(build(back)[0], rng.choice(DIRECTIONS), "follow-up"))
        return out


def request_start_spec(spec: dict) -> bool:
    return R.request_start(spec["payload"])
