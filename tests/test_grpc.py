"""gRPC's grpc-status through the classifier (bpf/http2.h, h2_walk), frame by frame in
BPF_PROG_TEST_RUN, on connections whose server's HPACK state is not followed (their
SYN-ACK's sequence number is not the response's: tests/test_hpack.py has the followed
ones): what any connection reads.

Header blocks come from the `hpack` package (its encoder, or its integer and Huffman
encoders for hand-made representations) and frames from `hyperframe`; every case is
also checked against the reference model (tests/reference.py) on every counter, and the
expected outcome is stated here outright. A grpc-status is read only in a HEADERS frame
with END_STREAM: 0 counts `grpc_ok`, 1-16 `grpc_errors`; a code in the trigger set's gRPC
slots (0-16) marks the flow with that code as its status."""
from __future__ import annotations

import pytest
from hpack import Encoder
from hpack.hpack import INDEX_INCREMENTAL, INDEX_NEVER, INDEX_NONE, encode_integer
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH

import reference as R
from mirror.abi import COUNTERS
from frames import TCP_SYN, tcp4
from test_http2 import CLI4, CPORT, LO_IFINDEX, SPORT, SRV4, Conns, data, headers, response_frame

HUFFMAN = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)
# The forms' first bytes (RFC 7541 6.2): incremental indexing, without, never indexed.
FORMS = {"incremental": (0x40, 6), "without": (0x00, 4), "never": (0x10, 4)}
GRPC_ERRORS = frozenset(range(1, 17))
# A set like an operator's `--trigger 5xx,grpc:2,13,14`.
TRIGGER = frozenset(range(500, 600)) | {2, 13, 14}


# --- building ---------------------------------------------------------------------------

def string(text: bytes, huffman: bool) -> bytes:
    """An HPACK string literal (RFC 7541 5.2)."""
    body = HUFFMAN.encode(text) if huffman else text
    out = bytearray(encode_integer(len(body), 7))
    if huffman:
        out[0] |= 0x80
    return bytes(out) + body


def literal(name: bytes | int, value: bytes, form: str = "incremental",
            huffman_name: bool = False, huffman_value: bool = False) -> bytes:
    """A literal field: a new name (bytes) or a name index (int), any of the three forms."""
    first, prefix = FORMS[form]
    index = 0 if isinstance(name, bytes) else name
    out = bytearray(encode_integer(index, prefix))
    out[0] |= first
    if isinstance(name, bytes):
        out += string(name, huffman_name)
    return bytes(out) + string(value, huffman_value)


def grpc_status(code: int, form: str = "incremental", huffman_name: bool = False,
                huffman_value: bool = False) -> bytes:
    return literal(b"grpc-status", str(code).encode(), form, huffman_name, huffman_value)


def trailers(block: bytes, stream: int = 1, end_stream: bool = True) -> bytes:
    return headers(block, stream=stream, end_stream=end_stream)


# --- running ----------------------------------------------------------------------------

def run(clf, payload: bytes, triggers=TRIGGER) -> dict:
    """Runs the payload in a server segment of an open connection; asserts the reference
    agrees on every counter and on the interface's gRPC stats; returns the counter
    deltas."""
    clf.poll_events(0)                  # keep the events ring buffer from filling
    c = Conns(clf)
    clf.set_trigger(triggers)
    c.model.triggers = frozenset(triggers)
    frame = response_frame(payload)
    got = c.run(frame)
    # The interface's gRPC stats move with the counters (the model's counters are
    # checked by Conns.run).
    stats = clf.iface_stats().get((LO_IFINDEX, "egress"), {})
    assert (stats.get("grpc_ok", 0), stats.get("grpc_error", 0)) == (
        got.get("grpc_ok", 0), got.get("grpc_errors", 0)), (stats, got)
    return got


def expect_code(clf, payload: bytes, code: int, triggers=TRIGGER) -> None:
    """The segment's grpc-status is `code`: counted, and marking iff in the triggers."""
    got = run(clf, payload, triggers)
    assert got.get("grpc_errors" if code else "grpc_ok") == 1, f"{payload.hex()}: {got}"
    assert "grpc_status_unknown" not in got
    assert R.grpc_status(payload) == [code]
    marks = code in triggers
    assert clf.flow_count() == int(marks), got
    if marks:
        assert got["mirrored_packets"] == 1 and got["events"] == 1
        assert [f["status"] for f in clf.flows().values()] == [code]


def expect_unknown(clf, payload: bytes) -> None:
    got = run(clf, payload)
    assert got.get("grpc_status_unknown") == 1, f"{payload.hex()}: {got}"
    assert not got.get("grpc_ok") and not got.get("grpc_errors")
    assert clf.flow_count() == 0


def expect_nothing(clf, payload: bytes) -> None:
    got = run(clf, payload)
    assert not any(k.startswith("grpc_") for k in got), f"{payload.hex()}: {got}"
    assert clf.flow_count() == 0


# --- representations --------------------------------------------------------------------

@pytest.mark.testrun
@pytest.mark.parametrize("huffman_value", [False, True], ids=["value-raw", "value-huffman"])
@pytest.mark.parametrize("huffman_name", [False, True], ids=["name-raw", "name-huffman"])
@pytest.mark.parametrize("form", list(FORMS))
def test_literal_forms_every_code(clf, form, huffman_name, huffman_value):
    """Trailers whose first field is grpc-status, every code 0-16."""
    for code in range(17):
        block = grpc_status(code, form, huffman_name, huffman_value)
        expect_code(clf, trailers(block + literal(b"grpc-message", b"boom")), code)


@pytest.mark.testrun
def test_hpack_encoder_trailers(clf):
    """The blocks hpack's own encoder writes (Huffman where shorter, else raw)."""
    for code in (0, 2, 13, 14, 16):
        for huffman in (False, True):
            block = Encoder().encode([("grpc-status", str(code)), ("grpc-message", "m")],
                                     huffman=huffman)
            expect_code(clf, trailers(block), code)


@pytest.mark.testrun
def test_trigger_set_chooses_codes(clf):
    """Only the codes in the set mark: 14 does with {14}, 13 does not; with every error
    code armed (grpc-error) 5 marks and 0 does not."""
    expect_code(clf, trailers(grpc_status(14)), 14, frozenset({14}))
    expect_code(clf, trailers(grpc_status(13)), 13, frozenset({14}))
    expect_code(clf, trailers(grpc_status(5)), 5, GRPC_ERRORS)
    expect_code(clf, trailers(grpc_status(0)), 0, GRPC_ERRORS)


# --- position in the block --------------------------------------------------------------

# What precedes grpc-status in the blocks servers send (captured, see bpf/http2.h).
GRPCIO_TRAILERS_ONLY = b"\x88" + literal(31, b"application/grpc")     # :status, content-type
GRPCJS_TRAILERS_ONLY = b"\x88"
BEFORE = {
    "status-static": b"\x88",
    "grpcio-trailers-only": GRPCIO_TRAILERS_ONLY,
    "dynamic-indexed": b"\x88\xc0",
    "new-name-literal": literal(b"grpc-accept-encoding", b"identity, deflate, gzip"),
    "three-literals": literal(31, b"application/grpc") + literal(b"x-a", b"1") +
                      literal(b"x-b", b"2", huffman_name=True, huffman_value=True),
    "size-update": b"\x3f\xe1\x1f\x88",
}


@pytest.mark.testrun
@pytest.mark.parametrize("before", list(BEFORE))
def test_after_other_fields(clf, before):
    """A trailers-only response: grpc-status after :status and other fields."""
    for code in (0, 14):
        expect_code(clf, trailers(BEFORE[before] + grpc_status(code)), code)


@pytest.mark.testrun
def test_beyond_the_step_bound(clf):
    """24 literals (a step each) before it: grpc-status is not reached (the bound); 23
    before it, it is."""
    block = b"".join(literal(b"x-%d" % i, b"v") for i in range(24)) + grpc_status(14)
    expect_nothing(clf, trailers(block))
    block = b"".join(literal(b"x-%d" % i, b"v") for i in range(23)) + grpc_status(14)
    expect_code(clf, trailers(block), 14)


@pytest.mark.testrun
def test_long_value_skipped(clf):
    """A literal with a value longer than a step sees (32 bytes) is skipped by length."""
    block = literal(b"grpc-message", b"m" * 300) + grpc_status(13)
    expect_code(clf, trailers(block), 13)


@pytest.mark.testrun
def test_trailers_after_data_in_one_segment(clf):
    """A response's HEADERS, DATA and trailers in one segment; and two streams' trailers,
    the second one an error."""
    head = headers(b"\x88" + literal(31, b"application/grpc"), stream=1)
    expect_code(clf, head + data(b"\x00\x00\x00\x00\x02hi") + trailers(grpc_status(14)), 14)
    two = trailers(grpc_status(0), stream=1) + trailers(grpc_status(2), stream=3)
    got = run(clf, two)
    assert got["grpc_ok"] == 1 and got["grpc_errors"] == 1 and got["flows_marked"] == 1
    assert [f["status"] for f in clf.flows().values()] == [2]


# --- what is not read --------------------------------------------------------------------

@pytest.mark.testrun
def test_no_end_stream(clf):
    """A HEADERS frame without END_STREAM is not trailers: nothing is read."""
    expect_nothing(clf, trailers(grpc_status(14), end_stream=False))
    expect_nothing(clf, trailers(b"\x88" + grpc_status(14), end_stream=False))


@pytest.mark.testrun
def test_dynamic_references_unknown(clf):
    """A repeated grpc-status (grpcio: indexed 63; grpc-js: a literal with name index
    63) cannot be read: unknown, nothing marked."""
    expect_unknown(clf, trailers(b"\xbf" + literal(b"grpc-message", b"m")))
    expect_unknown(clf, trailers(b"\x88\x7f\x00\x0214"))
    expect_unknown(clf, trailers(b"\x88\xc1\xc0"))


@pytest.mark.testrun
@pytest.mark.parametrize("value", [b"17", b"99", b"1x", b"", b"100", b"-1"])
def test_bad_values_unknown(clf, value):
    expect_unknown(clf, trailers(literal(b"grpc-status", value)))


@pytest.mark.testrun
def test_value_cut_by_segment_end(clf):
    frame = trailers(grpc_status(14))
    expect_unknown(clf, frame[:-1])


@pytest.mark.testrun
def test_other_names_and_plain_h2(clf):
    """A name like grpc-status is not it; a plain h2 response with END_STREAM reads no
    grpc-status (its static fields are no dynamic references)."""
    expect_nothing(clf, trailers(literal(b"grpc-statux", b"14")))
    expect_nothing(clf, trailers(literal(b"grpc-message", b"14")))
    expect_nothing(clf, trailers(Encoder().encode([(":status", "204"), ("server", "x")])))


@pytest.mark.testrun
def test_http_status_below_100_never_triggers(clf):
    """Slots 0-16 of the trigger array are gRPC's: an HTTP/2 :status "014" or an HTTP/1.x
    "HTTP/1.1 014" is counted but marks nothing."""
    got = run(clf, headers(literal(8, b"014")), frozenset({14}))
    assert got["h2_responses"] == 1 and clf.flow_count() == 0
    got = run(clf, b"HTTP/1.1 014 Odd\r\n\r\n", frozenset({14}))
    assert got["responses"] == 1 and clf.flow_count() == 0


# --- the trigger spec --------------------------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("spec, codes, text", [
    ("5xx,grpc:2,13,14", set(range(500, 600)) | {2, 13, 14}, "5xx,grpc:2,13-14"),
    ("grpc:unavailable,INTERNAL,503", {13, 14, 503}, "503,grpc:13-14"),
    ("grpc-error", set(range(1, 17)), "grpc-error"),
    ("grpc:0-16", set(range(17)), "grpc:0-16"),
    ("429,grpc:not_found", {429, 5}, "429,grpc:5"),
])
def test_trigger_spec(spec, codes, text):
    from mirror.trigger import describe, parse_trigger
    assert parse_trigger(spec) == codes
    assert describe(frozenset(codes)) == text
    assert parse_trigger(text) == codes


@pytest.mark.unit
@pytest.mark.parametrize("spec, words", [
    ("13", "cannot read '13'"), ("grpc:17", "0-16"), ("grpc:teapot", "no gRPC code"),
    ("grpc:9-3", "ascending"), ("grpc:", "no gRPC code"),
])
def test_trigger_spec_refused(spec, words):
    from mirror.errors import UsageError
    from mirror.trigger import parse_trigger
    with pytest.raises(UsageError, match=words):
        parse_trigger(spec)


@pytest.mark.unit
def test_event_json_names_the_grpc_code():
    from mirror.events.record import Event, grpc_name, status_label
    from mirror.flowkey import FlowKey
    key = FlowKey(4, "198.18.0.80", 50051, "198.19.7.10", 40000)
    ev = Event(0, 1, 14, "egress", True, "grpc", key.to_bytes(), True, 0, 0, b"")
    record = ev.to_json("eth0", 0)
    assert (record["proto"], record["status"], record["grpc_status"]) == ("grpc", 14, "UNAVAILABLE")
    assert status_label(ev) == "grpc:14" and grpc_name(0) == "OK"


# --- mutations, against the reference ----------------------------------------------------

@pytest.mark.testrun
def test_mutated_trailers_agree_with_reference(clf, capsys):
    """20,000 segments from the fuzz's gRPC generator (mutated frames around gRPC
    trailers), each the server's on a connection its client's SYN opened just before:
    the classifier's counters equal the reference model's on every one."""
    import random
    from fuzz_frames import h2_payload
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    c = Conns(clf)
    clf.set_trigger(TRIGGER)
    c.model.triggers = frozenset(TRIGGER)
    syn = tcp4(CLI4, CPORT, SRV4, SPORT, flags=TCP_SYN)
    seen = {"grpc_ok": 0, "grpc_errors": 0, "grpc_status_unknown": 0, "flows_marked": 0}
    for n in range(20000):
        c.run(syn, "ingress")           # a new connection: nothing learned from the last
        frame = response_frame(h2_payload(rng))
        try:
            got = c.run(frame)
        except AssertionError as exc:
            raise AssertionError(f"seed {seed} case {n}: {frame.hex()}: {exc}") from None
        for k in seen:
            seen[k] += got.get(k, 0)
        if n % 500 == 499:
            clf.poll_events(0)          # keep the events ring buffer from filling
    with capsys.disabled():
        print(f"\ngRPC mutations: 20000 segments, seed {seed}, 0 disagreements, {seen}")
    assert seen["grpc_errors"] and seen["grpc_ok"] and seen["grpc_status_unknown"]
