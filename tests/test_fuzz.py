"""Differential tests: the classifier (bpf/mirror.c, through BPF_PROG_TEST_RUN on the real
kernel) against the reference model (tests/reference.py), frame by frame, through the
harness in tests/fuzz_harness.py (what is compared is described there).

test_fuzz generates MIRROR_FUZZ_FRAMES frames (default 100000) from a seeded random
generator (tests/fuzz_frames.py): seed from MIRROR_FUZZ_SEED, else random, printed, and
quoted in every failure. The same seed and frame count replay the same frames in the same
order (the seed also chooses the classifier's hash seed, so that the connections' slots
are the same too).

    MIRROR_FUZZ_SEED=1234 .venv/bin/python -m pytest tests/test_fuzz.py::test_fuzz

The stream of a seed does not depend on the frame count, so MIRROR_FUZZ_FRAMES=N+1 with
the same seed stops right after frame #N.
"""
from __future__ import annotations

import ipaddress
import os
import random
import time
from collections import Counter

import pytest
from hpack import Encoder

import fastmaps
import frames as F
import reference as R
from frames import (TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, cut, dest_opts, eth,
                    fragment, hop_by_hop, ipv4, ipv6, tcp_options)
from fuzz_frames import (FORWARDED_FROM, H2_SETTINGS, HANDSHAKE, NEAR_MISSES, NOT_MONITORED,
                         UNSEEN, Generator, addresses_allowed, build, conversation,
                         grpc_channel, h2_frame, other, random_conn, response)
from fuzz_harness import LO_IFINDEX, TRIGGER_5XX, Harness, report
from mirror.abi import DEFAULT_MAX_EVENTS_PER_CONN, DIRECTIONS
from mirror.flowkey import FlowKey

BOGUS_IFINDEX = 999999
SNAPSHOT_BYTES = 256                # the request snapshot's length when a run turns it on
# The last tenth of every TRIGGER_CYCLE frames of the fuzz runs with this trigger set:
# codes outside 100-599 (0 and 14 are also gRPC codes), a 1xx, a 2xx.
TRIGGER_ODD = frozenset({0, 14, 100, 204, 404, 599, 600, 999})
TRIGGER_CYCLE = 10000
# The second half of every SNAPSHOT_CYCLE frames runs with the request snapshot on.
SNAPSHOT_CYCLE = 10000
# The event bounds over every EVENT_CYCLE frames, from the share of the cycle gone by:
# (from, events per window, events per connection). The window never turns over (its
# width outlasts the run); in the phase with a window it starts empty at every
# checkpoint, so that both of its states are met in every interval.
EVENT_CYCLE = 20000
EVENT_PHASES = [(0.0, 0, DEFAULT_MAX_EVENTS_PER_CONN), (0.4, 0, 1), (0.6, 4, 2), (0.8, 0, 0)]
# The last tenth of every LO_CYCLE frames runs with the loopback (the test run's device)
# in `monitored`: its ingress hook only counts, its egress hook sees both sides.
LO_CYCLE = 25000
# A checkpoint compares everything the classifier holds with the model after this many
# frames (at the next episode boundary); every CLEAR_EVERY-th one also empties it
# (Classifier.clear), so that in between the states fill the slots and buckets overflow
# on their own.
CHECKPOINT_FRAMES = 1000
CLEAR_EVERY = 10
# What the default run (100,000 frames) must have met at least once.
COVERAGE = ("conns_started", "conns_replaced", "flows_evicted", "side_from_request",
            "status_side_unknown", "status_from_client", "seen_before", "lo_second_pass",
            "syn_unmarked", "requests", "resp_no_request", "errors", "events",
            "events_conn_limited", "events_rate_limited", "flows_marked", "responses",
            "h2_responses", "h2_status_unknown", "grpc_ok", "grpc_errors",
            "grpc_status_unknown", "mirrored_packets", "malformed", "other",
            "hpack_start_unseen", "hpack_gap", "hpack_bounds")
COVERAGE_FRAMES = 50000


# --- tests -----------------------------------------------------------------------------

@pytest.mark.unit
def test_generator_is_deterministic():
    """A seed gives the same frames, and a shorter run is a prefix of a longer one (so a
    failure at frame N replays with MIRROR_FUZZ_FRAMES=N+1)."""
    def frames_of(seed, total):
        return [x for x in Generator(seed, total) if x is not None]
    a = frames_of(42, 3000)
    assert len(a) == 3000
    assert a == frames_of(42, 3000)
    assert a[:1234] == frames_of(42, 1234)
    assert a != frames_of(43, 3000)
    assert Generator(42, 1).hash_seed == Generator(42, 9).hash_seed


@pytest.mark.unit
def test_generated_addresses_allowed():
    frames = [x.frame for x in Generator(7, 20000) if x is not None]
    assert len(frames) == 20000
    assert all(addresses_allowed(f) for f in frames)


@pytest.mark.unit
def test_crowds_share_a_bucket():
    """A crowd's connections land in one bucket of the generator's slots and seed, as
    the model computes it (tests/test_fuzz.py checks the model's slots against the
    kernel's)."""
    gen = Generator(11, 1)
    for _ in range(5):
        conns = gen.colliding(7)
        buckets = {R.conn_bucket(FlowKey.from_endpoints(c.cli, c.cport, c.srv, c.sport),
                                 LO_IFINDEX, gen.hash_seed, gen.slots) for c in conns}
        assert len(conns) >= 5 and len(buckets) == 1


@pytest.mark.unit
def test_reference_reads_realistic_frames_like_dpkt():
    """On well-formed frames the reference sees what dpkt sees: the same flow key and
    the same status line."""
    dpkt = pytest.importorskip("dpkt")
    rng = random.Random(5)
    checked = 0
    for conn in [random_conn(rng) for _ in range(60)]:
        for spec, _ in conversation(rng, conn):
            frame = build(spec)[0]
            d = R.decide(frame, "egress", TRIGGER_5XX)
            e = dpkt.ethernet.Ethernet(frame)
            ip = e.data
            seg = ip.data
            if isinstance(ip, dpkt.ip6.IP6) and not isinstance(seg, dpkt.tcp.TCP):
                seg = dpkt.tcp.TCP(seg)  # dpkt leaves TCP behind a fragment header raw
            assert isinstance(seg, dpkt.tcp.TCP)
            fam = 4 if isinstance(ip, dpkt.ip.IP) else 6
            src = ipaddress.ip_address(ip.src)
            dst = ipaddress.ip_address(ip.dst)
            assert d.key == FlowKey.from_endpoints(str(src), seg.sport, str(dst), seg.dport)
            assert d.key.family == fam
            code = None
            if seg.data[:5] == b"HTTP/":
                # The status line and a header end: the body may be in later segments.
                head = seg.data.split(b"\r\n", 1)[0] + b"\r\n\r\n"
                code = int(dpkt.http.Response(head).status)
            assert d.status == code
            checked += 1
    assert checked > 500


@pytest.mark.unit
def test_reference_client_headers_posing_as_a_server():
    """What the model counts apart for a client's HEADERS frame (frames from hyperframe,
    blocks from hpack): a block whose first field is :status by static index, wherever
    padding and priority fields put it; not a request's block, an empty one, or a :status
    behind a size update or another field."""
    from test_http2 import headers
    status = Encoder().encode([(":status", "500")])
    assert all(R.h2_client_poses_as_server(headers(status, pad=pad, priority=prio))
               for pad in (0, 4) for prio in (False, True))
    assert R.h2_client_poses_as_server(headers(Encoder().encode([(":status", "599")])))
    resized = Encoder()
    resized.header_table_size = 256     # its next block starts with a size update
    for block in (Encoder().encode([(":method", "GET"), (":path", "/"), (":scheme", "http"),
                                    (":authority", "s")]),
                  b"", resized.encode([(":status", "500")]),
                  Encoder().encode([("server", "x"), (":status", "500")])):
        assert not R.h2_client_poses_as_server(headers(block))
    # The documented limit: the pad length is not subtracted, so an empty block whose
    # padding byte reads as a :status counts (a diagnostic counter only).
    over_padded = (2).to_bytes(3, "big") + bytes([1, 0x0C]) + (1).to_bytes(4, "big") + b"\x01\x88"
    assert R.h2_client_poses_as_server(over_padded)


@pytest.mark.unit
def test_reference_hpack_request_blocks():
    """hpack's encoding of a request starts with a request pseudo-header, which the
    model reads as a request's block; a response's never does."""
    enc = Encoder()
    request = enc.encode([(":method", "GET"), (":scheme", "https"), (":path", "/"),
                          (":authority", "x")])
    assert R.h2_block_status(request) == R.H2_REQUEST
    assert R.h2_block_status(Encoder().encode([(":authority", "x")])) == R.H2_REQUEST
    assert R.h2_block_status(Encoder().encode([(":status", "503")])) == 503
    assert R.h2_statuses(h2_frame(1, 0x05, 1, request)) == []


@pytest.mark.testrun
def test_test_run_limits(clf):
    """The harness limits the reference models: frames this kernel's test run refuses."""
    h = Harness(clf)
    big = eth(b"\0" * (fastmaps.TEST_RUN_MAX_FRAME - 14), 0x1234)
    cases = [b"", b"\0" * 13, eth(b"", 0x1234), eth(b"\x45" + b"\0" * 18),
             eth(b"\x45" + b"\0" * 19), eth(b"\x60" + b"\0" * 38, F.ETH_P_IPV6),
             eth(b"\x60" + b"\0" * 39, F.ETH_P_IPV6),
             eth(b"\x45", vlans=[1]), big, big + b"\0"]
    for frame in cases:
        for d in DIRECTIONS:
            h.feed(frame, d)
    assert [h.feed(f, "egress").ran for f in cases] == [
        False, False, True, False, True, False, True, True, True, False]
    assert not h.disagreements, report(h)


# --- crafted edge cases ----------------------------------------------------------------

C4, S4, C6, S6 = "198.19.7.10", "198.18.0.80", "2001:db8:7::10", "2001:db8::80"
ERR500 = response(500)
REQUEST = b"GET /x HTTP/1.1\r\nHost: s\r\n\r\n"
H2_REQUEST = h2_frame(1, 0x05, 1, Encoder().encode(
    [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "s")]))


def r4(payload=ERR500, **kw):
    return F.tcp4(S4, 80, C4, 40000, payload, **kw)


def r6(payload=ERR500, **kw):
    return F.tcp6(S6, 80, C6, 40000, payload, **kw)


def ack4(payload=b"", **kw):
    return F.tcp4(C4, 40000, S4, 80, payload, **{"flags": TCP_ACK, **kw})


def ack6(payload=b"", **kw):
    return F.tcp6(C6, 40000, S6, 80, payload, **{"flags": TCP_ACK, **kw})


# Steps: (frame, who[, ingress_ifindex]). who: "c" the client's (on the client's hook),
# "s" the server's (on the other), "c!"/"s!" that side's on the wrong hook.
START4 = [(ack4(flags=TCP_SYN), "c"), (r4(b"", flags=TCP_SYN | TCP_ACK), "s"), (ack4(), "c")]
START6 = [(ack6(flags=TCP_SYN), "c"), (r6(b"", flags=TCP_SYN | TCP_ACK), "s"), (ack6(), "c")]
REQ4 = (ack4(REQUEST, flags=TCP_PSH | TCP_ACK), "c")
REQ6 = (ack6(REQUEST, flags=TCP_PSH | TCP_ACK), "c")


def s(*frames_):
    return [(f, "s") for f in frames_]


def c(*frames_):
    return [(f, "c") for f in frames_]


def _sequences():
    """Connections from their start: a trigger, then the connection both ways."""
    p = []

    def add(name, *steps):
        p.append(pytest.param(list(steps), id=name))

    add("v4-trigger-then-flow", *START4, REQ4, (r4(), "s"), (ack4(), "c"),
        (r4(response(200)), "s"), (ack4(flags=TCP_FIN | TCP_ACK), "c"))
    add("v6-trigger-then-flow", *START6, REQ6, (r6(), "s"), (ack6(), "c"), (r6(b"body"), "s"),
        (ack6(flags=TCP_RST), "c"))
    add("v4-non-trigger-then-trigger", *START4, REQ4, (r4(response(404)), "s"), (ack4(), "c"),
        REQ4, (r4(response(503)), "s"), (ack4(), "c"))
    add("vlan-trigger-then-untagged", *START4, (r4(vlans=[7]), "s"), (ack4(), "c"),
        (ack4(vlans=[(F.ETH_P_8021AD, 9)]), "c"))
    add("v6-ext-trigger-then-plain", *START6,
        (r6(ip={"ext": [hop_by_hop(), fragment(0, True)]}), "s"), (ack6(), "c"))
    add("trigger-in-first-ipv4-fragment", *START4, (r4(ip={"mf": True}), "s"),
        (r4(b"rest", ip={"frag_offset": 8}), "s"), (ack4(), "c"))
    add("trigger-in-first-ipv6-fragment", *START6, (r6(ip={"ext": [fragment(0, True)]}), "s"),
        (r6(b"rest", ip={"ext": [fragment(8, False)]}), "s"), (ack6(), "c"))
    add("malformed-segment-of-marked-flow", *START4, (r4(), "s"), (ack4(doff=4), "c"),
        (ack4(ip={"ihl": 4}), "c"), (ack4(), "c"))
    add("trigger-with-rst-flag", *START4, (r4(flags=TCP_RST | TCP_ACK), "s"), (ack4(), "c"))
    # A status line with SYN alone: its sender opens a connection, as the client.
    add("trigger-with-syn-flag", *START4, (r4(flags=TCP_SYN), "s"), (ack4(), "c"),
        (r4(), "s"))
    # With SYN and ACK from the server's side of a known connection: the status counts.
    add("trigger-with-synack-flags", *START4, (r4(flags=TCP_SYN | TCP_ACK), "s"),
        (ack4(), "c"), (r4(flags=TCP_SYN | TCP_ACK), "s"), (ack4(), "c"))
    add("trigger-with-no-flags", *START4, (r4(flags=0), "s"), (ack4(), "c"))
    add("trigger-zero-window", *START4, (r4(window=0), "s"), (ack4(window=0), "c"))
    return p


def _semantics():
    """Whose status it is, how the client side is learned, the 4-tuple reused, the
    seen-before packets and the event bounds."""
    p = []

    def add(name, *steps):
        p.append(pytest.param(list(steps), id=name))

    add("unseen-start-side-from-request", REQ4, (r4(), "s"), (ack4(), "c"), REQ4,
        (r4(response(503)), "s"))
    add("unseen-start-no-request", (r4(), "s"), (ack4(), "c"), (r4(response(503)), "s"),
        (ack4(REQUEST), "c"), (r4(), "s"))
    add("synack-only", (r4(b"", flags=TCP_SYN | TCP_ACK), "s"), (ack4(), "c"), REQ4,
        (r4(), "s"), (ack4(), "c"))
    add("synack-from-the-client-side", (ack4(flags=TCP_SYN), "c"),
        (ack4(flags=TCP_SYN | TCP_ACK), "c"), (r4(), "s"), (ack4(ERR500), "c"))
    # A client's own SYN-ACK (issue 21): it names no side, so its status line never counts.
    add("client-synack-then-status", *START4, REQ4, (ack4(b"", flags=TCP_SYN | TCP_ACK), "c"),
        (ack4(ERR500), "c"), (r4(), "s"))
    add("spoofed-synack-then-status", (ack4(b"", flags=TCP_SYN | TCP_ACK), "c"),
        (ack4(ERR500), "c"), (r6(b"", flags=TCP_SYN | TCP_ACK), "s!"), (r6(), "s!"))
    add("synack-twice-then-marked-synack", *START4, (r4(b"", flags=TCP_SYN | TCP_ACK), "s"),
        REQ4, (r4(), "s"), (r4(b"", flags=TCP_SYN | TCP_ACK), "s"), (ack4(), "c"),
        (r4(), "s"))
    add("client-sends-status-line", *START4, (ack4(ERR500, flags=TCP_PSH | TCP_ACK), "c"),
        (r4(response(200)), "s"), (ack4(response(503)), "c"))
    add("client-sends-status-when-marked", *START4, (r4(), "s"), (ack4(ERR500), "c"),
        (ack4(h2_frame(1, 0x04, 1, b"\x8e")), "c"))
    add("client-h2-status", *START4, (ack4(h2_frame(1, 0x04, 1, b"\x8e")), "c"),
        (ack4(h2_frame(1, 0x04, 1, b"\x48\x03503")), "c"), (r4(h2_frame(1, 0x04, 1, b"\x8e")), "s"))
    add("client-h2-status-forms", *START4,
        (ack4(h2_frame(1, 0x0C, 1, b"\x02\x8e\0\0")), "c"),               # padded
        (ack4(h2_frame(1, 0x24, 1, b"\0\0\0\0\x10\x0e\x03500")), "c"),  # priority
        (ack4(h2_frame(1, 0x04, 1, b"\x18\x03500")), "c"),                  # never indexed
        (ack4(h2_frame(1, 0x04, 1, b"\x20\x8e")), "c"),                     # size update first
        (ack4(h2_frame(1, 0x04, 1, b"\xff\x00")), "c"),                     # index 127
        (ack4(h2_frame(1, 0x04, 1, b"") + h2_frame(1, 0x04, 3, b"\x8e")), "c"),  # empty block
        (ack4(h2_frame(1, 0x0C, 1, b"\x00")), "c"),                          # padded, no block
        (ack4(H2_REQUEST), "c"), (r4(h2_frame(1, 0x04, 1, b"\x8e")), "s"))
    add("server-status-in-client-direction", *START4, REQ4, (r4(), "s!"), (r4(response(200)), "s"),
        (r4(), "s!"), (r4(), "s"))
    add("client-request-in-server-direction", *START4, (REQ4[0], "c!"), (r4(), "s"))
    add("server-request-ignored", *START4, (r4(REQUEST), "s"), (r4(H2_REQUEST), "s"), (r4(), "s"))
    add("lone-spoofed-segments", (r4(), "s"), (r4(), "s!"), (r6(), "s"), (r6(), "c"),
        (ack4(ERR500), "c"), (r4(h2_frame(1, 0x04, 1, b"\x8e")), "s"))
    add("reuse-after-kept-request", *START4, REQ4, (r4(), "s"), (ack4(), "c"), *START4,
        (r4(response(503)), "s"), (ack4(), "c"), REQ4, (r4(response(502)), "s"))
    add("reuse-roles-swapped", *START4, REQ4, (r4(), "s"), (r4(b"", flags=TCP_SYN), "s"),
        (ack4(b"", flags=TCP_SYN | TCP_ACK), "c"), (ack4(REQUEST), "s!"), (ack4(ERR500), "c"),
        (r4(), "s"))
    add("v6-reuse", *START6, REQ6, (r6(), "s"), *START6, (r6(response(504)), "s"))
    add("preface-teaches-side", (ack4(R.H2_PREFACE + H2_SETTINGS), "c"), (r4(H2_SETTINGS), "s"),
        (r4(h2_frame(1, 0x04, 1, b"\x8e")), "s"), (ack4(), "c"))
    add("preface-after-start", *START6, (ack6(R.H2_PREFACE), "c"),
        (r6(h2_frame(1, 0x04, 1, b"\x8e")), "s"), (ack6(H2_REQUEST), "c"))
    add("h2-request-teaches-side", (ack4(H2_REQUEST), "c"),
        (r4(h2_frame(1, 0x04, 1, b"\x8e")), "s"), (ack4(), "c"))
    add("h2-request-literal-authority", (ack6(h2_frame(1, 0x05, 1, b"\x41\x01s\x82")), "c"),
        (r6(h2_frame(1, 0x04, 1, b"\x48\x03503")), "s"))
    add("h2-request-after-status-unknown-side", (r4(h2_frame(1, 0x04, 1, b"\x8e")), "s"),
        (ack4(H2_REQUEST), "c"), (r4(h2_frame(1, 0x04, 3, b"\x8e")), "s"))
    add("h2-server-sends-request-block-first", (r4(H2_REQUEST), "s"),
        (r4(h2_frame(1, 0x04, 3, b"\x8e")), "s"), (ack4(h2_frame(1, 0x04, 1, b"\x8e")), "c"))
    add("grpc-trailers", *START4, (ack4(R.H2_PREFACE), "c"),
        (r4(h2_frame(1, 0x05, 1, b"\x88\x40\x0bgrpc-status\x0214")), "s"),
        (r4(h2_frame(1, 0x05, 1, b"\x40\x0bgrpc-status\x010")), "s"), (ack4(), "c"))
    add("grpc-unknown-side", (r4(h2_frame(1, 0x05, 1, b"\x40\x0bgrpc-status\x0213")), "s"))
    add("seen-before-marks-silently", *START4, REQ4, (r4(), "s", FORWARDED_FROM), (ack4(), "c"),
        (r4(response(200)), "s", FORWARDED_FROM), (r4(response(200)), "s"), (ack4(), "c"))
    add("seen-before-h2", *START4, (r4(h2_frame(1, 0x04, 1, b"\x8e")), "s", FORWARDED_FROM),
        (ack4(), "c", FORWARDED_FROM), (ack4(), "c"))
    add("seen-before-keeps-requests", *START4, (REQ4[0], "c", FORWARDED_FROM), (r4(), "s"))
    add("ingress-ifindex-not-monitored", *START4, (r4(), "s", NOT_MONITORED),
        (ack4(), "c", NOT_MONITORED))
    add("events-per-connection", *START4, REQ4,
        *[(r4(response(500 + i)), "s") for i in range(DEFAULT_MAX_EVENTS_PER_CONN + 2)],
        *START4, (r4(), "s"))
    return p


def _near_misses():
    p = []
    for i, m in enumerate(NEAR_MISSES):
        p.append(pytest.param([*START4, *START6, *s(r4(m), r6(m)), *c(ack4(), ack6())],
                              id=f"near-miss-{i}"))
    for code in (0, 1, 99, 100, 199, 200, 499, 500, 599, 600, 999):
        p.append(pytest.param([*START4, (r4(b"HTTP/1.1 %03d x\r\n" % code), "s"), (ack4(), "c")],
                              id=f"status-{code:03d}"))
    return p


def _parse_cases():
    """Link layer, IP and TCP lengths (on started connections where a status is read)."""
    p = []

    def add(name, *steps):
        p.append(pytest.param(list(steps), id=name))

    add("qinq-two-tags", *START4, *s(r4(vlans=[1, 2])), (ack4(), "c"))
    add("tag-9100", *s(r4(vlans=[(0x9100, 5)])))
    add("ethertype-802.3-length", *s(eth(b"\0" * 46, 46)))
    add("ipv4-tot-len-0", *START4, *s(r4(ip={"tot_len": 0})), (ack4(), "c"))
    add("ipv4-tot-len-short-of-status", *START4, *s(r4(ip={"tot_len": 40 + 12})))
    add("ipv4-tot-len-exact-status", *START4, *s(r4(ip={"tot_len": 40 + 13})), (ack4(), "c"))
    add("ipv4-udp-ihl-past-frame", *s(cut(F.udp4(S4, 53, C4, 5353, b""), 14 + 20),
                                      eth(ipv4(b"", S4, C4, F.IPPROTO_UDP, ihl=15))))
    add("ipv4-udp-tot-len-below-ihl",
        *s(eth(ipv4(b"\0" * 8, S4, C4, F.IPPROTO_UDP, tot_len=10))))
    add("ipv4-fragment-tot-len-below-ihl", *START4, *s(r4(ip={"frag_offset": 1, "tot_len": 3})))
    add("ipv4-ihl-past-frame-tcp", *START4, *s(cut(r4(ip={"ihl": 15}), 14 + 40)))
    udp_body = F.udp(53, 5353, b"x")
    add("ipv6-hbh-cut-then-udp",
        *s(cut(eth(ipv6(udp_body, S6, C6, F.IPPROTO_UDP, ext=[hop_by_hop(3)]), F.ETH_P_IPV6),
               14 + 40 + 4)))
    add("ipv6-hbh-len-past-frame-then-udp",
        *s(eth(ipv6(udp_body, S6, C6, F.IPPROTO_UDP, ext=[hop_by_hop(hdrlen=200)]),
               F.ETH_P_IPV6)))
    add("ipv6-hbh-past-payload-len-then-udp",
        *s(eth(ipv6(udp_body, S6, C6, F.IPPROTO_UDP, ext=[hop_by_hop(1)], payload_len=8),
               F.ETH_P_IPV6)))
    add("ipv6-nonfirst-fragment-header-cut",
        *s(cut(r6(ip={"ext": [fragment(5, True)]}), 14 + 40 + 4)))
    add("ipv6-nonfirst-fragment-header-cut-3",
        *s(cut(r6(ip={"ext": [fragment(5, True)]}), 14 + 40 + 3)))
    add("ipv6-first-fragment-header-cut", *s(cut(r6(ip={"ext": [fragment(0, True)]}), 14 + 40 + 4)))
    add("ipv6-nonfirst-fragment-past-payload-len",
        *START6, *s(r6(ip={"ext": [fragment(5, True)], "payload_len": 4})))
    add("ipv6-ext-past-payload-len-tcp", *START6,
        *s(r6(ip={"ext": [dest_opts(2)], "payload_len": 16})))
    add("ipv6-hbh-not-first", *START6, *s(r6(ip={"ext": [dest_opts(), hop_by_hop()]})),
        (ack6(), "c"))
    add("ipv6-7-ext-headers", *START6, *s(r6(ip={"ext": [dest_opts()] * 7})))
    add("ipv6-6-ext-then-udp",
        *s(eth(ipv6(udp_body, S6, C6, F.IPPROTO_UDP, ext=[dest_opts()] * 6), F.ETH_P_IPV6)))
    add("ipv6-plen-0", *START6, *s(r6(ip={"payload_len": 0})), (ack6(), "c"))
    add("tcp-doff-15-options", *START4, *s(r4(options=tcp_options(40))), (ack4(), "c"))
    add("tcp-doff-past-ip-end", *START4, *s(r4(doff=15, ip={"tot_len": 20 + 40})))
    return p


def _key_order():
    """Flow key order: addresses byte by byte, then ports in network byte order; the
    server (a, pa) answers the client (b, pb) that opened the connection."""
    p = []
    for a, pa, b, pb in [(S4, 512, S4, 511), (S4, 511, S4, 512), (S4, 1, S4, 256),
                         ("198.18.0.255", 80, "198.18.1.0", 80), ("198.18.1.0", 80, "198.18.0.255", 80),
                         (S6, 512, S6, 511), (S6, 1, S6, 256),
                         ("2001:db8::1:0", 80, "2001:db8::ff", 80),
                         ("2001:db8:1::", 80, "2001:db8::ffff:ffff", 80)]:
        tcpx = F.tcp6 if ":" in a else F.tcp4
        p.append(pytest.param([
            (tcpx(b, pb, a, pa, flags=TCP_SYN), "c"),
            (tcpx(a, pa, b, pb, flags=TCP_SYN | TCP_ACK), "s"),
            (tcpx(a, pa, b, pb, ERR500), "s"), (tcpx(b, pb, a, pa, flags=TCP_ACK), "c"),
            (tcpx(a, pa, b, pb, flags=TCP_ACK), "s")], id=f"key-{a}-{pa}-{b}-{pb}"))
    return p


def run_steps(h: Harness, steps, client_dir: str) -> None:
    for frame, who, *ifindex in steps:
        d = client_dir if who[0] == "c" else other(client_dir)
        if who.endswith("!"):
            d = other(d)
        h.feed(frame, d, *ifindex)


@pytest.mark.testrun
@pytest.mark.parametrize("steps", _sequences() + _semantics() + _near_misses()
                         + _parse_cases() + _key_order())
def test_crafted(clf, pinned, debug_iface, steps):
    """Each case from empty states, for either hook as the client's, with the request
    snapshot off and on."""
    for client_dir in DIRECTIONS:
        for request_bytes in (0, SNAPSHOT_BYTES):
            h = Harness(clf, debug_iface=debug_iface, request_bytes=request_bytes,
                        monitored=(FORWARDED_FROM,))
            try:
                run_steps(h, steps, client_dir)
                h.checkpoint(clear=True)
            finally:
                h.close()
            assert not h.disagreements, \
                f"client on {client_dir}, request bytes {request_bytes}:\n" + report(h)


def pick(cases, *names):
    chosen = [c for c in cases if c.id in names]
    assert len(chosen) == len(names), "no such case"
    return chosen


LO_CASES = pick(_sequences(), "v4-trigger-then-flow", "v6-trigger-then-flow") + pick(
    _semantics(), "client-sends-status-line", "server-status-in-client-direction",
    "reuse-after-kept-request", "seen-before-marks-silently", "h2-request-teaches-side",
    "lone-spoofed-segments")


@pytest.mark.testrun
@pytest.mark.parametrize("steps", LO_CASES)
def test_crafted_on_monitored_loopback(clf, pinned, debug_iface, steps):
    """With the loopback (the test run's device) in `monitored`: its ingress hook only
    counts the second pass, its egress hook tells the sides apart by address alone."""
    for client_dir in DIRECTIONS:
        h = Harness(clf, debug_iface=debug_iface, request_bytes=SNAPSHOT_BYTES,
                    monitored=(FORWARDED_FROM, LO_IFINDEX))
        try:
            run_steps(h, steps, client_dir)
            run_steps(h, steps, "egress")
            h.checkpoint(clear=True)
        finally:
            h.close()
        assert not h.disagreements, report(h)


# Budgets the crafted cases run with: each one alone at its tightest, and all together.
BUDGETS = {"packets-1": (1, 0, 0), "packets-2": (2, 0, 0), "bytes-1": (0, 1, 0),
           "bytes-150": (0, 150, 0), "rate-1": (0, 0, 1), "rate-3": (0, 0, 3),
           "all": (3, 300, 4)}
BUDGET_CASES = _sequences() + pick(
    _semantics(), "unseen-start-side-from-request", "synack-twice-then-marked-synack",
    "client-sends-status-when-marked", "reuse-after-kept-request", "reuse-roles-swapped",
    "seen-before-marks-silently", "preface-after-start") + _key_order()


@pytest.mark.testrun
@pytest.mark.parametrize("limits", BUDGETS.values(), ids=BUDGETS.keys())
@pytest.mark.parametrize("steps", BUDGET_CASES)
def test_crafted_with_budgets(clf, pinned, debug_iface, steps, limits):
    """The sequences and key-order cases again, with budgets: the model decides every
    skip exactly (one CPU, a window no run outlasts)."""
    for client_dir in DIRECTIONS:
        h = Harness(clf, debug_iface=debug_iface, budget=R.Budget(*limits))
        try:
            run_steps(h, steps * 2, client_dir)     # twice: every budget above is reached
            h.checkpoint(clear=True)
        finally:
            h.close()
        assert not h.disagreements, report(h)


@pytest.mark.testrun
@pytest.mark.parametrize("steps", [c for c in _sequences() if c.id != "trigger-with-syn-flag"])
def test_crafted_byte_budget_boundaries(clf, pinned, debug_iface, steps):
    """Byte budgets that a marked connection's bytes reach exactly, and one byte either
    side: the budget is inclusive. The model alone says which totals are reached."""
    seq = steps * 2
    model = R.Model(triggers=TRIGGER_5XX)
    reached = set()
    for frame, who, *_ in seq:
        d = model.decide(frame, "egress" if who[0] == "c" else "ingress")
        if d.conn is not None and d.conn.marked:
            reached.add(d.conn.bytes)
    assert reached
    for budget in sorted(b + d for b in sorted(reached)[:6] for d in (-1, 0, 1)):
        h = Harness(clf, debug_iface=debug_iface, budget=R.Budget(0, budget, 0))
        try:
            run_steps(h, seq, "egress")
            h.checkpoint(clear=True)
        finally:
            h.close()
        assert not h.disagreements, f"byte budget {budget}: " + report(h)


@pytest.mark.testrun
@pytest.mark.parametrize("debug, ifindex", [(R.DEBUG_NONE, 0), (R.DEBUG_NONE, LO_IFINDEX),
                                            (R.DEBUG_FAIL, BOGUS_IFINDEX)])
def test_crafted_debug_interface_states(clf, pinned, debug, ifindex):
    clf.set_debug_ifindex(ifindex)
    h = Harness(clf, debug=debug)
    steps = [*START4, (r4(), "s"), (ack4(), "c"), *START6, (r6(response(502)), "s"),
             (ack6(), "c"), (r4(response(200)), "s"), (ack4(doff=3), "c")]
    try:
        run_steps(h, steps, "ingress")
        h.checkpoint(clear=True)
    finally:
        h.close()
    assert not h.disagreements, report(h)


PARSE_COUNTERS = frozenset({"packets", "ipv4", "ipv6", "tcp", "other", "malformed",
                            "nonlinear"})


@pytest.mark.unit
def test_classifier_cases_agree_with_reference():
    """The parse path of tests/test_classifier.py's hand-written cases, as the reference
    computes it (no kernel involved). Only the parse: what follows it depends on the
    connection's state, which those single frames do not set up (the crafted cases above
    cover it)."""
    import test_classifier as tc
    wrong = []
    for param in tc._cases():
        frame, expected = param.values
        got = {k: v for k, v in R.decide(frame, "egress", TRIGGER_5XX).counters.items()
               if k in PARSE_COUNTERS}
        expected = {k: v for k, v in expected.items() if k in PARSE_COUNTERS}
        if got != expected:
            wrong.append(f"{param.id}: reference {got}, test_classifier {expected}")
    assert not wrong, "\n".join(wrong)


# --- the fuzz --------------------------------------------------------------------------

def fuzz_settings(frames: int) -> dict:
    """What the classifier runs with from frame `frames` on (the cycles above)."""
    phase = frames % EVENT_CYCLE / EVENT_CYCLE
    per_window, per_conn = next((w, c) for start, w, c in reversed(EVENT_PHASES)
                                if phase >= start)
    return {"triggers": TRIGGER_ODD if frames % TRIGGER_CYCLE >= TRIGGER_CYCLE * 9 // 10
            else TRIGGER_5XX,
            "request_bytes": SNAPSHOT_BYTES if frames % SNAPSHOT_CYCLE >= SNAPSHOT_CYCLE // 2
            else 0,
            "events": (per_window, per_conn),
            "lo": frames % LO_CYCLE >= LO_CYCLE * 9 // 10}


def apply_settings(h: Harness, now: dict, was: dict | None) -> None:
    if was is None or now["triggers"] != was["triggers"]:
        h.set_triggers(now["triggers"])
    if was is None or now["request_bytes"] != was["request_bytes"]:
        h.set_request_bytes(now["request_bytes"])
    if was is None or now["events"] != was["events"]:
        h.set_event_limits(*now["events"])
    if was is None or now["lo"] != was["lo"]:
        h.set_monitored(LO_IFINDEX, now["lo"])


def run_fuzz(h: Harness, gen: Generator, on_checkpoint=None) -> Counter:
    """Feeds the generator's stream to the harness with the cycles of fuzz_settings;
    returns how many frames each source made."""
    whats = Counter()
    last_checkpoint = 0
    settings = None
    for item in gen:
        if item is None:
            if h.frames - last_checkpoint >= CHECKPOINT_FRAMES:
                h.checkpoint(reset=(h.checkpoints + 1) % CLEAR_EVERY == 0)
                last_checkpoint = h.frames
                if settings["events"][0]:
                    h.set_event_limits(*settings["events"])
                if on_checkpoint:
                    on_checkpoint()
            continue
        now = fuzz_settings(h.frames)
        if now != settings:
            apply_settings(h, now, settings)
            settings = now
        h.feed(item.frame, item.direction, item.ingress_ifindex)
        whats[item.what.split("+")[0]] += 1
    h.checkpoint(reset=True)
    return whats


def fuzz_seed() -> int:
    return int(os.environ.get("MIRROR_FUZZ_SEED") or random.SystemRandom().randrange(1 << 32))


def summary(h: Harness) -> str:
    paths = " ".join(f"{p}={h.paths[p]}" for p in R.PATHS)
    modes = " ".join(f"{m}={h.modes[m]}" for m in R.MODES)
    totals = " ".join(f"{k}={h.totals[k]}" for k in COVERAGE)
    return (f"paths: {paths}\n  modes: {modes} (no state or not TCP: {h.modes[None]})\n"
            f"  counters: {totals}\n  new states in a full bucket: {h.victims}")


@pytest.mark.testrun
@pytest.mark.slow
def test_fuzz(clf, pinned, debug_iface, capsys):
    seed = fuzz_seed()
    total = int(os.environ.get("MIRROR_FUZZ_FRAMES") or 100000)
    with capsys.disabled():
        print(f"\nmirror fuzz: seed={seed} frames={total} (replay: MIRROR_FUZZ_SEED={seed} "
              f"MIRROR_FUZZ_FRAMES={total})", flush=True)
    gen = Generator(seed, total, clf.conn_slots)
    h = Harness(clf, debug_iface=debug_iface, monitored=(FORWARDED_FROM,),
                hash_seed=gen.hash_seed)
    started = time.monotonic()
    try:
        whats = run_fuzz(h, gen)
    finally:
        h.set_monitored(LO_IFINDEX, False)
        h.close()
    elapsed = time.monotonic() - started
    dirs = Counter(d.direction for d in h.disagreements)
    with capsys.disabled():
        print(f"mirror fuzz summary: frames={h.frames} seed={seed} "
              f"disagreements={len(h.disagreements)} non_pass_verdicts={h.non_pass} "
              f"sweeps={gen.sweeps_done}/{len(gen.sweep_base)} checkpoints={h.checkpoints} "
              f"seconds={elapsed:.1f}\n  {summary(h)}", flush=True)
        print("mirror fuzz reasons: " + ", ".join(
            f"{r}={n}" for r, n in sorted(h.reasons.items(), key=lambda x: -x[1])), flush=True)
        print("mirror fuzz sources: " + ", ".join(
            f"{w}={n}" for w, n in sorted(whats.items(), key=lambda x: -x[1])), flush=True)
    assert h.frames == total
    assert not h.disagreements, (
        f"seed {seed}: {len(h.disagreements)} disagreements "
        f"({dict(dirs)}; replay with MIRROR_FUZZ_SEED={seed} MIRROR_FUZZ_FRAMES={total})\n"
        + report(h, seed))
    assert h.non_pass == 0, f"seed {seed}: {h.non_pass} verdicts other than TC_ACT_UNSPEC"
    if total >= COVERAGE_FRAMES:
        missed = [k for k in COVERAGE if not h.totals[k]]
        assert not missed and h.victims, f"seed {seed}: the fuzz never met {missed}"


@pytest.mark.testrun
@pytest.mark.slow
def test_fuzz_grpc_channels(clf, pinned, debug_iface, capsys):
    """Long-lived gRPC channels, each through one `hpack` Encoder per side (random
    metadata, table size changes, calls answered together, messages spanning segments;
    tests/fuzz_frames.py grpc_channel), fed whole to the classifier and the model: 0
    disagreements on every frame and on every slot, the server's followed HPACK state
    included, at each channel's end. MIRROR_FUZZ_SEED as for test_fuzz;
    MIRROR_FUZZ_CHANNELS channels (default 300) of up to 200 calls."""
    import random as random_module
    seed = fuzz_seed()
    channels = int(os.environ.get("MIRROR_FUZZ_CHANNELS") or 300)
    rng = random_module.Random(seed)
    h = Harness(clf, debug_iface=debug_iface, triggers=frozenset(range(500, 600)) | {13, 14},
                hash_seed=rng.getrandbits(32))
    seen = Counter()
    try:
        for n in range(channels):
            conn = random_conn(rng)
            start = HANDSHAKE if rng.random() < 0.9 else UNSEEN
            client_dir = rng.choice(DIRECTIONS)
            for spec, from_client in grpc_channel(rng, conn, start,
                                                  calls=rng.randrange(1, 200)):
                d = client_dir if from_client else other(client_dir)
                seen.update(h.feed(build(spec)[0], d).counters)
            if n % 20 == 19:
                h.checkpoint(reset=True)
        h.checkpoint(reset=True)
    finally:
        h.close()
    shown = {k: seen[k] for k in sorted(seen) if k.startswith(("grpc", "hpack", "h2", "flows"))}
    with capsys.disabled():
        print(f"\nmirror gRPC channel fuzz: seed={seed} channels={channels} "
              f"frames={h.frames} disagreements={len(h.disagreements)} {shown}", flush=True)
    assert not h.disagreements, f"seed {seed}:\n" + report(h, seed)
    assert seen["grpc_errors"] and seen["grpc_ok"] and seen["flows_marked"]


# Budgets the budget fuzz cycles through, one per checkpoint interval.
FUZZ_BUDGETS = [(3, 0, 0), (0, 1500, 0), (0, 0, 60), (6, 4000, 150), (1, 0, 0)]


@pytest.mark.testrun
@pytest.mark.slow
def test_fuzz_with_budgets(clf, pinned, debug_iface, capsys):
    """The fuzz's frames with budgets on: a new set of budgets (and empty rate windows)
    at every checkpoint. MIRROR_FUZZ_SEED as for test_fuzz; MIRROR_FUZZ_BUDGET_FRAMES
    frames (default 20000)."""
    seed = fuzz_seed()
    total = int(os.environ.get("MIRROR_FUZZ_BUDGET_FRAMES") or 20000)
    with capsys.disabled():
        print(f"\nmirror budget fuzz: seed={seed} frames={total}", flush=True)
    gen = Generator(seed, total, clf.conn_slots)
    h = Harness(clf, debug_iface=debug_iface, budget=R.Budget(*FUZZ_BUDGETS[0]),
                monitored=(FORWARDED_FROM,), hash_seed=gen.hash_seed)

    def next_budget():
        h.set_budget(R.Budget(*FUZZ_BUDGETS[h.checkpoints % len(FUZZ_BUDGETS)]))
    try:
        run_fuzz(h, gen, next_budget)
    finally:
        h.set_monitored(LO_IFINDEX, False)
        h.close()
    skips = {k: h.totals[k] for k in ("skip_flow_packets", "skip_flow_bytes", "skip_cpu_rate")}
    with capsys.disabled():
        print(f"mirror budget fuzz summary: frames={h.frames} "
              f"disagreements={len(h.disagreements)} checkpoints={h.checkpoints} "
              + " ".join(f"{k}={v}" for k, v in skips.items()) + f"\n  {summary(h)}",
              flush=True)
    assert h.frames == total
    assert not h.disagreements, (f"seed {seed}: {len(h.disagreements)} disagreements\n"
                                 + report(h, seed))
    assert all(skips.values()), f"a budget never skipped anything: {skips}"
