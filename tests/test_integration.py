"""End to end in network namespaces: real nginx, the real classifier attached by a real
`mirror run` process, tcpdump on the debug interface and on the monitored interface, and
dpkt reading both pcaps."""
from __future__ import annotations

import itertools
import os
import time

import pytest

from helpers import (HOOKS, MirrorProcess, counted_from_now, env_with, from_first_status,
                     link_packets, mirrored_packets, request_of, same_packets, signature,
                     wait_captured, wait_closed, wait_until)
from mirror.flowkey import FlowKey, key_of
from mirror.lab.client import send
from mirror.lab.netns import unique_name
from mirror.capture.flow import read_flows
from mirror.capture.tcpdump import Tcpdump

pytestmark = pytest.mark.kernel


_seq = itertools.count()


class Session:
    """One `mirror run` on the host's veth plus two captures: the debug interface (what
    the mirror produced) and the monitored interface itself (the reference)."""

    def __init__(self, host, tmp_path, hook, trigger="5xx", extra=()):
        self.host = host
        self.debug = unique_name("d")
        self.tmp = tmp_path
        self.state_dir = tmp_path / "state"
        self.mirror = MirrorProcess("--iface", host.host_if, "--debug-iface", self.debug,
                                    "--hook", hook, "--trigger", trigger, *extra,
                                    env=env_with(MIRROR_STATE_DIR=self.state_dir))
        self.dumps = []

    def __enter__(self):
        self.mirror.start()
        self.mirror_dump = Tcpdump(self.debug, str(self.tmp / "mirror.pcap")).start()
        self.mirrored = counted_from_now(lambda: mirrored_packets(self.state_dir))
        self.ref_dump = Tcpdump(self.host.host_if, str(self.tmp / "ref.pcap")).start()
        self.crossed = counted_from_now(lambda: link_packets(self.host.host_if))
        return self

    def finish(self):
        """Stops both captures once the connections are closed (their last ACKs sent) and
        each capture holds what its interface carried, and reads them."""
        wait_closed(self.host.ns_v4, self.host.ns_v6)
        wait_captured(self.mirror_dump, self.mirrored, "every clone")
        wait_captured(self.ref_dump, self.crossed, "every packet of the link")
        self.mirror_dump.stop()
        self.ref_dump.stop()
        return read_flows(str(self.tmp / "mirror.pcap")), read_flows(str(self.tmp / "ref.pcap"))

    def __exit__(self, *exc):
        for d in (getattr(self, "mirror_dump", None), getattr(self, "ref_dump", None)):
            if d:
                d.stop()
        rc = self.mirror.stop()
        assert rc == 0, self.mirror.output


def addresses(host, family):
    return (host.ns_v4, host.host_v4) if family == 4 else (host.ns_v6, host.host_v6)


def error_connection(host):
    """An open keep-alive IPv4 connection whose first response was a 500."""
    import http.client
    conn = http.client.HTTPConnection(host.ns_v4, 80, timeout=10,
                                      source_address=(host.host_v4, 0))
    conn.request("GET", "/error")
    conn.getresponse().read()
    return conn


def connect(host, family, paths):
    server, source = addresses(host, family)
    tuple5, statuses = send(server, source, paths)
    return FlowKey.from_endpoints(*tuple5), statuses


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("family", [4, 6])
def test_error_connections_mirrored_whole_and_nothing_else(host, nginx, tmp_path, hook, family):
    with Session(host, tmp_path, hook) as s:
        err, st_err = connect(host, family, ["/error"])
        ok, st_ok = connect(host, family, ["/ok", "/ok"])
        keep, st_keep = connect(host, family, ["/ok", "/ok", "/error", "/ok"])
        big, st_big = connect(host, family, ["/big", "/error", "/big"])
        mirrored, ref = s.finish()
    assert st_err == [500] and st_ok == [200, 200] and st_keep == [200, 200, 500, 200]
    assert st_big == [200, 500, 200]
    # Exactly the error connections, nothing of the 200-only one.
    assert set(mirrored) == {err, keep, big}
    for key in (err, keep, big):
        # The request that got the 500 (written by the controller from the request
        # snapshot), then the 500 and everything after it.
        expected = request_of(ref[key].packets, 500) + from_first_status(ref[key].packets, 500)
        assert same_packets(mirrored[key].packets, expected), (
            f"{key}: mirrored {[signature(p) for p in mirrored[key].packets]}\n"
            f"expected {[signature(p) for p in expected]}")
        # Both directions, and the response that triggered it comes first.
        assert {p.sport for p in mirrored[key].packets} == {key.port_lo, key.port_hi}
        assert mirrored[key].packets[0].payload.startswith(b"HTTP/1.1 500 ")
    # On the keep-alive connection nothing before the 500 but its request: the 2 earlier
    # responses and their requests are absent, the request after it is present.
    assert mirrored[keep].statuses == [500, 200]
    assert sorted(mirrored[keep].requests) == ["GET /error HTTP/1.1", "GET /ok HTTP/1.1"]
    assert len(ref[keep].packets) > len(mirrored[keep].packets)


@pytest.mark.parametrize("trigger,mirrored_404", [("5xx", False), ("404,5xx", True)])
def test_404_mirrors_only_when_in_trigger(host, nginx, tmp_path, trigger, mirrored_404):
    with Session(host, tmp_path, "clsact", trigger=trigger) as s:
        missing, st = connect(host, 4, ["/missing"])
        err, _ = connect(host, 6, ["/error"])
        mirrored, ref = s.finish()
    assert st == [404]
    assert (missing in mirrored) == mirrored_404
    assert err in mirrored
    if mirrored_404:
        assert same_packets(mirrored[missing].packets,
                            request_of(ref[missing].packets, 404) +
                            from_first_status(ref[missing].packets, 404))


def test_flows_command_lists_marked_flows(host, nginx, tmp_path):
    from helpers import run_cli
    import json
    with Session(host, tmp_path, "clsact") as s:
        err, _ = connect(host, 4, ["/error", "/ok"])
        connect(host, 4, ["/ok"])
        wait_closed(host.ns_v4)         # the flow's count is final
        out = run_cli("flows", "--json", env=env_with(MIRROR_STATE_DIR=tmp_path / "state"))
        table = run_cli("flows", env=env_with(MIRROR_STATE_DIR=tmp_path / "state"))
        mirrored, _ = s.finish()
    assert out.returncode == 0, out.stderr
    flows = json.loads(out.stdout)
    assert [key_of(f["client"], f["server"]) for f in flows] == [err]
    assert flows[0]["status"] == 500
    # Every packet mirrored is counted in the flow's per-CPU values.
    # The kernel's count of the flow's clones, and the request frame of its 500.
    assert flows[0]["packets"] + 1 == len(mirrored[err].packets) >= 4
    assert str(err.port_lo) in table.stdout and "500" in table.stdout


def test_capture_holds_mirrored_packets_only(host, nginx, tmp_path):
    """No router solicitation, MLD report or anything else of the debug interface's own:
    every frame in the pcap is a mirrored TCP segment."""
    import dpkt
    with Session(host, tmp_path, "clsact") as s:
        connect(host, 6, ["/error"])
        # Not a wait: the window in which a fresh interface would send its router
        # solicitation (delayed up to 1 s) and MLD reports, were IPv6 on.
        time.sleep(1.0)
        connect(host, 4, ["/error"])
        mirrored, _ = s.finish()
        # The interface's own count: nothing else left it, not even before tcpdump ran.
        sent = link_packets(s.debug, "tx_packets")
        clones = mirrored_packets(s.state_dir)
    with open(tmp_path / "mirror.pcap", "rb") as f:
        frames = [buf for _, buf in dpkt.pcap.Reader(f)]
    assert len(frames) == sum(len(fl.packets) for fl in mirrored.values()) > 0
    assert sent == clones == len(frames)


def test_idle_flow_expires_and_stops_mirroring(host, nginx, tmp_path):
    import http.client
    from helpers import run_cli
    import json
    with Session(host, tmp_path, "clsact", extra=("--idle-timeout", "1")) as s:
        conn = error_connection(host)
        env = env_with(MIRROR_STATE_DIR=tmp_path / "state")
        assert len(json.loads(run_cli("flows", "--json", env=env).stdout)) == 1
        def expired():
            flows = json.loads(run_cli("flows", "--json", env=env).stdout)
            return not flows, flows
        wait_until(expired, "the idle flow to expire")
        conn.request("GET", "/ok")      # same connection, after expiry
        conn.getresponse().read()
        local = conn.sock.getsockname()
        conn.close()
        mirrored, ref = s.finish()
    key = FlowKey.from_endpoints(local[0], local[1], host.ns_v4, 80)
    assert mirrored[key].statuses == [500]
    assert "GET /ok HTTP/1.1" not in mirrored[key].requests
    assert ref[key].statuses == [500, 200]


def test_existing_debug_iface_is_used_and_kept(host, nginx, tmp_path):
    """A debug interface that was there before the controller is used, and left there."""
    from mirror import debugif
    from mirror.bpfprog import Sink
    from pyroute2 import IPRoute
    sink = Sink()
    s = Session(host, tmp_path, "clsact")
    with IPRoute() as ipr:
        debugif.ensure(ipr, s.debug, lambda: sink.fd)
    try:
        with s:
            assert "created" not in [l for l in s.mirror.lines if "debug interface" in l][0]
            err, _ = connect(host, 4, ["/error"])
            mirrored, _ = s.finish()
        assert err in mirrored
        with IPRoute() as ipr:
            assert ipr.link_lookup(ifname=s.debug)
    finally:
        with IPRoute() as ipr:
            debugif.remove(ipr, s.debug)


def test_lab_demo(tmp_path):
    """The README's demo command: builds its own host, reports, cleans up, exits 0."""
    from helpers import run_cli
    out = run_cli("lab", "--rounds", "1", "--output", str(tmp_path / "lab"), timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "UNEXPECTED" not in out.stdout
    # 3 HTTP/1.x error connections and 1 h2c x IPv4, IPv6; an event per error response
    assert "8 connections marked" in out.stdout
    assert "2 connections mirrored, 2 expected" in out.stdout
    assert "8 error events" in out.stdout and "e.g. 500 for GET /error" in out.stdout
    assert (tmp_path / "lab" / "mirror.pcap").stat().st_size > 24
    assert "kernel state cleaned up" in out.stdout


def test_active_flow_never_expires(host, nginx, tmp_path):
    """A marked connection that keeps sending (one request every 0.3 s, idle timeout 2 s,
    so the sweep runs several times while it is active) stays marked and every one of its
    packets is mirrored. The flow map is read over the control socket, in-process: a CLI
    process per check would itself take a good part of the idle timeout on a busy host."""
    from helpers import controller_ask
    with Session(host, tmp_path, "clsact", extra=("--idle-timeout", "2")) as s:
        conn = error_connection(host)
        for _ in range(13):
            time.sleep(0.3)     # pacing the client, not waiting for a result
            conn.request("GET", "/ok")
            conn.getresponse().read()
            assert len(controller_ask(tmp_path / "state", "flows")) == 1
        local = conn.sock.getsockname()
        conn.close()
        mirrored, ref = s.finish()
    key = FlowKey.from_endpoints(local[0], local[1], host.ns_v4, 80)
    assert same_packets(mirrored[key].packets, request_of(ref[key].packets, 500) +
                        from_first_status(ref[key].packets, 500))
    assert mirrored[key].statuses == [500] + [200] * 13
