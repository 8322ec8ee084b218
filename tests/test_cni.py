"""The chained CNI plugin (cni/tc-mirror) against a real controller: the runtime's side of
the contract (CNI_COMMAND, the network configuration with its prevResult on stdin, the
result passed on), the controller's answer on its control socket, and everything that
may go wrong on a node: no controller, a controller that never answers or restarts, an
interface gone before the attach. Then real podman containers on a CNI network whose
configuration `mirror cni install` chains the plugin into, after the bridge."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from helpers import MirrorProcess, controller_ask, drop_link, env_with, podman, run_cli
from mirror import ownership
from mirror.lab.netns import unique_name

TOP = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> Path:
    if shutil.which("go") is None:
        pytest.skip("go is not installed: run scripts/setup (it installs golang-go)")
    out = tmp_path_factory.mktemp("cni") / "tc-mirror"
    r = subprocess.run([TOP / "cni" / "build", out], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    return out


def prev_result(*host_names: str, sandbox_name: str = "eth0") -> dict:
    """A bridge plugin's result: the bridge and the veth's host end outside the sandbox."""
    return {"cniVersion": "1.0.0",
            "interfaces": [*({"name": n, "mac": "02:00:00:00:00:01"} for n in host_names),
                           {"name": sandbox_name, "mac": "02:00:00:00:00:02",
                            "sandbox": "/var/run/netns/test"}],
            "ips": [{"address": "198.18.99.2/24", "gateway": "198.18.99.1", "interface": 1}]}


def plugin_call(command: str, state_dir, prev: dict | None = None,
                timeout_seconds: float = 3, **extra) -> tuple[str, dict]:
    """What the runtime gives the plugin: the network configuration and the environment."""
    conf = {"cniVersion": "1.0.0", "name": "test", "type": "tc-mirror",
            "stateDir": str(state_dir), "timeoutSeconds": timeout_seconds, **extra}
    if prev is not None:
        conf["prevResult"] = prev
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": "c0ffee", "CNI_NETNS": "/var/run/netns/test",
           "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni", "PATH": os.environ["PATH"]}
    return json.dumps(conf), env


def run_plugin(plugin: Path, command: str, state_dir, prev: dict | None = None,
               timeout_seconds: float = 3, **extra) -> subprocess.CompletedProcess:
    conf, env = plugin_call(command, state_dir, prev, timeout_seconds, **extra)
    return subprocess.run([plugin], input=conf, env=env, capture_output=True, text=True,
                          timeout=60)


def passed_on(r: subprocess.CompletedProcess, prev: dict) -> None:
    """The runtime gets the previous result back, unchanged, and the pod starts."""
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert json.loads(r.stdout) == prev


def hooked(name: str) -> bool:
    out = subprocess.run(["tc", "filter", "show", "dev", name, "ingress"], capture_output=True,
                         text=True).stdout
    return "tc-mirror:ingress" in out


@pytest.fixture
def veth():
    """A veth pair in the root namespace: `host` (what the plugin names) and its peer."""
    host, peer = unique_name("c"), unique_name("p")
    with IPRoute() as ipr:
        ipr.link("add", ifname=host, kind="veth", peer=peer)
    try:
        yield host
    finally:
        drop_link(host)


@pytest.fixture
def controller(state_dir, veth):
    """A controller whose pattern selects the test's veths (their names share a prefix)."""
    m = MirrorProcess("--iface", veth[:-3] + "*c", "--debug-iface", unique_name("d"),
                      env=env_with(MIRROR_STATE_DIR=state_dir)).start()
    try:
        yield m
    finally:
        assert m.stop() == 0, m.output


@pytest.mark.kernel
def test_version_lists_the_spec_versions(plugin, state_dir):
    r = run_plugin(plugin, "VERSION", state_dir)
    assert r.returncode == 0
    assert "1.0.0" in json.loads(r.stdout)["supportedVersions"]


@pytest.mark.kernel
def test_add_returns_with_the_hooks_in_place(plugin, state_dir, veth, controller):
    prev = prev_result("cni-bridge0", veth)
    r = run_plugin(plugin, "ADD", state_dir, prev)
    passed_on(r, prev)
    assert hooked(veth), controller.output         # at return: before any packet
    assert r.stderr == "", r.stderr                # nothing to warn about
    counts = controller_ask(state_dir)
    # The link event may have attached it first ("already"): hooked at return either way.
    assert counts["cni_attached"] + counts["cni_already"] == 1
    assert counts["cni_ignored"] == 1              # the bridge: no pattern selects it


@pytest.mark.kernel
def test_del_detaches_and_keeps_it_detached(plugin, state_dir, veth, controller):
    prev = prev_result(veth)
    passed_on(run_plugin(plugin, "ADD", state_dir, prev), prev)
    r = run_plugin(plugin, "DEL", state_dir, prev)
    assert r.returncode == 0, r.stderr
    assert not hooked(veth)
    assert controller_ask(state_dir)["cni_detached"] == 1
    later = unique_name("c")
    with IPRoute() as ipr:                      # a link event of the same interface...
        ipr.link("set", index=ipr.link_lookup(ifname=veth)[0], state="up")
        ipr.link("add", ifname=later, kind="veth", peer=unique_name("p"))
    try:
        # Link events are handled in order: once the later interface is attached, the
        # first one's event was decided.
        assert controller.wait_for(f"{later}: attached"), controller.output
        assert not hooked(veth)                 # ...does not bring the hooks back
    finally:
        drop_link(later)


@pytest.mark.kernel
def test_an_interface_gone_before_the_attach(plugin, state_dir, controller):
    prev = prev_result(unique_name("c"))         # selected by the pattern, never made
    r = run_plugin(plugin, "ADD", state_dir, prev)
    passed_on(r, prev)
    assert "no such interface" in r.stderr
    assert controller_ask(state_dir)["cni_gone"] == 1


@pytest.mark.kernel
def test_no_controller_passes_the_result_on_and_counts_it(plugin, state_dir, veth):
    prev = prev_result(veth)
    r = run_plugin(plugin, "ADD", state_dir, prev)          # no state directory at all
    passed_on(r, prev)
    assert "no mirror controller runs" in r.stderr
    d = ownership.netns_dir()                               # one a controller made before
    passed_on(run_plugin(plugin, "ADD", state_dir, prev), prev)
    passed_on(run_plugin(plugin, "ADD", state_dir, prev), prev)
    assert (d / ownership.CNI_UNANSWERED).read_text().strip() == "2"
    assert ownership.cni_unanswered() == 2


@pytest.mark.kernel
def test_a_controller_that_never_answers_costs_a_bounded_wait(plugin, state_dir, veth):
    """A socket that accepts and says nothing (a hung controller): the plugin gives up at
    its timeout, passes the result on, says why and counts it."""
    d = ownership.netns_dir()
    hung = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hung.bind(str(d / "controller-hung.sock"))
    hung.listen(8)
    accepted = []
    t = threading.Thread(target=lambda: accepted.append(hung.accept()), daemon=True)
    t.start()
    try:
        prev = prev_result(veth)
        r = run_plugin(plugin, "ADD", state_dir, prev, timeout_seconds=0.5)
        passed_on(r, prev)
        assert "controller-hung.sock did not answer" in r.stderr
        assert "no controller answered within 0.5s" in r.stderr
        assert ownership.cni_unanswered() == 1
    finally:
        hung.close()
        for conn, _ in accepted:
            conn.close()


@pytest.mark.kernel
def test_a_socket_that_refuses_is_said_and_counted(plugin, state_dir, veth):
    """A control socket left behind by a controller that was killed: the file is there,
    nothing listens, connect() is refused at once. The pod starts without a wait."""
    d = ownership.netns_dir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(d / "controller-stale.sock"))
    stale.close()                               # bound, never listening: refused
    try:
        prev = prev_result(veth)
        r = run_plugin(plugin, "ADD", state_dir, prev)
        passed_on(r, prev)
        assert "controller-stale.sock did not answer" in r.stderr
        assert "refused" in r.stderr
        assert ownership.cni_unanswered() == 1
    finally:
        (d / "controller-stale.sock").unlink(missing_ok=True)


@pytest.mark.kernel
def test_an_add_while_the_controller_restarts(plugin, state_dir, veth, tmp_path):
    """An ADD that arrives while the controller is stopped and being started again (its
    socket absent, then present): the plugin looks for sockets once, so it either found
    the new controller's socket and returned with the hooks in place, or found none and
    passed the result on at once, said so and counted it. Either way the new controller's
    pattern watcher has the interface hooked once it is up: the pod is mirrored, at worst
    without its first packets."""
    def controller() -> MirrorProcess:
        return MirrorProcess("--iface", veth[:-3] + "*c", "--debug-iface", unique_name("d"),
                             env=env_with(MIRROR_STATE_DIR=state_dir))
    first = controller().start()
    assert first.stop() == 0, first.output
    d = ownership.netns_dir()
    assert not list(d.glob("controller-*.sock")), first.output     # stopped: no socket
    assert not hooked(veth)                     # detached by the stop
    prev = prev_result(veth)
    conf, env = plugin_call("ADD", state_dir, prev, timeout_seconds=30)
    (tmp_path / "add.json").write_text(conf)
    with open(tmp_path / "add.json") as stdin:
        add = subprocess.Popen([plugin], stdin=stdin, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=env, text=True)
    second = controller()
    try:
        second.start()                          # the ADD in flight; the controller starts
        out, err = add.communicate(timeout=60)
        r = subprocess.CompletedProcess(add.args, add.returncode, out, err)
        passed_on(r, prev)                      # the pod starts either way
        unanswered = "no mirror controller runs" in err
        if unanswered:
            assert ownership.cni_unanswered() == 1, err
        else:
            assert err == "", err               # answered: attached, or already by the
            counts = controller_ask(state_dir)  # new controller's first pass
            assert counts["cni_attached"] + counts["cni_already"] == 1, counts
            assert ownership.cni_unanswered() == 0
        # The new controller's first pass over the links attached it before it was ready.
        assert hooked(veth), second.output
        # A later ADD of the same interface (the runtime's retry) finds it hooked.
        passed_on(run_plugin(plugin, "ADD", state_dir, prev), prev)
        counts = controller_ask(state_dir)
        assert counts["cni_already"] >= 1, counts
        assert counts["cni_attached"] + counts["cni_already"] == (1 if unanswered else 2)
    finally:
        if add.poll() is None:
            add.kill()
            add.wait()
        if second.proc is not None:
            assert second.stop() == 0, second.output


@pytest.mark.kernel
def test_not_chained_is_a_configuration_error(plugin, state_dir):
    r = run_plugin(plugin, "ADD", state_dir)
    assert r.returncode == 1
    assert "chained plugin" in json.loads(r.stdout)["msg"]


@pytest.mark.kernel
def test_a_bad_request_on_the_socket_is_answered_not_fatal(state_dir, controller):
    from mirror.ctlsocket import ask
    sock = ownership.records("controller")[0]["socket"]
    assert "error" in ask(sock, "cni-add {\"names\": [\"../../etc\"]}")
    assert "error" in ask(sock, "cni-add not json")
    assert "error" not in ask(sock, "counters")


# --- real containers ------------------------------------------------------------------

@pytest.mark.container
def test_podman_containers_on_a_chained_network(plugin, state_dir, tmp_path, images):
    """A CNI network made by podman, the plugin chained after its bridge by `mirror cni
    install`: each container's veth is hooked by the plugin before the container runs,
    and detached at its removal; `mirror cni uninstall` takes the plugin out again. The
    container is the Debian base image that container/build (the `images` fixture, so
    that a fresh machine has it) always leaves as docker.io/library/debian:SUITE."""
    if podman("info", "--format", "{{.Host.NetworkBackend}}").stdout.strip() != "cni":
        pytest.skip("podman's network backend is not CNI")
    names = podman("images", "--format", "{{.Repository}}:{{.Tag}}", "--filter",
                   "reference=docker.io/library/debian").stdout.split()
    # podman's reference filter also matches localhost/debian:SUITE (a name that exists
    # only where debootstrap made the image on this host): keep the base's own name.
    bases = [n for n in names if n.startswith("docker.io/library/debian:")]
    assert bases, "container/build left no docker.io/library/debian base image"
    image = bases[0]
    net, confdir, bindir = f"mcni{os.getpid() % 10000}", tmp_path / "net.d", tmp_path / "bin"
    confdir.mkdir()
    conf = tmp_path / "containers.conf"
    conf.write_text(Path("/etc/containers/containers.conf").read_text() +
                    f'\n[network]\ncni_plugin_dirs = ["{bindir}", "/usr/lib/cni"]\n'
                    f'network_config_dir = "{confdir}"\n')
    env = env_with(CONTAINERS_CONF=conf)
    podman("network", "create", "--subnet", "198.18.230.0/24", net, env=env)
    listfile = confdir / f"{net}.conflist"
    bridge = json.loads(listfile.read_text())["plugins"][0]["bridge"]
    # The documented command, with this test's directories (MIRROR_STATE_DIR, set by the
    # state_dir fixture, becomes the entry's stateDir).
    r = run_cli("cni", "install", "--conf-dir", str(confdir), "--network", net,
                "--bin-dir", str(bindir), "--plugin", str(plugin))
    assert r.returncode == 0, r.stderr
    assert json.loads(listfile.read_text())["plugins"][-1] == {"type": "tc-mirror",
                                                               "stateDir": str(state_dir)}
    m = MirrorProcess("--iface", "veth*", "--exclude", bridge, "--debug-iface",
                      unique_name("d"), env=env_with(MIRROR_STATE_DIR=state_dir)).start()
    try:
        for i in range(2):
            name = f"{net}-{i}"
            podman("run", "--rm", "--name", name, "--network", net, image, "true", env=env)
        counts = controller_ask(state_dir)
        assert counts["cni_attached"] + counts["cni_already"] == 2, m.output
        assert counts["cni_detached"] == 2, m.output
        r = run_cli("cni", "uninstall", "--conf-dir", str(confdir), "--network", net,
                    "--bin-dir", str(bindir))
        assert r.returncode == 0, r.stderr
        assert "tc-mirror" not in listfile.read_text()
        assert not (bindir / "tc-mirror").exists()
        podman("run", "--rm", "--network", net, image, "true", env=env)   # runs without it
    finally:
        assert m.stop() == 0, m.output
        podman("network", "rm", "--force", net, env=env, check=False)
