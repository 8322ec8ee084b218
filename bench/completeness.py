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
of a marked connection, requests and responses, from its first 500 on."""
from __future__ import annotations

import tempfile
from pathlib import Path

from mirror.capture.pcap import read_packets
from mirror.capture.tcpdump import Tcpdump

from .lab import link_stats

FIN_RST_FILTER = "tcp[tcpflags] & (tcp-fin|tcp-rst) != 0"


class Watch:
    def __init__(self, lab, debug_iface: str):
        self.lab, self.debug_iface = lab, debug_iface
        self.dir = tempfile.TemporaryDirectory(prefix="bench-watch-")
        self.pcap = str(Path(self.dir.name) / "fin.pcap")
        self.tcpdump = Tcpdump(debug_iface, self.pcap, snaplen=128)
        self.tcpdump.cmd += [FIN_RST_FILTER]

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
            for p in read_packets(self.pcap):
                client = (p.src, p.sport) if p.dport == 80 else (p.dst, p.dport)
                server = p.dst if p.dport == 80 else p.src
                if server == self.lab.error_v4:
                    error_flows.add(client)
                elif server == self.lab.ok_v4:
                    ok_flows.add(client)
        finally:
            self.dir.cleanup()
        n5xx = h2["status"]["5xx"]
        expected_flows = h2["error_connections"]
        mirrored = stats1["tx_packets"] - self.stats0["tx_packets"]
        min_packets = max(0, 2 * n5xx - expected_flows)
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
            "complete": not problems,
            "problems": problems,
        }
