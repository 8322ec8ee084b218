"""Interfaces attached as they appear (mirror.discovery): a real `mirror run` with --iface
patterns, veths created, renamed and removed while it runs, real HTTP traffic, tcpdump on
the debug interface.

Other tests (and other people's runs) create veths on this machine at the same time, so
every pattern here matches only this process's own names: unique_name("x") makes the
interfaces meant to match, unique_name("y") those that must not. The bridge test runs its
controller in a namespace of its own, where a plain 'veth*' is safe."""
from __future__ import annotations

import glob
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.request
from contextlib import contextmanager

import pytest
from pyroute2 import IPRoute

from conftest import tc_show
import helpers
from helpers import (HOOKS, ROOT, MirrorProcess, drop_link, env_with, from_first_status,
                     podman, request_of, same_packets, signature, wait_captured)
from mirror import hooks as mirror_hooks
from mirror import ownership
from mirror.capture.flow import read_flows
from mirror.histogram import Histogram
from mirror.capture.tcpdump import Tcpdump
from mirror.discovery import Selector
from mirror.errors import UsageError
from mirror.flowkey import FlowKey
from mirror.lab.client import send
from mirror.lab.netns import PREFIX, sh, unique_name

PATTERN = f"m{os.getpid():06x}??x"      # unique_name("x") of this process, nothing else
_ns_seq = itertools.count(200)           # namespace numbers clear of Host.create()'s

ERROR_SERVER = r'''
import http.server
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = b"error"
        self.send_response(500)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("", 80), Handler)
print("ready", flush=True)
server.serve_forever()
'''


# --- helpers ---------------------------------------------------------------------------
def wait_until(cond, what: str, timeout: float = 30):
    """helpers.wait_until for a condition that is its own answer (truthy when reached)."""
    def check():
        value = cond()
        return bool(value), value
    return helpers.wait_until(check, what, timeout)


def hooks(name: str) -> list[str]:
    """This tool's hooks on the interface now ([] when it has none or is gone)."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        return mirror_hooks.ours(ipr, found[0]) if found else []


def recorded(state_dir) -> dict:
    """The one controller record in `state_dir`."""
    old = os.environ.get("MIRROR_STATE_DIR")
    os.environ["MIRROR_STATE_DIR"] = str(state_dir)
    try:
        recs = ownership.records("controller")
        return recs[0] if recs else {}
    finally:
        if old is None:
            del os.environ["MIRROR_STATE_DIR"]
        else:
            os.environ["MIRROR_STATE_DIR"] = old


def ifaces_of(state_dir) -> set[str]:
    return set(recorded(state_dir).get("ifaces", []))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    for line in text.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def closed(path, key: FlowKey) -> bool:
    """Whether the capture at `path` holds the connection's end: the server's FIN (the
    client closes first) and a packet of the client after it."""
    try:
        flows = read_flows(str(path))
    except Exception:           # tcpdump is writing: a record may be incomplete
        return False
    if key not in flows:
        return False
    packets = flows[key].packets
    fins = [i for i, p in enumerate(packets) if p.sport == 80 and p.flags & 0x01]
    return bool(fins) and any(p.dport == 80 for p in packets[fins[0] + 1:])


@pytest.fixture
def links():
    """Interfaces the test creates, removed at the end by ifindex (names may change)."""
    made: list[int] = []
    yield made
    with IPRoute() as ipr:
        for idx in made:
            try:
                ipr.link("del", index=idx)
            except Exception:
                pass        # gone with its peer, or deleted by the test


def veth(links, a: str, b: str) -> None:
    sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)
    with IPRoute() as ipr:
        links.append(ipr.link_lookup(ifname=a)[0])


@contextmanager
def watching(tmp_path, *extra: str, hook: str = "clsact", pattern: str = PATTERN,
             netns: str | None = None):
    """`mirror run --iface PATTERN` with a private state directory; stopped with SIGTERM
    at the end, which must exit 0."""
    debug = unique_name("d")
    proc = MirrorProcess("--iface", pattern, "--debug-iface", debug, "--hook", hook, *extra,
                         env=env_with(MIRROR_STATE_DIR=tmp_path / "state"), netns=netns)
    proc.start()
    try:
        yield proc, debug
    finally:
        rc = proc.stop()
        if netns is None:
            drop_link(debug)
    assert rc == 0, proc.output


class Namespace:
    """A bare network namespace (loopback up), removed with everything in it."""

    def __init__(self):
        self.name = f"{PREFIX}-{os.getpid()}-{next(_ns_seq)}"
        sh("ip", "netns", "add", self.name)
        self.exec("ip", "link", "set", "lo", "up")

    def exec(self, *cmd: str, **kw):
        return sh("ip", "netns", "exec", self.name, *cmd, **kw)

    def popen(self, *cmd: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.name, *cmd], **kw)

    def destroy(self) -> None:
        sh("ip", "netns", "del", self.name, check=False)


@pytest.fixture
def namespaces():
    made: list[Namespace] = []

    def make() -> Namespace:
        made.append(Namespace())
        return made[-1]
    yield make
    for ns in made:
        ns.destroy()


@contextmanager
def error_server(ns: Namespace):
    """An HTTP server on port 80 of every address of `ns` answering 500 to every GET; it
    listens before the namespace has any interface but lo."""
    proc = ns.popen(sys.executable, "-c", ERROR_SERVER, stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT)
    try:
        line = proc.stdout.readline()
        assert line.strip() == b"ready", line
        yield proc
    finally:
        proc.kill()
        proc.wait()


# --- pure logic ------------------------------------------------------------------------
@pytest.mark.unit
def test_selector_names_patterns_and_excludes():
    sel = Selector.parse(["eth0", "veth*", "cali*", "veth*"], ["veth0*"])
    assert sel.names == ["eth0"] and sel.patterns == ["veth*", "cali*"]
    assert sel.wants("veth1a2b") and sel.wants("cali77")
    assert not sel.wants("veth0abc")        # excluded
    assert not sel.wants("eth0")            # a plain name is matched at start only
    assert sel.pattern_of("cali1") == "cali*"
    for bad in (["a b"], ["x/y"], [""], ["averyveryverylongname"]):
        with pytest.raises(UsageError):
            Selector.parse(bad)


@pytest.mark.unit
def test_histogram_is_cumulative():
    h = Histogram((0.001, 0.01))
    for v in (0.0005, 0.001, 0.005, 2.0):
        h.observe(v)
    assert h.buckets() == [("0.001", 2), ("0.01", 3), ("+Inf", 4)]
    assert h.sum == pytest.approx(2.0065)


# --- the kernel ------------------------------------------------------------------------
@pytest.mark.kernel
@pytest.mark.parametrize("hook", HOOKS)
def test_first_connection_on_a_new_veth_is_mirrored(tmp_path, namespaces, hook):
    """The controller starts with nothing matching; a container-like namespace gets its
    veth afterwards and makes an error connection the moment the link is up, without
    waiting for the controller: its 500 response must be in the mirror."""
    ns = namespaces()
    subnet = (os.getpid() * 7 + next(_ns_seq)) % 250 + 1
    server, client = f"198.19.{subnet}.2", f"198.19.{subnet}.1"
    host_if = unique_name("x")
    with error_server(ns), watching(tmp_path, hook=hook) as (proc, debug):
        assert "no interface yet" in proc.output
        dump = Tcpdump(debug, str(tmp_path / "mirror.pcap")).start()
        try:
            # One shell: the link is created, addressed and up within a few milliseconds.
            sh("sh", "-ec", f"ip link add {host_if} type veth peer name eth0 netns {ns.name}\n"
               f"ip addr add {client}/24 dev {host_if}\n"
               f"ip -n {ns.name} addr add {server}/24 dev eth0\n"
               f"ip -n {ns.name} link set eth0 up\n"
               f"ip link set {host_if} up")
            tuple5, statuses = send(server, client, ["/error"])
            key = FlowKey.from_endpoints(*tuple5)
            wait_until(lambda: closed(tmp_path / "mirror.pcap", key),
                       f"the first connection in the mirror, to its close:\n{proc.output}",
                       timeout=10)
        finally:
            dump.stop()
    assert statuses == [500]
    assert f"{host_if}: attached" in proc.output
    packets = read_flows(str(tmp_path / "mirror.pcap"))[key].packets
    assert packets[0].payload.startswith(b"HTTP/1.1 500 "), [signature(p) for p in packets]
    assert {p.sport for p in packets} == {key.port_lo, key.port_hi}     # both directions
    assert f"{host_if}: interface is gone" not in proc.output


@pytest.mark.kernel
def test_non_matching_untouched_rename_in_and_out(tmp_path, links):
    with watching(tmp_path) as (proc, _debug):
        state = tmp_path / "state"
        other_a, other_b = unique_name("y"), unique_name("y")
        veth(links, other_a, other_b)
        before = tc_show(other_a)
        # Events are handled in order: once a later matching pair is attached, the
        # non-matching one has been seen and left alone.
        mine_a, mine_b = unique_name("x"), unique_name("x")
        veth(links, mine_a, mine_b)
        wait_until(lambda: {mine_a, mine_b} <= ifaces_of(state), "the matching pair attached")
        assert hooks(other_a) == [] and tc_show(other_a) == before
        assert other_a not in ifaces_of(state)

        renamed_in = unique_name("x")
        sh("ip", "link", "set", other_a, "name", renamed_in)
        wait_until(lambda: len(hooks(renamed_in)) == 2, "hooks after a rename into the pattern")
        wait_until(lambda: renamed_in in ifaces_of(state), "the record of the renamed interface")

        within = unique_name("x")       # matching before and after: followed
        sh("ip", "link", "set", renamed_in, "name", within)
        wait_until(lambda: within in ifaces_of(state), "a rename within the pattern followed")
        assert renamed_in not in ifaces_of(state) and len(hooks(within)) == 2

        renamed_out = unique_name("y")
        sh("ip", "link", "set", within, "name", renamed_out)
        wait_until(lambda: within not in ifaces_of(state), "detach after a rename out")
        assert hooks(renamed_out) == [] and tc_show(renamed_out) == before
    assert "which no --iface pattern selects; no longer monitored" in proc.output


@pytest.mark.kernel
def test_removed_interfaces_are_forgotten(tmp_path, links):
    with watching(tmp_path) as (proc, _debug):
        state = tmp_path / "state"
        a, b = unique_name("x"), unique_name("x")
        veth(links, a, b)
        wait_until(lambda: {a, b} <= ifaces_of(state), "both ends attached")
        sh("ip", "link", "del", a)          # takes its peer along
        wait_until(lambda: not ifaces_of(state), "both ends forgotten")
        assert f"{a}: interface is gone" in proc.output
        assert f"{b}: interface is gone" in proc.output
        locks = list((state).glob("netns-*/iface-*.lock"))
        assert not [p for p in locks if ownership.is_held(p.name[:-5])]


@pytest.mark.kernel
def test_burst_of_fifty_all_attached_and_all_detached(tmp_path, links):
    names = [unique_name("x") for _ in range(50)]
    batch = "".join(f"link add {a} type veth peer name {b}\n"
                    for a, b in zip(names[::2], names[1::2]))
    with watching(tmp_path, "--metrics-addr", f"127.0.0.1:{(port := free_port())}") as (proc, _):
        state = tmp_path / "state"
        subprocess.run(["ip", "-batch", "-"], input=batch, text=True, check=True)
        with IPRoute() as ipr:
            links.extend(ipr.link_lookup(ifname=a)[0] for a in names[::2])
        wait_until(lambda: set(names) <= ifaces_of(state), "all 50 attached", timeout=60)
        assert all(len(hooks(n)) == 2 for n in names)
        assert metric(port, "mirror_interfaces_attached") == 50
        assert metric(port, "mirror_attach_latency_seconds_count") == 50
        assert metric(port, "mirror_attach_failures_total") == 0
    assert all(hooks(n) == [] and "clsact" not in tc_show(n) for n in names)


@pytest.mark.kernel
def test_max_ifaces_bound(tmp_path, links):
    port = free_port()
    with watching(tmp_path, "--max-ifaces", "2", "--metrics-addr",
                  f"127.0.0.1:{port}") as (proc, _debug):
        state = tmp_path / "state"
        first = unique_name("x"), unique_name("x")
        veth(links, *first)
        wait_until(lambda: set(first) <= ifaces_of(state), "the first pair attached")
        second = unique_name("x"), unique_name("x")
        veth(links, *second)
        wait_until(lambda: proc.output.count("--max-ifaces 2 is reached") == 2,
                   "two warnings")
        assert metric(port, "mirror_interfaces_skipped_total") == 2
        assert hooks(second[0]) == [] and hooks(second[1]) == []
        sh("ip", "link", "del", first[0])       # frees both places
        wait_until(lambda: ifaces_of(state) == set(second), "the waiting pair attached")
        assert recorded(state)["max_ifaces"] == 2


@pytest.mark.kernel
def test_status_shows_patterns_and_matches(tmp_path, links):
    with watching(tmp_path, "--exclude", f"m{os.getpid():06x}??y") as (proc, _debug):
        state = tmp_path / "state"
        a, b = unique_name("x"), unique_name("x")
        veth(links, a, b)
        wait_until(lambda: {a, b} <= ifaces_of(state), "the pair attached")
        out = subprocess.run([sys.executable, "-m", "mirror", "status", "--json"],
                             capture_output=True, text=True, cwd=ROOT,
                             env=env_with(MIRROR_STATE_DIR=state), check=True).stdout
        ctl = json.loads(out)["controllers"][0]
        assert ctl["patterns"] == [PATTERN]
        assert ctl["exclude"] == [f"m{os.getpid():06x}??y"]
        assert sorted(ctl["matched"][PATTERN]) == sorted([a, b])
        text = subprocess.run([sys.executable, "-m", "mirror", "status"], capture_output=True,
                              text=True, cwd=ROOT, env=env_with(MIRROR_STATE_DIR=state),
                              check=True).stdout
        assert f"{PATTERN}: {', '.join(sorted([a, b]))}" in text


@pytest.mark.kernel
def test_plain_name_must_exist_pattern_need_not(tmp_path):
    missing = unique_name("x")
    res = subprocess.run([sys.executable, "-m", "mirror", "run", "--iface", missing],
                         capture_output=True, text=True, cwd=ROOT,
                         env=env_with(MIRROR_STATE_DIR=tmp_path / "state"))
    assert res.returncode == 2 and f"unknown interface {missing!r}" in res.stderr


@pytest.mark.kernel
def test_bridge_packets_cloned_once(tmp_path, namespaces):
    """Two namespaces on one bridge, both host-side ends monitored (the controller runs in
    a third namespace playing the host): exactly one clone per packet of the error
    connection, the same packets a capture on one of the veths sees."""
    host, a, b = namespaces(), namespaces(), namespaces()
    for ns, addr in ((a, "198.19.0.2"), (b, "198.19.0.3")):
        sh("ip", "-n", host.name, "link", "add", f"veth-{ns is a and 'a' or 'b'}", "type",
           "veth", "peer", "name", "eth0", "netns", ns.name)
        ns.exec("ip", "addr", "add", f"{addr}/24", "dev", "eth0")
        ns.exec("ip", "link", "set", "eth0", "up")
    host.exec("ip", "link", "add", "br0", "type", "bridge")
    for dev in ("veth-a", "veth-b", "br0"):
        if dev != "br0":
            host.exec("ip", "link", "set", dev, "master", "br0")
        host.exec("ip", "link", "set", dev, "up")
    with error_server(a), watching(tmp_path, pattern="veth*", netns=host.name) as (proc, dbg):
        assert "veth-a: attached" in proc.output and "veth-b: attached" in proc.output
        mirror = Tcpdump(dbg, str(tmp_path / "mirror.pcap"), netns=host.name).start()
        ref = Tcpdump("veth-a", str(tmp_path / "ref.pcap"), netns=host.name).start()
        try:
            out = b.exec(sys.executable, "-c",
                         "import json; from mirror.lab.client import send; "
                         "print(json.dumps(send('198.19.0.2', '198.19.0.3', ['/error'])))",
                         cwd=ROOT).stdout
            tuple5, statuses = json.loads(out)
            key = FlowKey.from_endpoints(*tuple5)
            # The client's last ACK is cloned at veth-b's ingress before veth-a's egress
            # tap records it: once the reference has it, every clone was made.
            wait_until(lambda: closed(tmp_path / "ref.pcap", key), "the connection's close")

            def ask():
                return json.loads(host.exec(
                    sys.executable, "-c", "import json, sys; sys.path.insert(0, 'tests'); "
                    "from helpers import controller_ask; "
                    f"print(json.dumps(controller_ask({str(tmp_path / 'state')!r})))",
                    cwd=ROOT).stdout)
            # And the request frame the controller writes for the error (user space).
            wait_captured(mirror, lambda: ask()["mirrored_packets"] + 1,
                          "the clones and the request frame")
            counters = ask()
        finally:
            mirror.stop()
            ref.stop()
    assert statuses == [500]
    mirrored = read_flows(str(tmp_path / "mirror.pcap"))[key].packets
    ref_packets = read_flows(str(tmp_path / "ref.pcap"))[key].packets
    clones = from_first_status(ref_packets, 500)
    expected = request_of(ref_packets, 500) + clones
    assert same_packets(mirrored, expected), (
        f"mirrored {[signature(p) for p in mirrored]}\nexpected {[signature(p) for p in expected]}")
    # Each packet crossed two monitored interfaces: handled at the first one's ingress,
    # only kept in the state at the second one's egress; cloned once.
    assert counters["mirrored_packets"] == len(clones)
    assert counters["seen_before"] == len(ref_packets)
    assert counters["request_frames_written"] == 1


# --- real containers -------------------------------------------------------------------

def controller_record_anywhere(state_dir) -> dict:
    """The controller record of a controller running in another namespace (its records
    are under that namespace's directory)."""
    for path in state_dir.glob("netns-*/controller-*.json"):
        return json.loads(path.read_text())
    return {}


CLIENT = r'''
import json, socket, sys, time
from mirror.lab.client import send
server = sys.argv[1]
deadline = time.monotonic() + 60
while True:         # the application listens some time after its container starts
    try:
        socket.create_connection((server, 80), timeout=1).close()
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
print(json.dumps(send(server, sys.argv[2], ["/error"])))
'''


@pytest.mark.container
def test_podman_containers_attached_as_they_start(images, tmp_path, namespaces):
    """Containers of a podman bridge network, started while `mirror run --iface 'veth*'`
    runs: each container's error flow is mirrored, and removing the containers leaves
    nothing. Podman runs with a namespace of the test's own as its host network (see
    podman() in helpers.py), so 'veth*' there matches only these containers' veths."""
    _image, app_image = images
    host = namespaces()
    net = f"mdisc{os.getpid()}"
    subnet = f"198.19.{100 + os.getpid() % 100}"
    containers = [f"{net}-c{i}" for i in range(2)]
    podman("network", "create", "--subnet", f"{subnet}.0/24", net)
    try:
        with watching(tmp_path, pattern="veth*", netns=host.name) as (proc, debug):
            dump = Tcpdump(debug, str(tmp_path / "mirror.pcap"), netns=host.name).start()
            keys = []
            try:
                for name in containers:
                    podman("run", "--detach", "--network", net, "--name", name, app_image,
                           netns=host.name)
                    addr = podman("inspect", "--format", "{{range .NetworkSettings.Networks}}"
                                  "{{.IPAddress}}{{end}}", name).stdout.strip()
                    out = host.exec(sys.executable, "-c", CLIENT, addr, f"{subnet}.1",
                                    cwd=ROOT).stdout
                    tuple5, statuses = json.loads(out)
                    assert statuses == [500]
                    keys.append(FlowKey.from_endpoints(*tuple5))
                for key in keys:
                    wait_until(lambda: closed(tmp_path / "mirror.pcap", key),
                               f"{key} mirrored to its close:\n{proc.output}")
            finally:
                dump.stop()
            veths = [l.split()[0].split("@")[0] for l in
                     host.exec("ip", "-br", "link").stdout.splitlines() if l.startswith("veth")]
            assert len(veths) == 2
            assert sorted(controller_record_anywhere(tmp_path / "state")["ifaces"]) == sorted(veths)
            podman("rm", "--force", "--time", "0", *containers)
            wait_until(lambda: not controller_record_anywhere(tmp_path / "state")["ifaces"],
                       "the removed containers' veths forgotten")
            assert not [l for l in host.exec("ip", "-br", "link").stdout.splitlines()
                        if l.startswith("veth")]
        flows = read_flows(str(tmp_path / "mirror.pcap"))
        for key in keys:
            assert flows[key].statuses == [500]
            assert flows[key].packets[0].payload.startswith(b"HTTP/1.1 500 ")
        for veth_name in veths:
            assert f"{veth_name}: attached" in proc.output
            assert f"{veth_name}: interface is gone" in proc.output
    finally:
        podman("rm", "--force", "--time", "0", *containers, check=False)
        podman("network", "rm", "--force", net, check=False)
        # CNI's address bookkeeping of the network outlives `network rm`.
        shutil.rmtree(f"/var/lib/cni/networks/{net}", ignore_errors=True)


@pytest.mark.container
def test_bench_containers_reports_consistent_numbers(images):
    """bench/containers.py end to end with two real podman containers: every container's
    veth was attached, and its figures add up (no threshold: the numbers belong to the
    bench)."""
    from helpers import run_module
    proc, stdout, stderr = run_module("bench.containers", "--count", "2", "--packets",
                                      "50", "--sender", "python3", "--image", images[0],
                                      "--json", timeout=600)
    assert proc.returncode == 0, stderr
    out = json.loads(stdout)
    rows = out["per_container"]
    assert out["containers"] == out["attached"] == len(rows) == 2
    for key in ("attach_ms", "event_to_attached_ms", "first_packet_ms", "margin_ms"):
        assert out[f"{key}_p50"] is not None and out[f"{key}_p99"] >= out[f"{key}_p50"]
    for row in rows:
        assert row["veth"].startswith("veth") and row["attached_at"] is not None
        assert row["t_run"] < row["event_at"] <= row["attached_at"]
        assert row["t_run"] < row["first_send"]
        assert 0 < row["sent"] <= 50 and 0 <= row["arrived"] <= row["sent"]
        assert row["missed"] == row["sent"] - row["seen"] >= 0
        if row["first_send"] >= row["attached_at"]:
            # Both hooks were in place before the first datagram left: none is missed.
            assert row["seen"] == row["sent"], row
    assert len({row["ifindex"] for row in rows}) == 2
    assert out["packets_sent"] == sum(r["sent"] for r in rows)
    assert out["packets_missed"] == out["packets_sent"] - out["packets_seen"]
    assert out["first_packet_before_attach"] == sum(
        1 for r in rows if r["first_send"] < r["attached_at"])
    # Nothing left behind: its namespace, containers and network are named after its pid.
    assert f"{PREFIX}-{proc.pid}-" not in sh("ip", "netns", "list").stdout
    assert f"mbench{proc.pid}" not in podman("ps", "--all", "--format", "{{.Names}}").stdout
    # The network's configuration was in the bench's own directory (CONTAINERS_CONF).
    assert not glob.glob(f"{tempfile.gettempdir()}/mirror-containers-{proc.pid}-*")
    assert not os.path.exists(f"/var/lib/cni/networks/mbench{proc.pid}")


@pytest.mark.container
def test_bench_containers_with_the_cni_plugin_misses_nothing():
    """bench/containers.py --attach-by cni end to end (the static sender, the plugin
    chained after podman's plugins): each container with the plugin was hooked before its
    process ran, whichever path attached it, so its first datagram left after the attach
    and none was missed; the containers without the plugin, interleaved, never asked the
    controller; nothing is left behind, either network included."""
    from helpers import run_module
    if shutil.which("go") is None:
        pytest.skip("go is not installed (the sender and the plugin are built with it): "
                    "run scripts/setup")
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed: run scripts/setup")
    proc, stdout, stderr = run_module("bench.containers", "--attach-by", "cni", "--count",
                                      "2", "--packets", "50", "--json", timeout=1200)
    if proc.returncode == 2 and "not CNI" in stderr:
        pytest.skip(stderr.strip())
    assert proc.returncode == 0, stderr
    out = json.loads(stdout)
    rows = out["per_container"]
    assert [r["plugin"] for r in rows] == [True, False, False, True]
    assert out["containers"] == out["without_plugin"]["containers"] == 2
    for row in rows:
        assert row["attached_at"] is not None and row["t_run"] < row["first_send"]
        assert row["cni_unanswered"] == 0
        if row["plugin"]:
            assert row["cni"].get("attached", 0) + row["cni"].get("already", 0) == 1, row
            assert row["first_send"] > row["attached_at"], row
            assert row["missed"] == 0 and row["seen"] == row["sent"] > 0, row
        else:
            assert row["cni"] == {} and row["attached_by"] == "link-event", row
    assert out["first_packet_before_attach"] == out["packets_missed"] == 0
    assert out["attached_by"]["cni"] + out["attached_by"]["link-event"] == 2
    for q in ("p50", "p99"):
        assert out[f"plugin_adds_ms_{q}"] == pytest.approx(
            out[f"first_packet_ms_{q}"] - out["without_plugin"][f"first_packet_ms_{q}"])
    assert f"{PREFIX}-{proc.pid}-" not in sh("ip", "netns", "list").stdout
    assert f"mbench{proc.pid}" not in podman("ps", "--all", "--format", "{{.Names}}").stdout
    assert not glob.glob(f"{tempfile.gettempdir()}/mirror-containers-{proc.pid}-*")
    for net in (f"mbench{proc.pid}", f"mbench{proc.pid}p"):
        assert not os.path.exists(f"/var/lib/cni/networks/{net}")

@pytest.mark.kernel
def test_bench_attach_reports_numbers():
    """bench/attach.py end to end with a few links: it produces its numbers, and what it
    calls missed is what arrived less what the classifier saw (no threshold: the numbers
    belong to the bench)."""
    res = subprocess.run([sys.executable, "-m", "bench.attach", "--count", "3", "--packets",
                          "20", "--json"], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["interfaces"] == out["attached"] == 3
    assert out["attach_ms_p50"] > 0 and out["attach_ms_p99"] >= out["attach_ms_p50"]
    assert out["packets_sent"] == 60
    assert out["packets_missed"] == out["packets_arrived"] - out["packets_seen"]


class RecordingTarget:
    """The controller's side of mirror.discovery, recording decisions instead of attaching
    (the kernel side, the link events, is real). `gate` holds the first attach back, so
    that events pile up in the socket meanwhile."""

    def __init__(self):
        import threading
        self.attached: dict[int, str] = {}
        self.gate = threading.Event()

    def attached_indexes(self):
        return dict(self.attached)

    def attach_matched(self, name, ifindex, since):
        self.gate.wait(60)
        self.attached[ifindex] = name
        return True

    def detach_iface(self, ifindex, why):
        self.attached.pop(ifindex, None)

    def follow_rename(self, ifindex, name):
        self.attached[ifindex] = name

    def never_monitor(self, ifindex, name, event=None):
        return False


@pytest.mark.kernel
def test_lost_link_events_are_recovered_by_a_full_read(links):
    """A receive buffer far too small for a burst: the kernel drops link events (ENOBUFS),
    discovery reads the whole link table again, and every interface is still attached,
    then every one forgotten after removal."""
    from mirror.discovery import Discovery
    target = RecordingTarget()
    disc = Discovery(Selector.parse([PATTERN]), target, set(), max_ifaces=1000, rcvbuf=4096)
    disc.start()
    try:
        names = [unique_name("x") for _ in range(40)]
        batch = "".join(f"link add {a} type veth peer name {b}\n"
                        for a, b in zip(names[::2], names[1::2]))
        subprocess.run(["ip", "-batch", "-"], input=batch, text=True, check=True)
        with IPRoute() as ipr:
            links.extend(ipr.link_lookup(ifname=a)[0] for a in names[::2])
        target.gate.set()
        wait_until(lambda: set(target.attached.values()) == set(names), "all 40 attached")
        assert disc.resyncs >= 1
        with IPRoute() as ipr:
            for idx in list(links):
                ipr.link("del", index=idx)
        wait_until(lambda: not target.attached, "all 40 forgotten")
    finally:
        disc.stop()


@pytest.mark.kernel
def test_debug_interface_never_attached_even_when_matched(tmp_path, links):
    """A pattern wide enough to match the debug interface and its sink end: both are left
    alone (mirroring clones onto a monitored interface would loop); the rest attaches."""
    wide = f"m{os.getpid():06x}*"
    with watching(tmp_path, pattern=wide) as (proc, debug):
        state = tmp_path / "state"
        a, b = unique_name("x"), unique_name("x")
        veth(links, a, b)
        wait_until(lambda: {a, b} <= ifaces_of(state), "the pair attached")
        assert ifaces_of(state) == {a, b}
        assert hooks(debug) == []
        assert f"{debug}: attached" not in proc.output and "-sink: attached" not in proc.output
