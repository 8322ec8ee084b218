"""The Prometheus endpoint reports what the traffic was: responses by class, flows
marked and packets mirrored, matching the requests sent and the capture."""
from __future__ import annotations

import re
import socket
import subprocess
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import (MirrorProcess, controller_ask, counted_from_now, env_with, mirrored_packets,
                     wait_captured, wait_closed, wait_until)
from mirror.lab.client import send
from mirror.lab.netns import unique_name
from mirror.capture.flow import read_packets
from mirror.capture.tcpdump import Tcpdump

pytestmark = pytest.mark.kernel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[tuple, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_match_traffic(host, nginx, state_dir, tmp_path):
    port = free_port()
    dbg = unique_name("d")
    m = MirrorProcess("--iface", host.host_if, "--debug-iface", dbg,
                      "--metrics-addr", f"127.0.0.1:{port}",
                      env=env_with(MIRROR_STATE_DIR=state_dir)).start()
    dump = Tcpdump(dbg, str(tmp_path / "m.pcap")).start()
    mirrored = counted_from_now(lambda: mirrored_packets(state_dir))
    try:
        sent = {"/ok": 3, "/missing": 2, "/error": 4}
        for path, n in sent.items():
            for i in range(n):
                server, source = ((host.ns_v4, host.host_v4) if i % 2 else
                                  (host.ns_v6, host.host_v6))
                send(server, source, [path])
        wait_closed(host.ns_v4, host.ns_v6)
        wait_captured(dump, mirrored, "every clone")
        dump.stop()
        metrics = scrape(port)
    finally:
        dump.stop()
        assert m.stop() == 0, m.output

    def resp(direction, cls):
        labels = (("class", cls), ("container", ""), ("direction", direction),
                  ("iface", host.host_if), ("namespace", ""), ("pod", ""),
                  ("proto", "h1"))
        return metrics[("mirror_http_responses_total", labels)]

    # Responses travel server -> client: they reach the host side's ingress hook.
    assert [resp("ingress", c) for c in ("1xx", "2xx", "3xx", "4xx", "5xx", "other")] == \
        [0, 3, 0, 2, 4, 0]
    assert all(resp("egress", c) == 0 for c in ("2xx", "4xx", "5xx"))
    assert metrics[("mirror_flows_marked_total", ())] == 4
    captured = len(read_packets(str(tmp_path / "m.pcap")))
    assert captured > 0
    # The capture holds the kernel's clones and, for each error connection, the request
    # frame the controller wrote from the request snapshot.
    assert metrics[("mirror_request_frames_written_total", ())] == 4
    assert metrics[("mirror_mirrored_packets_total", ())] + 4 == captured
    by_iface = sum(v for (name, labels), v in metrics.items()
                   if name == "mirror_iface_mirrored_packets_total")
    assert by_iface + 4 == captured
    # The host's test namespace is no container runtime's: no namespace, pod, container.
    assert metrics[("mirror_error_responses_total", (
        ("container", ""), ("iface", host.host_if), ("namespace", ""), ("pod", ""),
        ("proto", "h1"), ("status", "500")))] == 4
    assert metrics[("mirror_error_response_seconds_count", ())] == 4
    assert metrics[("mirror_clone_failures_total", ())] == 0
    assert metrics[("mirror_flows_active", ())] == 4
    assert metrics[("mirror_interfaces_attached", ())] == 1


def test_an_error_burst_is_counted_exactly(host, nginx, state_dir, tmp_path):
    """50,000 error responses from a real nginx, as fast as h2load asks for them: the
    scraped mirror_error_responses_total says 50,000, and every one of them is an event
    delivered, held back by a bound, or counted lost (the kernel counts each)."""
    total = 50_000
    port = free_port()
    m = MirrorProcess("--iface", host.host_if, "--debug-iface", unique_name("d"),
                      "--metrics-addr", f"127.0.0.1:{port}",
                      "--events-file", str(tmp_path / "events.jsonl"),
                      env=env_with(MIRROR_STATE_DIR=state_dir)).start()
    try:
        out = subprocess.run(["h2load", "--h1", "-n", str(total), "-c", "8", "-m", "1",
                              f"http://{host.ns_v4}/error"],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout[-800:] + out.stderr
        assert re.search(rf"status codes: 0 2xx, 0 3xx, 0 4xx, {total} 5xx", out.stdout), \
            out.stdout[-800:]
        wait_closed(host.ns_v4)
        c = wait_until(lambda: ((c := controller_ask(state_dir))["events_read"]
                                >= c["events"], c), "every event read")
        metrics = scrape(port)
    finally:
        assert m.stop() == 0, m.output
    assert metrics[("mirror_error_responses_total", (
        ("container", ""), ("iface", host.host_if), ("namespace", ""), ("pod", ""),
        ("proto", "h1"), ("status", "500")))] == total
    assert c["errors"] == total
    assert (c["events"] + c["events_rate_limited"] + c["events_conn_limited"] +
            c["events_lost"]) == total
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert len(lines) == c["events"] > 0
