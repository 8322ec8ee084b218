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
# while it runs, even on a busy machine (_load_runs fails if the load ends first).
RATE_BPS, DATAGRAM, LOAD_SECONDS = 5_000_000, 600, 15


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
        server.kill()
        drop_link(dbg)
    _no_loss(stdout)
