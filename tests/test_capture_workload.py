"""The capture's knowledge of where a connection came from: the controller's events file
joined by Community ID (mirror.capture.eventjoin) into the index rows and the extract,
and `mirror capture --extract --namespace/--pod/--container` on a ring of pcap files,
read back by tshark."""
from __future__ import annotations

import json

import dpkt
import pytest

from test_capture import C4, C6, S4, S6, injected_basic  # noqa: F401
from test_capture_record import pcapng_packets, tshark
from helpers import run_cli
from mirror.capture.eventjoin import EventJoin, add_statuses, statuses_of, where_seen
from mirror.capture.flow import Packet
from mirror.capture.index import Indexer, read_index
from mirror.communityid import of_flow

pytestmark = pytest.mark.unit

CHECKOUT = {"k8s.namespace.name": "shop", "k8s.pod.name": "checkout-7d9f",
            "k8s.container.name": "app", "container.runtime.name": "containerd"}
CART = {"k8s.namespace.name": "shop", "k8s.pod.name": "cart-5c4b",
        "k8s.container.name": "app", "container.runtime.name": "containerd"}


def key_of_frames(frames):
    return Packet.decode(1, 0.0, frames[0]).key


def event_of(key, iface, workload, status=500) -> dict:
    cid = of_flow(key)
    return {"time": "2026-01-01T00:00:00.000000Z", "time_unix": 1767225600.0,
            "iface": iface, "community_id": cid, "status": status, "proto": "h1",
            "method": "GET", "target": "/fail?id=7", **workload}


def test_where_seen_names_the_interface_and_a_known_workload():
    assert where_seen({"iface": "veth1", **CHECKOUT, "status": 500}) == {"iface": "veth1",
                                                                        **CHECKOUT}
    assert where_seen({"iface": "veth1", "mirror.workload.state": "pending"}) == {
        "iface": "veth1"}
    assert where_seen({"iface": 7}) == {}


def test_statuses_from_the_events_where_the_capture_read_none():
    """An h2c or gRPC row takes its statuses from the events, gRPC codes apart; an HTTP/1.x
    row keeps the status lines the capture read; a status outside its protocol's codes,
    or not a number, is no status."""
    h2 = [{"proto": "h2", "status": 503}, {"proto": "h2", "status": 500}]
    grpc = [{"proto": "grpc", "status": 14}, {"proto": "grpc", "status": 13},
            {"proto": "grpc", "status": 99}, {"proto": "h2", "status": True}]
    blank = {"status": None, "proto": None, "statuses": [], "grpc_statuses": []}
    assert add_statuses(dict(blank), h2) == {"status": 503, "proto": "h2",
                                             "statuses": [503, 500], "grpc_statuses": []}
    assert add_statuses(dict(blank), grpc) == {
        "status": 14, "proto": "grpc", "grpc_status": "UNAVAILABLE", "statuses": [],
        "grpc_statuses": [14, 13]}
    h1 = {"status": 500, "proto": "h1", "statuses": [500, 200], "grpc_statuses": []}
    assert add_statuses(dict(h1), [{"proto": "h1", "status": 500}]) == h1
    assert add_statuses(dict(blank), [{"status": "500"}]) == blank
    assert statuses_of(h2 + grpc + [h1]) == ({200, 500, 503}, {13, 14})


def test_the_join_reads_the_rotated_file_and_what_is_appended(tmp_path):
    path = tmp_path / "events.jsonl"
    (tmp_path / "events.jsonl.1").write_text(
        json.dumps({"community_id": "1:a", "iface": "veth1", **CHECKOUT}) + "\n")
    path.write_text("not json\n" + json.dumps({"community_id": "1:b", "iface": "veth2"})
                    + "\n")
    joined = EventJoin(str(path))
    joined.refresh()
    assert [e["iface"] for e in joined.of("1:a") + joined.of("1:b")] == ["veth1", "veth2"]
    assert joined.skipped == 1
    with path.open("a") as f:
        f.write(json.dumps({"community_id": "1:c", "iface": "veth3", **CART}) + "\n")
    joined.refresh()
    assert joined.enrich({"community_id": "1:c", "iface": None}) == {
        "community_id": "1:c", "iface": "veth3", **CART}
    assert joined.enrich({"community_id": "1:z", "iface": None}) == {
        "community_id": "1:z", "iface": None}
    joined.close()


def test_index_rows_carry_the_joined_interface_and_workload(tmp_path):
    frames, _ = injected_basic(C4, S4)
    key = key_of_frames(frames)
    events = tmp_path / "events.jsonl"
    events.write_text(json.dumps(event_of(key, "veth9", CHECKOUT)) + "\n")
    pcap = tmp_path / "one.pcap"
    with pcap.open("wb") as f:
        w = dpkt.pcap.Writer(f)
        for n, frame in enumerate(frames):
            w.writepkt(frame, ts=1767225600 + n / 10)
    joined = EventJoin(str(events))
    idx = Indexer(tmp_path / "index.jsonl", enrich=joined.enrich)
    idx.add_file(pcap)
    assert idx.flush(final=True) == 1
    [row] = read_index(tmp_path / "index.jsonl")
    assert row["iface"] == "veth9" and row["k8s.pod.name"] == "checkout-7d9f"
    assert row["community_id"] == of_flow(key)


def ring_of_two(tmp_path):
    """A capture directory as the sidecar leaves it: one ring file holding two error
    connections (an IPv4 one and an IPv6 one), and an index whose rows name the first
    connection's pod (the sidecar joined the events file) and not the second's."""
    cap = tmp_path / "cap"
    cap.mkdir()
    a, _ = injected_basic(C4, S4)
    b, _ = injected_basic(C6, S6, cport=40001)
    with (cap / "mirror-20260101T000000Z-r1.pcap0").open("wb") as f:
        w = dpkt.pcap.Writer(f)
        for n, frame in enumerate(a + b):
            w.writepkt(frame, ts=1767225600 + n / 10)
    idx = Indexer(cap / "index.jsonl", enrich=lambda r: {
        **r, **({"iface": "veth-a", **CHECKOUT} if r["community_id"] == of_flow(
            key_of_frames(a)) else {})})
    idx.add_file(cap / "mirror-20260101T000000Z-r1.pcap0")
    idx.flush(final=True)
    return cap, key_of_frames(a), key_of_frames(b)


def keys_in(path):
    return {Packet.decode(1, 0.0, buf).key for _, buf in pcapng_packets(path.read_bytes())}


def test_extract_by_workload_from_the_index(tmp_path):
    cap, a, b = ring_of_two(tmp_path)
    out = tmp_path / "checkout.pcapng"
    r = run_cli("capture", "--extract", "--dir", str(cap), "-n", "shop", "--pod",
                "checkout-*", "-w", str(out))
    assert r.returncode == 0, r.stderr
    assert keys_in(out) == {a}
    rows = tshark(out, "-Y", "http.response", "-T", "fields", "-e", "http.response.code",
                  "-e", "http.response_for.uri", "-e", "frame.interface_name",
                  "-e", "frame.comment")
    assert [(code, uri.endswith("/fail?id=7"), iface) for code, uri, iface, _ in rows] == [
        ("500", True, "veth-a")]
    assert "on veth-a (shop/checkout-7d9f (app))" in rows[0][3], rows
    none = tmp_path / "none.pcapng"
    r = run_cli("capture", "--extract", "--dir", str(cap), "--container", "db", "-w",
                str(none))
    assert r.returncode == 1 and not none.exists(), r.stderr


def test_extract_by_workload_from_the_events_file(tmp_path):
    """The second connection's pod is not in the index; the controller's events file,
    given to the extract, names it."""
    cap, a, b = ring_of_two(tmp_path)
    events = tmp_path / "events.jsonl"
    events.write_text(json.dumps(event_of(b, "veth-b", CART)) + "\n")
    out = tmp_path / "cart.pcapng"
    r = run_cli("capture", "--extract", "--dir", str(cap), "--pod", "cart-*",
                "--events-file", str(events), "-w", str(out))
    assert r.returncode == 0, r.stderr
    assert keys_in(out) == {b}
    without = run_cli("capture", "--extract", "--dir", str(cap), "--pod", "cart-*", "-w",
                      str(tmp_path / "no.pcapng"))
    assert without.returncode == 1 and "no connection" in without.stderr
