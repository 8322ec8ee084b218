"""The statuses of h2c and gRPC connections in the capture: the index rows, `mirror capture
--list` and `--extract --status`, on real traffic.

The capture reads HTTP/1.x status lines itself, but not an h2c :status or a gRPC
grpc-status (HPACK-coded); the controller reads those and says each in an error event, and
the sidecar takes them from its events file joined by Community ID
(mirror.capture.eventjoin). Here: a hyper-h2 server answering 500 on one connection and
200 then 404 on another, a grpcio server answering UNAVAILABLE (14) on one connection and
INTERNAL (13) on another, a real `mirror run --trigger 404,500,grpc:13,14 --events-file`,
a real capture sidecar joining that file; the extracts are read back with tshark. Every
connection is in the ring, so that a selection leaving one out is a choice, not an
absence. (Not 200 in the trigger: a gRPC response's :status is 200, which would then mark
the connection before its grpc-status is read.)"""
from __future__ import annotations

import json

import pytest

from helpers import (MirrorProcess, controller_ask, drop_link, env_with, run_cli,
                     wait_closed, wait_until)
from test_capture import capture_proc  # noqa: F401 (the fixture)
from test_capture_record import pcapng_packets, tshark
from test_grpc_live import PORT as GRPC_PORT, Server as GrpcServer, client as grpc_client
from test_http2_live import PORT as H2_PORT, Server as H2Server, nghttp
from mirror.capture.annotate import event_key
from mirror.capture.flow import Packet
from mirror.capture.index import read_index
from mirror.communityid import of_flow
from mirror.lab.netns import unique_name

pytestmark = pytest.mark.kernel

TRIGGER = "404,500,grpc:13,14"


@pytest.fixture
def servers(host):
    h2 = H2Server(host, "hyper-h2").start()
    try:
        grpc = GrpcServer(host, "grpcio").start()
        try:
            yield
        finally:
            grpc.stop()
    finally:
        h2.stop()


def ids_in(path) -> set[str]:
    """The Community IDs of the connections in a pcapng file."""
    return {of_flow(Packet.decode(1, 0.0, buf).key)
            for _, buf in pcapng_packets(path.read_bytes())}


def extract(cap_dir, tmp_path, name: str, *args: str) -> set[str]:
    out = tmp_path / f"{name}.pcapng"
    r = run_cli("capture", "--extract", "--dir", str(cap_dir), *args, "-w", str(out))
    assert r.returncode == 0, r.stderr
    return ids_in(out)


def test_h2c_and_grpc_statuses_from_the_events(host, servers, capture_proc,  # noqa: F811
                                               tmp_path):
    debug = unique_name("d")
    state, cap_dir = tmp_path / "state", tmp_path / "cap"
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o700)
    events_file = logs / "events.jsonl"
    env = env_with(MIRROR_STATE_DIR=state)
    cap = capture_proc(debug, cap_dir, "--events-file", str(events_file))
    mirror = None
    try:
        assert cap.wait_state("waiting"), cap.stop_output()
        mirror = MirrorProcess("--iface", host.host_if, "--debug-iface", debug, "--trigger",
                               TRIGGER, "--events-file", str(events_file), env=env).start()
        assert cap.wait_state("capturing"), cap.stop_output()
        nghttp(host, 4, [500])
        nghttp(host, 4, [200, 404])
        grpc_client(host, 4, ["Call:14"])
        grpc_client(host, 4, ["Call:13"])
        wait_closed(host.ns_v4, port=H2_PORT)
        wait_closed(host.ns_v4, port=GRPC_PORT)
        wait_until(lambda: ((c := controller_ask(state))["events_read"] >= c["events"], c),
                   "every event read")
        wait_until(lambda: (cap.status().get("flows_indexed", 0) >= 4, cap.status()),
                   "the four connections in the index")

        events = [json.loads(line) for line in
                  run_cli("events", "--json", env=env).stdout.splitlines()]
        by_port = {}
        for e in events:
            by_port.setdefault((event_key(e).port_hi if event_key(e) else None,
                                e["proto"], e["status"]), e["community_id"])
        h2_500 = by_port[(H2_PORT, "h2", 500)]
        h2_404 = by_port[(H2_PORT, "h2", 404)]
        grpc_14 = by_port[(GRPC_PORT, "grpc", 14)]
        grpc_13 = by_port[(GRPC_PORT, "grpc", 13)]
        assert len({h2_500, h2_404, grpc_14, grpc_13}) == 4, events

        # The index rows: the statuses the capture could not read, from the events.
        rows = {r["community_id"]: r for r in read_index(cap_dir / "index.jsonl")}
        assert (rows[h2_500]["proto"], rows[h2_500]["status"], rows[h2_500]["statuses"]) \
            == ("h2", 500, [500]), rows[h2_500]
        assert rows[h2_404]["statuses"] == [404], rows[h2_404]
        assert (rows[grpc_14]["proto"], rows[grpc_14]["status"], rows[grpc_14]["grpc_status"],
                rows[grpc_14]["grpc_statuses"], rows[grpc_14]["statuses"]) == \
            ("grpc", 14, "UNAVAILABLE", [14], []), rows[grpc_14]
        listed = run_cli("capture", "--list", "--dir", str(cap_dir))
        assert listed.returncode == 0, listed.stderr
        line_of = {cid: next(line for line in listed.stdout.splitlines() if cid in line)
                   for cid in (h2_500, h2_404, grpc_14)}
        assert line_of[h2_500].split()[3] == "500", listed.stdout
        assert line_of[grpc_14].split()[3] == "grpc:14", listed.stdout

        # The extracts, from the index rows (no events file given to them)...
        assert extract(cap_dir, tmp_path, "5xx", "--status", "5xx") == {h2_500}
        assert extract(cap_dir, tmp_path, "500", "--status", "500") == {h2_500}
        assert extract(cap_dir, tmp_path, "grpc14", "--status", "grpc:14") == {grpc_14}
        assert extract(cap_dir, tmp_path, "404", "--status", "4xx") == {h2_404}
        assert extract(cap_dir, tmp_path, "grpc13", "--status", "grpc:internal") == {grpc_13}
        # ... and from the events file, the same.
        assert extract(cap_dir, tmp_path, "both", "--status", "500,grpc:unavailable",
                       "--events-file", str(events_file)) == {h2_500, grpc_14}
        none = run_cli("capture", "--extract", "--dir", str(cap_dir), "--status", "503,grpc:2",
                       "-w", str(tmp_path / "none.pcapng"))
        assert none.returncode == 1 and not (tmp_path / "none.pcapng").exists(), none.stderr

        # What tshark reads in them: the h2c 500, and the gRPC call's grpc-status 14.
        statuses = tshark(tmp_path / "5xx.pcapng", "-d", f"tcp.port=={H2_PORT},http2", "-Y",
                          "http2.headers.status", "-T", "fields", "-e", "http2.headers.status")
        assert [row[0] for row in statuses] == ["500"], statuses
        headers = tshark(tmp_path / "grpc14.pcapng", "-d", f"tcp.port=={GRPC_PORT},http2",
                         "-Y", "http2.header.name", "-T", "fields", "-e", "http2.header.name",
                         "-e", "http2.header.value")
        pairs = [pair for names, values in headers
                 for pair in zip(names.split(","), values.split(","))]
        assert ("grpc-status", "14") in pairs, headers
        assert cap.stop() == 0, cap.output
    finally:
        cap.stop()
        if mirror is not None:
            assert mirror.stop() == 0, mirror.output
        drop_link(debug)
