"""Running `mirror run` as a real process, comparing captures, and waiting on counters
(never on fixed sleeps) until a capture holds everything that was sent."""
from __future__ import annotations

import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import dpkt
import pytest

from mirror.capture.flow import Flow, Packet, flows_of
from mirror.flowkey import FlowKey
from mirror.hooks import tcx
from mirror.http1 import status_line

ROOT = Path(__file__).resolve().parent.parent

# tcx exists from Linux 6.6 on: on an older kernel a tcx test skips (and says why) instead
# of failing on `mirror run --hook tcx` refusing to start. NEEDS_TCX marks a test that
# uses tcx only; HOOKS is the parameter list of a test run once per hook layout.
NEEDS_TCX = pytest.mark.skipif(not tcx.supported(), reason="tcx needs Linux 6.6 or newer, "
                               f"this is {platform.release()}")
HOOKS = ["clsact", "htb", pytest.param("tcx", marks=NEEDS_TCX)]


def mirror_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mirror", *args]


def run_cli(*args: str, env=None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(mirror_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


class MirrorProcess:
    """`mirror run ...` in the background; start() returns when it prints its ready line.
    A thread collects its output (stdout and stderr merged) line by line. With `netns`, it
    runs inside that network namespace (ip netns exec)."""

    def __init__(self, *args: str, env=None, wrapper: list[str] = (),
                 netns: str | None = None):
        self.args = args
        self.env = env
        self.wrapper = list(wrapper)    # a command that runs it, e.g. setpriv with options
        self.netns = netns
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []
        self._reader: threading.Thread | None = None

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def _read(self) -> None:
        for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace"))

    def start(self, timeout: float = 60) -> "MirrorProcess":
        cmd = self.wrapper + mirror_cmd("run", *self.args)
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self.wait_for("mirror: ready", timeout):
            self.kill()
            raise RuntimeError(f"mirror run did not become ready:\n{self.output}")
        return self

    def wait_for(self, text: str, timeout: float = 10) -> bool:
        """Waits until `text` appears in the output (or the process ends)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output:
                return True
            if self.proc.poll() is not None and not self._reader.is_alive():
                return text in self.output
            time.sleep(0.05)
        return False

    def wait_for_count(self, text: str, count: int, timeout: float = 10) -> bool:
        """Waits until `text` appears `count` times in the output (or the process ends)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.output.count(text) >= count:
                return True
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        return self.output.count(text) >= count

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; returns the exit status. A controller that does not stop is
        killed and the test fails with what it said (its log shows where it stuck)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            self._reader.join(5)
            raise AssertionError(f"mirror run did not stop within {timeout} s of SIGTERM "
                                 f"(killed); it said:\n{self.output}") from None
        self._reader.join(5)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self._reader:
            self._reader.join(5)


def dpkt_flows(path) -> dict[FlowKey, Flow]:
    """The connections of a pcap the product wrote (the sidecar's reordered ring files),
    its records framed by dpkt's reader instead of mirror.capture.pcap, so that what the
    product wrote is checked by a reader that is not its own."""
    with open(path, "rb") as f:
        reader = dpkt.pcap.Reader(f)
        link = reader.datalink()
        packets = (Packet.decode(link, ts, frame) for ts, frame in reader)
        return flows_of((p for p in packets if p is not None), os.path.basename(path))


def signature(p: Packet) -> tuple:
    return (p.src, p.sport, p.dst, p.dport, p.seq, p.ack, p.flags, len(p.payload))


def from_first_status(packets: list[Packet], code: int) -> list[Packet]:
    """The packets from the first response carrying `code` on (capture order)."""
    for i, p in enumerate(packets):
        if status_line(p.payload) and int(p.payload[9:12]) == code:
            return packets[i:]
    raise AssertionError(f"no {code} response in the reference capture")


def request_of(packets: list[Packet], code: int) -> list[Packet]:
    """The request start answered by the first response carrying `code`: the last
    segment starting with a request line, sent the other way, before that response
    (capture order). What the mirror writes to the debug interface for that error."""
    from mirror.http1 import starts_request
    for i, p in enumerate(packets):
        if status_line(p.payload) and int(p.payload[9:12]) == code:
            before = [q for q in packets[:i] if q.sport != p.sport and
                      starts_request(q.payload)]
            if not before:
                raise AssertionError(f"no request before the {code} response")
            return [before[-1]]
    raise AssertionError(f"no {code} response in the reference capture")


def same_packets(a: list[Packet], b: list[Packet]) -> bool:
    return Counter(map(signature, a)) == Counter(map(signature, b))


def crossed_trigger(packets: list[Packet], first: int) -> tuple[list[Packet], list[Packet]]:
    """The packets of one connection from its trigger segment `packets[first]` on, split
    into those the mirror must clone and those it may: a packet the peer sent before it
    received the trigger (its ACK does not cover the trigger's last byte) crossed the
    trigger in flight. It can come through the classifier on another CPU before the
    flow is marked, even though the capture, which taps received packets before tc
    ingress and sent ones after tc egress, lists it after the trigger. h2 clients send
    such frames (WINDOW_UPDATE, PING and SETTINGS acknowledgements) at any time."""
    trigger = packets[first]
    end = (trigger.seq + len(trigger.payload)) & 0xFFFFFFFF
    must, may = [], []
    for p in packets[first:]:
        covers = ((p.ack - end) & 0xFFFFFFFF) < 1 << 31
        (may if p.sport != trigger.sport and not covers else must).append(p)
    return must, may


def assert_mirrored_from(mirrored: list[Packet], packets: list[Packet], first: int) -> None:
    """`mirrored` holds every packet of `packets` from the trigger at `first` on, and
    nothing else but packets that crossed the trigger in flight (crossed_trigger)."""
    must, may = crossed_trigger(packets, first)
    got, want, extra = (Counter(map(signature, x)) for x in (mirrored, must, may))
    assert not want - got, (f"not mirrored: {sorted(want - got)}\n"
                            f"mirrored {[signature(p) for p in mirrored]}")
    assert not got - want - extra, f"mirrored but not expected: {sorted(got - want - extra)}"


def run_module(*args: str, timeout: float) -> tuple[subprocess.Popen, str, str]:
    """`python -m ARGS` from the repository root: (the finished process, its stdout, its
    stderr); its pid names what it made in the kernel. On a timeout, or any exception
    while waiting, the process gets SIGTERM (the bench's commands clean up their kernel
    state on it) and is waited for."""
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.communicate()
    return proc, stdout, stderr


def env_with(**kw) -> dict:
    env = dict(os.environ)
    env.update({k: str(v) for k, v in kw.items()})
    return env


def controller_ask(state_dir, what: str = "counters"):
    """Asks the one controller recorded in `state_dir` over its control socket."""
    from mirror import ownership
    from mirror.ctlsocket import ask
    old = os.environ.get("MIRROR_STATE_DIR")
    os.environ["MIRROR_STATE_DIR"] = str(state_dir)
    try:
        return ask(ownership.records("controller")[0]["socket"], what)
    finally:
        if old is None:
            del os.environ["MIRROR_STATE_DIR"]
        else:
            os.environ["MIRROR_STATE_DIR"] = old


def drop_link(name: str) -> None:
    """Deletes a link a test may have left (a killed controller's debug interface)."""
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        if ipr.link_lookup(ifname=name):
            ipr.link("del", ifname=name)


def links_of_this_run() -> set[str]:
    """The host's interface names, less those of other test processes running at the same
    time (mirror.lab.netns.unique_name: "m" + another pid): what this run could have
    created or left behind."""
    mine = f"m{os.getpid():06x}"
    return {name for name in os.listdir("/sys/class/net")
            if not re.match(r"m[0-9a-f]{6}[0-9a-f]{2}[a-z]", name) or name.startswith(mine)}


# --- waiting on counters -----------------------------------------------------------------

def wait_until(check, what: str, timeout: float = 60.0):
    """Polls `check()`, which returns (done, seen), until done; returns `seen`. A condition
    never reached fails the test, naming `what` and the last `seen`. The timeout only
    bounds a hang: a test passes or fails on the condition, never on elapsed time."""
    deadline = time.monotonic() + timeout
    while True:
        done, seen = check()
        if done:
            return seen
        if time.monotonic() >= deadline:
            raise AssertionError(f"waited {timeout:g} s for {what}; last seen: {seen}")
        time.sleep(0.05)


CLOCK_MONOTONIC_COARSE = 6     # linux/time.h; the time module does not name it


def next_coarse_tick() -> None:
    """Returns once the coarse monotonic clock, the one the classifier stamps connections
    with (bpf_ktime_get_coarse_ns, a tick's resolution), has moved on: only then is a
    connection touched until now idle longer than 1 ns in the classifier's eyes."""
    start = time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)
    while time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE) == start:
        os.sched_yield()


def tcpdump_counts(dump) -> dict[str, int]:
    """A running mirror.capture.tcpdump.Tcpdump's own counters, fresh: captured (written
    to its file: it runs with -U), received (handed to its socket by the kernel) and
    dropped (lost to a full buffer). Asks with SIGUSR1 and waits for the answer."""
    reports = dump.stats_reports
    dump.request_stats()
    wait_until(lambda: (dump.stats_reports > reports or not dump.running(), dump.stats),
               f"tcpdump on {dump.iface} to print its counters", timeout=10)
    if not dump.running():
        raise AssertionError(f"tcpdump on {dump.iface} exited: {dump.stderr}")
    return dict(dump.stats)


def link_packets(ifname: str, *counts: str) -> int:
    """Packets the interface received and sent (or the named `counts` only), from its
    own statistics."""
    stats = Path("/sys/class/net") / ifname / "statistics"
    return sum(int((stats / f).read_text()) for f in counts or ("rx_packets", "tx_packets"))


def counted_from_now(counter: Callable[[], int]) -> Callable[[], int]:
    """`counter` (a function returning a running total) relative to its value now."""
    start = counter()
    return lambda: counter() - start


def mirrored_packets(state_dir) -> int:
    """Frames the controller sent to the debug interface: the classifier's clones and the
    request frames of error responses (the controller's counters), plus one for each
    event still in the ring buffer (it may yet write a request frame): a wait on this
    count does not end before the controller has read every event."""
    counters = controller_ask(state_dir)
    unread = counters["events"] - counters["events_read"]
    return counters["mirrored_packets"] + counters["request_frames_written"] + unread


def wait_captured(dump, expected, what: str = "", lossy: bool = False) -> dict[str, int]:
    """Waits until tcpdump `dump` has written at least `expected()` packets (re-read on
    every poll, so packets still arriving are waited for too) and returns its counters.
    `expected` counts what crossed the interface since the capture began: the classifier's
    mirrored count for a debug interface, the link's own count for any other. A packet
    the kernel dropped before tcpdump read it can never be captured: that fails at once,
    unless `lossy`, where the drops count as accounted for."""
    def check():
        counts = tcpdump_counts(dump)
        want = expected()
        if counts["dropped"] and not lossy:
            raise AssertionError(f"tcpdump on {dump.iface} lost packets: {counts}")
        done = counts["captured"] + counts["dropped"] >= want
        return done, {**counts, "expected": want}
    return wait_until(check, f"tcpdump on {dump.iface} to capture {what or 'everything sent'}")


def wait_closed(*servers: str, port: int = 80) -> None:
    """Waits until no connection of this namespace to `servers` (port `port`) has a packet
    left to send or receive: each is gone or in TIME-WAIT (its last ACK sent)."""
    def check():
        out = subprocess.run(["ss", "-Htan", "state", "all", "dport", f"= :{port}"],
                             capture_output=True, text=True, check=True).stdout
        busy = [line.split() for line in out.splitlines()
                if line.split()[0] != "TIME-WAIT"
                and line.split()[4].rsplit(":", 1)[0].strip("[]") in servers]
        return not busy, busy
    wait_until(check, f"the connections to {', '.join(servers)} to close")


# --- podman: one helper for every test of real containers ------------------------------

CONTAINER = ROOT / "container"
IMAGE = "localhost/mirror:latest"
APP_IMAGE = "localhost/mirror-demo-app:latest"
TEST_LABEL = "io.mirror.test-pid"       # on every pod a test makes: the pid that made it


def podman(*args: str, netns: str | None = None, env: dict | None = None, check: bool = True,
           timeout: float = 300) -> subprocess.CompletedProcess:
    """podman, with `netns` as its host network when given: the network's bridge and its
    containers' host-side veths are made there. nsenter, not `ip netns exec`: the latter
    remounts /sys, hiding the cgroup mount runc needs."""
    prefix = ["nsenter", f"--net=/run/netns/{netns}"] if netns else []
    r = subprocess.run([*prefix, "podman", *args], capture_output=True, text=True,
                       timeout=timeout, env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({r.returncode}):\n"
                             f"{r.stdout}\n{r.stderr}")
    return r


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def remove_stale_pods() -> None:
    """Removes the pods of earlier test processes that died before cleaning up."""
    out = podman("pod", "ps", "--filter", f"label={TEST_LABEL}", "--format", "{{.Name}}",
                 check=False).stdout
    for name in out.split():
        labels = json.loads(podman("pod", "inspect", name, "--format", "{{json .Labels}}",
                                   check=False).stdout or "{}")
        pid = int(labels.get(TEST_LABEL, "0") or 0)
        if pid and not _pid_alive(pid):
            podman("pod", "rm", "--force", name, check=False)
