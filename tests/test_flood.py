"""Flow-table flood: far more error flows than the map holds. Nothing fails, the newest
flows are mirrored, evictions show in the metrics, and the map never grows."""
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


def frame(client: int, port: int, payload: bytes, from_server: bool = True) -> bytes:
    """Ethernet/IPv4/TCP between 198.18.0.1:80 and 198.19.x.y:port (checksums unused)."""
    server = bytes([198, 18, 0, 1])
    cli = bytes([198, 19, client >> 8, client & 0xFF])
    src, dst = (server, cli) if from_server else (cli, server)
    sport, dport = (80, port) if from_server else (port, 80)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 5 << 4, 0x18, 512, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), 0, 0x4000, 64, 6,
                     0, src, dst)
    eth = b"\x02\x00\x00\x00\x00\x01\x02\x00\x00\x00\x00\x02\x08\x00"
    return eth + ip + tcp + payload


def fdinfo(fd: int) -> dict[str, str]:
    text = open(f"/proc/self/fdinfo/{fd}").read()
    return dict(re.findall(r"^(\w+):\s+(\S+)", text, re.M))


@pytest.mark.testrun
@pytest.mark.slow
def test_flood_through_test_run(debug_iface):
    clf = Classifier(max_flows=MAX_FLOWS)
    clf.set_trigger(frozenset(range(500, 600)))
    clf.set_debug_ifindex(debug_iface.ifindex)
    flows_fd = clf._flows.map_fd
    before = fdinfo(flows_fd)
    original = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {0})
    try:
        fd = clf.fd("egress")
        verdicts = set()
        for i in range(FLOOD):
            verdicts.add(bpfsys.test_run(fd, frame(i >> 14, 1024 + (i & 0x3FFF), RESPONSE)).retval)
        assert verdicts == {TC_ACT_UNSPEC}
        c = clf.counters()
        assert c["flows_marked"] == FLOOD
        assert c["mirrored_packets"] == FLOOD and c["clone_failures"] == 0
        active = clf.flows()
        assert 0 < len(active) <= MAX_FLOWS
        # The newest flows survived the flood, and a later packet of one is mirrored.
        newest = [FlowKey.from_endpoints("198.18.0.1", 80, f"198.19.{i >> 14 >> 8}.{(i >> 14) & 0xFF}",
                                         1024 + (i & 0x3FFF)) for i in range(FLOOD - 64, FLOOD)]
        assert all(k in active for k in newest)
        i = FLOOD - 1
        ack = frame(i >> 14, 1024 + (i & 0x3FFF), b"", from_server=False)
        assert bpfsys.test_run(clf.fd("ingress"), ack).retval == TC_ACT_UNSPEC
        assert clf.counters()["mirrored_packets"] == FLOOD + 1
    finally:
        os.sched_setaffinity(0, original)
    after = fdinfo(flows_fd)
    assert after["max_entries"] == before["max_entries"] == str(MAX_FLOWS)
    assert after["memlock"] == before["memlock"]
    print(f"flooded {FLOOD} error flows into a {MAX_FLOWS}-entry map: "
          f"{len(active)} resident, {FLOOD - len(active)} evicted")


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
