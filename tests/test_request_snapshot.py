"""The request snapshot and error events (bpf/mirror.c keep_request, report_error)
through BPF_PROG_TEST_RUN: which segments are kept, how much of them, which status lines
count as responses, and what the ring buffer hands to user space (read with bcc's ring
buffer API and decoded by mirror.events, the controller's own decoder)."""
from __future__ import annotations

import pytest

from frames import TCP_ACK, TCP_SYN, tcp4, tcp6
from mirror.abi import COUNTERS, TC_ACT_UNSPEC
from mirror.events.record import HEAD_SIZE, Event, describe_request
from mirror.flowkey import FlowKey

pytestmark = pytest.mark.testrun

SRV4, CLI4 = "198.18.0.80", "198.19.7.10"
SRV6, CLI6 = "2001:db8::80", "2001:db8:7::10"
SPORT, CPORT = 80, 40000
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
ERR500 = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"
OK200 = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


def request(method="GET", target="/orders/7", host="shop.example") -> bytes:
    return (f"{method} {target} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: test\r\n"
            f"Accept: */*\r\n\r\n").encode()


def c2s4(payload=b"", **kw):
    return tcp4(CLI4, CPORT, SRV4, SPORT, payload, **kw)


def s2c4(payload=b"", **kw):
    return tcp4(SRV4, SPORT, CLI4, CPORT, payload, **kw)


def c2s6(payload=b"", **kw):
    return tcp6(CLI6, CPORT, SRV6, SPORT, payload, **kw)


def s2c6(payload=b"", **kw):
    return tcp6(SRV6, SPORT, CLI6, CPORT, payload, **kw)


KEY4 = FlowKey.from_endpoints(CLI4, CPORT, SRV4, SPORT)
KEY6 = FlowKey.from_endpoints(CLI6, CPORT, SRV6, SPORT)


class Ring:
    """The classifier's `events` ring buffer, drained into decoded events."""

    def __init__(self, clf):
        self.clf = clf
        self.records: list[bytes] = []
        clf.on_events(self.records.append)
        self.drain()

    def drain(self) -> list[Event]:
        self.records.clear()
        self.clf.poll_events(0)
        return [Event.from_record(r) for r in self.records]


@pytest.fixture
def snap(clf):
    """The session classifier with the request snapshot on (512 bytes)."""
    clf.set_request_bytes(512)
    return clf


@pytest.fixture
def ring(snap):
    r = Ring(snap)
    try:
        yield r
    finally:
        snap.on_events(None)


def run(clf, frame, direction="egress") -> dict:
    before = clf.counters()
    res = clf.test_run(direction, frame)
    assert res.retval == TC_ACT_UNSPEC and res.data_out == frame
    after = clf.counters()
    return {k: after[k] - before[k] for k in COUNTERS if after[k] != before[k]}


def kept(clf, key) -> bytes | None:
    """The frame bytes the snapshot holds for `key`, or None."""
    t = clf._requests
    try:
        v = t[t.Key.from_buffer_copy(key.to_bytes())]
    except KeyError:
        return None
    raw = bytes(v)
    return raw[HEAD_SIZE:HEAD_SIZE + int.from_bytes(raw[84:88], "little")]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_is_kept(snap, method):
    frame = c2s4(request(method))
    assert run(snap, frame, "ingress").get("requests") == 1
    assert kept(snap, KEY4) == frame


@pytest.mark.parametrize("payload", [
    b"GETX / HTTP/1.1\r\nHost: a\r\n\r\n",      # not a method
    b"get / HTTP/1.1\r\nHost: a\r\n\r\n",       # methods are case-sensitive
    b"GET/ HTTP/1.1\r\nHost: a\r\n\r\n",        # no space after the method
    b"POSTGRES startup message....",
    b"GET / HTTP/1",                            # 12 bytes: shorter than the 13 read
    b"\r\nGET / HTTP/1.1\r\n\r\n",              # not at the start of the payload
], ids=["GETX", "lowercase", "no-space", "POSTGRES", "cut-12-bytes", "not-at-start"])
def test_near_misses_are_not_kept(snap, payload):
    assert "requests" not in run(snap, c2s4(payload), "ingress")
    assert kept(snap, KEY4) is None


@pytest.mark.parametrize("build,key", [(c2s4, KEY4), (c2s6, KEY6)], ids=["ipv4", "ipv6"])
def test_ipv4_and_ipv6(snap, build, key):
    frame = build(request())
    run(snap, frame, "ingress")
    assert kept(snap, key) == frame


def test_vlan_tagged(snap):
    frame = c2s4(request(), vlans=(42,))
    run(snap, frame, "ingress")
    assert kept(snap, KEY4) == frame


@pytest.mark.parametrize("delta", [-1, 0, 1, 200])
def test_snapshot_length_around_the_frame_length(snap, delta):
    frame = c2s4(request())
    snap.set_request_bytes(len(frame) + delta)
    run(snap, frame, "ingress")
    assert kept(snap, KEY4) == frame[:len(frame) + delta]


def test_a_second_request_replaces_the_first(snap):
    run(snap, c2s4(request(target="/first")), "ingress")
    second = c2s4(request(target="/second"))
    run(snap, second, "ingress")
    assert kept(snap, KEY4) == second


def test_status_line_from_the_requesting_side_does_not_count(snap, ring):
    """A client that sends "HTTP/1.1 500" after its own request does not mark its flow."""
    run(snap, c2s4(request()), "ingress")
    moved = run(snap, c2s4(ERR500), "ingress")
    assert moved == {"packets": 1, "ipv4": 1, "tcp": 1, "status_same_dir": 1}
    assert snap.flow_count() == 0 and ring.drain() == []
    # The server's answer, the other way, is a response.
    moved = run(snap, s2c4(ERR500), "egress")
    assert moved["flows_marked"] == 1 and moved["events"] == 1


def test_response_without_a_kept_request_still_counts(snap, ring):
    """A response whose request was not seen (evicted, or sent before the mirror started)
    is still an error: counted apart, marked, reported without a request."""
    moved = run(snap, s2c4(ERR500))
    assert moved["resp_no_request"] == 1 and moved["flows_marked"] == 1
    (ev,) = ring.drain()
    assert ev.request == b"" and ev.request_ns == 0 and ev.status == 500


def test_snapshot_off_keeps_nothing_and_counts_either_side(clf, ring):
    clf.set_request_bytes(0)
    assert "requests" not in run(clf, c2s4(request()), "ingress")
    assert kept(clf, KEY4) is None
    moved = run(clf, c2s4(ERR500), "ingress")      # the old rule: any side marks
    assert moved["flows_marked"] == 1 and "status_same_dir" not in moved
    (ev,) = ring.drain()
    assert ev.request == b""


@pytest.mark.parametrize("build_req,build_resp,key", [(c2s4, s2c4, KEY4), (c2s6, s2c6, KEY6)],
                         ids=["ipv4", "ipv6"])
def test_event_carries_request_and_response(snap, ring, build_req, build_resp, key):
    req = build_req(request("POST", "/pay", "pay.example"))
    run(snap, req, "ingress")
    run(snap, build_resp(ERR500), "egress")
    (ev,) = ring.drain()
    assert (ev.status, ev.direction, ev.new_flow, ev.proto, ev.key) == (500, "egress", True,
                                                                       "h1", key)
    assert ev.request == req and ev.request_frame_len == len(req)
    assert 0 < ev.request_ns <= ev.response_ns
    client, server = (f"{CLI4}:{CPORT}", f"{SRV4}:{SPORT}") if key.family == 4 else \
        (f"[{CLI6}]:{CPORT}", f"[{SRV6}]:{SPORT}")
    assert (ev.client, ev.server) == (client, server)
    assert describe_request(ev.request) == ("POST", "/pay", "pay.example")
    # A second error on the marked flow: an event with new_flow false.
    run(snap, build_resp(ERR500), "egress")
    (again,) = ring.drain()
    assert again.new_flow is False and again.status == 500


def test_no_event_for_a_status_outside_the_trigger_set(snap, ring):
    run(snap, c2s4(request()), "ingress")
    run(snap, s2c4(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"))
    run(snap, s2c4(OK200))
    assert ring.drain() == [] and snap.counters()["events"] == 0


def test_pipelined_requests_report_the_last_one_before_the_response(snap, ring):
    """Two requests in flight (pipelining): the event names the last request start seen
    before the response, which may not be the one the response answers."""
    run(snap, c2s4(request(target="/a")), "ingress")
    run(snap, c2s4(request(target="/b")), "ingress")
    run(snap, s2c4(ERR500))
    (ev,) = ring.drain()
    assert describe_request(ev.request)[1] == "/b"


def test_cut_request_is_described(snap, ring):
    req = c2s4(request(target="/" + "x" * 300))
    snap.set_request_bytes(100)
    run(snap, req, "ingress")
    run(snap, s2c4(ERR500))
    (ev,) = ring.drain()
    assert ev.request == req[:100] and ev.request_frame_len == len(req)
    method, target, host = describe_request(ev.request)
    assert method == "GET" and target.startswith("/xxx") and host is None


def test_syn_unmarks_a_reused_four_tuple(snap, ring):
    run(snap, c2s4(request()), "ingress")
    run(snap, s2c4(ERR500))
    assert snap.flow_count() == 1
    moved = run(snap, c2s4(flags=TCP_SYN), "ingress")
    assert moved == {"packets": 1, "ipv4": 1, "tcp": 1, "syn_unmarked": 1}
    assert snap.flow_count() == 0
    assert "mirrored_packets" not in run(snap, s2c4(flags=TCP_SYN | TCP_ACK))


def test_burst_every_event_delivered_or_counted_lost(snap, ring):
    """50,000 error responses in one go, far more than the ring buffer holds: each is an
    event handed over or an event counted lost, and the program never waits (the test run
    returns)."""
    run(snap, c2s4(request()), "ingress")
    before = snap.counters()
    res = snap.test_run("egress", s2c4(ERR500), repeat=50000)
    assert res.retval == TC_ACT_UNSPEC
    after = snap.counters()
    handed = after["events"] - before["events"]
    lost = after["events_lost"] - before["events_lost"]
    assert handed + lost == 50000 and lost > 0
    assert len(ring.drain()) == handed
