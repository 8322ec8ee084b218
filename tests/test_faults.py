"""Faults while running: the debug interface deleted or down, a monitored interface
removed, the controller killed under load. Production traffic must not notice."""
from __future__ import annotations

import json
import signal
import subprocess

import pytest
from pyroute2 import IPRoute

from helpers import (HOOKS, NEEDS_TCX, MirrorProcess, controller_ask, counted_from_now,
                     drop_link, env_with, link_packets, mirrored_packets, run_cli,
                     wait_captured, wait_closed, wait_until)
from mirror.flowkey import FlowKey
from mirror.lab.client import send
from mirror.lab.netns import Host, unique_name
from mirror.capture.flow import read_flows
from mirror.capture.tcpdump import Tcpdump

pytestmark = [pytest.mark.kernel, pytest.mark.slow]


def test_debug_iface_deleted_is_recreated(host, nginx, state_dir, tmp_path):
    from test_metrics import free_port, scrape
    env = env_with(MIRROR_STATE_DIR=state_dir)
    dbg = unique_name("d")
    port = free_port()
    m = MirrorProcess("--iface", host.host_if, "--debug-iface", dbg,
                      "--metrics-addr", f"127.0.0.1:{port}", env=env).start()
    try:
        send(host.ns_v4, host.host_v4, ["/error"])
        assert scrape(port)[("mirror_debug_iface_recreated_total", ())] == 0
        with IPRoute() as ipr:
            ipr.link("del", ifname=dbg)
        # Production traffic is untouched while the mirror has nowhere to go.
        for _ in range(5):
            assert send(host.ns_v4, host.host_v4, ["/ok", "/error"])[1] == [200, 500]
        assert m.wait_for(f"debug interface {dbg} recreated", timeout=30), m.output
        assert m.output.count("disappeared") == 1
        dump = Tcpdump(dbg, str(tmp_path / "after.pcap")).start()
        mirrored = counted_from_now(lambda: mirrored_packets(state_dir))
        tuple5, _ = send(host.ns_v4, host.host_v4, ["/error"])
        wait_closed(host.ns_v4)
        wait_captured(dump, mirrored, "every clone")
        dump.stop()
        assert FlowKey.from_endpoints(*tuple5) in read_flows(str(tmp_path / "after.pcap"))
        assert scrape(port)[("mirror_debug_iface_recreated_total", ())] == 1
    finally:
        assert m.stop() == 0, m.output
    with IPRoute() as ipr:
        assert not ipr.link_lookup(ifname=dbg)      # the recreated one is removed too


def test_debug_iface_down_counts_clone_failures(host, nginx, state_dir):
    env = env_with(MIRROR_STATE_DIR=state_dir)
    dbg = unique_name("d")
    m = MirrorProcess("--iface", host.host_if, "--debug-iface", dbg, env=env).start()
    try:
        with IPRoute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname=dbg)[0], state="down")
        for _ in range(10):
            assert send(host.ns_v4, host.host_v4, ["/error", "/ok"])[1] == [500, 200]
        c = controller_ask(state_dir)
        assert c["clone_failures"] > 0
        assert c["flows_marked"] == 10
        assert m.proc.poll() is None
    finally:
        assert m.stop() == 0, m.output


def test_monitored_iface_removed_others_continue(host, nginx, state_dir, tmp_path):
    env = env_with(MIRROR_STATE_DIR=state_dir)
    other = Host.create()
    dbg = unique_name("d")
    try:
        m = MirrorProcess("--iface", other.host_if, "--iface", host.host_if,
                          "--debug-iface", dbg, env=env).start()
        try:
            other.destroy()
            assert m.wait_for(f"{other.host_if}: interface is gone", timeout=30), m.output
            dump = Tcpdump(dbg, str(tmp_path / "m.pcap")).start()
            mirrored = counted_from_now(lambda: mirrored_packets(state_dir))
            tuple5, _ = send(host.ns_v4, host.host_v4, ["/error"])
            wait_closed(host.ns_v4)
            wait_captured(dump, mirrored, "every clone")
            dump.stop()
            assert FlowKey.from_endpoints(*tuple5) in read_flows(str(tmp_path / "m.pcap"))
            ifaces = json.loads(run_cli("status", "--json", env=env).stdout)["interfaces"]
            mine = {host.host_if, other.host_if}
            assert [i["iface"] for i in ifaces if i["iface"] in mine] == [host.host_if]
        finally:
            assert m.stop() == 0, m.output
    finally:
        other.destroy()


# The load: 5 Mbit/s of 600-byte datagrams, about 1000 a second, for long enough that the
# steps each test waits for (a few seconds of load, two controller starts) all happen
# while it runs, even on a busy machine where a start compiles for 10 s (_load_runs
# fails if the load ends first).
RATE_BPS, DATAGRAM, LOAD_SECONDS = 5_000_000, 600, 45


def _iperf_udp(host, seconds: float) -> subprocess.Popen:
    return subprocess.Popen(["iperf3", "-c", host.ns_v4, "-B", host.host_v4, "-u",
                             "-b", str(RATE_BPS), "-l", str(DATAGRAM), "-t", str(seconds), "-J"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _udp_server(host) -> subprocess.Popen:
    server = host.popen("iperf3", "-s", "-1", "-B", host.ns_v4, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)

    def listening():
        out = host.exec("ss", "-Htln", "sport", "= :5201").stdout
        assert server.poll() is None, "iperf3 server exited"
        return host.ns_v4 in out, out
    wait_until(listening, "the iperf3 server to listen")
    return server


def _load_runs(host, client: subprocess.Popen, seconds: float) -> None:
    """Waits while the load sends `seconds` worth of datagrams across the monitored
    interface (counted by the interface itself), so that what follows happens under load."""
    sent = counted_from_now(lambda: link_packets(host.host_if, "tx_packets"))
    want = int(seconds * RATE_BPS / 8 / DATAGRAM)

    def check():
        if client.poll() is not None:
            out, err = client.communicate()
            raise AssertionError(f"the load ended early: {err.decode()} {out.decode()[-2000:]}")
        return sent() >= want, sent()
    wait_until(check, f"{want} datagrams of load")


def _kill_running(*procs) -> None:
    """On the way out of a test that failed midway: controllers and loads still running
    are killed and reaped before the debug interface is dropped, which a live controller
    would otherwise recreate (and leave behind when the test process exits)."""
    for p in procs:
        proc = getattr(p, "proc", p)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


def _no_loss(stdout: bytes) -> None:
    end = json.loads(stdout)["end"]["sum"]
    assert end["packets"] > 1000
    assert end["lost_packets"] == 0, end


@pytest.mark.parametrize("hook", HOOKS)
def test_sigkill_and_restart_under_load_lose_nothing(host, state_dir, hook):
    """UDP at a fixed rate crosses the monitored interface while the controller is killed
    with SIGKILL and started again (adopting, or for tcx re-creating, the hooks): the
    server counts every datagram. For clsact and htb the qdiscs are added before and
    removed after the load: adding or deleting a qdisc deactivates the device's queues
    for a moment (see test_tcx_attach_detach_under_load_lose_nothing)."""
    env = env_with(MIRROR_STATE_DIR=state_dir)
    dbg = unique_name("d")
    server = _udp_server(host)
    m = m2 = client = None
    try:
        m = MirrorProcess("--iface", host.host_if, "--hook", hook, "--debug-iface", dbg,
                          env=env).start()
        client = _iperf_udp(host, LOAD_SECONDS)
        _load_runs(host, client, 2)
        m.proc.send_signal(signal.SIGKILL)
        m.proc.wait()
        _load_runs(host, client, 1)
        m2 = MirrorProcess("--iface", host.host_if, "--hook", hook, "--debug-iface", dbg,
                           env=env).start()
        _load_runs(host, client, 1)
        m2.proc.send_signal(signal.SIGKILL)
        m2.proc.wait()
        stdout, _ = client.communicate(timeout=60)
        out = run_cli("detach", "--iface", host.host_if, env=env)
        assert out.returncode == 0, out.stderr
    finally:
        _kill_running(m, m2, client)
        server.kill()
        drop_link(dbg)
    _no_loss(stdout)


@NEEDS_TCX
def test_tcx_attach_detach_under_load_lose_nothing(host, state_dir):
    """With tcx the whole lifecycle (attach, SIGTERM detach, attach, SIGKILL) happens
    under load: no qdisc is touched, so nothing is lost."""
    from mirror.hooks import tcx
    env = env_with(MIRROR_STATE_DIR=state_dir)
    dbg = unique_name("d")
    server = _udp_server(host)
    m = m2 = client = None
    try:
        client = _iperf_udp(host, LOAD_SECONDS)
        _load_runs(host, client, 1)
        m = MirrorProcess("--iface", host.host_if, "--hook", "tcx", "--debug-iface", dbg,
                          env=env).start()
        _load_runs(host, client, 1)
        assert m.stop() == 0, m.output
        m2 = MirrorProcess("--iface", host.host_if, "--hook", "tcx", "--debug-iface", dbg,
                           env=env).start()
        idx = int(open(f"/sys/class/net/{host.host_if}/ifindex").read())
        assert sorted(l.direction for l in tcx.links(idx)) == ["egress", "ingress"]
        _load_runs(host, client, 1)
        m2.proc.send_signal(signal.SIGKILL)
        m2.proc.wait()
        stdout, _ = client.communicate(timeout=60)
        assert tcx.links(idx) == []     # the kernel released the killed one's links
    finally:
        _kill_running(m, m2, client)
        server.kill()
        drop_link(dbg)
    _no_loss(stdout)


def test_debug_iface_that_could_pass_clones_on_is_not_mirrored_to(host, nginx, state_dir):
    """The debug veth's far end loses its sink filter, or is moved into another network
    namespace, while the controller runs: clones would enter a network stack. The run
    loop notices, says so, and mirrors nowhere (counted as no_debug_if) until the
    interface is safe again: here, deleted and recreated."""
    from mirror.debugif import sink_name
    env = env_with(MIRROR_STATE_DIR=state_dir)
    dbg = unique_name("d")
    sink = sink_name(dbg)
    m = MirrorProcess("--iface", host.host_if, "--debug-iface", dbg, env=env).start()
    try:
        with IPRoute() as ipr:
            if not ipr.link_lookup(ifname=sink):
                pytest.skip("the debug interface is a dummy here: it has no far end")

        def error_connection_mirrored() -> tuple[int, int]:
            """(clones, no_debug_if) that one more error connection added."""
            before = controller_ask(state_dir)
            assert send(host.ns_v4, host.host_v4, ["/error"])[1] == [500]
            after = controller_ask(state_dir)
            return (after["mirrored_packets"] - before["mirrored_packets"],
                    after["no_debug_if"] - before["no_debug_if"])

        assert error_connection_mirrored()[0] > 0
        subprocess.run(["tc", "filter", "del", "dev", sink, "ingress"], check=True)
        assert m.wait_for(f"debug interface {dbg} is no longer safe to mirror to: its far "
                          "end does not drop", timeout=30), m.output
        clones, nowhere = error_connection_mirrored()
        assert clones == 0 and nowhere > 0
        subprocess.run(["ip", "link", "del", dbg], check=True)
        assert m.wait_for(f"debug interface {dbg} recreated", timeout=30), m.output
        assert error_connection_mirrored()[0] > 0
        subprocess.run(["ip", "link", "set", sink, "netns", host.ns], check=True)
        assert m.wait_for_count("is no longer safe to mirror to", 2, timeout=30), m.output
        assert "its far end is in another network namespace" in m.output
        clones, nowhere = error_connection_mirrored()
        assert clones == 0 and nowhere > 0
        assert m.proc.poll() is None
    finally:
        assert m.stop() == 0, m.output
        drop_link(dbg)


def test_events_file_that_fills_up_is_retried_and_nothing_is_lost(host, nginx, state_dir,
                                                                  tmp_path):
    """The events file's file system fills up while the controller runs (a 64 KiB tmpfs
    in a mount namespace of the controller's own): the failure is logged and counted in
    mirror_controller_errors_total{stage="events"}, `mirror events` still shows every
    event, and once there is room again every line is in the file, none twice."""
    from test_metrics import free_port, scrape
    env = env_with(MIRROR_STATE_DIR=state_dir)
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o700)
    path = logs / "events.jsonl"
    port = free_port()
    mount = f'mount -t tmpfs -o size=64k,mode=0700 tmpfs "{logs}" && exec "$@"'
    m = MirrorProcess("--iface", host.host_if, "--debug-iface", unique_name("d"),
                      "--events-file", str(path), "--metrics-addr", f"127.0.0.1:{port}",
                      env=env, wrapper=["unshare", "--mount", "--propagation", "private",
                                        "sh", "-c", mount, "sh"]).start()

    def inside(script: str) -> str:
        """A shell command in the controller's mount namespace (where the tmpfs is)."""
        return subprocess.run(["nsenter", "-t", str(m.proc.pid), "-m", "sh", "-c", script],
                              capture_output=True, text=True, check=True).stdout

    def lines_in_file() -> list[dict]:
        return [json.loads(l) for l in inside(f'cat "{path}" 2>/dev/null || true').splitlines()]

    try:
        send(host.ns_v4, host.host_v4, ["/error"])
        wait_until(lambda: (len(lines_in_file()) == 1, lines_in_file()), "the first line")
        inside(f'head -c 1M /dev/zero > "{logs}/fill" || true')      # the disk is full
        # The file's last page still has room for a few lines (tmpfs allocates pages):
        # more than a page of lines, then.
        for _ in range(12):
            send(host.ns_v4, host.host_v4, ["/error"])
        assert m.wait_for("cannot write the events file", timeout=30), m.output
        events = run_cli("events", "--json", env=env)
        assert len(events.stdout.splitlines()) == 13, events.stdout + events.stderr
        assert scrape(port)[("mirror_controller_errors_total", (("stage", "events"),))] >= 1
        inside(f'rm "{logs}/fill"')
        assert m.wait_for("is written again", timeout=60), m.output
        got = lines_in_file()
        assert len(got) == 13, got
        assert sorted(e["client"] for e in got) == sorted(
            json.loads(l)["client"] for l in events.stdout.splitlines())
    finally:
        assert m.stop() == 0, m.output
