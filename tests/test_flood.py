"""Connection-state flood: far more error connections than the state slots. Nothing fails,
the newest connection is mirrored, replacements show in the counters and the metrics, and
the arrays never grow."""
from __future__ import annotations

import os
import re
import struct

import pytest

from helpers import (MirrorProcess, counted_from_now, env_with, mirrored_packets, wait_captured,
                     wait_closed)
from mirror import bpfsys
from mirror.abi import TC_ACT_UNSPEC
from mirror.bpfprog import Classifier
from mirror.flowkey import FlowKey
from mirror.lab.client import send
from mirror.lab.netns import unique_name
from mirror.capture.flow import read_flows
from mirror.capture.tcpdump import Tcpdump

MAX_FLOWS = 1024
FLOOD = 200_000

RESPONSE = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 5\r\n\r\nerror"


def frame(client: int, port: int, payload: bytes, from_server: bool = True,
          flags: int = 0x18) -> bytes:
    """Ethernet/IPv4/TCP between 198.18.0.1:80 and 198.19.x.y:port (checksums unused)."""
    server = bytes([198, 18, 0, 1])
    cli = bytes([198, 19, client >> 8, client & 0xFF])
    src, dst = (server, cli) if from_server else (cli, server)
    sport, dport = (80, port) if from_server else (port, 80)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 5 << 4, flags, 512, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), 0, 0x4000, 64, 6,
                     0, src, dst)
    eth = b"\x02\x00\x00\x00\x00\x01\x02\x00\x00\x00\x00\x02\x08\x00"
    return eth + ip + tcp + payload


def syn(client: int, port: int) -> bytes:
    """The client's SYN that opens the connection (at the ingress hook)."""
    return frame(client, port, b"", from_server=False, flags=0x02)


def fdinfo(fd: int) -> dict[str, str]:
    text = open(f"/proc/self/fdinfo/{fd}").read()
    return dict(re.findall(r"^(\w+):\s+(\S+)", text, re.M))


@pytest.mark.testrun
@pytest.mark.slow
def test_flood_through_test_run(debug_iface):
    """FLOOD connections, each opened by its SYN and marked by a 500, into MAX_FLOWS state
    slots: nothing fails, every error is cloned, states are replaced (counted) and never
    more than the slots, the arrays never grow, and the newest connection is still
    mirrored."""
    clf = Classifier(max_flows=MAX_FLOWS)
    clf.set_trigger(frozenset(range(500, 600)))
    clf.set_debug_ifindex(debug_iface.ifindex)
    conns_fd = clf._conns.map_fd
    before = fdinfo(conns_fd)
    original = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {0})
    try:
        ingress, egress = clf.fd("ingress"), clf.fd("egress")
        verdicts = set()
        for i in range(FLOOD):
            client, port = i >> 14, 1024 + (i & 0x3FFF)
            verdicts.add(bpfsys.test_run(ingress, syn(client, port)).retval)
            verdicts.add(bpfsys.test_run(egress, frame(client, port, RESPONSE)).retval)
        assert verdicts == {TC_ACT_UNSPEC}
        c = clf.counters()
        assert c["conns_started"] == FLOOD and c["flows_marked"] == FLOOD
        assert c["mirrored_packets"] == FLOOD and c["clone_failures"] == 0
        resident = clf.conn_count()
        assert resident == c["conns_started"] - c["conns_replaced"] <= MAX_FLOWS
        assert c["flows_evicted"] <= c["conns_replaced"]
        active = clf.flows()
        assert 0 < len(active) <= MAX_FLOWS
        # The newest connection survived the flood, and a later packet of it is mirrored.
        i = FLOOD - 1
        client, port = i >> 14, 1024 + (i & 0x3FFF)
        newest = FlowKey.from_endpoints("198.18.0.1", 80, f"198.19.{client >> 8}.{client & 0xFF}",
                                        port)
        assert newest in active
        ack = frame(client, port, b"", from_server=False)
        assert bpfsys.test_run(ingress, ack).retval == TC_ACT_UNSPEC
        assert clf.counters()["mirrored_packets"] == FLOOD + 1
    finally:
        os.sched_setaffinity(0, original)
    after = fdinfo(conns_fd)
    assert after["max_entries"] == before["max_entries"] == str(MAX_FLOWS)
    assert after["memlock"] == before["memlock"]
    print(f"flooded {FLOOD} error connections into {MAX_FLOWS} state slots: "
          f"{len(active)} marked and resident, {c['conns_replaced']} states replaced")


@pytest.mark.kernel
@pytest.mark.slow
def test_flood_with_real_connections(host, nginx, state_dir, tmp_path):
    """More real error connections than --max-flows: every one is mirrored from its error
    response on while it is the newest, and the metrics account for the evictions."""
    from test_metrics import free_port, scrape
    port = free_port()
    dbg = unique_name("d")
    m = MirrorProcess("--iface", host.host_if, "--debug-iface", dbg, "--max-flows", "16",
                      "--metrics-addr", f"127.0.0.1:{port}",
                      env=env_with(MIRROR_STATE_DIR=state_dir)).start()
    dump = Tcpdump(dbg, str(tmp_path / "m.pcap")).start()
    mirrored = counted_from_now(lambda: mirrored_packets(state_dir))
    sent = []
    try:
        for _ in range(200):
            tuple5, statuses = send(host.ns_v4, host.host_v4, ["/error"])
            assert statuses == [500]
            sent.append(FlowKey.from_endpoints(*tuple5))
        wait_closed(host.ns_v4)
        wait_captured(dump, mirrored, "every clone")
        dump.stop()
        metrics = scrape(port)
    finally:
        dump.stop()
        assert m.stop() == 0, m.output
    flows = read_flows(str(tmp_path / "m.pcap"))
    assert all(flows[k].statuses == [500] for k in sent)
    active = metrics[("mirror_flows_active", ())]
    assert active <= 16
    assert metrics[("mirror_flows_marked_total", ())] == 200
    assert metrics[("mirror_flows_evicted_total", ())] == 200 - active - \
        metrics[("mirror_flows_expired_total", ())]
    assert metrics[("mirror_flows_evicted_total", ())] >= 200 - 16
