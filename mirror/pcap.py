"""tcpdump as a child process, and reading what it recorded with dpkt."""
from __future__ import annotations

import select
import signal
import subprocess
import time
from dataclasses import dataclass, field

import dpkt

from .flowkey import FlowKey


class Tcpdump:
    """Records one interface to a pcap file. Started with -U (a packet is written as it
    arrives); start() returns once tcpdump says it is listening, stop() sends SIGINT and
    waits, so that no packet is lost at either end."""

    def __init__(self, iface: str, path: str, netns: str | None = None, snaplen: int = 0,
                 buffer_kib: int = 32768):
        self.iface, self.path = iface, path
        prefix = ["ip", "netns", "exec", netns] if netns else []
        # A large kernel buffer (-B): on a busy machine the default 2 MiB overflows with a
        # few GSO super-packets while tcpdump waits for a CPU.
        self.cmd = prefix + ["tcpdump", "-n", "-U", "--immediate-mode", "-B", str(buffer_kib),
                             "-s", str(snaplen or 262144), "-i", iface, "-w", path]
        self.proc: subprocess.Popen | None = None
        self.stderr = ""

    def start(self, timeout: float = 10.0) -> "Tcpdump":
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        buf = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stderr], [], [], 0.1)
            if ready:
                chunk = self.proc.stderr.read1(4096)
                if not chunk:
                    break
                buf += chunk
                if b"listening on" in buf:
                    self.stderr = buf.decode(errors="replace")
                    return self
            elif self.proc.poll() is not None:
                break
        self.proc.kill()
        self.proc.wait()
        raise RuntimeError(f"tcpdump did not start on {self.iface}: "
                           f"{buf.decode(errors='replace').strip()}")

    def stop(self) -> str:
        """Stops tcpdump; returns its closing summary (packets captured/dropped)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                # Generous: after a stall it may have a full buffer left to write out.
                _, err = self.proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                _, err = self.proc.communicate()
            self.stderr += err.decode(errors="replace")
        return self.stderr


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
            if line.split(b" ", 1)[0] in (b"GET", b"POST", b"PUT", b"DELETE", b"HEAD",
                                          b"PATCH", b"OPTIONS"):
                out.append(line.decode(errors="replace"))
        return out


def status_line(payload: bytes) -> bool:
    """The same test the classifier applies (bpf/mirror.c read_status)."""
    p = payload[:13]
    return (len(p) == 13 and p[:7] == b"HTTP/1." and p[7:8] in (b"0", b"1") and p[8:9] == b" "
            and p[9:12].isdigit() and p[12:13] in (b" ", b"\r"))


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
