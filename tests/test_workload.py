"""Workload identity (mirror.workload): which pod, container or network namespace is
behind an interface.

unit: the protobuf reader, the workload's names in each convention, the kubelet's labels,
the network namespace in a containerd spec.
kernel: real network namespaces and veths, with no runtime (the namespace's name, its id,
the host), and with runtime sockets that are absent, refused, hung or answer garbage (test
servers on unix sockets): each costs a counted failure and a bounded delay, never a
blocked caller.
container: real runtimes with their own state and sockets: a private containerd driven
with `ctr` in namespace k8s.io with the kubelet's labels (pods joined to the host by veths
the test makes), a private dockerd (tests/dockerengine.py) and podman's API service; each
runtime's own events change an answer without a link event; `mirror status` shows the
pod of a monitored veth."""
from __future__ import annotations

import json
import logging
import os
import queue
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from pyroute2 import IPRoute

import containerdengine
import dockerengine
from helpers import ROOT, MirrorProcess, env_with, podman, run_cli, wait_until
from mirror.lab.netns import PREFIX, sh, stop_process, unique_name
from mirror.workload import PENDING, Container, Workload, Workloads, resolve
from mirror.workload import protowire as pw
from mirror.workload.containerd import Containerd
from mirror.workload.docker import Docker
from mirror.workload.model import kubernetes_fields
from mirror.workload.podman import Podman

CLIENTS = {"containerd": Containerd, "docker": Docker, "podman": Podman}
POD_LABELS = {"io.kubernetes.pod.name": "checkout-1", "io.kubernetes.pod.namespace": "shop",
              "io.kubernetes.pod.uid": "0d7e-pod-uid"}
_ns_seq = iter(range(300, 400))


# --- unit ---------------------------------------------------------------------------------
@pytest.mark.unit
def test_protowire_reads_fields_and_refuses_garbage():
    entry = pw.string_field(1, "k") + pw.string_field(2, "v")
    message = (pw.string_field(1, "abc") + pw.bytes_field(2, entry) +
               bytes([3 << 3, 0xAC, 0x02]) + bytes([4 << 3 | 5]) + b"\0\0\0\0")
    fields = pw.fields(message)
    assert pw.text(fields, 1) == "abc"
    assert pw.string_map(fields, 2) == {"k": "v"}
    assert pw.number(fields, 3) == 300
    assert 4 not in fields and pw.text(fields, 9) == "" and pw.number(fields, 9) == 0
    for garbage in (b"\x0a\x05ab", b"\xff" * 11, bytes([1 << 3 | 3]), b"\x0d\x00"):
        with pytest.raises(pw.WireError):
            pw.fields(garbage)


@pytest.mark.unit
def test_kubelet_labels_sandbox_and_containers():
    sandbox = kubernetes_fields({**POD_LABELS, "io.cri-containerd.kind": "sandbox",
                                 "io.kubernetes.container.name": "POD"})
    assert sandbox == {"namespace": "shop", "pod": "checkout-1", "pod_uid": "0d7e-pod-uid",
                       "name": None, "sandbox": True}
    app = kubernetes_fields({**POD_LABELS, "io.cri-containerd.kind": "container",
                             "io.kubernetes.container.name": "app"})
    assert (app["name"], app["sandbox"]) == ("app", False)
    shim = kubernetes_fields({**POD_LABELS, "io.kubernetes.docker.type": "podsandbox"})
    assert shim["sandbox"] is True
    assert kubernetes_fields({"com.docker.compose.service": "web"}) == {}


@pytest.mark.unit
def test_workload_names_in_each_convention():
    pod = Workload.of_containers("containerd", [
        Container("containerd", "c2", "sidecar", "shop", "checkout-1", "uid"),
        Container("containerd", "sb", None, "shop", "checkout-1", "uid", sandbox=True),
        Container("containerd", "c1", "app", "shop", "checkout-1", "uid")], "cni-1")
    assert pod.as_dict() == {"runtime": "containerd", "namespace": "shop",
                             "pod": "checkout-1", "pod_uid": "uid",
                             "container": "app,sidecar", "container_id": "sb",
                             "netns": "cni-1"}
    assert pod.attributes() == {
        "container.runtime.name": "containerd", "k8s.namespace.name": "shop",
        "k8s.pod.name": "checkout-1", "k8s.pod.uid": "uid",
        "k8s.container.name": "app,sidecar", "container.id": "sb", "mirror.netns": "cni-1"}
    assert pod.labels() == {"namespace": "shop", "pod": "checkout-1",
                            "container": "app,sidecar"}
    assert pod.describe() == "shop/checkout-1 (app,sidecar)"
    docker = Workload.of_containers("docker", [Container("docker", "f00d" * 16, "web")],
                                    "net:[4026532000]")
    assert docker.attributes() == {"container.runtime.name": "docker", "container.name": "web",
                                   "container.id": "f00d" * 16,
                                   "mirror.netns": "net:[4026532000]"}
    assert docker.labels() == {"namespace": "", "pod": "", "container": "web"}
    assert docker.describe() == "docker:web"
    podman = Workload.of_containers("podman", [
        Container("podman", "i1", "x-infra", pod="shop", sandbox=True),
        Container("podman", "a1", "api", pod="shop")], "netns-1")
    assert podman.attributes()["mirror.pod.name"] == "shop"
    assert "k8s.pod.name" not in podman.attributes()
    assert podman.describe() == "podman:shop/api"
    netns = Workload("netns", netns="blue")
    assert netns.attributes() == {"mirror.netns": "blue"} and netns.describe() == "netns:blue"
    assert Workload("host").attributes() == {} and Workload("host").describe() == "host"
    assert PENDING.attributes() == {"mirror.workload.state": "pending"}
    for w in (pod, docker, podman, netns, Workload("host"), PENDING):
        assert Workload.from_attributes(w.attributes()) == w
    assert Workload.from_attributes(None) is None


@pytest.mark.unit
def test_containerd_spec_says_where_the_network_namespace_is():
    def entry(spec) -> dict:
        any_spec = (pw.string_field(1, "types.containerd.io/opencontainers/runtime-spec/1/"
                                    "Spec") + pw.bytes_field(2, json.dumps(spec).encode()))
        return pw.fields(pw.string_field(1, "c") + pw.bytes_field(5, any_spec))
    joined = {"linux": {"namespaces": [{"type": "pid"},
                                       {"type": "network", "path": "/var/run/netns/cni-1"}]}}
    own = {"linux": {"namespaces": [{"type": "network"}]}}
    host = {"linux": {"namespaces": [{"type": "pid"}]}}
    paths = Containerd._netns_paths
    assert paths(entry(joined), 42) == ("/var/run/netns/cni-1", "/proc/42/ns/net")
    assert paths(entry(own), 42) == ("/proc/42/ns/net",)
    assert paths(entry(own), None) == ()
    assert paths(entry(host), 42) == ()


@pytest.mark.unit
def test_daemonset_gains_two_read_only_mounts_and_nothing_else():
    """The node-wide controller reads containerd's socket and the node's /run/netns
    (docs/deployment.md says why both), read-only, without a capability or the host's
    PID namespace. (Its other mounts: the kernel headers, its state, and the events
    directory it shares with the capture sidecar: tests/test_container.py.)"""
    doc = next(d for d in yaml.safe_load_all((ROOT / "container/k8s/daemonset.yaml").read_text())
               if d and d.get("kind") == "DaemonSet")
    spec = doc["spec"]["template"]["spec"]
    mirror = next(c for c in spec["containers"] if c["name"] == "mirror")
    mounts = {m["mountPath"]: m for m in mirror["volumeMounts"]}
    assert set(mounts) == {"/lib/modules", "/usr/src", "/run/tc-mirror",
                           "/run/containerd/containerd.sock", "/run/netns", "/var/log/mirror"}
    sock, netns = mounts["/run/containerd/containerd.sock"], mounts["/run/netns"]
    assert sock["readOnly"] and netns["readOnly"]
    assert netns["mountPropagation"] == "HostToContainer"
    volumes = {v["name"]: v["hostPath"] for v in spec["volumes"]}
    assert volumes[sock["name"]] == {"path": "/run/containerd/containerd.sock",
                                     "type": "Socket"}
    assert volumes[netns["name"]]["path"] == "/run/netns"
    assert mirror["securityContext"]["capabilities"]["add"] == ["BPF", "NET_ADMIN",
                                                                "PERFMON", "NET_RAW"]
    assert not spec.get("hostPID") and "privileged" not in mirror["securityContext"]


# --- kernel: namespaces and broken runtime sockets ----------------------------------------
class Netns:
    """A network namespace bind-mounted under /run/netns (as `ip netns add` makes one)."""

    def __init__(self):
        self.name = f"{PREFIX}-{os.getpid()}-{next(_ns_seq)}"
        sh("ip", "netns", "add", self.name)

    def destroy(self) -> None:
        sh("ip", "netns", "del", self.name, check=False)


@pytest.fixture
def made():
    """What a test makes: network namespaces, host-side veths (by ifindex), processes;
    all removed at the end."""
    things = {"netns": [], "links": [], "procs": []}

    def netns() -> Netns:
        things["netns"].append(Netns())
        return things["netns"][-1]

    def veth(target: str | int) -> tuple[str, int]:
        """A veth whose peer is in `target` (a namespace's name, or a process's pid);
        (host-side name, ifindex)."""
        name = unique_name("w")
        sh("ip", "link", "add", name, "type", "veth", "peer", "name", "eth0", "netns",
           str(target))
        ifindex = socket.if_nametoindex(name)
        things["links"].append(ifindex)
        return name, ifindex

    yield netns, veth, things["procs"]
    for proc in things["procs"]:
        stop_process(proc)
    with IPRoute() as ipr:
        for ifindex in things["links"]:
            try:
                ipr.link("del", index=ifindex)
            except Exception:
                pass            # gone with its namespace, or deleted by the test
    for ns in things["netns"]:
        ns.destroy()


def absent_runtimes(tmp_path) -> list:
    return [cls(str(tmp_path / f"no-{name}.sock")) for name, cls in CLIENTS.items()]


def link_netnsid(ifindex: int) -> int:
    """The peer's nsid as pyroute2 reads it (not through mirror.workload.netns)."""
    with IPRoute() as ipr:
        return ipr.get_links(ifindex)[0].get_attr("IFLA_LINK_NETNSID")


@pytest.mark.kernel
def test_without_runtimes_the_namespace_names_the_workload(made, tmp_path):
    netns, veth, procs = made
    blue = netns()
    _, named = veth(blue.name)
    hidden = subprocess.Popen(["unshare", "--net", "sleep", "infinity"])
    procs.append(hidden)
    wait_until(lambda: (os.readlink(f"/proc/{hidden.pid}/ns/net") !=
                        os.readlink("/proc/self/ns/net"), None), "unshare's namespace")
    _, unnamed = veth(hidden.pid)
    a, b = unique_name("w"), unique_name("w")
    sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)     # both ends here
    host_side = socket.if_nametoindex(a)
    try:
        gone = 0x7FFFFFF0           # no interface has this index
        answers, failures = resolve([named, unnamed, host_side, gone],
                                    absent_runtimes(tmp_path))
    finally:
        sh("ip", "link", "del", a)
    assert answers[named] == Workload("netns", netns=blue.name)
    assert answers[unnamed] == Workload("netns", netns=f"nsid:{link_netnsid(unnamed)}")
    assert answers[host_side] == Workload("host")
    assert answers[gone] is None
    assert {n: f.reason for n, f in failures.items()} == dict.fromkeys(CLIENTS, "absent")


@pytest.mark.kernel
def test_absent_runtimes_cost_a_counter_and_one_info_line_each(made, tmp_path, caplog):
    """A runtime not installed here (no socket) is no news: counted, said once at info
    level, never a warning (a node with one runtime of three would warn at every start)."""
    netns, veth, _procs = made
    _, ifindex = veth(netns().name)
    caplog.set_level("INFO", logger="mirror")
    w = Workloads(absent_runtimes(tmp_path), resync_seconds=3600).start()
    try:
        assert w.lookup(ifindex) == PENDING
        for _ in range(3):          # three passes, each asking every runtime again
            passes = w.stats.passes
            w.refresh(ifindex)
            assert w.wait([ifindex], 30)
            wait_until(lambda: (w.stats.passes > passes, w.stats.passes), "a pass")
        assert w.lookup(ifindex).runtime == "netns"
        for name in CLIENTS:
            assert w.stats.failures[(name, "absent")] >= 3
        said = [r for r in caplog.records if "gives no containers" in r.getMessage()]
        assert sorted(r.getMessage().split()[1] for r in said) == sorted(CLIENTS), said
        assert {r.levelname for r in said} == {"INFO"}, said
        # Nor does following their events (which fails at once, the same way) warn.
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], \
            [r.getMessage() for r in caplog.records]
    finally:
        w.stop()


class BrokenRuntime:
    """A unix socket playing a runtime that does not work: `hang` accepts and never
    answers, `garbage` answers bytes that are neither HTTP nor HTTP/2, `not-json` an HTTP
    200 whose body is not JSON, `refused` is bound but never listens."""

    GARBAGE = b"SSH-2.0-OpenSSH_9.2\r\n" + bytes(range(256)) * 4
    NOT_JSON = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15"
                b"\r\n\r\n<html>oops</ht>")

    def __init__(self, path: Path, mode: str):
        self.path = str(path)
        self.mode = mode
        self.accepted = 0
        self.held: list[socket.socket] = []
        self._stop = threading.Event()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self._thread = None
        if mode != "refused":
            self.sock.listen(64)
            self._thread = threading.Thread(target=self._serve, daemon=True)
            self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not select.select([self.sock], [], [], 0.1)[0]:
                continue
            conn, _ = self.sock.accept()
            self.accepted += 1
            if self.mode == "hang":
                self.held.append(conn)
                continue
            try:
                conn.settimeout(5)
                conn.recv(65536)
                conn.sendall(self.GARBAGE if self.mode == "garbage" else self.NOT_JSON)
            except OSError:
                pass
            finally:
                conn.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)
        for conn in self.held:
            conn.close()
        self.sock.close()
        os.unlink(self.path)


@pytest.fixture
def broken():
    servers = []

    def make(path: Path, mode: str) -> BrokenRuntime:
        servers.append(BrokenRuntime(path, mode))
        return servers[-1]
    yield make
    for server in servers:
        server.close()


def runtimes_with(tmp_path, name: str, path: str) -> list:
    """The three clients, `name` at `path` and the others at absent sockets."""
    return [cls(path if n == name else str(tmp_path / f"no-{n}.sock"))
            for n, cls in CLIENTS.items()]


@pytest.mark.kernel
@pytest.mark.parametrize("name", list(CLIENTS))
@pytest.mark.parametrize("mode,reason", [("garbage", "bad-answer"), ("not-json", "bad-answer"),
                                         ("refused", "refused")])
def test_a_runtime_answering_garbage_is_counted_and_skipped(made, tmp_path, broken, name,
                                                            mode, reason):
    netns, veth, _procs = made
    blue = netns()
    _, ifindex = veth(blue.name)
    server = broken(tmp_path / "runtime.sock", mode)
    runtimes = runtimes_with(tmp_path, name, server.path)
    answers, failures = resolve([ifindex], runtimes, timeout=5)
    assert failures[name].reason == reason, failures[name]
    assert answers[ifindex] == Workload("netns", netns=blue.name)
    assert (server.accepted > 0) == (mode != "refused")
    for rt in runtimes:
        rt.close()


HUNG_TIMEOUT = 5.0      # long beside a lookup (microseconds), short for the test's length


@pytest.mark.kernel
@pytest.mark.parametrize("name", list(CLIENTS))
def test_a_hung_runtime_blocks_neither_the_caller_nor_the_answer(made, tmp_path, broken, name,
                                                              caplog):
    """A socket that accepts and never answers: start() returns at once, lookup() says
    pending while a call to the runtime is under way and not yet timed out, the answer
    comes without the runtime once the call times out, the timeout is counted and warned
    about (the absent others are not), and stop() ends every thread."""
    caplog.set_level("INFO", logger="mirror")
    netns, veth, _procs = made
    blue = netns()
    _, ifindex = veth(blue.name)
    server = broken(tmp_path / "runtime.sock", "hang")
    w = Workloads(runtimes_with(tmp_path, name, server.path), timeout=HUNG_TIMEOUT,
                  resync_seconds=3600)
    w.start()
    try:
        assert w.lookup(ifindex) == PENDING
        wait_until(lambda: (server.accepted > 0, server.accepted), "the runtime asked")
        assert w.lookup(ifindex) == PENDING
        # That lookup returned while the call it would have waited for was still held:
        assert w.stats.failures.get((name, "timeout"), 0) == 0, w.stats.failures
        assert w.wait([ifindex], 60)
        assert w.lookup(ifindex) == Workload("netns", netns=blue.name)
        assert w.stats.failures.get((name, "timeout"), 0) >= 1, w.stats.failures
        warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"
                  and "gives no containers" in r.getMessage()]
        assert [m.split()[1] for m in warned] == [name], warned
    finally:
        threads = list(w._threads)
        w.stop()
    assert not [t.name for t in threads if t.is_alive()]


@pytest.mark.kernel
def test_stop_does_not_wait_for_a_hung_runtime(made, tmp_path, broken):
    """stop() while a pass waits for a runtime that holds the call (timeout: an hour)."""
    netns, veth, _procs = made
    _, ifindex = veth(netns().name)
    server = broken(tmp_path / "runtime.sock", "hang")
    w = Workloads(runtimes_with(tmp_path, "docker", server.path), timeout=3600,
                  resync_seconds=3600).start()
    threads = list(w._threads)
    try:
        assert w.lookup(ifindex) == PENDING
        # The pass's call and the event stream's request both held by the runtime:
        wait_until(lambda: (server.accepted >= 2, server.accepted), "the runtime asked")
    finally:
        stopping = threading.Thread(target=w.stop)
        stopping.start()
        stopping.join(60)       # bounds a hang only: stopping takes milliseconds
    assert not stopping.is_alive(), "stop() waited for the hung runtime"
    assert not [t.name for t in threads if t.is_alive()]
    assert w.lookup(ifindex) == PENDING and ("docker", "timeout") not in w.stats.failures


# --- container: real runtimes -------------------------------------------------------------

@pytest.fixture(scope="session")
def pause_image() -> str:
    """The smallest image that sleeps: podman's pause image (catatonit -P), which podman
    builds locally when it first makes a pod."""
    if subprocess.run(["which", "podman"], capture_output=True).returncode:
        pytest.skip("podman is not installed: run scripts/setup")

    def find() -> str | None:
        out = podman("images", "--format", "{{.Repository}}:{{.Tag}}", "--filter",
                     "reference=localhost/podman-pause").stdout.split()
        return sorted(out)[-1] if out else None
    if find() is None:
        name = f"mpause{os.getpid()}"
        podman("pod", "create", "--name", name)
        podman("pod", "rm", "--force", name)
    image = find()
    assert image, "podman made no pause image"
    return image


def veths(netns: str) -> set[str]:
    out = sh("ip", "netns", "exec", netns, "ip", "-o", "link", "show", "type", "veth").stdout
    return {line.split(": ")[1].split("@")[0] for line in out.splitlines()}


WATCH = r'''
import json, socket, sys
from mirror.workload import Workloads
from mirror.workload.containerd import Containerd
from mirror.workload.docker import Docker
from mirror.workload.podman import Podman
kind, path, absent = sys.argv[1:4]
clients = {"containerd": Containerd, "docker": Docker, "podman": Podman}
runtimes = [cls(path if name == kind else absent + name) for name, cls in clients.items()]
names = {}
def changed(ifindex, workload):
    print(json.dumps({"iface": names.get(ifindex),
                      "workload": workload and workload.attributes()}), flush=True)
# No periodic pass: only a link event (a line here) or a runtime's event answers again.
w = Workloads(runtimes, on_change=changed, resync_seconds=3600).start()
for line in sys.stdin:
    name = line.strip()
    names[socket.if_nametoindex(name)] = name
    w.refresh(socket.if_nametoindex(name))
print(json.dumps({"stats": w.stats.as_dict()}), flush=True)
w.stop()
'''


class Watcher:
    """mirror.workload.Workloads in a process inside a network namespace (where a
    runtime's veths are): interface names go in as link events would, each answer that
    changes comes out as a JSON line."""

    def __init__(self, netns: str, kind: str, path: str, absent_prefix: str, log: Path):
        self.log = log          # its warnings (a pipe nobody reads could fill up)
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{netns}", sys.executable, "-c", WATCH, kind,
                 path, absent_prefix], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=err, text=True, cwd=ROOT, env=env_with(PYTHONPATH=ROOT))
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[dict] = []
        self.unread: dict[str, list] = {}
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def follow(self, iface: str) -> None:
        self.proc.stdin.write(iface + "\n")
        self.proc.stdin.flush()

    def wait_for(self, iface: str, check, what: str, timeout: float = 60) -> dict:
        """The next answer for `iface` that `check(attributes)` accepts (answers for other
        interfaces read meanwhile are kept for them)."""
        deadline = time.monotonic() + timeout
        while True:
            mine = self.unread.setdefault(iface, [])
            while mine:
                answer = mine.pop(0)
                if answer and check(answer):
                    return answer
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no answer for {iface}: {what}; seen {self.seen}; "
                                     f"it said: {self.log.read_text()}") from None
            self.seen.append(line)
            self.unread.setdefault(line["iface"], []).append(line["workload"])

    def finish(self) -> dict:
        """Its counters, once it has stopped."""
        self.proc.stdin.close()
        while True:
            line = self.lines.get(timeout=60)
            if "stats" in line:
                assert self.proc.wait(30) == 0, self.log.read_text()
                return line["stats"]

    def kill(self) -> None:
        stop_process(self.proc)


@pytest.fixture
def containerd():
    why = containerdengine.available()
    if why:
        pytest.skip(why)
    engine = containerdengine.ContainerdEngine().start()
    try:
        yield engine
    finally:
        left = engine.stop()
    assert not left, f"containerd left {left}"


def kubelet_labels(container: str | None) -> dict[str, str]:
    if container is None:
        return {**POD_LABELS, "io.cri-containerd.kind": "sandbox",
                "io.kubernetes.container.name": "POD"}
    return {**POD_LABELS, "io.cri-containerd.kind": "container",
            "io.kubernetes.container.name": container}


@pytest.mark.container
def test_containerd_pods_and_containers_by_network_namespace(containerd, pause_image, made,
                                                             tmp_path):
    """A pod as a kubelet makes it through CRI (a sandbox and an app container in
    namespace k8s.io, the kubelet's labels, the network namespace the CNI made and a veth
    from it to the host), and a plain container in containerd namespace `default` with a
    namespace of its own (found through its task's pid). A sidecar started later and the
    pod's removal change the answer through containerd's events alone."""
    netns, veth, _procs = made
    for space in ("k8s.io", "default"):
        containerd.import_from_podman(pause_image, namespace=space)
    cni = netns()
    pod_if, pod_idx = veth(cni.name)
    containerd.run("sandbox-1", pause_image, labels=kubelet_labels(None), netns=cni.name)
    containerd.run("app-1", pause_image, labels=kubelet_labels("app"), netns=cni.name)
    solo_pid = containerd.run("solo", pause_image, namespace="default")
    solo_if, solo_idx = veth(solo_pid)
    changes: queue.Queue = queue.Queue()
    w = Workloads(runtimes_with(tmp_path, "containerd", str(containerd.sock)),
                  on_change=lambda i, a: changes.put((i, a)), resync_seconds=3600)
    t0 = time.monotonic()
    w.start()
    try:
        assert w.lookup(pod_idx) == PENDING and w.lookup(solo_idx) == PENDING
        assert w.wait([pod_idx, solo_idx], 30)
        first = time.monotonic() - t0
        assert w.lookup(pod_idx) == Workload(
            "containerd", namespace="shop", pod="checkout-1", pod_uid="0d7e-pod-uid",
            container="app", container_id="sandbox-1", netns=cni.name)
        inode = os.stat(f"/proc/{solo_pid}/ns/net").st_ino
        assert w.lookup(solo_idx) == Workload("containerd", container="solo",
                                              container_id="solo", netns=f"net:[{inode}]")
        passes = w.stats.passes

        def next_answer(check, what):
            def seen():
                while not changes.empty():
                    ifindex, answer = changes.get()
                    if ifindex == pod_idx and check(answer):
                        return True, answer
                return False, w.lookup(pod_idx)
            return wait_until(seen, what)

        t1 = time.monotonic()
        containerd.run("side-1", pause_image, labels=kubelet_labels("sidecar"),
                       netns=cni.name)
        next_answer(lambda a: a.container == "app,sidecar", "the sidecar named")
        event_seconds = time.monotonic() - t1
        assert w.stats.passes > passes          # no refresh(): containerd's event did it
        for cid in ("side-1", "app-1", "sandbox-1"):
            containerd.remove(cid)
        next_answer(lambda a: a == Workload("netns", netns=cni.name), "the pod gone")
        stats = w.stats.as_dict()
        assert set(stats["failures"]) == {"docker/absent", "podman/absent"}, stats
        print(f"containerd: first answers {first * 1e3:.1f} ms after start, sidecar named "
              f"{event_seconds * 1e3:.1f} ms after `ctr run` started; {stats}")
    finally:
        w.stop()
    assert solo_if and pod_if


@pytest.mark.container
def test_mirror_status_names_the_pod_of_a_monitored_veth(containerd, pause_image, made,
                                                         tmp_path):
    netns, veth, _procs = made
    containerd.import_from_podman(pause_image)
    cni = netns()
    pod_if, _ = veth(cni.name)
    containerd.run("sandbox-1", pause_image, labels=kubelet_labels(None), netns=cni.name)
    containerd.run("app-1", pause_image, labels=kubelet_labels("app"), netns=cni.name)
    env = env_with(MIRROR_STATE_DIR=tmp_path / "state",
                   MIRROR_CONTAINERD_SOCKET=containerd.sock,
                   MIRROR_DOCKER_SOCKET="off", MIRROR_PODMAN_SOCKET="off")
    debug = unique_name("d")
    proc = MirrorProcess("--iface", pod_if, "--debug-iface", debug, env=env).start()
    try:
        report = json.loads(run_cli("status", "--json", env=env).stdout)
        text = run_cli("status", env=env).stdout
    finally:
        assert proc.stop() == 0, proc.output
    entry = next(i for i in report["interfaces"] if i["iface"] == pod_if)
    assert entry["workload"] == {
        "container.runtime.name": "containerd", "k8s.namespace.name": "shop",
        "k8s.pod.name": "checkout-1", "k8s.pod.uid": "0d7e-pod-uid",
        "k8s.container.name": "app", "container.id": "sandbox-1", "mirror.netns": cni.name}
    assert report["workload_failures"] == {}
    print(text)
    row = next(line for line in text.splitlines() if line.startswith(pod_if))
    assert row.split()[1:3] == ["shop/checkout-1", "(app)"], text


@pytest.mark.container
def test_docker_containers_by_network_namespace(pause_image, made):
    why = dockerengine.available()
    if why:
        pytest.skip(why)
    netns, _veth, _procs = made
    host = netns()
    engine = dockerengine.DockerEngine(host.name, 150 + os.getpid() % 50).start()
    watcher = None
    try:
        engine.load_from_podman(pause_image)
        engine.docker("network", "create", "mwl")
        web, side = f"web{os.getpid()}", f"side{os.getpid()}"
        engine.docker("run", "--detach", "--network", "mwl", "--name", web, pause_image)
        (veth_name,) = veths(host.name)
        web_id = engine.docker("inspect", "--format", "{{.Id}}", web).stdout.strip()
        watcher = Watcher(host.name, "docker", str(engine.sock), str(engine.dir / "no-"),
                          engine.dir / "watcher.log")
        watcher.follow(veth_name)
        first = watcher.wait_for(veth_name, lambda a: "container.name" in a, "web named")
        assert {k: first[k] for k in ("container.runtime.name", "container.name",
                                      "container.id")} == {
            "container.runtime.name": "docker", "container.name": web,
            "container.id": web_id}
        assert first["mirror.netns"].startswith("net:[")
        # Joining its network namespace changes no link: Docker's event names it.
        engine.docker("run", "--detach", "--network", f"container:{web}", "--name", side,
                      pause_image)
        watcher.wait_for(veth_name, lambda a: a["container.name"] == f"{side},{web}",
                         "the second container named")
        engine.docker("rm", "--force", side)
        watcher.wait_for(veth_name, lambda a: a["container.name"] == web,
                         "the second container gone")
        stats = watcher.finish()
        assert set(stats["failures"]) <= {"containerd/absent", "podman/absent"}, stats
        print(f"docker: {stats}")
        engine.docker("rm", "--force", web)
    finally:
        if watcher:
            watcher.kill()
        left = engine.stop()
    assert not left, left


@pytest.fixture
def podman_service(tmp_path):
    """podman's API service on a socket of the test's own."""
    path = tmp_path / "podman.sock"
    proc = subprocess.Popen(["podman", "system", "service", "--time", "0", f"unix://{path}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: (path.exists(), proc.poll()), "podman's API socket")
        yield path
    finally:
        stop_process(proc, timeout=30)


@pytest.mark.container
def test_podman_containers_and_pods_by_network_namespace(pause_image, made, podman_service):
    netns, _veth, _procs = made
    host = netns()
    net, pod = f"mwl{os.getpid()}", f"mwlpod{os.getpid()}"
    watcher = None
    podman("network", "create", "--subnet", f"198.19.{200 + os.getpid() % 50}.0/24", net)
    try:
        podman("pod", "create", "--name", pod, "--network", net, netns=host.name)
        podman("run", "--detach", "--pod", pod, "--name", f"{pod}-api", pause_image,
               netns=host.name)
        solo = f"{net}-solo"
        podman("run", "--detach", "--network", net, "--name", solo, pause_image,
               netns=host.name)
        infra = podman("pod", "inspect", "--format", "{{.InfraContainerID}}",
                       pod).stdout.strip()
        solo_id = podman("inspect", "--format", "{{.Id}}", solo).stdout.strip()
        host_veths = veths(host.name)
        assert len(host_veths) == 2
        watcher = Watcher(host.name, "podman", str(podman_service),
                          str(podman_service.parent / "no-"),
                          podman_service.parent / "watcher.log")
        answers = {}
        for veth_name in host_veths:
            watcher.follow(veth_name)
        for veth_name in host_veths:
            answers[veth_name] = watcher.wait_for(veth_name, lambda a: "container.id" in a,
                                                  "named")
        pod_if = next(n for n, a in answers.items() if a.get("mirror.pod.name") == pod)
        solo_if = next(n for n in answers if n != pod_if)
        assert answers[pod_if]["container.name"] == f"{pod}-api"
        assert answers[pod_if]["container.id"] == infra
        assert answers[pod_if]["mirror.netns"].startswith("netns-")
        assert answers[solo_if] == {"container.runtime.name": "podman", "container.name": solo,
                                    "container.id": solo_id,
                                    "mirror.netns": answers[solo_if]["mirror.netns"]}
        # A container joining the pod changes no link: podman's event names it.
        podman("run", "--detach", "--pod", pod, "--name", f"{pod}-worker", pause_image,
               netns=host.name)
        watcher.wait_for(pod_if, lambda a: a["container.name"] == f"{pod}-api,{pod}-worker",
                         "the second container of the pod named")
        stats = watcher.finish()
        assert set(stats["failures"]) <= {"containerd/absent", "docker/absent"}, stats
        print(f"podman: {stats}")
    finally:
        if watcher:
            watcher.kill()
        podman("pod", "rm", "--force", "--time", "0", pod, check=False)
        podman("rm", "--force", "--time", "0", f"{net}-solo", check=False)
        podman("network", "rm", "--force", net, check=False)
        subprocess.run(["rm", "-rf", f"/var/lib/cni/networks/{net}"])
