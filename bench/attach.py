"""python -m bench.attach: the ConMon figure, measured. ConMon attached its monitor to each
new container 79 ms after the container started and missed its first 76 packets at
1000 packets/s; this measures the same two things for `mirror run --iface PATTERN`.

For each of N new veth pairs, one after the other:
  - attach latency: from just before the request that creates the pair (and sets its
    host end up) to both hooks of the host end attached, as a `mirror run` process
    records it (CLOCK_MONOTONIC on both sides, asked over its control socket), so the
    creation's netlink round trip is included; also the controller's histogram figure,
    from the link event's arrival to both hooks attached;
  - packets missed: a sender in a namespace, told beforehand, brings its end up the moment
    the link exists and sends frames at --rate packets/s from the moment the link has
    carrier; arrived = the host end's rx_packets, seen = what the classifier counted.
    The frames carry an experimental EtherType (0x88B5), so the stack drops them
    silently, nothing answers or forwards them, and the classifier counts them as
    neither IPv4 nor IPv6: seen = packets - ipv4 - ipv6 counted while they flow.

By default a veth pair is attached before the measured ones and kept, as on a node that
already runs a container. With --hook tcx that matters: the kernel enables its tcx
fast path (a static key) only after the first tcx link of the system has waited for an
RCU grace period, so on a node with no tcx link at all the first one goes live some
milliseconds after the attach call began; once any tcx link exists, a new one is live
as soon as it is installed. --no-anchor measures the empty node.

What "missed" means, and why it is a race rather than a latency: every frame that arrives
before the ingress hook is in place is missed, so the figure counts the links on which the
sender's first frame won the race against the attach. Both sides start from the same
moment: the kernel sends RTM_NEWLINK only at the end of the creating request (about
3 ms here for a veth with its peer in a namespace, included in the attach figure), and
the sender may bring its end up from then on. The sender needs one rtnetlink request
(set up) and then sends; the controller needs the event's delivery and at least two
requests (add the clsact qdisc, add the ingress filter; with tcx, one BPF_LINK_CREATE),
all serialised with the sender's on the same RTNL lock. A user-space attach that starts
at the link event therefore cannot be guaranteed to finish before a sender that is as
fast as this one; 0 missed here means the attach won every race, not that it cannot
lose one. The keys that show the race: ingress_hook_ms_* (link creation -> ingress hook
in place), first_packet_ms_* (link creation -> the sender's first frame, CLOCK_MONOTONIC
in both namespaces), first_packet_before_ingress_hook (links on which the first frame
left before the ingress hook was in place) and the misses on those links; link_add_ms_*
(the creating request's round trip) and event_read_ms_* (link creation -> the
controller's discovery thread has read the event) split the attach figure. With tcx the
ingress link is live before its BPF_LINK_CREATE returns (the kernel then waits for an RCU
grace period, holding the RTNL lock, which also holds the sender's set-up request back),
so there the ingress time is an upper bound and first_packet_before_ingress_hook
over-counts; the misses are exact. A container
is slower to start than this sender (its runtime configures addresses and routes, then
starts the process), which is why the setting is called harsh in the README.

Nothing is asserted here: numbers belong to the bench. Run as root from the repository."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SENDER = r'''
import socket, sys, time
from pyroute2 import IPRoute
ipr = IPRoute()
for line in sys.stdin:
    name, dst, count, rate = line.split()
    count, rate = int(count), float(rate)
    while not ipr.link_lookup(ifname=name):
        time.sleep(0.0001)
    index = ipr.link_lookup(ifname=name)[0]
    ipr.link("set", index=index, state="up")
    oper = f"/sys/class/net/{name}/operstate"
    while open(oper).read().strip() != "up":
        time.sleep(0.0001)
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((name, 0))
    src = bytes.fromhex(open(f"/sys/class/net/{name}/address").read().strip().replace(":", ""))
    frame = bytes.fromhex(dst.replace(":", "")) + src + b"\x88\xb5" + bytes(46)
    start, sent, first = time.monotonic(), 0, 0.0
    for k in range(count):
        delay = start + k / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        try:
            t = time.monotonic()
            s.send(frame)
            first = first or t
            sent += 1
        except OSError:
            pass
    s.close()
    print(sent, first, flush=True)
'''


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.attach", description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=200, help="new veth pairs (default 200)")
    p.add_argument("--hook", choices=["clsact", "htb", "tcx"], default="clsact")
    p.add_argument("--rate", type=float, default=1000.0,
                   help="sender packets per second from carrier on (default 1000)")
    p.add_argument("--packets", type=int, default=100,
                   help="packets sent on each new link (default 100: 0.1 s at 1000/s)")
    p.add_argument("--no-anchor", dest="anchor", action="store_false",
                   help="measure an empty node: no interface monitored before the new ones "
                   "(by default one veth pair is attached first, as on a node that already "
                   "runs a container; with tcx this matters: see the module's docstring)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    return p.parse_args(argv)


class Bench:
    """A real `mirror run --iface PATTERN` process, a sender in a namespace, and the new
    links. The controller is a process of its own, as deployed: in this process its
    discovery thread would wait for the interpreter lock held by the bench."""

    def __init__(self, args):
        from mirror.lab.netns import PREFIX, unique_name
        self.args = args
        self.ns = f"{PREFIX}-{os.getpid()}-250"
        self.debug = unique_name("d")
        self.pattern = f"m{os.getpid():06x}??a"       # unique_name("a") of this process
        self.state = tempfile.mkdtemp(prefix="mirror-attach-")
        self.mirror = self.sender = self.ipr = self.socket = None
        self.anchor: list[int] = []

    def setup(self) -> None:
        from pyroute2 import IPRoute
        subprocess.run(["ip", "netns", "add", self.ns], check=True)
        # No IPv6 in the sender's namespace: its end sends our frames and nothing else.
        subprocess.run(["ip", "netns", "exec", self.ns, "sysctl", "-qw",
                        "net.ipv6.conf.default.disable_ipv6=1"], check=True)
        self.sender = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, sys.executable, "-c", SENDER],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        env = dict(os.environ, MIRROR_STATE_DIR=self.state)
        self.mirror = subprocess.Popen(
            [sys.executable, "-m", "mirror", "run", "--iface", self.pattern, "--debug-iface",
             self.debug, "--hook", self.args.hook, "--max-ifaces", str(max(16, self.args.count))],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
        for line in self.mirror.stdout:
            if line.startswith("mirror: ready"):
                break
        else:
            raise RuntimeError("mirror run did not start")
        # Keep reading its log so that it never blocks on a full pipe.
        import threading
        threading.Thread(target=lambda: [None for _ in self.mirror.stdout], daemon=True).start()
        os.environ["MIRROR_STATE_DIR"] = self.state
        from mirror import ownership
        self.socket = ownership.records("controller")[0]["socket"]
        self.ipr = IPRoute()
        if self.args.anchor:
            self._anchor()

    def _anchor(self) -> None:
        """A monitored veth pair that stays for the whole run (a node's existing pod)."""
        from mirror.lab.netns import unique_name
        a, b = unique_name("a"), unique_name("a")
        self.ipr.link("add", ifname=a, kind="veth", peer=b)
        self.anchor = [self.ipr.link_lookup(ifname=n)[0] for n in (a, b)]
        deadline = time.monotonic() + 10
        while not set(self.anchor) <= set(self.ask("attach")["attached"]):
            if time.monotonic() > deadline:
                raise RuntimeError("the anchor pair was not attached")
            time.sleep(0.005)

    def ask(self, what: str):
        from mirror.ctlsocket import ask
        return ask(self.socket, what)

    def one(self, i: int) -> dict:
        from mirror.lab.netns import unique_name
        host, peer = unique_name("a"), f"p{i}"
        mac = f"02:00:00:00:{i >> 8 & 0xff:02x}:{i & 0xff:02x}"
        self.sender.stdin.write(f"{peer} {mac} {self.args.packets} {self.args.rate}\n")
        self.sender.stdin.flush()
        before = self.ask("counters")
        t0 = time.monotonic()
        self.ipr.link("add", ifname=host, kind="veth", address=mac, state="up",
                      peer={"ifname": peer, "net_ns_fd": self.ns})
        created = time.monotonic()
        sent, first = self.sender.stdout.readline().split()
        sent, first = int(sent), float(first)
        arrived = self._rx_packets(host, sent)
        after = self.ask("counters")
        index = self.ipr.link_lookup(ifname=host)[0]
        attach = self.ask("attach")
        attached_at = attach["attached_at"].get(str(index))
        ingress_at = attach.get("ingress_at", {}).get(str(index))
        event_at = attach.get("event_at", {}).get(str(index))
        self.ipr.link("del", index=index)
        # Each new link is measured alone: wait until the controller has forgotten this
        # one (with tcx, releasing its links waits for RCU grace periods).
        deadline = time.monotonic() + 10
        while index in self.ask("attach")["attached"] and time.monotonic() < deadline:
            time.sleep(0.005)
        seen = after["packets"] - before["packets"] - sum(
            after[k] - before[k] for k in ("ipv4", "ipv6"))
        return {"iface": host, "attach_s": attached_at - t0 if attached_at else None,
                "ingress_s": ingress_at - t0 if ingress_at else None,
                "created_s": created - t0,
                "event_s": event_at - t0 if event_at else None,
                "first_packet_s": first - t0 if first else None,
                "sent": sent, "arrived": arrived, "seen": seen}

    @staticmethod
    def _rx_packets(host: str, sent: int) -> int:
        """The host end's received packets, once all `sent` are in (or after 2 s: some
        were lost on the way, which the result then shows)."""
        path = Path(f"/sys/class/net/{host}/statistics/rx_packets")
        deadline = time.monotonic() + 2
        while True:
            n = int(path.read_text())
            if n >= sent or time.monotonic() > deadline:
                return n
            time.sleep(0.001)

    def event_latencies(self) -> list[float]:
        """The controller's link-event-to-attached figures, the anchor's left out."""
        return self.ask("attach")["latency_s"][len(self.anchor):]

    def teardown(self) -> None:
        if self.mirror:
            self.mirror.terminate()
            try:
                self.mirror.wait(30)
            except subprocess.TimeoutExpired:
                self.mirror.kill()
                self.mirror.wait()
        if self.ipr:
            for index in self.anchor[:1]:       # its peer goes with it
                self.ipr.link("del", index=index)
            self.ipr.close()
        if self.sender:
            self.sender.kill()
            self.sender.wait()
        subprocess.run(["ip", "netns", "del", self.ns], check=False)
        subprocess.run(["ip", "link", "del", self.debug], check=False, capture_output=True)
        subprocess.run(["rm", "-rf", self.state], check=False)


def _ms(values: list[float], q: float) -> float | None:
    return percentile(values, q) * 1e3 if values else None


def summarize(rows: list[dict], event_latencies: list[float], args) -> dict:
    attach = [r["attach_s"] for r in rows if r["attach_s"] is not None]
    missed = [r["arrived"] - r["seen"] for r in rows]
    ingress = [r["ingress_s"] for r in rows if r.get("ingress_s") is not None]
    created = [r["created_s"] for r in rows]
    event = [r["event_s"] for r in rows if r.get("event_s") is not None]
    first = [r["first_packet_s"] for r in rows if r.get("first_packet_s") is not None]
    # The race the misses come from: the sender's first frame against the ingress hook.
    early = [r for r in rows if r.get("first_packet_s") is not None and
             r.get("ingress_s") is not None and r["first_packet_s"] < r["ingress_s"]]
    return {
        "interfaces": len(rows), "hook": args.hook, "rate_pps": args.rate,
        "anchor": args.anchor,
        "attached": len(attach),
        # per interface, for the bench's interval on the p99 (bench/report.py)
        "attach_ms": [round(a * 1e3, 3) for a in attach],
        "attach_ms_p50": percentile(attach, 50) * 1e3 if attach else None,
        "attach_ms_p99": percentile(attach, 99) * 1e3 if attach else None,
        "attach_ms_max": max(attach) * 1e3 if attach else None,
        "event_to_attached_ms_p50": percentile(event_latencies, 50) * 1e3
        if event_latencies else None,
        "event_to_attached_ms_p99": percentile(event_latencies, 99) * 1e3
        if event_latencies else None,
        "packets_sent": sum(r["sent"] for r in rows),
        "packets_arrived": sum(r["arrived"] for r in rows),
        "packets_seen": sum(r["seen"] for r in rows),
        "packets_missed": sum(missed),
        "interfaces_with_misses": sum(1 for m in missed if m > 0),
        "max_missed_one_interface": max(missed) if missed else 0,
        "link_add_ms_p50": _ms(created, 50), "link_add_ms_p99": _ms(created, 99),
        "event_read_ms_p50": _ms(event, 50), "event_read_ms_p99": _ms(event, 99),
        "ingress_hook_ms_p50": _ms(ingress, 50), "ingress_hook_ms_p99": _ms(ingress, 99),
        "first_packet_ms_min": min(first) * 1e3 if first else None,
        "first_packet_ms_p50": _ms(first, 50), "first_packet_ms_p99": _ms(first, 99),
        "first_packet_before_ingress_hook": len(early),
        "missed_when_first_packet_before_ingress_hook": sum(
            r["arrived"] - r["seen"] for r in early),
    }


def render(s: dict) -> str:
    def ms(v):
        return "-" if v is None else f"{v:.2f} ms"
    return "\n".join([
        f"{s['interfaces']} new veth pairs, --hook {s['hook']}, sender at "
        f"{s['rate_pps']:g} packets/s from carrier on, "
        f"{'one pair attached before (a node with a pod)' if s['anchor'] else 'empty node'}",
        f"attach, link creation -> both hooks attached: p50 {ms(s['attach_ms_p50'])}, "
        f"p99 {ms(s['attach_ms_p99'])}, max {ms(s['attach_ms_max'])} "
        f"({s['attached']} of {s['interfaces']} attached)",
        f"attach, link event -> both hooks attached (controller histogram): p50 "
        f"{ms(s['event_to_attached_ms_p50'])}, p99 {ms(s['event_to_attached_ms_p99'])}",
        f"from link creation: the creating request returns after p50 "
        f"{ms(s['link_add_ms_p50'])}, p99 {ms(s['link_add_ms_p99'])}; the controller reads "
        f"its link event after p50 {ms(s['event_read_ms_p50'])}, p99 "
        f"{ms(s['event_read_ms_p99'])}",
        f"ingress hook alone, from link creation: p50 {ms(s['ingress_hook_ms_p50'])}, "
        f"p99 {ms(s['ingress_hook_ms_p99'])}; the sender's first frame, from link "
        f"creation: min {ms(s['first_packet_ms_min'])}, p50 {ms(s['first_packet_ms_p50'])}, "
        f"p99 {ms(s['first_packet_ms_p99'])}",
        f"first frame sent before the ingress hook was in place on "
        f"{s['first_packet_before_ingress_hook']} interfaces "
        f"({s['missed_when_first_packet_before_ingress_hook']} of the misses)",
        f"packets: {s['packets_sent']} sent, {s['packets_arrived']} arrived at the host end, "
        f"{s['packets_seen']} seen by the classifier: {s['packets_missed']} missed "
        f"({s['interfaces_with_misses']} interfaces with misses, at most "
        f"{s['max_missed_one_interface']} on one)",
        "ConMon (the thesis' reference): 79 ms to attach, 76 packets missed at 1000/s",
    ])


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench.attach: run as root (it creates interfaces and loads BPF)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    bench = Bench(args)
    rows = []
    try:
        bench.setup()
        for i in range(args.count):
            rows.append(bench.one(i))
        events = bench.event_latencies()
    finally:
        bench.teardown()
    result = summarize(rows, events, args)
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
