"""The data path under real conditions: GSO super-packets and payloads in page
fragments, and a capture side that stops reading."""
from __future__ import annotations

import re
import signal
import subprocess

import pytest

from helpers import (MirrorProcess, controller_ask, counted_from_now, env_with, mirrored_packets,
                     wait_captured, wait_closed)
from mirror.flowkey import FlowKey
from mirror.lab.client import send
from mirror.lab.netns import unique_name
from mirror.capture.flow import read_flows
from mirror.capture.tcpdump import Tcpdump

pytestmark = pytest.mark.kernel


def test_status_line_in_page_fragments_of_gso_packets(host, nginx, state_dir, tmp_path):
    """/big answers 256 KiB: nginx sends it with sendfile, so the status line and the body
    travel in GSO super-packets whose payload is in page fragments, not in the linear
    part the classifier parses headers from. The status line is still read
    (bpf_skb_load_bytes), the whole super-packets are mirrored, and no packet had its
    headers outside the linear part."""
    dbg = unique_name("d")
    m = MirrorProcess("--iface", host.host_if, "--debug-iface", dbg, "--trigger", "200",
                      env=env_with(MIRROR_STATE_DIR=state_dir)).start()
    dump = Tcpdump(dbg, str(tmp_path / "m.pcap")).start()
    mirrored = counted_from_now(lambda: mirrored_packets(state_dir))
    try:
        tuple5, statuses = send(host.ns_v4, host.host_v4, ["/big"])
        wait_closed(host.ns_v4)
        wait_captured(dump, mirrored, "every clone")
        dump.stop()
        c = controller_ask(state_dir)
    finally:
        dump.stop()
        assert m.stop() == 0, m.output
    assert statuses == [200]
    flow = read_flows(str(tmp_path / "m.pcap"))[FlowKey.from_endpoints(*tuple5)]
    assert flow.statuses == [200]
    body = sum(len(p.payload) for p in flow.packets if p.sport == 80)
    assert body >= 256 * 1024
    assert max(len(p.payload) for p in flow.packets) > 1500     # a GSO super-packet, whole
    assert c["nonlinear"] == 0 and c["malformed"] == 0


def test_capture_not_reading_does_not_hurt_traffic(host, state_dir, tmp_path):
    """Every response is an error, so every packet is cloned, while the capture process
    is stopped (SIGSTOP): its socket buffer overflows and the kernel drops clones there,
    but every request still succeeds and the controller keeps running."""
    from mirror.lab.nginx import Nginx
    srv = Nginx(host, workers=1).start()
    dbg = unique_name("d")
    # Budgets off: every packet of every connection is cloned (8 connections of 2500
    # exchanges each would pass the default per-flow budget).
    m = MirrorProcess("--iface", host.host_if, "--debug-iface", dbg,
                      "--max-packets-per-flow", "0", "--max-bytes-per-flow", "0",
                      "--max-clones-per-second", "0",
                      env=env_with(MIRROR_STATE_DIR=state_dir)).start()
    dump = Tcpdump(dbg, str(tmp_path / "m.pcap")).start()
    mirrored = counted_from_now(lambda: mirrored_packets(state_dir))
    try:
        dump.proc.send_signal(signal.SIGSTOP)
        n = 20000
        out = subprocess.run(["h2load", "--h1", "-n", str(n), "-c", "8", "-m", "1",
                              f"http://{host.ns_v4}/error"], capture_output=True, text=True,
                             timeout=300)
        dump.proc.send_signal(signal.SIGCONT)
        wait_closed(host.ns_v4)
        # Every clone either read by tcpdump or dropped by the kernel for it.
        wait_captured(dump, mirrored, "or drop every clone", lossy=True)
        summary = dump.stop()
        final = dict(dump.stats)
        c = controller_ask(state_dir)
        assert m.proc.poll() is None
    finally:
        dump.proc.send_signal(signal.SIGCONT)
        dump.stop()
        assert m.stop() == 0, m.output
        srv.stop()
    done = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, "
                     r"(\d+) failed, (\d+) errored", out.stdout)
    assert done, out.stdout
    # h2load counts a 5xx answer as "failed"; "errored" are transport errors.
    assert (int(done.group(1)), int(done.group(2)), int(done.group(5))) == (n, n, 0)
    assert re.search(rf"status codes: 0 2xx, 0 3xx, 0 4xx, {n} 5xx", out.stdout), out.stdout
    assert c["flows_marked"] == 8
    assert c["mirrored_packets"] >= 2 * n - 16          # each request and response, at least
    # tcpdump's final counters (its stderr also holds the ones asked for on the way).
    captured, received, dropped = (final[k] for k in ("captured", "received", "dropped"))
    assert dropped > 0, summary                         # the capture side really was full
    # Received: every clone and the request frame of each of the 8 error connections.
    assert c["request_frames_written"] == 8
    assert captured + dropped == received == c["mirrored_packets"] + 8, summary
