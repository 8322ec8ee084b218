"""Did a mirroring configuration mirror what it should during an h2load run?

A baseline has to do its job to be a fair baseline, so every h2load run of a mirroring
configuration is checked while it runs, with sources that cost the traffic nothing or
next to nothing:
  - error responses sent: h2load's 5xx count;
  - connections: the server namespace's TcpPassiveOpens (h2load opens one per client and,
    when the count matches, never reconnected), error connections = those of /error
    instances;
  - packets mirrored: the debug interface's tx counter;
  - flows mirrored: a tcpdump on the debug interface whose kernel filter keeps only
    FIN and RST segments (a few per connection), so every clone passes a packet tap,
    as under a capture sidecar, but almost none is copied to user space. Error and
    success connections use different server addresses (lab.py), so a flow's address
    says which it is.
Complete means: every error connection shows up on the debug interface, no success
connection does, and at least one mirrored packet per request and per 500 response after
each connection's first 500 (2 x 5xx - error connections): the mirror clones every packet
of a marked connection, requests and responses, from its first 500 on.

With per-flow budgets a marked connection stops being cloned long before its FIN, so for
budgeted configurations the tcpdump also keeps the first segment of each response (an
HTTP/1.x status line, or an h2 frame header of type HEADERS): at most a budget's worth per
connection reaches user space. Complete then means every error connection and no success
connection showed up; the packet count is only reported.

The same watch runs in every configuration, mirroring or not (on a debug interface made
for it where the configuration has none), so that its cost is the same in every ratio.

The scale mode (bench/scale.py) runs no tcpdump at all, so that every configuration runs
the same apparatus there too; it judges by counters only (counters_check): the debug
interface's packets against h2load's 5xx responses."""
from __future__ import annotations

import tempfile
from pathlib import Path

from mirror.capture.flow import read_packets
from mirror.capture.tcpdump import Tcpdump

from .lab import link_stats

FIN_RST_FILTER = "tcp[tcpflags] & (tcp-fin|tcp-rst) != 0"
PAYLOAD = "tcp[((tcp[12:1] & 0xf0) >> 2){}]"
RESPONSE_START = {"h1": PAYLOAD.format(":4") + " = 0x48545450",          # "HTTP"
                  "h2c": PAYLOAD.format(" + 3:1") + " = 0x01"}           # HEADERS


def capture_filter(server_port: int, proto: str, budgeted: bool) -> str:
    if not budgeted:
        return FIN_RST_FILTER
    return (f"({FIN_RST_FILTER}) or (tcp src port {server_port} and "
            f"{RESPONSE_START[proto]})")


class Watch:
    def __init__(self, lab, debug_iface: str, server_port: int = 80, proto: str = "h1",
                 budgeted: bool = False):
        self.lab, self.debug_iface = lab, debug_iface
        self.server_port, self.budgeted = server_port, budgeted
        self.dir = tempfile.TemporaryDirectory(prefix="bench-watch-")
        self.pcap = str(Path(self.dir.name) / "watch.pcap")
        self.tcpdump = Tcpdump(debug_iface, self.pcap, snaplen=128)
        self.tcpdump.cmd += [capture_filter(server_port, proto, budgeted)]

    def start(self) -> "Watch":
        self.opens0 = self.lab.passive_opens()
        self.stats0 = link_stats(self.debug_iface)
        self.tcpdump.start()
        return self

    def abort(self) -> None:
        self.tcpdump.stop()
        self.dir.cleanup()

    def stop(self, h2: dict) -> dict:
        """Finishes the watch after the h2load run `h2` and judges completeness."""
        try:
            stats1 = link_stats(self.debug_iface)
            opens = self.lab.passive_opens() - self.opens0
            self.tcpdump.stop()
            error_flows, ok_flows = set(), set()
            port = self.server_port
            for p in read_packets(self.pcap):
                client = (p.src, p.sport) if p.dport == port else (p.dst, p.dport)
                server = p.dst if p.dport == port else p.src
                if server == self.lab.error_v4:
                    error_flows.add(client)
                elif server == self.lab.ok_v4:
                    ok_flows.add(client)
        finally:
            self.dir.cleanup()
        n5xx = h2["status"]["5xx"]
        expected_flows = h2["error_connections"]
        mirrored = stats1["tx_packets"] - self.stats0["tx_packets"]
        # with budgets a connection is cloned for a budget's worth of packets only
        min_packets = 0 if self.budgeted else max(0, 2 * n5xx - expected_flows)
        problems = []
        if opens != h2["connections"]:
            problems.append(f"{opens} connections accepted, h2load made {h2['connections']} "
                            "(reconnects make the flow count inexact)")
        if len(error_flows) < expected_flows:
            problems.append(f"{len(error_flows)} of {expected_flows} error connections mirrored")
        if ok_flows:
            problems.append(f"{len(ok_flows)} success connections mirrored")
        if mirrored < min_packets:
            problems.append(f"{mirrored} packets mirrored, expected at least {min_packets}")
        if n5xx == 0 and mirrored:
            problems.append(f"{mirrored} packets mirrored without a single error response")
        return {
            "responses_5xx": n5xx,
            "connections_accepted": opens,
            "error_connections": expected_flows,
            "error_flows_mirrored": len(error_flows),
            "ok_flows_mirrored": len(ok_flows),
            "mirrored_packets": mirrored,
            "mirrored_bytes": stats1["tx_bytes"] - self.stats0["tx_bytes"],
            "min_packets_expected": min_packets,
            "packets_per_5xx": round(mirrored / n5xx, 3) if n5xx else None,
            "budgeted": self.budgeted,
            "complete": not problems,
            "problems": problems,
        }


def counters_check(mirrored: int, h2: dict, budgeted: bool = False) -> dict:
    """Counters-only completeness: at least one clone per request and per 500 response
    after each connection's first 500 (with per-flow budgets, at least one per
    connection), none when no 500 was sent."""
    n5xx = h2["status"]["5xx"]
    conns = h2["connections"] if n5xx else 0
    least = conns if budgeted else max(0, 2 * n5xx - conns)
    problems = []
    if mirrored < least:
        problems.append(f"{mirrored} packets mirrored, expected at least {least}")
    if not n5xx and mirrored:
        problems.append(f"{mirrored} packets mirrored without a single error response")
    return {"mirrored_packets": mirrored, "min_packets_expected": least,
            "complete": not problems, "problems": problems}
