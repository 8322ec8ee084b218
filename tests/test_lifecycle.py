"""Attach, detach, crash and restart, bad input: the controller changes exactly what it
owns, and nothing when the input is bad."""
from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest
from pyroute2 import IPRoute

from helpers import (HOOKS, NEEDS_TCX, ROOT, MirrorProcess, drop_link, env_with,
                     links_of_this_run, mirror_cmd, run_cli)
from mirror.hooks import tc
from mirror.lab.client import send
from mirror.lab.netns import unique_name

pytestmark = pytest.mark.kernel


def snapshot(ifname: str):
    with IPRoute() as ipr:
        return tc.snapshot(ipr, ipr.link_lookup(ifname=ifname)[0])


def our_filter_lines(ifname: str) -> list[str]:
    """This tool's filters as the tc command shows them, one line each (tc itself is the
    independent reader here, not our pyroute2 code)."""
    lines = set()
    for where in (["ingress"], ["egress"], ["parent", "1:"]):
        out = subprocess.run(["tc", "filter", "show", "dev", ifname, *where],
                             capture_output=True, text=True).stdout
        lines |= {l for l in out.splitlines() if "tc-mirror:" in l}
    return sorted(lines)


def link_exists(name: str) -> bool:
    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=name))


def debug_name() -> str:
    return unique_name("d")


@pytest.fixture
def env(state_dir):
    return env_with(MIRROR_STATE_DIR=state_dir)


@pytest.mark.parametrize("hook", HOOKS)
def test_detach_restores_qdiscs_exactly(host, env, hook, state_dir):
    from mirror.hooks import tcx
    before = snapshot(host.host_if)
    dbg = debug_name()
    idx = int(open(f"/sys/class/net/{host.host_if}/ifindex").read())
    m = MirrorProcess("--iface", host.host_if, "--hook", hook, "--debug-iface", dbg,
                      env=env).start()
    try:
        during = snapshot(host.host_if)
        if hook == "tcx":
            assert during == before     # no qdisc, no filter: links only
            assert sorted((l.direction, l.prog_name) for l in tcx.links(idx)) == [
                ("egress", "mirror_egress"), ("ingress", "mirror_ingress")]
            status = json.loads(run_cli("status", "--json", env=env).stdout)["interfaces"]
            assert [i["filters"] for i in status if i["iface"] == host.host_if] == [
                ["tcx:ingress", "tcx:egress"]]
        else:
            assert during != before
            assert len(our_filter_lines(host.host_if)) == 2
        assert link_exists(dbg)
    finally:
        assert m.stop() == 0, m.output
    assert snapshot(host.host_if) == before
    assert tcx.links(idx) == []
    assert not link_exists(dbg)
    # A clean exit leaves nothing in the state directory: no record, lock or socket.
    assert [p.name for p in state_dir.rglob("*") if not p.is_dir()] == []


def test_htb_layout_is_ingress_plus_htb_root(host, env):
    m = MirrorProcess("--iface", host.host_if, "--hook", "htb", "--debug-iface",
                      debug_name(), env=env).start()
    try:
        qd = subprocess.run(["tc", "qdisc", "show", "dev", host.host_if], capture_output=True,
                            text=True).stdout
        assert "qdisc htb 1: root" in qd and "qdisc ingress ffff:" in qd
        flt = subprocess.run(["tc", "filter", "show", "dev", host.host_if, "parent", "1:"],
                             capture_output=True, text=True).stdout
        assert "tc-mirror:egress" in flt and "direct-action" in flt
    finally:
        assert m.stop() == 0, m.output


COUNTER_PROG = r"""
#include <uapi/linux/pkt_cls.h>
BPF_ARRAY(seen, u64, 1);
int count_all(struct __sk_buff *skb) {
    int k = 0;
    u64 *v = seen.lookup(&k);
    if (v) __sync_fetch_and_add(v, 1);
    return TC_ACT_OK;
}
"""


def test_foreign_clsact_filter_survives_and_keeps_running(host, nginx, env):
    """Someone else's clsact and filter (lower priority than ours) stay in place through
    attach and detach, and keep seeing every packet while the mirror is attached."""
    from bcc import BPF
    counter = BPF(text=COUNTER_PROG.encode())
    fn = counter.load_func(b"count_all", BPF.SCHED_CLS)
    seen = counter.get_table(b"seen")
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=host.host_if)[0]
        ipr.tc("add", "clsact", idx)
        ipr.tc("add-filter", "bpf", idx, handle=7, fd=fn.fd, name="someone-else", prio=5,
               parent=tc.CLSACT_INGRESS, protocol=tc.ETH_P_ALL, direct_action=True)
    before = snapshot(host.host_if)
    m = MirrorProcess("--iface", host.host_if, "--debug-iface", debug_name(), env=env).start()
    try:
        base = seen[seen.Key(0)].value
        _, statuses = send(host.ns_v4, host.host_v4, ["/ok", "/error"])
        assert statuses == [200, 500]
        # Server-to-client segments arrive on the host side's ingress: at least the two
        # responses and the FIN went through both filters.
        assert seen[seen.Key(0)].value - base >= 3
        assert "someone-else" in subprocess.run(
            ["tc", "filter", "show", "dev", host.host_if, "ingress"],
            capture_output=True, text=True).stdout
    finally:
        assert m.stop() == 0, m.output
    after = snapshot(host.host_if)
    assert after == before
    assert any(f[-1] == "someone-else" for f in after if len(f) == 5)


def test_sigkill_then_restart_replaces_not_stacks(host, nginx, env, tmp_path):
    before = snapshot(host.host_if)
    dbg = debug_name()
    first = MirrorProcess("--iface", host.host_if, "--debug-iface", dbg, env=env).start()
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    # The kernel keeps the filters of a killed controller (they hold the program).
    assert len(our_filter_lines(host.host_if)) == 2
    status = run_cli("status", "--json", env=env)
    # (Other test runs' interfaces may show up too: look at ours.)
    rows = [r for r in json.loads(status.stdout)["interfaces"] if r["iface"] == host.host_if]
    assert [r["owner"] for r in rows] == ["stale"]

    second = MirrorProcess("--iface", host.host_if, "--debug-iface", dbg, env=env).start()
    try:
        assert len(our_filter_lines(host.host_if)) == 2
        assert "replacing the hooks of a stopped controller" in second.output
        live = [r for r in json.loads(run_cli("status", "--json", env=env).stdout)["interfaces"]
                if r["iface"] == host.host_if]
        assert [r["owner"] for r in live] == ["live"]
        # The replacement mirrors: an error connection shows up in its flow map.
        send(host.ns_v4, host.host_v4, ["/error"])
        flows = json.loads(run_cli("flows", "--json", env=env).stdout)
        assert [f["status"] for f in flows] == [500]
    finally:
        assert second.stop() == 0, second.output
    # It adopted what the killed one created: qdisc and debug interface are gone too.
    assert snapshot(host.host_if) == before
    assert not link_exists(dbg)


def test_detach_command_cleans_up_after_sigkill(host, env):
    before = snapshot(host.host_if)
    for hook in ("clsact", "htb"):
        dbg = debug_name()
        m = MirrorProcess("--iface", host.host_if, "--hook", hook,
                          "--debug-iface", dbg, env=env).start()
        m.proc.send_signal(signal.SIGKILL)
        m.proc.wait()
        assert snapshot(host.host_if) != before
        out = run_cli("detach", "--iface", host.host_if, env=env)
        assert out.returncode == 0, out.stderr
        assert "removed filter" in out.stdout
        assert snapshot(host.host_if) == before, hook
        with IPRoute() as ipr:
            ipr.link("del", ifname=dbg)


def test_detach_refuses_while_a_controller_runs(host, env):
    m = MirrorProcess("--iface", host.host_if, "--debug-iface", debug_name(), env=env).start()
    try:
        out = run_cli("detach", "--iface", host.host_if, env=env)
        assert out.returncode == 2
        assert "owned by a running controller" in out.stderr
        assert len(our_filter_lines(host.host_if)) == 2
        second = run_cli("run", "--iface", host.host_if, "--debug-iface", debug_name(),
                         env=env)
        assert second.returncode == 2
        assert "already monitored by another mirror controller" in second.stderr
    finally:
        assert m.stop() == 0, m.output


def _bad(args, env, expect, host):
    before = snapshot(host.host_if)
    links_before = links_of_this_run()
    out = run_cli(*args, env=env)
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("mirror: error:"), out.stderr
    assert expect in lines[0]
    assert snapshot(host.host_if) == before
    assert links_of_this_run() == links_before


def test_bad_input_exits_2_and_touches_nothing(host, env, tmp_path):
    i = host.host_if
    _bad(["run", "--iface", "nosuch0"], env, "unknown interface 'nosuch0'", host)
    _bad(["run", "--iface", i, "--trigger", "6xx"], env, "bad trigger spec", host)
    _bad(["run", "--iface", i, "--trigger", "504-500"], env, "runs backwards", host)
    _bad(["run", "--iface", i, "--debug-iface", i], env, "is also monitored", host)
    _bad(["run", "--iface", i, "--metrics-addr", "nope"], env, "bad --metrics-addr", host)
    _bad(["run", "--iface", i, "--debug-iface", "x" * 16], env, "bad debug interface name", host)
    _bad(["run"], env, "no interface to monitor", host)
    _bad(["run", "--iface", i], dict(env, BCC_KERNEL_SOURCE=str(tmp_path / "none")),
         "kernel headers missing", host)
    fake = tmp_path / "fakebcc" / "bcc"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('libbcc.so.0: cannot open')\n")
    _bad(["run", "--iface", i], dict(env, PYTHONPATH=str(fake.parent)), "cannot import bcc",
         host)
    cfg = tmp_path / "bad.conf"
    cfg.write_text("trigger = 5xy\n")
    _bad(["run", "--iface", i, "--config", str(cfg)], env, "bad trigger spec", host)
    _bad(["run", "--iface", i, "--idle-timeout", "inf"], env, "finite number of seconds", host)
    for events in (str(tmp_path), "/proc/version", "/dev/full"):
        _bad(["run", "--iface", i, "--events-file", events], env,
             f"cannot use {events} as the events file", host)


def _as_nobody(*args: str, env: dict) -> subprocess.CompletedProcess:
    """The CLI as uid and gid 65534 with no groups. It keeps one capability,
    CAP_DAC_READ_SEARCH (ambient, so that it survives the exec), only so that it can read
    the checkout and the virtualenv wherever they are (a clone in /root, any 0700
    directory): without it the interpreter cannot import from there and fails before
    `mirror` runs, or imports another copy installed elsewhere. It grants no write and
    nothing the checks under test look at: the uid is what they refuse."""
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search",
                           *mirror_cmd(*args)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=60)


def _as_root_with_caps(caps: list[str], *args: str, env: dict):
    """The CLI as root whose capabilities are dropped to `caps` (bounding and inheritable
    sets) plus the DAC overrides, so that it reads the checkout wherever it lives."""
    bounding = ",".join(["-all", "+dac_override", "+dac_read_search",
                         *(f"+{c}" for c in caps)])
    return subprocess.run(["setpriv", "--inh-caps=-all", f"--bounding-set={bounding}",
                           *mirror_cmd(*args)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=60)


def test_not_root_exits_2(host, env):
    out = _as_nobody("run", "--iface", host.host_if, env=env)
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert out.returncode == 2, out.stderr
    assert len(lines) == 1 and lines[0].startswith("mirror: error: must run as root:"), \
        out.stderr
    assert "uid 65534 is not root" in out.stderr
    assert "--cap-add BPF,NET_ADMIN,PERFMON" in out.stderr
    out = _as_nobody("status", env=env)
    assert out.returncode == 2, out.stderr
    assert "must run as root" in out.stderr and "CAP_NET_ADMIN" in out.stderr, out.stderr


@pytest.mark.parametrize("caps,missing", [
    ([], "CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON"),
    (["bpf", "net_admin"], "CAP_PERFMON"),
    (["net_admin", "perfmon"], "CAP_BPF"),
    (["bpf", "perfmon"], "CAP_NET_ADMIN"),
])
def test_root_without_capabilities_names_the_missing_ones(host, env, caps, missing):
    before = snapshot(host.host_if)
    out = _as_root_with_caps(caps, "run", "--iface", host.host_if, env=env)
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert out.returncode == 2, out.stderr
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"mirror: error: running as root without {missing}:"), out.stderr
    assert "--cap-add BPF,NET_ADMIN,PERFMON" in lines[0]
    assert snapshot(host.host_if) == before


def test_root_with_exactly_the_documented_capabilities_runs(host, nginx, env):
    """The set docs/deployment.md names is enough (and nothing else is kept, not even the
    DAC overrides): attach, mirror an error connection, detach. `mirror flows` needs only
    CAP_NET_ADMIN."""
    from mirror.privileges import CONTROLLER_CAPS
    caps = [c.removeprefix("CAP_").lower() for c in CONTROLLER_CAPS]
    bounding = ",".join(["-all", *(f"+{c}" for c in caps)])
    before = snapshot(host.host_if)
    dbg = debug_name()
    m = MirrorProcess("--iface", host.host_if, "--debug-iface", dbg, env=env,
                      wrapper=["setpriv", "--inh-caps=-all", f"--bounding-set={bounding}"])
    m.start()
    try:
        send(host.ns_v4, host.host_v4, ["/ok", "/error"])
        flows = _as_root_with_caps(["net_admin"], "flows", "--json", env=env)
        assert flows.returncode == 0, flows.stderr
        assert [f["status"] for f in json.loads(flows.stdout)] == [500]
    finally:
        assert m.stop() == 0, m.output
    assert snapshot(host.host_if) == before and not link_exists(dbg)


def test_htb_refused_on_foreign_root_qdisc(host, env):
    subprocess.run(["tc", "qdisc", "add", "dev", host.host_if, "root", "handle", "5:", "tbf",
                    "rate", "1gbit", "burst", "100k", "latency", "50ms"], check=True)
    _bad(["run", "--iface", host.host_if, "--hook", "htb"], env,
         "already has a root qdisc (tbf 5:)", host)


def test_prio_taken_by_foreign_filter_kind_is_refused(host, env):
    subprocess.run(["tc", "qdisc", "add", "dev", host.host_if, "clsact"], check=True)
    subprocess.run(["tc", "filter", "add", "dev", host.host_if, "ingress", "prio", "1",
                    "protocol", "all", "u32", "match", "u32", "0", "0"], check=True)
    _bad(["run", "--iface", host.host_if], env, "holds another tool's u32 filter", host)


def test_failure_half_way_rolls_back(host, state_dir):
    """The second interface vanishes between the checks and the attach (a container
    stopping): the kernel refuses, and the first interface is put back as it was and the
    debug interface removed."""
    from mirror.controller import Controller, Options
    from mirror.lab.netns import Host
    other = Host.create()
    try:
        before = snapshot(host.host_if)
        dbg = debug_name()
        ctl = Controller(Options(ifaces=[host.host_if, other.host_if], debug_iface=dbg))
        indexes = ctl.preflight()
        other.destroy()
        with pytest.raises(Exception) as err:
            ctl.start(indexes)
        assert getattr(err.value, "code", None) == 19 or "No such device" in str(err.value)
        assert snapshot(host.host_if) == before
        assert not link_exists(dbg)
        assert list(state_dir.rglob("iface-*.json")) == []
    finally:
        other.destroy()


def test_sighup_reloads_trigger_and_rejects_bad_config(host, nginx, env, tmp_path):
    cfg = tmp_path / "mirror.conf"
    cfg.write_text("trigger = 5xx\n")
    m = MirrorProcess("--iface", host.host_if, "--debug-iface", debug_name(),
                      "--config", str(cfg), env=env).start()
    try:
        send(host.ns_v4, host.host_v4, ["/missing"])
        assert json.loads(run_cli("flows", "--json", env=env).stdout) == []
        cfg.write_text("trigger = 404\n")
        m.signal(signal.SIGHUP)
        assert m.wait_for("trigger set is now 404")
        send(host.ns_v4, host.host_v4, ["/missing"])
        send(host.ns_v4, host.host_v4, ["/error"])
        flows = json.loads(run_cli("flows", "--json", env=env).stdout)
        assert [f["status"] for f in flows] == [404]
        cfg.write_text("trigger = 4x4\n")
        m.signal(signal.SIGHUP)
        assert m.wait_for("config rejected, keeping trigger 404")
        send(host.ns_v4, host.host_v4, ["/missing"])
        assert len(json.loads(run_cli("flows", "--json", env=env).stdout)) == 2
    finally:
        assert m.stop() == 0, m.output


def test_sighup_with_a_bad_duration_keeps_the_settings(host, env, tmp_path):
    """A duration that is not a finite number of seconds in the config file, sent with
    SIGHUP: rejected with a message, the controller keeps running with its settings
    (a nan once killed it); a good one is then taken."""
    cfg = tmp_path / "mirror.conf"
    cfg.write_text("idle_timeout = 20\n")
    m = MirrorProcess("--iface", host.host_if, "--debug-iface", debug_name(),
                      "--config", str(cfg), env=env).start()
    try:
        for n, bad in enumerate(("nan", "inf", "-inf", "1e308", "0", "-5", "ten"), 1):
            cfg.write_text(f"idle_timeout = {bad}\n")
            m.signal(signal.SIGHUP)
            assert m.wait_for_count("config rejected", n), m.output
            assert m.proc.poll() is None, m.output
            status = json.loads(run_cli("status", "--json", env=env).stdout)
            assert [c["idle_timeout"] for c in status["controllers"]] == [20], status
        cfg.write_text("idle_timeout = 12.5\n")
        m.signal(signal.SIGHUP)
        assert m.wait_for("idle timeout 12.5 s"), m.output
        status = json.loads(run_cli("status", "--json", env=env).stdout)
        assert [c["idle_timeout"] for c in status["controllers"]] == [12.5]
    finally:
        assert m.stop() == 0, m.output


def test_after_sigkill_commands_say_stopped(host, env):
    """A killed controller is a state, not an error: `status` names it stopped and exits
    3 while its hooks remain (0 once they are removed), `flows` and `events` say that no
    controller runs and exit 0."""
    dbg = debug_name()
    m = MirrorProcess("--iface", host.host_if, "--debug-iface", dbg, env=env).start()
    try:
        pid = m.proc.pid
        m.proc.send_signal(signal.SIGKILL)
        m.proc.wait()
        status = run_cli("status", env=env)
        assert status.returncode == 3, status.stdout + status.stderr
        assert f"controller pid {pid}: stopped without cleaning up" in status.stdout
        assert "stale hooks" in status.stdout
        assert run_cli("status", "--json", env=env).returncode == 3
        for command in ("flows", "events"):
            out = run_cli(command, env=env)
            assert out.returncode == 0, out.stderr
            assert "no running controller in this network namespace" in out.stdout
            assert f"controller pid {pid} stopped without cleaning up" in out.stdout
        flows = run_cli("flows", "--json", env=env)
        assert flows.returncode == 0 and json.loads(flows.stdout) == []
        assert "no running controller" in flows.stderr
        events = run_cli("events", "--json", env=env)
        assert events.returncode == 0 and events.stdout == ""
        assert run_cli("detach", "--iface", host.host_if, env=env).returncode == 0
        status = run_cli("status", env=env)
        assert status.returncode == 0, status.stdout + status.stderr
    finally:
        drop_link(dbg)


def test_shared_debug_iface_outlives_first_controller(state_dir):
    """Two controllers on two interfaces share one debug interface: the first to stop
    leaves it to the other, the last one removes it."""
    from mirror.lab.netns import Host
    a, b = Host.create(), Host.create()
    env = env_with(MIRROR_STATE_DIR=state_dir)
    dbg = debug_name()
    try:
        ma = MirrorProcess("--iface", a.host_if, "--debug-iface", dbg, env=env).start()
        mb = MirrorProcess("--iface", b.host_if, "--debug-iface", dbg, env=env).start()
        try:
            ifindex = int(open(f"/sys/class/net/{dbg}/ifindex").read())
            assert ma.stop() == 0, ma.output
            assert "still used by another controller" in ma.output
            assert int(open(f"/sys/class/net/{dbg}/ifindex").read()) == ifindex
        finally:
            assert mb.stop() == 0, mb.output
        assert "removed debug interface" in mb.output, mb.output
        assert not link_exists(dbg)
    finally:
        a.destroy()
        b.destroy()


def test_foreign_debug_iface_is_refused_and_sink_not_monitored(host, env):
    _bad(["run", "--iface", host.host_if, "--debug-iface", "lo"], env,
         "lo exists and is not a mirror debug interface", host)
    from mirror import debugif
    from mirror.bpfprog import Sink
    sink = Sink()
    dbg = debug_name()
    with IPRoute() as ipr:
        made = debugif.ensure(ipr, dbg, lambda: sink.fd)
    try:
        _bad(["run", "--iface", made.peer], env, "is the drop end of a mirror debug interface",
             host)
    finally:
        with IPRoute() as ipr:
            debugif.remove(ipr, dbg)


def test_pre_existing_debug_iface_survives_kill_and_restart(host, env):
    """A debug interface the operator made is never adopted as this tool's: not after a
    SIGKILL and a restart either."""
    from mirror import debugif
    from mirror.bpfprog import Sink
    sink = Sink()
    dbg = debug_name()
    with IPRoute() as ipr:
        debugif.ensure(ipr, dbg, lambda: sink.fd)
    try:
        m = MirrorProcess("--iface", host.host_if, "--debug-iface", dbg, env=env).start()
        m.proc.send_signal(signal.SIGKILL)
        m.proc.wait()
        m2 = MirrorProcess("--iface", host.host_if, "--debug-iface", dbg, env=env).start()
        assert m2.stop() == 0, m2.output
        assert link_exists(dbg)
    finally:
        with IPRoute() as ipr:
            debugif.remove(ipr, dbg)


def test_renamed_interface_stays_monitored_and_is_detached(host, nginx, env):
    before = snapshot(host.host_if)
    m = MirrorProcess("--iface", host.host_if, "--debug-iface", debug_name(), env=env).start()
    new_name = host.host_if[:-1] + "r"
    try:
        subprocess.run(["ip", "link", "set", host.host_if, "name", new_name], check=True)
        host.host_if = new_name             # so the fixture removes it
        assert m.wait_for(f"renamed to {new_name}", timeout=30), m.output
        send(host.ns_v4, host.host_v4, ["/error"])
        flows = json.loads(run_cli("flows", "--json", env=env).stdout)
        assert [f["status"] for f in flows] == [500]
    finally:
        assert m.stop() == 0, m.output
    assert snapshot(new_name) == before
    assert our_filter_lines(new_name) == []


def test_idle_control_client_does_not_block_sigterm(host, env, state_dir):
    import socket
    from pathlib import Path
    from mirror import ctlsocket, ownership
    m = MirrorProcess("--iface", host.host_if, "--debug-iface", debug_name(), env=env).start()
    path = Path(ownership.records("controller")[0]["socket"])   # state_dir set the env
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        with ctlsocket.address(path) as where:
            s.connect(where)                # connects and says nothing
        assert m.stop(timeout=30) == 0, m.output


@NEEDS_TCX
def test_tcx_runs_before_a_foreign_tcx_program(host, nginx, env):
    """A foreign tcx program that returns a final verdict (TC_ACT_OK) is attached first;
    the mirror attaches ahead of it and still sees (and mirrors) the error flow."""
    from bcc import BPF
    from mirror.hooks import tcx
    prog = BPF(text=b"""
#include <uapi/linux/pkt_cls.h>
int pass_all(struct __sk_buff *skb) { return TC_ACT_OK; }
""")
    fn = prog.load_func(b"pass_all", BPF.SCHED_CLS)
    idx = int(open(f"/sys/class/net/{host.host_if}/ifindex").read())
    links = [tcx.attach(fn.fd, idx, d, first=False) for d in ("ingress", "egress")]
    try:
        m = MirrorProcess("--iface", host.host_if, "--hook", "tcx",
                          "--debug-iface", debug_name(), env=env).start()
        try:
            send(host.ns_v4, host.host_v4, ["/error"])
            flows = json.loads(run_cli("flows", "--json", env=env).stdout)
            assert [f["status"] for f in flows] == [500]
        finally:
            assert m.stop() == 0, m.output
    finally:
        for fd in links:
            os.close(fd)


def test_state_of_gone_interfaces_and_dead_controllers_is_pruned(state_dir):
    """A controller killed on an interface that then disappears leaves records and lock
    files; the next controller start removes them (the state directory stays bounded)."""
    from mirror.lab.netns import Host
    a, b = Host.create(), Host.create()
    env = env_with(MIRROR_STATE_DIR=state_dir)
    try:
        dbg = debug_name()
        m = MirrorProcess("--iface", a.host_if, "--debug-iface", dbg, env=env).start()
        m.proc.send_signal(signal.SIGKILL)
        m.proc.wait()
        a.destroy()
        with IPRoute() as ipr:
            ipr.link("del", ifname=dbg)
        left = sorted(p.name for p in state_dir.rglob("*") if p.is_file())
        assert any(n.startswith("iface-if") for n in left)
        assert any(n.startswith("controller-") for n in left)
        m2 = MirrorProcess("--iface", b.host_if, "--debug-iface", debug_name(), env=env).start()
        try:
            now = sorted(p.name for p in state_dir.rglob("*") if p.is_file())
            ifindex_b = int(open(f"/sys/class/net/{b.host_if}/ifindex").read())
            assert {n for n in now if n.startswith("iface-")} == {
                f"iface-if{ifindex_b}.json", f"iface-if{ifindex_b}.lock"}
            assert len([n for n in now if n.startswith("controller-")]) == 2   # .json, .lock
            assert not any(dbg in n for n in now)
        finally:
            assert m2.stop() == 0, m2.output
        assert not any(p.name.startswith("controller-")
                       for p in state_dir.rglob("*") if p.is_file())
    finally:
        a.destroy()
        b.destroy()
