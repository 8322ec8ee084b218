"""End to end: the request that got the error, in the capture and in the event line.

Real nginx in a network namespace, a real `mirror run` with --events-file, tcpdump on the
debug interface and on the monitored one; the pcaps read by dpkt and by tshark, the
events file by json."""
from __future__ import annotations

import json
import re
import socket
import stat
import subprocess
import time
import urllib.request

import pytest

from helpers import (HOOKS, MirrorProcess, controller_ask, env_with, from_first_status,
                     mirrored_packets, request_of, run_cli, same_packets, wait_captured,
                     wait_closed, wait_until)
from mirror.capture.flow import read_flows
from mirror.capture.tcpdump import Tcpdump
from mirror.communityid import of_flow
from mirror.flowkey import FlowKey, endpoint
from mirror.lab.client import send
from mirror.lab.netns import unique_name

pytestmark = pytest.mark.kernel

EVENT_FIELDS = {"time", "time_unix", "iface", "direction", "client", "server",
                "community_id", "method", "target", "host", "status", "response_seconds",
                "new_flow", "proto", "request_bytes", "request_truncated", "capture_cut",
                "budget"}
TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


class Run:
    """`mirror run --events-file` on the host's veth, with both captures."""

    def __init__(self, host, tmp_path, hook="clsact", extra=()):
        self.host, self.tmp = host, tmp_path
        self.debug = unique_name("d")
        self.events_path = tmp_path / "events.jsonl"
        self.state = tmp_path / "state"
        self.mirror = MirrorProcess("--iface", host.host_if, "--debug-iface", self.debug,
                                    "--hook", hook, "--events-file", str(self.events_path),
                                    *extra, env=env_with(MIRROR_STATE_DIR=self.state))

    def __enter__(self):
        self.mirror.start()
        self.before = mirrored_packets(self.state)
        self.dump = Tcpdump(self.debug, str(self.tmp / "mirror.pcap")).start()
        self.ref = Tcpdump(self.host.host_if, str(self.tmp / "ref.pcap")).start()
        return self

    def counters(self) -> dict:
        return controller_ask(self.state, "counters")

    def events(self) -> list[dict]:
        if not self.events_path.exists():
            return []
        return [json.loads(line) for line in self.events_path.read_text().splitlines()]

    def finish(self, expected_events: int):
        """Waits until the controller has written the expected events, the connections
        are closed and tcpdump holds every frame sent to the debug interface (clones and
        request frames), and stops the captures."""
        wait_until(lambda: (len(self.events()) >= expected_events, self.events()),
                   f"{expected_events} events")
        wait_closed(self.host.ns_v4, self.host.ns_v6)
        wait_captured(self.dump, lambda: mirrored_packets(self.state) - self.before,
                      "the clones and the request frames")
        self.dump.stop()
        self.ref.stop()
        return read_flows(str(self.tmp / "mirror.pcap")), read_flows(str(self.tmp / "ref.pcap"))

    def __exit__(self, *exc):
        for d in (getattr(self, "dump", None), getattr(self, "ref", None)):
            if d:
                d.stop()
        assert self.mirror.stop() == 0, self.mirror.output


def tshark_fields(pcap, display_filter: str, *fields: str) -> list[list[str]]:
    # On a raw capture of the debug interface the request frame comes after the
    # response that acknowledges it: with sequence analysis on, tshark takes it for a
    # spurious retransmission and does not dissect it (the sidecar's files are reordered).
    cmd = ["tshark", "-r", str(pcap), "-o", "tcp.analyze_sequence_numbers:FALSE",
           "-Y", display_filter, "-T", "fields"]
    for f in fields:
        cmd += ["-e", f]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [line.split("\t") for line in out.stdout.splitlines() if line]


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("family", [4, 6])
def test_request_of_the_error_is_captured_and_reported(host, nginx, tmp_path, hook, family):
    server, source = (host.ns_v4, host.host_v4) if family == 4 else (host.ns_v6, host.host_v6)
    with Run(host, tmp_path, hook) as r:
        tuple5, statuses = send(server, source, ["/ok", "/ok", "/error", "/ok"])
        _, missing = send(server, source, ["/missing"])
        mirrored, ref = r.finish(expected_events=1)
    assert statuses == [200, 200, 500, 200] and missing == [404]
    key = FlowKey.from_endpoints(*tuple5)
    assert set(mirrored) == {key}
    # The request of the 500, byte for byte as it crossed the interface, then the 500
    # and everything after it; nothing of the two 200 exchanges before.
    want = request_of(ref[key].packets, 500) + from_first_status(ref[key].packets, 500)
    assert same_packets(mirrored[key].packets, want)
    injected = [p for p in mirrored[key].packets if p.payload.startswith(b"GET /error ")]
    assert len(injected) == 1 and injected[0].payload == want[0].payload
    assert sorted(mirrored[key].requests) == ["GET /error HTTP/1.1", "GET /ok HTTP/1.1"]
    # tshark decodes the request frame as HTTP.
    requests = tshark_fields(tmp_path / "mirror.pcap", "http.request", "http.request.method",
                             "http.request.uri", "http.host")
    assert ["GET", "/error", server if family == 4 else f"[{server}]"] in requests
    # One event line, exactly these fields.
    (ev,) = r.events()
    # The workload's attributes (dotted, OpenTelemetry's names) beside the event's own:
    # the test host's network namespace, no container runtime's.
    assert {k for k in ev if "." not in k} == EVENT_FIELDS
    assert {k: v for k, v in ev.items() if "." in k} == {"mirror.netns": host.ns}
    assert TIME_RE.match(ev["time"])
    assert abs(ev["time_unix"] - time.time()) < 3600
    assert ev["community_id"] == of_flow(FlowKey.from_endpoints(*tuple5))
    assert ev["client"] == endpoint(tuple5[0], tuple5[1])
    assert ev["server"] == endpoint(server, 80)
    assert (ev["method"], ev["target"], ev["status"], ev["new_flow"], ev["proto"]) == \
        ("GET", "/error", 500, True, "h1")
    assert ev["host"] == (server if family == 4 else f"[{server}]")
    assert ev["iface"] == host.host_if and ev["direction"] == "ingress"
    assert isinstance(ev["response_seconds"], float) and ev["response_seconds"] > 0
    assert ev["request_truncated"] is False
    # The default budgets, none spent on this short connection.
    assert ev["capture_cut"] == [] and ev["budget"] == {
        "max_packets_per_flow": 1000, "max_bytes_per_flow": 1 << 20,
        "max_clones_per_second": 10000}
    assert stat.S_IMODE(r.events_path.stat().st_mode) == 0o600


def test_self_marking_client_is_not_mirrored(host, nginx, tmp_path):
    """A client that sends a status line of its own after its request does not mark its
    connection: it is the client (its SYN said so), and only the server answers."""
    with Run(host, tmp_path) as r:
        with socket.create_connection((host.ns_v4, 80), timeout=10,
                                      source_address=(host.host_v4, 0)) as s:
            s.sendall(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
            s.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
            answer = s.recv(65536)              # nginx: 400 Bad Request, then closes
        counters = r.counters()
        mirrored, _ = r.finish(expected_events=0)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert counters["status_from_client"] == 1 and counters["flows_marked"] == 0
    assert mirrored == {} and r.events() == []


def test_snapshot_off_keeps_the_old_rule(host, nginx, tmp_path):
    """--request-bytes 0: no request in the capture, and an event without one."""
    with Run(host, tmp_path, extra=("--request-bytes", "0")) as r:
        tuple5, _ = send(host.ns_v4, host.host_v4, ["/error"])
        mirrored, ref = r.finish(expected_events=1)
    key = FlowKey.from_endpoints(*tuple5)
    assert same_packets(mirrored[key].packets, from_first_status(ref[key].packets, 500))
    (ev,) = r.events()
    assert (ev["method"], ev["target"], ev["host"], ev["response_seconds"]) == (None,) * 4


def test_events_command_and_metrics(host, nginx, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with Run(host, tmp_path, extra=("--metrics-addr", f"127.0.0.1:{port}")) as r:
        for _ in range(3):
            send(host.ns_v4, host.host_v4, ["/error"])
        send(host.ns_v4, host.host_v4, ["/ok", "/missing"])
        wait_until(lambda: (len(r.events()) == 3, r.events()), "3 events")
        env = env_with(MIRROR_STATE_DIR=r.state)
        as_json = run_cli("events", "--json", env=env)
        table = run_cli("events", env=env)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        r.finish(expected_events=3)
    assert '"GET /error"' not in table.stdout
    assert as_json.returncode == 0, as_json.stderr
    listed = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert listed == r.events()
    assert table.stdout.count("GET /error") == 3 and "500" in table.stdout
    iface = host.host_if
    errors = [line for line in metrics.splitlines()
              if line.startswith("mirror_error_responses_total{")]
    assert errors == [f'mirror_error_responses_total{{container="",iface="{iface}",'
                      f'namespace="",pod="",proto="h1",status="500"}} 3.0'], errors
    assert "mirror_error_response_seconds_count 3.0" in metrics
    assert 'mirror_error_response_seconds_bucket{le="+Inf"} 3.0' in metrics
    assert "mirror_events_total 3.0" in metrics and "mirror_events_lost_total 0.0" in metrics
