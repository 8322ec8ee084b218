"""Community ID v1 (corelight's community-id-spec): the flow hash that Zeek, Suricata,
Wireshark and Elastic print beside a connection, so that an index row, an event, a flow
and a pcap can be joined by one string.

The hash input, in network byte order and aligned on 32 bits: the seed (2 bytes), the
lower endpoint's address then the higher one's (4 or 16 bytes each), the IP protocol
number (1 byte) and a zero byte, then the lower endpoint's port and the higher one's
(2 bytes each). "Lower" is the endpoint whose (address bytes, port) sorts first, so
both directions of a connection hash the same. The ID is "1:" and the base64 of the
input's SHA-1.

Covered here: the protocols with ports (TCP, UDP, SCTP), which is all the mirror sees,
and the protocols without (the ports are left out of the input). ICMP and ICMPv6, whose
type and code stand in for ports with a mapping of their own, are not implemented."""
from __future__ import annotations

import base64
import hashlib
import ipaddress
import struct

TCP, UDP, SCTP = 6, 17, 132
PORT_PROTOCOLS = frozenset((TCP, UDP, SCTP))
ICMP, ICMPV6 = 1, 58


def community_id(saddr: str, daddr: str, sport: int | None, dport: int | None,
                 proto: int = TCP, seed: int = 0) -> str:
    """The Community ID v1 of a flow given by either direction. ValueError for mixed
    address families, out-of-range ports or seed, and ICMP (not implemented)."""
    if proto in (ICMP, ICMPV6):
        raise ValueError("ICMP community IDs need the type/code mapping, not implemented")
    if not 0 <= seed <= 0xFFFF or not 0 <= proto <= 0xFF:
        raise ValueError(f"seed {seed} or protocol {proto} out of range")
    src, dst = ipaddress.ip_address(saddr), ipaddress.ip_address(daddr)
    if src.version != dst.version:
        raise ValueError(f"mixed address families: {saddr} and {daddr}")
    with_ports = proto in PORT_PROTOCOLS
    if with_ports:
        for port in (sport, dport):
            if port is None or not 0 <= port <= 0xFFFF:
                raise ValueError(f"port {port} out of range")
    a, b = (src.packed, sport or 0), (dst.packed, dport or 0)
    lo, hi = (a, b) if a <= b else (b, a)
    data = struct.pack("!H", seed) + lo[0] + hi[0] + struct.pack("!BB", proto, 0)
    if with_ports:
        data += struct.pack("!HH", lo[1], hi[1])
    return "1:" + base64.b64encode(hashlib.sha1(data).digest()).decode("ascii")


def of_flow(key, proto: int = TCP) -> str:
    """The Community ID of a normalised flow key (mirror.flowkey.FlowKey or anything
    with its addr_lo/port_lo/addr_hi/port_hi)."""
    return community_id(key.addr_lo, key.addr_hi, key.port_lo, key.port_hi, proto)
