"""The classifier's connection state (bpf/mirror.c: struct conn) through BPF_PROG_TEST_RUN:
which side is the client and who may therefore mark a connection, the request kept for
it, the error events and their bounds, the error counts, and every hostile case of issue
"One connection state in the kernel": a client's status line or HTTP/2 :status, a lone
spoofed segment either way, a spoofed server segment travelling the client's way, a
4-tuple reused after a request with a secret, two interfaces with the same addresses, a
packet seen at two monitored hooks, a monitored lo.

Events are read with bcc's ring buffer API and decoded by mirror.events.record, the
controller's own decoder. HTTP/2 frames come from the independent `hpack` and `hyperframe`
encoders. Unless a test says otherwise the client's packets pass the ingress hook and the
server's the egress hook, as on a host-side veth whose container is the server."""
from __future__ import annotations

import pytest
from hpack import Encoder
from hyperframe.frame import HeadersFrame

from frames import TCP_ACK, TCP_FIN, TCP_SYN, tcp4, tcp6
from helpers import next_coarse_tick
from mirror.abi import COUNTERS, KEPT_REQUEST_HEAD, TC_ACT_UNSPEC
from mirror.bpfsys import batch_lookup
from mirror.events.record import HEAD_SIZE, Event, describe_request
from mirror.flowkey import FlowKey

pytestmark = pytest.mark.testrun

LO = 1
SRV4, CLI4 = "198.18.0.80", "198.19.7.10"
SRV6, CLI6 = "2001:db8::80", "2001:db8:7::10"
SPORT, CPORT = 80, 40000
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
ERR500 = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"
ERR503 = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
OK200 = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
BASE4 = {"packets": 1, "ipv4": 1, "tcp": 1}
BASE6 = {"packets": 1, "ipv6": 1, "tcp": 1}


def request(method="GET", target="/orders/7", host="shop.example", extra="") -> bytes:
    return (f"{method} {target} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: test\r\n{extra}"
            f"Accept: */*\r\n\r\n").encode()


class Conn:
    """One test connection: its frames each way and the key."""

    def __init__(self, family=4, cport=CPORT, cli=None, srv=None, sport=SPORT):
        self.family = family
        self.tcp = tcp4 if family == 4 else tcp6
        self.cli = cli or (CLI4 if family == 4 else CLI6)
        self.srv = srv or (SRV4 if family == 4 else SRV6)
        self.cport, self.sport = cport, sport
        self.key = FlowKey.from_endpoints(self.cli, cport, self.srv, sport)
        self.base = BASE4 if family == 4 else BASE6

    def c2s(self, payload=b"", **kw) -> bytes:
        return self.tcp(self.cli, self.cport, self.srv, self.sport, payload, **kw)

    def s2c(self, payload=b"", **kw) -> bytes:
        return self.tcp(self.srv, self.sport, self.cli, self.cport, payload, **kw)

    def moved(self, **kw) -> dict:
        return {**self.base, **kw}


def run(clf, frame, direction, **ctx) -> dict:
    """Runs one frame; asserts the pass verdict and the packet untouched; returns the
    counters that moved."""
    before = clf.counters()
    res = clf.test_run(direction, frame, **ctx)
    assert res.retval == TC_ACT_UNSPEC and res.data_out == frame
    after = clf.counters()
    return {k: after[k] - before[k] for k in COUNTERS if after[k] != before[k]}


def open_conn(clf, c: Conn, client_dir="ingress", **ctx) -> None:
    """The client's SYN, the server's SYN-ACK."""
    server_dir = "egress" if client_dir == "ingress" else "ingress"
    run(clf, c.c2s(flags=TCP_SYN), client_dir, **ctx)
    run(clf, c.s2c(flags=TCP_SYN | TCP_ACK), server_dir, **ctx)


def kept(clf, key: FlowKey, ifindex: int = LO) -> bytes | None:
    """The request bytes kept for the connection, or None."""
    for r in clf.kept_requests().values():
        if r["flow"] == key and r["ifindex"] == ifindex:
            return bytes(r["data"])
    return None


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
    """The session classifier keeping 512 bytes of each request."""
    clf.set_request_bytes(512)
    return clf


@pytest.fixture
def ring(snap):
    r = Ring(snap)
    try:
        yield r
    finally:
        snap.on_events(None)


def h2_headers(fields, stream=1, end_stream=False) -> bytes:
    f = HeadersFrame(stream)
    f.data = Encoder().encode(fields)
    f.flags.add("END_HEADERS")
    if end_stream:
        f.flags.add("END_STREAM")
    return f.serialize()


H2_500 = h2_headers([(":status", "500"), ("server", "test")])
H2_REQUEST = h2_headers([(":method", "GET"), (":path", "/x"), (":scheme", "http"),
                         (":authority", "a")], end_stream=True)


# --- the request kept -----------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_every_method_is_kept(snap, method):
    c = Conn()
    open_conn(snap, c)
    frame = c.c2s(request(method))
    assert run(snap, frame, "ingress") == c.moved(requests=1)
    assert kept(snap, c.key) == frame


@pytest.mark.parametrize("payload", [
    b"GETX / HTTP/1.1\r\nHost: a\r\n\r\n",      # not a method
    b"get / HTTP/1.1\r\nHost: a\r\n\r\n",       # methods are case-sensitive
    b"GET/ HTTP/1.1\r\nHost: a\r\n\r\n",        # no space after the method
    b"POSTGRES startup message....",
    b"GET / HTTP/1",                            # 12 bytes: shorter than the 13 read
    b"\r\nGET / HTTP/1.1\r\n\r\n",              # not at the start of the payload
], ids=["GETX", "lowercase", "no-space", "POSTGRES", "cut-12-bytes", "not-at-start"])
def test_near_misses_are_not_kept(snap, payload):
    c = Conn()
    open_conn(snap, c)
    assert "requests" not in run(snap, c.c2s(payload), "ingress")
    assert kept(snap, c.key) is None


@pytest.mark.parametrize("family", [4, 6])
def test_ipv4_ipv6_and_vlan(snap, family):
    c = Conn(family)
    open_conn(snap, c)
    frame = c.c2s(request(), vlans=(42,))
    run(snap, frame, "ingress")
    assert kept(snap, c.key) == frame


@pytest.mark.parametrize("delta", [-1, 0, 1, 200])
def test_kept_length_around_the_frame_length(snap, delta):
    c = Conn()
    open_conn(snap, c)
    frame = c.c2s(request())
    snap.set_request_bytes(len(frame) + delta)
    run(snap, frame, "ingress")
    assert kept(snap, c.key) == frame[:len(frame) + delta]


def test_a_second_request_replaces_the_first(snap):
    c = Conn()
    open_conn(snap, c)
    run(snap, c.c2s(request(target="/first")), "ingress")
    second = c.c2s(request(target="/second"))
    run(snap, second, "ingress")
    assert kept(snap, c.key) == second


def test_request_bytes_zero_keeps_nothing_and_the_side_still_counts(snap, ring):
    """With no request kept, which side is the client still decides what counts."""
    snap.set_request_bytes(0)
    c = Conn()
    open_conn(snap, c)
    assert "requests" not in run(snap, c.c2s(request()), "ingress")
    assert kept(snap, c.key) is None
    assert run(snap, c.c2s(ERR500), "ingress") == c.moved(status_from_client=1)
    moved = run(snap, c.s2c(ERR500), "egress")
    assert moved["flows_marked"] == 1 and moved["resp_no_request"] == 1
    (ev,) = ring.drain()
    assert ev.request == b""


# --- events ----------------------------------------------------------------------------

@pytest.mark.parametrize("family", [4, 6])
def test_event_carries_request_and_response(snap, ring, family):
    c = Conn(family)
    open_conn(snap, c)
    req = c.c2s(request("POST", "/pay", "pay.example"))
    run(snap, req, "ingress")
    moved = run(snap, c.s2c(ERR500), "egress")
    assert moved == c.moved(responses=1, resp_5xx=1, flows_marked=1, events=1, errors=1,
                            mirrored_packets=1, mirrored_bytes=len(c.s2c(ERR500)))
    (ev,) = ring.drain()
    assert (ev.status, ev.direction, ev.new_flow, ev.proto, ev.key) == (500, "egress", True,
                                                                       "h1", c.key)
    assert ev.request == req and ev.request_frame_len == len(req)
    assert 0 < ev.request_ns <= ev.response_ns
    client = f"{c.cli}:{CPORT}" if family == 4 else f"[{c.cli}]:{CPORT}"
    assert ev.client == client
    assert describe_request(ev.request) == ("POST", "/pay", "pay.example")
    # A second error on the marked connection: an event with new_flow false.
    run(snap, c.s2c(ERR503), "egress")
    (again,) = ring.drain()
    assert again.new_flow is False and again.status == 503
    assert snap.errors() == {(LO, 500, "h1"): 1, (LO, 503, "h1"): 1}
    buckets, seconds = snap.response_times()
    assert sum(buckets) == 2 and seconds > 0


def test_no_event_for_a_status_outside_the_trigger_set(snap, ring):
    c = Conn()
    open_conn(snap, c)
    run(snap, c.c2s(request()), "ingress")
    run(snap, c.s2c(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"), "egress")
    run(snap, c.s2c(OK200), "egress")
    assert ring.drain() == [] and snap.counters()["events"] == 0 and snap.errors() == {}


def test_pipelined_requests_report_the_last_one_before_the_response(snap, ring):
    """Two requests in flight (pipelining): the event names the last request start seen
    before the response, which may not be the one the response answers."""
    c = Conn()
    open_conn(snap, c)
    run(snap, c.c2s(request(target="/a")), "ingress")
    run(snap, c.c2s(request(target="/b")), "ingress")
    run(snap, c.s2c(ERR500), "egress")
    (ev,) = ring.drain()
    assert describe_request(ev.request)[1] == "/b"


def test_cut_request_is_described(snap, ring):
    c = Conn()
    open_conn(snap, c)
    req = c.c2s(request(target="/" + "x" * 300))
    snap.set_request_bytes(100)
    run(snap, req, "ingress")
    run(snap, c.s2c(ERR500), "egress")
    (ev,) = ring.drain()
    assert ev.request == req[:100] and ev.request_frame_len == len(req)
    method, target, host = describe_request(ev.request)
    assert method == "GET" and target.startswith("/xxx") and host is None


def padded_request(c: Conn, frame_len: int) -> bytes:
    """A request frame of exactly `frame_len` bytes (an extra header pads it)."""
    short = c.c2s(request(target="/", host="a", extra="X-Pad: \r\n"))
    assert frame_len >= len(short)
    pad = "p" * (frame_len - len(short))
    return c.c2s(request(target="/", host="a", extra=f"X-Pad: {pad}\r\n"))


def event_request_room(clf, c: Conn, req: bytes, ring: Ring) -> tuple[int, bytes]:
    """Opens `c`, runs `req` and a 500; returns the room the event's record
    gave the request (its size past the head) and the request it carried."""
    open_conn(clf, c)
    run(clf, req, "ingress")
    run(clf, c.s2c(ERR500), "egress")
    ring.drain()
    (raw,) = ring.records
    return len(raw) - HEAD_SIZE, Event.from_record(raw).request


@pytest.mark.parametrize("frame_len,room", [
    (121, 128), (128, 128), (129, 256), (256, 256), (257, 384), (384, 384), (385, 512),
    (512, 512), (900, 512)])
def test_an_event_carries_its_request_in_the_smallest_step_that_holds_it(
        snap, ring, frame_len, room):
    """The request travels in a step of 128, 256, 384 or the whole REQUEST_BYTES (512
    here), not always in the whole: an event copies what its request needs. The same
    4-tuple (the same requests entry) kept a longer request before, whose bytes lie past
    this one's length within the step: the event's request_len is this request's, so
    the decoded request is exactly it."""
    c = Conn()
    event_request_room(snap, c, padded_request(c, 512), ring)
    req = padded_request(c, frame_len)
    assert event_request_room(snap, c, req, ring) == (room, req[:512])


@pytest.mark.parametrize("capacity", [8, 64, 4096])
def test_every_compiled_request_size_loads_and_reports_whole_requests(capacity):
    """--request-bytes sets REQUEST_BYTES at compile time, and with it which steps exist
    (none at 64, all at 4096): each program passes the verifier and reports a request of
    each size whole, up to the capacity, in the smallest step that holds it (frames up
    to 3500 bytes: BPF_PROG_TEST_RUN takes no more than a page, less its head and tail
    room)."""
    from mirror.bpfprog import Classifier
    clf = Classifier(max_flows=64, request_bytes=capacity)
    try:
        clf.set_trigger(frozenset(range(500, 600)))
        ring = Ring(clf)
        steps = [n for n in (128, 256, 384, 512, 1024, 2048) if n < capacity] + [capacity]
        for i, frame_len in enumerate((125, 200, 300, 500, 1000, 1024, 1025, 1500, 2048,
                                       2049, 3500)):
            c = Conn(cport=CPORT + i)
            req = padded_request(c, frame_len)
            room, carried = event_request_room(clf, c, req, ring)
            want = min(frame_len, capacity)
            assert carried == req[:want]
            assert room == min(n for n in steps if n >= want), (frame_len, room)
        clf.on_events(None)
    finally:
        clf.bpf.cleanup()        # bcc closes the programs and maps


def test_events_per_connection_are_bounded(snap, ring):
    """At most max_events_per_conn events for one connection; every error still counts."""
    snap.set_event_limits(per_conn=3)
    c = Conn()
    open_conn(snap, c)
    moved = [run(snap, c.s2c(ERR500), "egress") for _ in range(5)]
    assert [m.get("events", 0) for m in moved] == [1, 1, 1, 0, 0]
    assert [m.get("events_conn_limited", 0) for m in moved] == [0, 0, 0, 1, 1]
    assert len(ring.drain()) == 3 and snap.errors() == {(LO, 500, "h1"): 5}
    # A new connection on the same 4-tuple has its own share.
    open_conn(snap, c)
    assert run(snap, c.s2c(ERR500), "egress")["events"] == 1


def test_events_per_cpu_window_are_bounded(snap, ring, pinned):
    """At most max_events_per_window events per CPU in a window no test outlasts."""
    snap.set_budgets(window_ns=1 << 62)
    snap.set_event_limits(per_window=4, per_conn=0)
    held = 0
    for port in range(41000, 41006):
        c = Conn(cport=port)
        open_conn(snap, c)
        held += run(snap, c.s2c(ERR500), "egress").get("events_rate_limited", 0)
    assert held == 2 and len(ring.drain()) == 4
    assert snap.errors() == {(LO, 500, "h1"): 6}


def test_burst_every_error_counted_and_every_event_delivered_suppressed_or_lost(snap, ring):
    """50,000 error responses in one go: the error count is exact, and each is an event
    handed over, held back by a bound, or counted lost (the ring buffer is far smaller);
    the program never waits (the test run returns)."""
    snap.set_event_limits(per_window=0, per_conn=0)
    c = Conn()
    open_conn(snap, c)
    run(snap, c.c2s(request()), "ingress")
    before = snap.counters()
    res = snap.test_run("egress", c.s2c(ERR500), repeat=50000)
    assert res.retval == TC_ACT_UNSPEC
    after = snap.counters()
    moved = {k: after[k] - before[k] for k in ("events", "events_lost", "events_rate_limited",
                                               "events_conn_limited", "errors")}
    assert moved["errors"] == 50000 and snap.errors() == {(LO, 500, "h1"): 50000}
    assert (moved["events"] + moved["events_lost"] + moved["events_rate_limited"] +
            moved["events_conn_limited"]) == 50000 and moved["events_lost"] > 0
    assert len(ring.drain()) == moved["events"]
    # With the default bound per connection: 10 events, the rest held back.
    snap.set_event_limits(per_window=0)
    open_conn(snap, c)
    before = snap.counters()
    snap.test_run("egress", c.s2c(ERR500), repeat=50000)
    after = snap.counters()
    assert after["events"] - before["events"] == 10
    assert after["events_conn_limited"] - before["events_conn_limited"] == 49990
    assert after["errors"] - before["errors"] == 50000


# --- which side is the client -----------------------------------------------------------

@pytest.mark.parametrize("family", [4, 6])
def test_a_clients_status_line_never_counts(snap, ring, family):
    """After its SYN (or its request), a client sending "HTTP/1.1 500" does not mark its
    connection, count a response or an error, or emit an event."""
    c = Conn(family)
    open_conn(snap, c)
    assert run(snap, c.c2s(ERR500), "ingress") == c.moved(status_from_client=1)
    run(snap, c.c2s(request()), "ingress")
    assert run(snap, c.c2s(ERR500), "ingress") == c.moved(status_from_client=1)
    assert snap.flows() == {} and ring.drain() == [] and snap.errors() == {}
    # The server's answer is a response.
    moved = run(snap, c.s2c(ERR500), "egress")
    assert moved["flows_marked"] == 1 and moved["events"] == 1


@pytest.mark.parametrize("family", [4, 6])
def test_a_clients_first_bytes_as_a_status_line_do_not_count(snap, ring, family):
    c = Conn(family)
    run(snap, c.c2s(flags=TCP_SYN), "ingress")
    assert run(snap, c.c2s(ERR500), "ingress") == c.moved(status_from_client=1)
    assert snap.flows() == {} and ring.drain() == []


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("direction", ["ingress", "egress"])
def test_a_lone_spoofed_segment_never_counts(snap, ring, family, direction):
    """No state for the connection (no SYN, no request seen): a status in either
    direction counts apart, creates no state, marks nothing."""
    c = Conn(family)
    for frame in (c.s2c(ERR500), c.c2s(ERR500)):
        assert run(snap, frame, direction) == c.moved(status_side_unknown=1)
    assert snap.conn_count() == 0 and snap.flows() == {} and ring.drain() == []


def test_a_spoofed_server_segment_the_clients_way_does_not_count(snap, ring):
    """A segment with the server's addresses that travels the client's way (injected from
    the client's side of the interface) is not the server's."""
    c = Conn()
    open_conn(snap, c)
    assert run(snap, c.s2c(ERR500), "ingress") == c.moved(status_from_client=1)
    assert snap.flows() == {} and ring.drain() == []


def test_a_syn_ack_alone_names_no_side(snap, ring):
    """The SYN went unseen: the SYN-ACK makes no state (anyone may send one); the
    connection's next request tells the client, as for one open before the attach."""
    c = Conn()
    assert run(snap, c.s2c(flags=TCP_SYN | TCP_ACK), "egress") == c.moved()
    assert snap.conn_count() == 0
    assert run(snap, c.s2c(ERR500), "egress") == c.moved(status_side_unknown=1)
    run(snap, c.c2s(request()), "ingress")
    assert run(snap, c.s2c(ERR500), "egress")["flows_marked"] == 1


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("payload", [ERR500, H2_500], ids=["h1", "h2"])
def test_a_clients_own_syn_ack_does_not_make_it_the_server(snap, ring, family, payload):
    """A client sends a SYN-ACK of its own on its connection (a raw socket), then a
    status: it would name the server as the client. Nothing counts, marks or reports,
    and the server's own statuses still do."""
    c = Conn(family, sport=8080 if payload is H2_500 else SPORT)
    open_conn(snap, c)
    if payload is H2_500:
        run(snap, c.c2s(PREFACE), "ingress")
    assert run(snap, c.c2s(flags=TCP_SYN | TCP_ACK), "ingress") == c.moved()
    assert run(snap, c.c2s(payload), "ingress") == c.moved(status_from_client=1)
    # The same SYN-ACK with the server's addresses, travelling the client's way.
    assert run(snap, c.s2c(flags=TCP_SYN | TCP_ACK), "ingress") == c.moved()
    assert run(snap, c.c2s(payload), "ingress") == c.moved(status_from_client=1)
    assert snap.flows() == {} and ring.drain() == [] and snap.errors() == {}
    moved = run(snap, c.s2c(payload), "egress")
    assert moved["flows_marked"] == 1 and moved["events"] == 1


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("direction", ["ingress", "egress"])
def test_a_spoofed_syn_ack_then_a_status_never_counts(snap, ring, family, direction):
    """Two spoofed segments on a 4-tuple never seen, no handshake: a SYN-ACK, then a
    status line from its sender. The SYN-ACK makes no state; the status counts apart."""
    c = Conn(family)
    for syn_ack, status in ((c.c2s(flags=TCP_SYN | TCP_ACK), c.c2s(ERR500)),
                            (c.s2c(flags=TCP_SYN | TCP_ACK), c.s2c(ERR500))):
        assert run(snap, syn_ack, direction) == c.moved()
        assert run(snap, status, direction) == c.moved(status_side_unknown=1)
    assert snap.conn_count() == 0 and snap.flows() == {} and ring.drain() == []
    assert snap.errors() == {}


@pytest.mark.parametrize("family", [4, 6])
def test_connection_open_before_the_attach_learns_its_side_from_its_next_request(
        snap, ring, family):
    """A keep-alive connection established before the classifier ran: the response to a
    request sent before counts apart; its next request tells the client, and the error
    that answers it is mirrored with that request."""
    c = Conn(family)
    assert run(snap, c.s2c(ERR500), "egress") == c.moved(status_side_unknown=1)
    req = c.c2s(request(target="/late"))
    assert run(snap, req, "ingress") == c.moved(conns_started=1, side_from_request=1,
                                                requests=1)
    moved = run(snap, c.s2c(ERR500), "egress")
    assert moved["flows_marked"] == 1 and moved["events"] == 1
    (ev,) = ring.drain()
    assert ev.request == req and describe_request(ev.request)[1] == "/late"


def raw_requests(clf) -> bytes:
    """Every byte of the classifier's requests map, whatever connection holds it."""
    size = KEPT_REQUEST_HEAD.size + clf.request_capacity
    return b"".join(bytes(values[:count * size]) for _, values, count in
                    batch_lookup(clf._requests.map_fd, 4, size, per_cpu=False))


def set_request_seq(clf, slot: int, seq: int) -> None:
    """Writes the sequence word of the requests entry of connection slot `slot`, as
    keep_request() on another CPU does when it takes the entry (odd) and leaves it."""
    table = clf._requests
    key = table.Key(slot & (clf.max_requests - 1))
    leaf = table[key]
    leaf.seq = seq
    table[key] = leaf


def test_an_entry_being_written_is_never_read(snap, ring):
    """Another CPU is writing the connection's requests entry (its sequence word odd)
    when the error comes: the event goes without a request, and not one request byte
    goes into the ring; no response time is counted."""
    c = Conn()
    open_conn(snap, c)
    run(snap, c.c2s(request(target="/first")), "ingress")
    (slot,) = snap.kept_requests()
    set_request_seq(snap, slot, 7)
    timed = sum(snap.response_times()[0])
    moved = run(snap, c.s2c(ERR500), "egress")
    assert moved["events"] == 1 and moved["resp_no_request"] == 1 and moved["errors"] == 1
    (ev,) = ring.drain()
    assert ev.request == b"" and len(ring.records[0]) == HEAD_SIZE
    assert sum(snap.response_times()[0]) == timed


def test_a_request_not_kept_takes_the_one_before_with_it(snap, ring):
    """The client's next request finds its entry held by another CPU: it is not kept
    (counted), and the error that answers it is reported without a request, never with
    the request before it."""
    c = Conn()
    open_conn(snap, c)
    run(snap, c.c2s(request(target="/first")), "ingress")
    (slot,) = snap.kept_requests()
    set_request_seq(snap, slot, 9)
    assert run(snap, c.c2s(request(target="/second")), "ingress") == c.moved(request_busy=1)
    set_request_seq(snap, slot, 10)      # the other CPU is done; /first is still there
    moved = run(snap, c.s2c(ERR500), "egress")
    assert moved["events"] == 1 and moved["resp_no_request"] == 1
    (ev,) = ring.drain()
    assert ev.request == b""
    # The entry is free again: the next request is kept and reported.
    run(snap, c.c2s(request(target="/third")), "ingress")
    run(snap, c.s2c(ERR503), "egress")
    (ev,) = ring.drain()
    assert describe_request(ev.request)[1] == "/third"


@pytest.mark.parametrize("family", [4, 6])
def test_a_reused_four_tuple_never_shows_the_old_request(snap, ring, family):
    """A connection sent a request with a secret and closed; the same 4-tuple connects
    again and the server answers 503 at once: the event carries no request, and the
    secret's bytes are gone from the kernel: the new SYN cleared them."""
    c = Conn(family)
    open_conn(snap, c)
    secret = c.c2s(request(target="/private?token=s3cr3t", extra="Authorization: Bearer s3cr3t\r\n"))
    run(snap, secret, "ingress")
    run(snap, c.s2c(OK200), "egress")
    run(snap, c.c2s(flags=TCP_FIN | TCP_ACK), "ingress")
    open_conn(snap, c)
    assert kept(snap, c.key) is None
    moved = run(snap, c.s2c(ERR503), "egress")
    assert moved["events"] == 1 and moved["resp_no_request"] == 1
    (ev,) = ring.drain()
    assert ev.request == b"" and b"s3cr3t" not in ev.request
    assert b"s3cr3t" not in raw_requests(snap)


def test_a_syn_while_another_cpu_holds_the_entry_leaves_bytes_no_event_can_reach(snap, ring):
    """The zeroing's documented limit: another CPU holds the requests entry when the new
    SYN comes, so the old request's bytes stay in the map until a later request
    overwrites them; the new connection's generation still keeps them from every event."""
    c = Conn()
    open_conn(snap, c)
    run(snap, c.c2s(request(target="/private?token=s3cr3t")), "ingress")
    (slot,) = snap.kept_requests()
    set_request_seq(snap, slot, 11)
    open_conn(snap, c)
    set_request_seq(snap, slot, 12)
    assert b"s3cr3t" in raw_requests(snap)
    moved = run(snap, c.s2c(ERR503), "egress")
    assert moved["events"] == 1 and moved["resp_no_request"] == 1
    (ev,) = ring.drain()
    assert ev.request == b"" and b"s3cr3t" not in ring.records[0]


@pytest.mark.parametrize("family", [4, 6])
def test_syn_unmarks_a_reused_four_tuple(snap, ring, family):
    c = Conn(family)
    open_conn(snap, c)
    run(snap, c.c2s(request()), "ingress")
    run(snap, c.s2c(ERR500), "egress")
    assert snap.flow_count() == 1
    assert run(snap, c.c2s(flags=TCP_SYN), "ingress") == c.moved(syn_unmarked=1)
    assert snap.flow_count() == 0
    assert "mirrored_packets" not in run(snap, c.s2c(flags=TCP_SYN | TCP_ACK), "egress")


# --- HTTP/2 ------------------------------------------------------------------------------

@pytest.mark.parametrize("family", [4, 6])
def test_a_clients_h2_headers_with_status_never_count(snap, ring, family):
    """After the preface (which tells the client), a client's HEADERS frame whose block is
    :status 500 is not walked: it only counts apart (status_from_client), and nothing
    marks; its requests' blocks count nowhere."""
    c = Conn(family, sport=8080)
    open_conn(snap, c)
    assert run(snap, c.c2s(PREFACE), "ingress") == c.moved()
    assert run(snap, c.c2s(H2_REQUEST), "ingress") == c.moved()
    assert run(snap, c.c2s(H2_500), "ingress") == c.moved(status_from_client=1)
    assert snap.flows() == {} and ring.drain() == [] and snap.errors() == {}
    moved = run(snap, c.s2c(H2_500), "egress")
    assert moved["h2_responses"] == 1 and moved["flows_marked"] == 1 and moved["events"] == 1
    assert snap.errors() == {(LO, 500, "h2"): 1}


@pytest.mark.parametrize("family", [4, 6])
def test_h2_status_on_a_connection_of_unknown_side_counts_apart(snap, ring, family):
    """A lone spoofed HEADERS frame with :status 500, either way: counted apart."""
    c = Conn(family, sport=8080)
    assert run(snap, c.s2c(H2_500), "egress") == c.moved(status_side_unknown=1)
    assert run(snap, c.c2s(H2_500), "ingress") == c.moved(status_side_unknown=1)
    assert snap.flows() == {} and ring.drain() == []


def test_h2_preface_and_request_headers_tell_the_client(snap, ring):
    """Start unseen: the preface tells the client; on another connection, a request's
    HEADERS block (pseudo-headers :method, :path ...) does."""
    c = Conn(sport=8080)
    assert run(snap, c.c2s(PREFACE), "ingress") == c.moved(conns_started=1,
                                                           side_from_request=1)
    assert run(snap, c.s2c(H2_500), "egress")["flows_marked"] == 1
    d = Conn(sport=8080, cport=CPORT + 1)
    assert run(snap, d.c2s(H2_REQUEST), "ingress") == d.moved(conns_started=1,
                                                              side_from_request=1)
    assert run(snap, d.s2c(H2_500), "egress")["flows_marked"] == 1
    assert len(ring.drain()) == 2


# --- interfaces -------------------------------------------------------------------------

def test_two_interfaces_never_share_a_state(snap, ring, debug_iface):
    """The same addresses on two interfaces (overlapping address ranges): the request kept
    on one is never reported with the other's error, and a side learned on one says
    nothing on the other."""
    other = debug_iface.ifindex
    c = Conn()
    open_conn(snap, c)
    req = c.c2s(request(target="/on-lo"))
    run(snap, req, "ingress")
    assert run(snap, c.s2c(ERR500), "egress", ifindex=other) == c.moved(status_side_unknown=1)
    assert ring.drain() == [] and kept(snap, c.key, other) is None
    open_conn(snap, c, ifindex=other)
    moved = run(snap, c.s2c(ERR500), "egress", ifindex=other)
    assert moved["events"] == 1 and moved["resp_no_request"] == 1
    (ev,) = ring.drain()
    assert ev.request == b"" and ev.ifindex == other
    assert kept(snap, c.key) == req


def test_a_packet_seen_at_a_monitored_ingress_is_counted_there_only(snap, ring, debug_iface):
    """Forwarded from one monitored interface out of another: at the second one's egress
    it keeps that interface's state (marked by the error) but counts, clones and reports
    nothing again."""
    first = debug_iface.ifindex         # stands for the monitored interface it came in by
    snap.set_monitored(first, True)
    try:
        c = Conn()
        open_conn(snap, c)
        moved = run(snap, c.s2c(ERR500), "egress", ingress_ifindex=first)
        assert moved == c.moved(seen_before=1, flows_marked=1)
        assert ring.drain() == [] and snap.errors() == {} and len(snap.flows()) == 1
        ack = c.c2s(flags=TCP_ACK)
        assert run(snap, ack, "ingress") == c.moved(mirrored_packets=1,
                                                   mirrored_bytes=len(ack))
    finally:
        snap.set_monitored(first, False)


def test_a_monitored_lo_counts_each_packet_once(snap, ring):
    """On lo every packet passes egress, then ingress: with lo monitored, the ingress pass
    is skipped, and both sides' packets (all at egress) are told apart by side alone."""
    snap.set_monitored(LO, True)
    try:
        c = Conn()
        for frame in (c.c2s(flags=TCP_SYN), c.s2c(flags=TCP_SYN | TCP_ACK),
                      c.c2s(request()), c.s2c(ERR500)):
            moved = run(snap, frame, "egress")
            assert run(snap, frame, "ingress") == {"packets": 1, "lo_second_pass": 1}
        assert moved["events"] == 1 and moved["flows_marked"] == 1
        (ev,) = ring.drain()
        assert describe_request(ev.request)[1] == "/orders/7"
        assert run(snap, c.c2s(ERR500), "egress") == c.moved(status_from_client=1,
                                                             mirrored_packets=1,
                                                             mirrored_bytes=len(c.c2s(ERR500)))
    finally:
        snap.set_monitored(LO, False)


# --- the state itself ---------------------------------------------------------------------

def test_idle_marked_connection_is_unmarked_at_its_next_packet(snap):
    c = Conn()
    open_conn(snap, c)
    run(snap, c.s2c(ERR500), "egress")
    assert snap.flow_count() == 1
    snap.set_idle_timeout(1e-9)         # everything is idle now
    assert snap.flow_count() == 0       # flows() leaves it out at once
    next_coarse_tick()
    ack = c.c2s(flags=TCP_ACK)
    assert run(snap, ack, "ingress") == c.moved(flows_expired=1)
    snap.set_idle_timeout(0)
    assert snap.flow_count() == 0


def test_a_full_bucket_gives_its_least_recently_active_slot(snap):
    """More connections than slots: states are replaced (counted), never mixed up; a
    connection keeps its own side and request or has none."""
    slots = snap.conn_slots
    conns = [Conn(cport=1024 + i) for i in range(slots + 64)]
    for c in conns:
        run(snap, c.c2s(flags=TCP_SYN), "ingress")
    counters = snap.counters()
    assert counters["conns_started"] == len(conns)
    assert counters["conns_replaced"] >= 64
    held = {c["flow"] for _, c in snap.conns()}
    assert len(held) == counters["conns_started"] - counters["conns_replaced"] <= slots
    for c in conns[-8:]:
        if c.key in held:
            assert run(snap, c.c2s(ERR500), "ingress") == c.moved(status_from_client=1)


def age(clf, key: FlowKey, last_ns: int = 1) -> None:
    """Makes the connection's state look untouched since `last_ns` (as if opened long
    ago), writing its slot back with that one field changed."""
    for slot, c in clf.conns():
        if c["flow"] == key:
            table = clf._conns
            value = table[table.Key(slot)]
            value.last_ns = last_ns
            table[table.Key(slot)] = value
            return
    raise AssertionError(f"no state for {key}")


@pytest.mark.parametrize("payload", [H2_500, ERR500], ids=["h2", "h1"])
def test_a_mark_touches_an_old_connection(snap, payload):
    """A connection opened long ago (older than the idle timeout) that gets its first
    error now stays marked: the mark touches it, whatever the protocol."""
    snap.set_idle_timeout(60)
    c = Conn(sport=8080)
    open_conn(snap, c)
    if payload is H2_500:
        run(snap, c.c2s(PREFACE), "ingress")
    age(snap, c.key)
    assert run(snap, c.s2c(payload), "egress")["flows_marked"] == 1
    ack = c.c2s(flags=TCP_ACK)
    assert run(snap, ack, "ingress") == c.moved(mirrored_packets=1, mirrored_bytes=len(ack))
    snap.set_idle_timeout(0)
