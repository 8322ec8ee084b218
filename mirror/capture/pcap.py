"""Reading a whole pcap back with dpkt: its TCP packets, grouped into flows (the demo's
report, the bench's completeness check, the tests' comparisons)."""
from __future__ import annotations

from dataclasses import dataclass, field

import dpkt

from ..flowkey import FlowKey
from ..http1 import is_request_line, status_line


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


@dataclass
class Flow:
    key: FlowKey
    packets: list[Packet] = field(default_factory=list)

    @property
    def statuses(self) -> list[int]:
        return [int(p.payload[9:12]) for p in self.packets if status_line(p.payload)]

    @property
    def requests(self) -> list[str]:
        out = []
        for p in self.packets:
            line = p.payload.split(b"\r\n", 1)[0]
            if is_request_line(line):
                out.append(line.decode(errors="replace"))
        return out


def read_packets(path: str) -> list[Packet]:
    """TCP packets of a pcap (Ethernet link type), IPv4 and IPv6, VLAN tags skipped."""
    out = []
    with open(path, "rb") as f:
        for ts, buf in dpkt.pcap.Reader(f):
            eth = dpkt.ethernet.Ethernet(buf)
            ip = eth.data
            if isinstance(ip, dpkt.ip.IP):
                src, dst = _ntoa(ip.src), _ntoa(ip.dst)
            elif isinstance(ip, dpkt.ip6.IP6):
                src, dst = _ntoa(ip.src), _ntoa(ip.dst)
            else:
                continue
            tcp = ip.data
            if not isinstance(tcp, dpkt.tcp.TCP):
                continue
            out.append(Packet(ts, src, tcp.sport, dst, tcp.dport, tcp.flags, tcp.seq, tcp.ack,
                              bytes(tcp.data)))
    return out


def _ntoa(raw: bytes) -> str:
    import ipaddress
    return str(ipaddress.ip_address(raw))


def read_flows(path: str) -> dict[FlowKey, Flow]:
    flows: dict[FlowKey, Flow] = {}
    for p in read_packets(path):
        key = FlowKey.from_endpoints(p.src, p.sport, p.dst, p.dport)
        flows.setdefault(key, Flow(key)).packets.append(p)
    return flows
