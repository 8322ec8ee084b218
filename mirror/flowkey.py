"""The normalised flow key shared with the classifier (struct flow_key in bpf/mirror.h).

Both directions of a connection map to one key: the endpoint that sorts lower (address
bytes, then port) comes first."""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from .abi import FLOW_KEY

KEY_SIZE = FLOW_KEY.size
_LAYOUT = FLOW_KEY.struct


@dataclass(frozen=True, order=True)
class FlowKey:
    family: int     # 4 or 6
    addr_lo: str
    port_lo: int
    addr_hi: str
    port_hi: int

    @classmethod
    def from_endpoints(cls, src: str, sport: int, dst: str, dport: int) -> "FlowKey":
        a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
        if a.version != b.version:
            raise ValueError(f"mixed address families: {src} and {dst}")
        if (a.packed, sport) <= (b.packed, dport):
            lo, hi = (a, sport), (b, dport)
        else:
            lo, hi = (b, dport), (a, sport)
        return cls(a.version, str(lo[0]), lo[1], str(hi[0]), hi[1])

    @classmethod
    def from_bytes(cls, raw: bytes) -> "FlowKey":
        lo, hi, port_lo, port_hi, family = _LAYOUT.unpack(bytes(raw)[:KEY_SIZE])
        if family == 4:     # inet_ntop: a tenth of ipaddress's cost, on every event
            return cls(family, socket.inet_ntop(socket.AF_INET, lo[:4]), port_lo,
                       socket.inet_ntop(socket.AF_INET, hi[:4]), port_hi)
        else:
            addr_lo, addr_hi = ipaddress.IPv6Address(lo), ipaddress.IPv6Address(hi)
        return cls(family, str(addr_lo), port_lo, str(addr_hi), port_hi)

    def to_bytes(self) -> bytes:
        lo = ipaddress.ip_address(self.addr_lo).packed.ljust(16, b"\0")
        hi = ipaddress.ip_address(self.addr_hi).packed.ljust(16, b"\0")
        return _LAYOUT.pack(lo, hi, self.port_lo, self.port_hi, self.family)

    def __str__(self) -> str:
        return f"{endpoint(self.addr_lo, self.port_lo)} <-> {endpoint(self.addr_hi, self.port_hi)}"


def endpoint(addr: str, port: int) -> str:
    """"198.18.0.1:80", "[2001:db8::1]:80": an address and port as operators write them."""
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def parse_endpoint(text: str) -> tuple[str, int]:
    """"198.18.0.1:80" or "[2001:db8::1]:80" (endpoint()) back into its parts; ValueError
    otherwise."""
    addr, sep, port = str(text).rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"not an endpoint: {text!r}")
    return addr.strip("[]"), int(port)


def key_of(client: str, server: str) -> FlowKey:
    """The flow key of a connection named by its endpoints (mirror.connection)."""
    return FlowKey.from_endpoints(*parse_endpoint(client), *parse_endpoint(server))
