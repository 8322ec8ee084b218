"""python -m bench.containers: the ConMon figure for real containers. ConMon attached its
monitor to each new container 79 ms after the container started and missed its first 76
packets at 1000 packets/s. bench/attach.py measures `mirror run --iface PATTERN` against
a raw sender that is faster than any container; this measures the operator's case: real
containers started by podman on a bridge network, each sending from its first
instruction, attached either way the controller can attach them (--attach-by).

Setting. A network namespace of the bench's own is podman's host network (podman runs
under `nsenter --net`, as tests/test_discovery.py does), so the podman bridge network
the bench creates there (a 198.19.x.0/24 subnet) and every container's host-side veth
exist in that namespace only. Podman runs with a containers.conf of the bench's own
(CONTAINERS_CONF: the system's plus a private CNI configuration directory and plugin
directory, as tests/test_cni.py does), in every mode, so that the modes differ in the
network's chain only. A `mirror run --iface 'veth*'` process runs in the namespace too.
By default a veth pair named veth-anchor-* is attached first and kept (as on a node that
already runs a container; with --hook tcx that matters, see bench/attach.py);
--no-anchor leaves it out.

Attach modes (--attach-by):
  - link-event: the network's chain is podman's own (bridge, portmap, firewall,
    tuning); the controller attaches when its discovery thread reads the veth's link
    event (the veth enters the namespace when the bridge plugin moves it there): a race
    with the container's first packet.
  - cni: the same chain with the chained plugin cni/tc-mirror after it (stateDir: the
    controller's state directory); its ADD asks the controller to attach and returns
    only once both hooks are in place, and the runtime starts the container's process
    only after the chain returned, so no packet can be missed. The controller's
    link-event watcher still runs (it cannot be turned off, and a node runs both): when
    it attached first, the plugin's request finds the hooks in place ("already"); either
    way the plugin has waited for them. attached_by counts which path attached each veth
    (the controller's mirror_cni_requests_total outcomes per container).
The plugin (build/cni/tc-mirror) is built with cni/build when missing or older than its
source.

What the plugin costs a container's start: podman run -> first send with the plugin
against the same without it. With --attach-by cni the bench makes two bridge networks
that differ only in the plugin at the end of the chain, and starts --count containers on
each, interleaved (plugin, none, none, plugin, ...: drift on a shared machine falls on
both alike; two separate runs differed by far more than the plugin costs). The
containers without the plugin are the link-event mode's, not containers on a node
without a controller: the same controller, the same watcher and the same attach work on
the same CPUs, so the difference is the plugin alone: its exec, its request and its wait
for the hooks. (Podman also runs every plugin of every network in its configuration
directory with VERSION at each container's start and removal, so once the plugin is in
any network, every container pays that exec, with or without the plugin in its own
chain: here both arms do, and the figure leaves it out.) Reported as
plugin_adds_ms_p50/p99 (p50 with the plugin less p50 without, the same for p99) with the
arm without the plugin under without_plugin; every other figure of a cni run is the
containers' with the plugin. bench/runner.py runs both modes.

For each of N containers, one after the other (each alone: the next starts once the
controller has forgotten the previous one's veth):
  - t_run: CLOCK_MONOTONIC just before `podman run` is started (the podman process's own
    start-up, the image's storage set-up, the CNI plugins and runc are all in the figures
    that start there);
  - the container's process is the sender (--sender static, the default): a static Go
    binary alone in a FROM-scratch image (bench/sender/main.go, built with
    bench/sender/build when missing or stale; nothing is pulled), so its first datagram
    leaves as soon as the runtime runs it, not after an interpreter's start-up. From its
    first instruction it sends --packets UDP datagrams of a few bytes to the network's
    gateway address at --rate packets/s, then prints how many sendto() calls succeeded,
    the CLOCK_MONOTONIC time of the first one (the clock is system-wide, so it compares
    with the bench's and the controller's) and its eth0's iflink, the ifindex of its
    host-side veth, and waits until the bench closes its stdin. --sender python3 runs
    the same in python3 of --image (the bench's mirror image by default), as earlier
    runs of this bench did (its first datagram waits for the interpreter's start-up);
  - the controller's times for that ifindex, asked over its control socket (`attach`,
    CLOCK_MONOTONIC): when it was asked to attach (the link event read, or the plugin's
    request, whichever attached it) and when both hooks were attached;
  - sent: the sender's count; arrived: the datagrams a UDP socket on the gateway
    received (it also keeps the gateway from answering with ICMP port unreachable);
    seen: what the classifier counted as IPv4 while the container ran. The classifier
    has no per-interface packet counter (bpf/mirror.c's iface_stats counts HTTP
    responses and clones only), so seen is the increase of its global IPv4 counter
    (`counters` over the control socket: every monitored interface, both directions)
    from before `podman run` to after the last datagram arrived. That is this
    container's datagrams and nothing else: while it runs its veth is the only
    monitored interface with traffic (the anchor pair is down, the bridge is not
    matched), ARP is not IPv4, IPv6 (router solicitations, MLD) is counted apart, and
    nothing IPv4 goes back to the container: the sink answers nothing, and the bridge's
    IGMP reports for link-local groups, which it floods to its ports, are turned off in
    the namespace (net.ipv4.igmp_link_local_mcast_reports=0). missed = sent - seen; a
    negative figure would mean some other IPv4 packet crossed a monitored interface.

A datagram sent before the gateway's address is resolved waits in the neighbour queue
until the ARP reply comes, so the first datagram reaches the veth a little after the
recorded first send; the figure is the send, the earlier and harsher of the two. The
margin is first send - both hooks attached: positive means the hooks were in place
first. first_packet_before_attach counts the containers with a negative margin (a miss
needs only the ingress hook to be late; its time is in the per-container rows).
Reported: p50/p99 of podman run -> both hooks attached (attach_ms), the controller's
request (link event or plugin) -> both hooks attached (event_to_attached_ms), podman run
-> first send (first_packet_ms) and the margin (margin_ms, with its minimum), the packets
sent, arrived, seen and missed, which path attached (attached_by) and, with the plugin,
the ADDs no controller answered (cni_unanswered). Not included: the images' first build
and the bridge's creation (made by the first container, which is measured like the
others).

Nothing is asserted here: numbers belong to the bench. Run as root from the repository;
progress lines go to stderr."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.attach import percentile
from bench.machine import raise_interrupt

ROOT = Path(__file__).resolve().parent.parent
IMAGE = os.environ.get("MIRROR_IMAGE", "localhost/mirror:latest")
SENDER_IMAGE = "localhost/mirror-bench-sender:latest"
SENDER_SOURCE = ROOT / "bench" / "sender" / "main.go"
SENDER_LABEL = "mirror.bench.sender.sha256"      # set by bench/sender/build
PLUGIN = ROOT / "build" / "cni" / "tc-mirror"
PLUGIN_SOURCE = ROOT / "cni" / "tc-mirror" / "main.go"
SINK_PORT = 9999
ANCHOR = ("veth-anchor-a", "veth-anchor-b")
ATTACH_MODES = ("link-event", "cni")
SENDERS = ("static", "python3")

# --sender python3's command (python3 -c SENDER TAG GATEWAY PORT RATE PACKETS): what
# bench/sender/main.go does. Its first statements send: nothing is read or set up before
# the first datagram.
SENDER = r'''
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
tag, dst = sys.argv[1].encode(), (sys.argv[2], int(sys.argv[3]))
rate, count, clock = float(sys.argv[4]), int(sys.argv[5]), time.CLOCK_MONOTONIC
start, sent, first = time.clock_gettime(clock), 0, 0.0
for k in range(count):
    delay = start + k / rate - time.clock_gettime(clock)
    if delay > 0:
        time.sleep(delay)
    try:
        t = time.clock_gettime(clock)
        s.sendto(tag, dst)
        first = first or t
        sent += 1
    except OSError:
        pass
iflink = open("/sys/class/net/eth0/iflink").read().strip()
print(sent, repr(first), iflink, flush=True)
sys.stdin.read()
'''

# Runs in the bench's namespace: the control socket is an abstract Unix socket, which
# belongs to the namespace its controller runs in, and the plugin's count of unanswered
# ADDs is kept under that namespace's directory. It also holds the gateway's UDP sink.
# One request a line on stdin, one JSON answer a line on stdout.
AGENT = r'''
import collections, json, socket, sys, threading
from mirror import ownership
from mirror.ctlsocket import ask
received = collections.Counter()
sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sink.bind(("0.0.0.0", int(sys.argv[1])))
def drain():
    while True:
        received[sink.recv(64)] += 1
threading.Thread(target=drain, daemon=True).start()
print(json.dumps("ready"), flush=True)
for line in sys.stdin:
    what, _, arg = line.strip().partition(" ")
    if what == "ask":
        answer = ask(ownership.records("controller")[0]["socket"], arg)
    elif what == "received":
        answer = received[arg.encode()]
    elif what == "unanswered":
        answer = ownership.cni_unanswered()
    else:
        try:
            answer = socket.if_indextoname(int(arg))
        except OSError:
            answer = None
    print(json.dumps(answer), flush=True)
'''


def missing_prerequisite(attach_by: str = "link-event", sender: str = "static",
                         image: str = IMAGE) -> str | None:
    """Why the experiment cannot run here in this mode, or None. What can be built
    (the sender's image, the plugin) is not missing while go is installed."""
    for tool in ("podman", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed: run scripts/setup"
    if sender == "python3":
        if subprocess.run(["podman", "image", "exists", image]).returncode != 0:
            return f"the image {image} does not exist: build it with container/build"
    elif not sender_image_current() and shutil.which("go") is None:
        return "go is not installed (the sender is built with it): run scripts/setup"
    if attach_by == "cni":
        backend = subprocess.run(["podman", "info", "--format", "{{.Host.NetworkBackend}}"],
                                 capture_output=True, text=True).stdout.strip()
        if backend != "cni":
            return f"podman's network backend is {backend or 'unknown'}, not CNI"
        if not PLUGIN.exists() and shutil.which("go") is None:
            return "go is not installed (cni/build needs it): run scripts/setup"
    return None


def sender_image_current() -> bool:
    """The sender's image exists and was built from the source as it is now."""
    r = subprocess.run(["podman", "image", "inspect", "--format",
                        f'{{{{index .Labels "{SENDER_LABEL}"}}}}', SENDER_IMAGE],
                       capture_output=True, text=True)
    return r.returncode == 0 and r.stdout.strip() == hashlib.sha256(
        SENDER_SOURCE.read_bytes()).hexdigest()


def build_what_is_missing(args) -> None:
    """The sender's image and the plugin, each built only when missing or stale: a
    build is CPU work no figure should share."""
    if args.sender == "static" and not sender_image_current():
        progress("building the sender's image (bench/sender/build)")
        subprocess.run([ROOT / "bench" / "sender" / "build", SENDER_IMAGE], check=True,
                       stdout=subprocess.DEVNULL, timeout=600)
    if args.attach_by == "cni" and (
            not PLUGIN.exists() or PLUGIN.stat().st_mtime < PLUGIN_SOURCE.stat().st_mtime):
        progress("building the CNI plugin (cni/build)")
        subprocess.run([ROOT / "cni" / "build", PLUGIN], check=True,
                       stdout=subprocess.DEVNULL, timeout=600)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.containers",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=positive_int, default=20,
                   help="containers started one after the other (default 20); with "
                        "--attach-by cni, that many with the plugin and as many without")
    p.add_argument("--rate", type=float, default=1000.0,
                   help="each container's datagrams per second (default 1000)")
    p.add_argument("--packets", type=positive_int, default=100,
                   help="datagrams each container sends (default 100: 0.1 s at 1000/s)")
    p.add_argument("--hook", choices=["clsact", "htb", "tcx"], default="clsact")
    p.add_argument("--attach-by", choices=ATTACH_MODES, default="link-event",
                   help="link-event: the controller's watcher only; cni: the chained "
                        "plugin cni/tc-mirror after the bridge too (default link-event)")
    p.add_argument("--sender", choices=SENDERS, default="static",
                   help=f"static: a static binary alone in {SENDER_IMAGE} (built by "
                        "bench/sender/build); python3: the same in python3 of --image "
                        "(default static)")
    p.add_argument("--image", default=IMAGE,
                   help=f"with --sender python3: an image with python3 (default {IMAGE}, "
                        "made by container/build)")
    p.add_argument("--no-anchor", dest="anchor", action="store_false",
                   help="no monitored interface before the containers' (see bench.attach)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    args = p.parse_args(argv)
    if args.rate <= 0:
        p.error(f"--rate {args.rate:g}: must be positive")
    return args


def progress(text: str) -> None:
    print(f"bench.containers: {text}", file=sys.stderr, flush=True)


def podman(*args: str, netns: str | None = None, check: bool = True, **kw):
    # nsenter, not `ip netns exec`: the latter remounts /sys, hiding the cgroup mount runc
    # needs (see tests/test_discovery.py's podman()).
    prefix = ["nsenter", f"--net=/run/netns/{netns}"] if netns else []
    r = subprocess.run([*prefix, "podman", *args], capture_output=True, text=True,
                       timeout=300, **kw)
    if check and r.returncode:
        raise RuntimeError(f"podman {' '.join(args[:3])} failed: {r.stderr.strip()}")
    return r


class Bench:
    """The namespace, podman's configuration and network, the controller and the agent in
    the namespace, and the containers."""

    def __init__(self, args):
        from mirror.lab.netns import PREFIX
        pid = os.getpid()
        self.args = args
        self.ns = f"{PREFIX}-{pid}-251"
        # The networks by arm: with the plugin at the end of the chain or without (the
        # link-event mode's). Named after the pid, so that a test can look for leftovers.
        self.networks = {"none": (f"mbench{pid}", f"198.19.{150 + pid % 50}")}
        if args.attach_by == "cni":
            self.networks["plugin"] = (f"mbench{pid}p", f"198.19.{100 + pid % 50}")
        # Both named after the pid too: the podman networks' configuration lives in the
        # second, so a test looks there for leftovers.
        self.state = tempfile.mkdtemp(prefix=f"mirror-containers-{pid}-state-")
        self.podman_dir = Path(tempfile.mkdtemp(prefix=f"mirror-containers-{pid}-podman-"))
        self.podman_env = dict(os.environ,
                               CONTAINERS_CONF=str(self.podman_dir / "containers.conf"))
        self.mirror = self.agent = self.running = None
        self.made_ns = False
        self.made_nets: list[str] = []
        self.names: list[str] = []

    # --- set-up -------------------------------------------------------------------------
    def setup(self) -> None:
        subprocess.run(["ip", "netns", "add", self.ns], check=True)
        self.made_ns = True
        self._in_ns("ip", "link", "set", "lo", "up")
        # The bridge joins the all-snoopers group (224.0.0.106) when it comes up, and its
        # IGMP reports, flooded to its ports, would be IPv4 on a container's veth.
        self._in_ns("sysctl", "-qw", "net.ipv4.igmp_link_local_mcast_reports=0")
        self._configure_podman()
        for arm, (net, subnet) in self.networks.items():
            podman("network", "create", "--subnet", f"{subnet}.0/24", net, env=self.podman_env)
            self.made_nets.append(net)
            if arm == "plugin":
                self._chain_plugin(net)
        self._start_controller()
        self._start_agent()
        if self.args.anchor:
            self._in_ns("ip", "link", "add", ANCHOR[0], "type", "veth", "peer", "name",
                        ANCHOR[1])
            self._wait_attached(2, "the anchor pair")

    def _configure_podman(self) -> None:
        """The system's containers.conf with a private CNI configuration directory (the
        network's conflist, edited for --attach-by cni, touches nothing of the system's)
        and a plugin directory holding the plugin before the system's plugins."""
        (self.podman_dir / "net.d").mkdir()
        (self.podman_dir / "bin").mkdir()
        system = Path("/etc/containers/containers.conf")
        (self.podman_dir / "containers.conf").write_text(
            (system.read_text() if system.exists() else "") +
            f'\n[network]\ncni_plugin_dirs = ["{self.podman_dir / "bin"}", "/usr/lib/cni"]\n'
            f'network_config_dir = "{self.podman_dir / "net.d"}"\n')

    def _chain_plugin(self, net: str) -> None:
        """cni/tc-mirror appended to the network's chain, as docs/deployment.md has an
        operator do it, pointed at the controller's state directory."""
        shutil.copy(PLUGIN, self.podman_dir / "bin" / "tc-mirror")
        listfile = self.podman_dir / "net.d" / f"{net}.conflist"
        chain = json.loads(listfile.read_text())
        chain["plugins"].append({"type": "tc-mirror", "stateDir": self.state})
        listfile.write_text(json.dumps(chain, indent=2))

    def _in_ns(self, *cmd: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.ns, *cmd], check=True,
                       capture_output=True)

    def _start_controller(self) -> None:
        env = dict(os.environ, MIRROR_STATE_DIR=self.state)
        self.mirror = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, sys.executable, "-m", "mirror", "run", "--iface",
             "veth*", "--hook", self.args.hook, "--max-ifaces", str(max(16, self.args.count))],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
        log = []
        for line in self.mirror.stdout:
            log.append(line)
            if line.startswith("mirror: ready"):
                break
        else:
            raise RuntimeError("mirror run did not start:\n" + "".join(log[-20:]))
        # Keep reading its log so that it never blocks on a full pipe.
        threading.Thread(target=lambda: [None for _ in self.mirror.stdout], daemon=True).start()

    def _start_agent(self) -> None:
        env = dict(os.environ, MIRROR_STATE_DIR=self.state)
        self.agent = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, sys.executable, "-c", AGENT, str(SINK_PORT)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        if json.loads(self.agent.stdout.readline() or "null") != "ready":
            raise RuntimeError("the agent in the namespace did not start")

    def request(self, line: str):
        self.agent.stdin.write(line + "\n")
        self.agent.stdin.flush()
        answer = self.agent.stdout.readline()
        if not answer:
            raise RuntimeError(f"the agent in the namespace died answering {line!r}")
        return json.loads(answer)

    def _wait_attached(self, n: int, what: str) -> None:
        deadline = time.monotonic() + 10
        while len(self.request("ask attach")["attached"]) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} was not attached")
            time.sleep(0.005)

    # --- one container --------------------------------------------------------------------
    def _command(self, tag: str, subnet: str) -> list[str]:
        sender_args = [tag, f"{subnet}.1", str(SINK_PORT), str(self.args.rate),
                       str(self.args.packets)]
        if self.args.sender == "static":
            return [SENDER_IMAGE, *sender_args]
        return ["--entrypoint", "python3", self.args.image, "-c", SENDER, *sender_args]

    def one(self, i: int, arm: str) -> dict:
        net, subnet = self.networks[arm]
        name = f"{net}-c{i}"
        tag = f"c{i}"
        self.names.append(name)
        before = self.request("ask counters")
        unanswered_before = self.request("unanswered")
        t_run = time.monotonic()
        self.running = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.ns}", "podman", "run", "--rm", "-i",
             "--network", net, "--name", name, *self._command(tag, subnet)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=self.podman_env)
        line = self.running.stdout.readline().split()
        if len(line) != 3:
            self.running.stdin.close()
            err = self.running.stderr.read()
            raise RuntimeError(f"container {name} printed no result: {err.strip()[-300:]}")
        sent, first, veth = int(line[0]), float(line[1]), int(line[2])
        arrived = self._arrived(tag, sent)
        after = self.request("ask counters")
        attach = self._attach_times(veth)
        cni = {k[len("cni_"):]: after[k] - before.get(k, 0) for k in after
               if k.startswith("cni_") and after[k] != before.get(k, 0)}
        row = {"container": name, "plugin": arm == "plugin",
               "veth": self.request(f"ifname {veth}"), "ifindex": veth,
               "t_run": t_run, "first_send": first or None, **attach,
               "sent": sent, "arrived": arrived, "seen": after["ipv4"] - before["ipv4"],
               "other_packets": (after["packets"] - before["packets"]
                                 - (after["ipv4"] - before["ipv4"])),
               "cni": cni, "cni_unanswered": self.request("unanswered") - unanswered_before}
        row["missed"] = row["sent"] - row["seen"]
        row["attached_by"] = attached_by(row)
        self._finish(name, veth)
        return row

    def _arrived(self, tag: str, sent: int) -> int:
        """The sink's count for this container, once all `sent` are in (or after 2 s:
        some were lost on the way, which the result then shows)."""
        deadline = time.monotonic() + 2
        while True:
            n = self.request(f"received {tag}")
            if n >= sent or time.monotonic() > deadline:
                return n
            time.sleep(0.001)

    def _attach_times(self, ifindex: int) -> dict:
        """The controller's times for the veth (waits for the attach, at most 10 s)."""
        key, deadline = str(ifindex), time.monotonic() + 10
        while True:
            attach = self.request("ask attach")
            if key in attach["attached_at"] or time.monotonic() > deadline:
                break
            time.sleep(0.005)
        return {"event_at": attach["event_at"].get(key),
                "ingress_at": attach.get("ingress_at", {}).get(key),
                "attached_at": attach["attached_at"].get(key)}

    def _finish(self, name: str, ifindex: int) -> None:
        """Lets the sender exit (podman removes the container; with the plugin, its DEL
        detaches) and waits until the controller has forgotten its veth, so that the next
        container is measured alone."""
        self.running.stdin.close()
        try:
            self.running.wait(60)
        except subprocess.TimeoutExpired:
            podman("rm", "--force", "--time", "0", name, check=False, env=self.podman_env)
            self.running.wait(30)
        self.running.stdout.close()
        self.running.stderr.close()
        self.running = None
        deadline = time.monotonic() + 10
        while ifindex in self.request("ask attach")["attached"]:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the controller still holds {name}'s veth after 10 s")
            time.sleep(0.005)

    # --- clean-up -------------------------------------------------------------------------
    def teardown(self) -> None:
        if self.running and self.running.poll() is None:
            self.running.kill()
            self.running.wait()
        if self.names:
            podman("rm", "--force", "--time", "0", "--ignore", *self.names, check=False,
                   env=self.podman_env)
        for proc in (self.agent, self.mirror):
            if proc and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for net in self.made_nets:
            podman("network", "rm", "--force", net, check=False, env=self.podman_env)
            # CNI's address bookkeeping of the network outlives `network rm`.
            shutil.rmtree(f"/var/lib/cni/networks/{net}", ignore_errors=True)
        if self.made_ns:
            subprocess.run(["ip", "netns", "del", self.ns], check=False)
        shutil.rmtree(self.state, ignore_errors=True)
        shutil.rmtree(self.podman_dir, ignore_errors=True)


# --- the figures ----------------------------------------------------------------------------
def attached_by(row: dict) -> str | None:
    """Which path attached the container's veth: with the plugin, its request's outcome
    says it ("already": the link event had attached it first); otherwise the link event."""
    if row["attached_at"] is None:
        return None
    if row["plugin"]:
        if row["cni"].get("attached"):
            return "cni"
        if row["cni"].get("already"):
            return "link-event"
        return None             # attached, the plugin's request not answered: see cni
    return "link-event"


def derive(row: dict) -> dict:
    """The row's intervals in ms (None where a time is missing)."""
    def ms(a, b):
        return round((row[b] - row[a]) * 1e3, 3) if row[a] and row[b] else None
    return {**row, "attach_ms": ms("t_run", "attached_at"),
            "event_to_attached_ms": ms("event_at", "attached_at"),
            "ingress_ms": ms("t_run", "ingress_at"),
            "first_packet_ms": ms("t_run", "first_send"),
            "margin_ms": ms("attached_at", "first_send")}


def _pct(rows: list[dict], key: str, q: float) -> float | None:
    values = [r[key] for r in rows if r[key] is not None]
    return percentile(values, q) if values else None


def figures(rows: list[dict]) -> dict:
    """The figures of some derived rows (one arm's)."""
    out = {"containers": len(rows),
           "attached": sum(1 for r in rows if r["attached_at"] is not None)}
    for key in ("attach_ms", "event_to_attached_ms", "first_packet_ms", "margin_ms"):
        out[f"{key}_p50"] = _pct(rows, key, 50)
        out[f"{key}_p99"] = _pct(rows, key, 99)
    margins = [r["margin_ms"] for r in rows if r["margin_ms"] is not None]
    out["margin_ms_min"] = min(margins) if margins else None
    out["first_packet_before_attach"] = sum(1 for m in margins if m < 0)
    for key in ("sent", "arrived", "seen", "missed"):
        out[f"packets_{key}"] = sum(r[key] for r in rows)
    out["containers_with_misses"] = sum(1 for r in rows if r["missed"] > 0)
    out["attached_by"] = {path: sum(1 for r in rows if r["attached_by"] == path)
                          for path in ("cni", "link-event")}
    out["cni_unanswered"] = sum(r["cni_unanswered"] for r in rows)
    return out


def summarize(rows: list[dict], args) -> dict:
    rows = [derive(r) for r in rows]
    cni = args.attach_by == "cni"
    out = {"attach_by": args.attach_by, "sender": args.sender, "hook": args.hook,
           "rate_pps": args.rate, "packets_per_container": args.packets,
           "anchor": args.anchor,
           "image": SENDER_IMAGE if args.sender == "static" else args.image,
           **figures([r for r in rows if r["plugin"] == cni])}
    if cni:
        out["without_plugin"] = without = figures([r for r in rows if not r["plugin"]])
        for q in ("p50", "p99"):
            a, b = out[f"first_packet_ms_{q}"], without[f"first_packet_ms_{q}"]
            out[f"plugin_adds_ms_{q}"] = None if a is None or b is None else round(a - b, 3)
    out["per_container"] = rows
    return out


def render(s: dict) -> str:
    def ms(v):
        return "-" if v is None else f"{v:.1f} ms"
    by = s["attached_by"]
    how = ("the controller's link-event watcher" if s["attach_by"] == "link-event" else
           "the chained CNI plugin (and the link-event watcher): attached by the plugin in "
           f"{by['cni']}, by the link event first in {by['link-event']}; "
           f"{s['cni_unanswered']} ADDs unanswered")
    lines = [
        f"{s['containers']} podman containers, --hook {s['hook']}, each sending "
        f"{s['packets_per_container']} UDP datagrams at {s['rate_pps']:g}/s from its first "
        f"instruction (--sender {s['sender']}); "
        f"{'one pair attached before' if s['anchor'] else 'empty node'}",
        f"attached by {how}",
        f"podman run -> both hooks attached: p50 {ms(s['attach_ms_p50'])}, p99 "
        f"{ms(s['attach_ms_p99'])} ({s['attached']} of {s['containers']} attached)",
        f"request (link event or plugin) -> both hooks attached: p50 "
        f"{ms(s['event_to_attached_ms_p50'])}, p99 {ms(s['event_to_attached_ms_p99'])}",
        f"podman run -> first datagram sent: p50 {ms(s['first_packet_ms_p50'])}, p99 "
        f"{ms(s['first_packet_ms_p99'])}",
        f"hooks attached -> first datagram (margin): p50 {ms(s['margin_ms_p50'])}, p99 "
        f"{ms(s['margin_ms_p99'])}, min {ms(s['margin_ms_min'])}; first datagram before "
        f"the attach in {s['first_packet_before_attach']} containers",
        f"packets: {s['packets_sent']} sent, {s['packets_arrived']} arrived at the gateway, "
        f"{s['packets_seen']} seen by the classifier: {s['packets_missed']} missed "
        f"({s['containers_with_misses']} containers with misses)",
        "ConMon (the thesis' reference): 79 ms to attach, 76 packets missed at 1000/s",
    ]
    if "without_plugin" in s:
        w = s["without_plugin"]
        lines.insert(-1, (
            f"without the plugin ({w['containers']} containers interleaved): podman run -> "
            f"first datagram sent p50 {ms(w['first_packet_ms_p50'])}, p99 "
            f"{ms(w['first_packet_ms_p99'])}; the plugin adds p50 "
            f"{ms(s['plugin_adds_ms_p50'])}, p99 {ms(s['plugin_adds_ms_p99'])}; "
            f"{w['packets_missed']} of {w['packets_sent']} missed"))
    return "\n".join(lines)


def arm_order(args) -> list[str]:
    """Which network each container starts on, in order: with --attach-by cni, --count on
    each, as plugin, none, none, plugin, ... (each arm first in every other pair, so that
    neither is always the one after the other)."""
    if args.attach_by != "cni":
        return ["none"] * args.count
    pairs = (("plugin", "none") if k % 2 == 0 else ("none", "plugin")
             for k in range(args.count))
    return [arm for pair in pairs for arm in pair]


def run(args) -> dict:
    build_what_is_missing(args)
    bench = Bench(args)
    rows = []
    try:
        nets = ", ".join(f"{net} ({subnet}.0/24, {arm})"
                         for arm, (net, subnet) in bench.networks.items())
        progress(f"namespace {bench.ns}, podman networks {nets}, --hook {args.hook}, "
                 f"--attach-by {args.attach_by}, --sender {args.sender}")
        bench.setup()
        arms = arm_order(args)
        for i, arm in enumerate(arms):
            rows.append(bench.one(i, arm))
            row = derive(rows[-1])
            progress(f"[{i + 1}/{len(arms)}] {row['veth']} ({arm}): attached "
                     f"{row['attach_ms']} ms after podman run (by {row['attached_by']}), "
                     f"first datagram {row['first_packet_ms']} ms, {row['missed']} of "
                     f"{row['sent']} missed")
    finally:
        bench.teardown()
    return summarize(rows, args)


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench.containers: run as root (it creates namespaces, containers and loads "
              "BPF)", file=sys.stderr)
        return 2
    reason = missing_prerequisite(args.attach_by, args.sender, args.image)
    if reason:
        print(f"bench.containers: {reason}", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    # SIGTERM unwinds like Ctrl-C, through the clean-up.
    signal.signal(signal.SIGTERM, raise_interrupt)
    result = run(args)
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
