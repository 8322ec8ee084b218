"""Frame crafting for the classifier tests: plain struct packing, so that every field can
be set to a wrong value on purpose.

Layers are built inside out and each builder takes the layer above as `payload`:

    eth(ipv4(tcp(40000, 80, b"HTTP/1.1 500 x"), "198.18.0.1", "198.18.0.2"))

Length and offset fields (IHL, total length, data offset, payload length, extension
header lengths) are computed unless given explicitly, which is how the malformed variants
are made. Checksums are filled in where the layer knows enough to do it (IPv4 header; TCP
and UDP when built through tcp4/tcp6/udp4/udp6); the classifier does not check them, but
dpkt and tcpdump do, and a frame that only "works" because nothing verifies it would be a
poor fixture. `cut()` truncates any frame."""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8
ETH_P_IPV6 = 0x86DD
ETH_P_LLDP = 0x88CC

IPPROTO_HOPOPTS = 0
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ROUTING = 43
IPPROTO_FRAGMENT = 44
IPPROTO_ICMPV6 = 58
IPPROTO_NONE = 59
IPPROTO_DSTOPTS = 60

TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10

MAC_CLIENT = bytes.fromhex("020000000001")
MAC_SERVER = bytes.fromhex("020000000002")

ETH_LEN = 14
VLAN_LEN = 4
IPV4_LEN = 20
IPV6_LEN = 40
TCP_LEN = 20


def cut(frame: bytes, length: int) -> bytes:
    """The first `length` bytes of `frame` (a truncated capture of it)."""
    if length > len(frame):
        raise ValueError(f"cannot cut a {len(frame)}-byte frame to {length} bytes")
    return frame[:length]


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


# --- link layer ------------------------------------------------------------------------

def eth(payload: bytes, ethertype: int = ETH_P_IP, vlans=(), src: bytes = MAC_SERVER,
        dst: bytes = MAC_CLIENT, trailer: bytes = b"") -> bytes:
    """An Ethernet frame. `vlans` is a sequence of tags, outermost first, each a VLAN id
    (tagged 802.1Q) or a (TPID, VLAN id) pair; `trailer` is appended after the payload
    (padding or garbage that the IP length fields do not cover)."""
    tags = []
    for tag in vlans:
        tpid, vid = tag if isinstance(tag, tuple) else (ETH_P_8021Q, tag)
        tags.append((tpid, vid))
    header = dst + src
    if tags:
        header += struct.pack("!H", tags[0][0])
        for i, (_, vid) in enumerate(tags):
            inner = tags[i + 1][0] if i + 1 < len(tags) else ethertype
            header += struct.pack("!HH", vid & 0x0FFF, inner)
    else:
        header += struct.pack("!H", ethertype)
    return header + payload + trailer


def arp(sender_ip: str, target_ip: str, op: int = 1, sender_mac: bytes = MAC_CLIENT,
        target_mac: bytes = b"\0" * 6) -> bytes:
    """An Ethernet/IPv4 ARP message (the Ethernet payload; wrap with eth(..., ETH_P_ARP))."""
    return (struct.pack("!HHBBH", 1, ETH_P_IP, 6, 4, op) + sender_mac
            + ipaddress.IPv4Address(sender_ip).packed + target_mac
            + ipaddress.IPv4Address(target_ip).packed)


# --- IPv4 ------------------------------------------------------------------------------

def ipv4(payload: bytes, src: str, dst: str, proto: int = IPPROTO_TCP, *,
         options: bytes = b"", ihl: int | None = None, tot_len: int | None = None,
         version: int = 4, frag_offset: int = 0, mf: bool = False, df: bool = False,
         ident: int = 0x1234, ttl: int = 64) -> bytes:
    """An IPv4 packet. `options` is padded with End-of-Options to a multiple of 4 bytes;
    `ihl` (in 32-bit words) and `tot_len` default to the real lengths; `frag_offset` is in
    8-byte units."""
    options = options + b"\0" * (-len(options) % 4)
    if ihl is None:
        ihl = (IPV4_LEN + len(options)) // 4
    if tot_len is None:
        tot_len = IPV4_LEN + len(options) + len(payload)
    flags = (0x4000 if df else 0) | (0x2000 if mf else 0) | (frag_offset & 0x1FFF)
    header = struct.pack("!BBHHHBBH4s4s", (version << 4) | (ihl & 0xF), 0, tot_len & 0xFFFF,
                         ident, flags, ttl, proto, 0, ipaddress.IPv4Address(src).packed,
                         ipaddress.IPv4Address(dst).packed) + options
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + payload


def ipv4_options(length: int) -> bytes:
    """`length` bytes of valid IPv4 options (a multiple of 4, at most 40): a Record Route
    option filling all but the last byte, then End-of-Options."""
    if length % 4 or not 0 <= length <= 40:
        raise ValueError(f"IPv4 options are 0-40 bytes in 4-byte steps, not {length}")
    if length == 0:
        return b""
    if length == 4:
        return b"\x01\x01\x01\x00"  # NOP NOP NOP EOL
    rr_len = length - 1  # type, length, pointer, then (rr_len - 3) bytes of route data
    return struct.pack("!BBB", 7, rr_len, 4) + b"\0" * (rr_len - 3) + b"\0"


# --- IPv6 ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Ext:
    """One IPv6 extension header. For hop-by-hop, destination options and routing headers
    `units` is the Hdr Ext Len field (8-byte units beyond the first 8 bytes) and the body is
    padding options / a type 0 routing header with no segments left; `hdrlen` overrides the
    field without changing the bytes that follow (a lying length). For the fragment header
    `offset` is in 8-byte units and `more` is the M flag."""
    kind: int
    units: int = 0
    offset: int = 0
    more: bool = False
    ident: int = 0xCAFE
    hdrlen: int | None = None

    def pack(self, nexthdr: int) -> bytes:
        if self.kind == IPPROTO_FRAGMENT:
            return struct.pack("!BBHI", nexthdr, 0, ((self.offset & 0x1FFF) << 3) | int(self.more),
                               self.ident)
        size = (self.units + 1) * 8
        field = self.units if self.hdrlen is None else self.hdrlen
        if self.kind in (IPPROTO_HOPOPTS, IPPROTO_DSTOPTS):
            body = b"\x01" + bytes([size - 4]) + b"\0" * (size - 4)  # one PadN option
        elif self.kind == IPPROTO_ROUTING:
            body = b"\x00\x00" + b"\0" * (size - 4)  # routing type 0, segments left 0
        else:
            raise ValueError(f"not an extension header: {self.kind}")
        return struct.pack("!BB", nexthdr, field & 0xFF) + body


def hop_by_hop(units: int = 0, **kw) -> Ext:
    return Ext(IPPROTO_HOPOPTS, units=units, **kw)


def routing(units: int = 0, **kw) -> Ext:
    return Ext(IPPROTO_ROUTING, units=units, **kw)


def dest_opts(units: int = 0, **kw) -> Ext:
    return Ext(IPPROTO_DSTOPTS, units=units, **kw)


def fragment(offset: int = 0, more: bool = False, **kw) -> Ext:
    return Ext(IPPROTO_FRAGMENT, offset=offset, more=more, **kw)


def ipv6(payload: bytes, src: str, dst: str, proto: int = IPPROTO_TCP, *, ext=(),
         payload_len: int | None = None, version: int = 6, hop_limit: int = 64) -> bytes:
    """An IPv6 packet whose extension headers `ext` (Ext objects, in order) precede the
    upper-layer `payload` of protocol `proto`."""
    chain = b""
    kinds = [e.kind for e in ext] + [proto]
    for e, nxt in zip(ext, kinds[1:]):
        chain += e.pack(nxt)
    body = chain + payload
    if payload_len is None:
        payload_len = len(body)
    header = struct.pack("!IHBB16s16s", version << 28, payload_len & 0xFFFF, kinds[0], hop_limit,
                         ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed)
    return header + body


# --- transport -------------------------------------------------------------------------

def tcp(sport: int, dport: int, payload: bytes = b"", *, flags: int = TCP_PSH | TCP_ACK,
        seq: int = 1000, ack: int = 2000, options: bytes = b"", doff: int | None = None,
        window: int = 65535, pseudo: bytes | None = None) -> bytes:
    """A TCP segment. `options` is padded with NOPs to a multiple of 4; `doff` (in 32-bit
    words) defaults to the real header length. With `pseudo` (the pseudo-header without
    the length) the checksum is filled in."""
    options = options + b"\x01" * (-len(options) % 4)
    if doff is None:
        doff = (TCP_LEN + len(options)) // 4
    header = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, (doff & 0xF) << 4, flags,
                         window, 0, 0) + options
    segment = header + payload
    if pseudo is not None:
        csum = checksum(pseudo + struct.pack("!I", len(segment)) + segment)
        segment = segment[:16] + struct.pack("!H", csum) + segment[18:]
    return segment


def tcp_options(length: int) -> bytes:
    """`length` bytes of valid TCP options (a multiple of 4, at most 40): MSS, SACK
    permitted, window scale, timestamps as room allows, then NOPs."""
    if length % 4 or not 0 <= length <= 40:
        raise ValueError(f"TCP options are 0-40 bytes in 4-byte steps, not {length}")
    out = b""
    for opt in (struct.pack("!BBH", 2, 4, 1460), struct.pack("!BBII", 8, 10, 1, 0),
                b"\x04\x02", struct.pack("!BBB", 3, 3, 7)):
        if len(out) + len(opt) <= length:
            out += opt
    return out + b"\x01" * (length - len(out))


def udp(sport: int, dport: int, payload: bytes = b"", pseudo: bytes | None = None) -> bytes:
    datagram = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    if pseudo is not None:
        csum = checksum(pseudo + struct.pack("!I", len(datagram)) + datagram) or 0xFFFF
        datagram = datagram[:6] + struct.pack("!H", csum) + datagram[8:]
    return datagram


def _pseudo(src: str, dst: str, proto: int) -> bytes:
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    # The 32-bit length is appended by the transport builder; IPv4's real pseudo-header has
    # a zero byte, the protocol and a 16-bit length, which sums to the same checksum.
    return a.packed + b.packed + struct.pack("!3xB", proto)


# --- whole frames ----------------------------------------------------------------------

def tcp4(src: str, sport: int, dst: str, dport: int, payload: bytes = b"", *, vlans=(),
         trailer: bytes = b"", ip: dict | None = None, **tcp_kw) -> bytes:
    """An Ethernet/IPv4/TCP frame. `ip` holds keyword arguments for ipv4(), the rest go
    to tcp()."""
    seg = tcp(sport, dport, payload, pseudo=_pseudo(src, dst, IPPROTO_TCP), **tcp_kw)
    return eth(ipv4(seg, src, dst, IPPROTO_TCP, **(ip or {})), ETH_P_IP, vlans=vlans,
               trailer=trailer)


def tcp6(src: str, sport: int, dst: str, dport: int, payload: bytes = b"", *, vlans=(),
         trailer: bytes = b"", ip: dict | None = None, **tcp_kw) -> bytes:
    """An Ethernet/IPv6/TCP frame. `ip` holds keyword arguments for ipv6() (ext=...)."""
    seg = tcp(sport, dport, payload, pseudo=_pseudo(src, dst, IPPROTO_TCP), **tcp_kw)
    return eth(ipv6(seg, src, dst, IPPROTO_TCP, **(ip or {})), ETH_P_IPV6, vlans=vlans,
               trailer=trailer)


def udp4(src: str, sport: int, dst: str, dport: int, payload: bytes = b"", *, vlans=(),
         ip: dict | None = None) -> bytes:
    dgram = udp(sport, dport, payload, pseudo=_pseudo(src, dst, IPPROTO_UDP))
    return eth(ipv4(dgram, src, dst, IPPROTO_UDP, **(ip or {})), ETH_P_IP, vlans=vlans)


def udp6(src: str, sport: int, dst: str, dport: int, payload: bytes = b"", *, vlans=(),
         ip: dict | None = None) -> bytes:
    dgram = udp(sport, dport, payload, pseudo=_pseudo(src, dst, IPPROTO_UDP))
    return eth(ipv6(dgram, src, dst, IPPROTO_UDP, **(ip or {})), ETH_P_IPV6, vlans=vlans)


def arp_frame(sender_ip: str, target_ip: str, op: int = 1, vlans=()) -> bytes:
    return eth(arp(sender_ip, target_ip, op), ETH_P_ARP, vlans=vlans,
               dst=b"\xff" * 6, src=MAC_CLIENT)
