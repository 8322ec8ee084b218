"""The server's HPACK state followed per connection (bpf/http2.h, struct conn_hpack), frame
by frame in BPF_PROG_TEST_RUN: gRPC channels whose later trailers refer to the
dynamic table.

Every response is written by one `hpack` Encoder per connection, as a real server's
encoder writes them: the first grpc-status is a literal with a new name, later ones name
its entry (a literal with a dynamic name index) or repeat it whole (an indexed field). The
segments carry the sequence numbers a real connection has. Every frame is checked
against the reference model (tests/reference.py) on every counter, and at the end of each
case the kernel's struct conn_hpack against the model's; what must happen is stated here
outright as well."""
from __future__ import annotations

from ipaddress import ip_address

import pytest
from hpack import Encoder

import reference as R
from frames import TCP_ACK, TCP_PSH, TCP_SYN, tcp4, tcp6
from fuzz_frames import H2_SETTINGS, H2_SETTINGS_ACK, h2_frame
from mirror.abi import CONN, CONN_HPACK
from test_http2 import CLI4, CLI6, SPORT, SRV4, SRV6, Conns

pytestmark = pytest.mark.testrun

# The channel's client port: not the one Conns opens for itself.
PORT = 40100
# --trigger 5xx,grpc:13,14
TRIGGER = frozenset(range(500, 600)) | {13, 14}
GRPC = ("grpc_ok", "grpc_errors", "grpc_status_unknown")


class Channel:
    """One gRPC connection in the classifier and the model, opened by a handshake (or,
    with `handshake` False, under way already: its client learned from the preface), then
    calls answered through one server encoder at the sequence numbers that follow."""

    def __init__(self, clf, family: int = 4, handshake: bool = True, triggers=TRIGGER):
        self.clf = clf
        self.conns = Conns(clf)
        clf.set_trigger(triggers)
        self.conns.model.triggers = frozenset(triggers)
        self.tcp = tcp4 if family == 4 else tcp6
        self.srv, self.cli = (SRV4, CLI4) if family == 4 else (SRV6, CLI6)
        self.seq = {"server": 0x7FFFFF00, "client": 3000}   # the server's wraps 2^31
        self.server_encoder, self.client_encoder = Encoder(), Encoder()
        self.stream = 1
        self.calls = 0
        if handshake:
            self.client(b"", TCP_SYN)
            self.server(b"", TCP_SYN | TCP_ACK)
            self.client(b"", TCP_ACK)
        self.client(R.H2_PREFACE + H2_SETTINGS)
        self.server(H2_SETTINGS + H2_SETTINGS_ACK)
        self.client(H2_SETTINGS_ACK)

    @property
    def key(self):
        return R.flow_key(4 if self.tcp is tcp4 else 6, ip_address(self.srv).packed, SPORT,
                          ip_address(self.cli).packed, PORT)

    def send(self, side: str, payload: bytes, flags: int, seq: int | None = None) -> dict:
        at = self.seq[side] if seq is None else seq
        if side == "server":
            frame = self.tcp(self.srv, SPORT, self.cli, PORT, payload, flags=flags, seq=at)
        else:
            frame = self.tcp(self.cli, PORT, self.srv, SPORT, payload, flags=flags, seq=at)
        if seq is None:
            grow = len(payload) + (1 if flags & TCP_SYN else 0)
            self.seq[side] = (at + grow) & 0xFFFFFFFF
        self.clf.poll_events(0)         # keep the events ring buffer from filling
        return self.conns.run(frame, "egress" if side == "server" else "ingress")

    def server(self, payload: bytes, flags: int = TCP_PSH | TCP_ACK, seq=None) -> dict:
        return self.send("server", payload, flags, seq)

    def client(self, payload: bytes = b"", flags: int = TCP_PSH | TCP_ACK) -> dict:
        return self.send("client", payload, flags)

    def request(self) -> int:
        stream = self.stream
        self.stream += 2
        block = self.client_encoder.encode(
            [(":method", "POST"), (":scheme", "http"), (":path", "/t.S/Call"),
             (":authority", self.srv), ("content-type", "application/grpc"),
             ("te", "trailers")])
        self.client(h2_frame(1, 0x04, stream, block) + h2_frame(0, 1, stream, b"\0" * 5))
        return stream

    def answer(self, stream: int, code: int, trailers_only: bool, request_id: bool) -> bytes:
        """The server's frames for a call: a trailers-only response, or headers, a
        message and trailers. With `request_id`, a new x-request-id in the headers of
        every call: each is an insertion, and the table turns over every few dozen."""
        enc = self.server_encoder
        meta = [("x-request-id", "%032x" % self.calls)] if request_id else []
        self.calls += 1
        error = [("grpc-message", f"failed {code}")] if code else []
        if trailers_only:
            return h2_frame(1, 0x05, stream, enc.encode(
                [(":status", "200"), ("content-type", "application/grpc"),
                 ("grpc-status", str(code))] + error + meta))
        head = enc.encode([(":status", "200"), ("content-type", "application/grpc")] + meta)
        trailers = enc.encode([("grpc-status", str(code))] + error)
        return (h2_frame(1, 0x04, stream, head) + h2_frame(0, 0, stream, b"\0\0\0\0\2ok")
                + h2_frame(1, 0x05, stream, trailers))

    def call(self, code: int, trailers_only: bool = False, request_id: bool = True) -> dict:
        """One call answered with `code`; the counters of the server's segment."""
        stream = self.request()
        got = self.server(self.answer(stream, code, trailers_only, request_id))
        self.client(b"", TCP_ACK)
        return got

    def kernel_hpack(self) -> dict:
        slot = self.conns.model.find(self.key)
        assert slot is not None
        raw = dict(self.clf._conn_slots())[slot]
        return CONN_HPACK.decode(CONN.decode(raw)["hpack"])

    def model_hpack(self) -> R.Hpack:
        return self.conns.model.slots[self.conns.model.find(self.key)].hpack

    def check_state(self) -> R.Hpack:
        """The kernel's followed state is the model's; returns it."""
        hp = self.model_hpack()
        k = self.kernel_hpack()
        assert (k["state"], k["next_seq"], k["inserted"], k["floor"], k["next"],
                list(k["named_at"]), list(k["named_what"])) == (
            hp.state, hp.next_seq, hp.inserted, hp.floor, hp.next, hp.named_at,
            hp.named_what), (k, hp)
        return hp


def grpc_of(got: dict) -> dict:
    return {k: got[k] for k in GRPC if got.get(k)}


def marked(clf) -> list:
    return [f["status"] for f in clf.flows().values()]


FAMILIES = pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])


@FAMILIES
@pytest.mark.parametrize("trailers_only", [True, False], ids=["trailers-only", "trailers"])
def test_error_first(clf, family, trailers_only):
    ch = Channel(clf, family)
    got = ch.call(14, trailers_only)
    assert grpc_of(got) == {"grpc_errors": 1} and got["flows_marked"] == 1
    assert marked(clf) == [14]
    assert ch.check_state().state == R.HPACK_FOLLOWING


@FAMILIES
@pytest.mark.parametrize("oks", [1, 10, 1000])
@pytest.mark.parametrize("trailers_only", [True, False], ids=["trailers-only", "trailers"])
def test_error_after_oks(clf, family, oks, trailers_only):
    """The error's grpc-status names the entry the first OK inserted (a dynamic name
    index): read, and the connection marked from that segment. After 1000 calls, each
    inserting a request id, the server's table has turned over many times (the
    grpc-status entry itself was dropped and inserted again)."""
    ch = Channel(clf, family)
    for _ in range(oks):
        got = ch.call(0)
        assert grpc_of(got) == {"grpc_ok": 1}, got
    assert not marked(clf)
    stream = ch.request()
    answer = ch.answer(stream, 14, trailers_only, True)
    if oks < 1000:      # (after 1000, the entry may just have been dropped: a literal)
        assert R.grpc_status(answer) == [R.H2_UNKNOWN], \
            "without the connection's state the error is a dynamic reference"
    got = ch.server(answer)
    assert grpc_of(got) == {"grpc_errors": 1} and got["flows_marked"] == 1, got
    assert marked(clf) == [14]
    hp = ch.check_state()
    assert hp.state == R.HPACK_FOLLOWING
    if oks == 1000:
        assert hp.inserted > 1000 and hp.floor > 1, "the table turned over"
    # The next error, an indexed repeat of the same entry, is read too.
    got = ch.call(14, trailers_only)
    assert grpc_of(got) == {"grpc_errors": 1}, got


@FAMILIES
@pytest.mark.parametrize("size", [0, 256, 64])
def test_table_size_update_before_error(clf, family, size):
    """The server's table shrinks (a client's SETTINGS_HEADER_TABLE_SIZE): the encoder
    starts its next block with a size update and forgets what no longer fits; a later
    error is still read (a new literal after 0, a reference to what remains else)."""
    ch = Channel(clf, family)
    for _ in range(5):
        ch.call(0, request_id=False)
    ch.server_encoder.header_table_size = size
    got = ch.call(0, request_id=False)
    assert grpc_of(got) == {"grpc_ok": 1}, got
    ch.server_encoder.header_table_size = 4096
    got = ch.call(13, trailers_only=True, request_id=False)
    assert grpc_of(got) == {"grpc_errors": 1} and got["flows_marked"] == 1, got
    assert marked(clf) == [13]
    assert ch.check_state().state == R.HPACK_FOLLOWING


@FAMILIES
def test_unseen_start_unknown_never_guessed(clf, family):
    """A connection whose start went unseen (open before `mirror run`): its first
    grpc-status, a literal, is read; the later ones refer to a table whose start was not
    seen: unknown, counted, and nothing marked."""
    ch = Channel(clf, family, handshake=False)
    assert ch.model_hpack().state == R.HPACK_LOST
    got = ch.call(0)
    assert grpc_of(got) == {"grpc_ok": 1}
    got = ch.call(14, trailers_only=True)
    assert grpc_of(got) == {"grpc_status_unknown": 1}, got
    got = ch.call(13)
    assert grpc_of(got) == {"grpc_status_unknown": 1}, got
    assert not marked(clf)
    assert clf.counters()["hpack_start_unseen"] == 1
    assert ch.check_state().state == R.HPACK_LOST


@FAMILIES
def test_client_headers_never_trigger(clf, family):
    """The client's header blocks are the client's encoder's: never read for a status,
    and the server's followed state does not move."""
    ch = Channel(clf, family)
    ch.call(0)
    before = ch.check_state().copy()
    stream = ch.stream
    for block in (ch.client_encoder.encode([("grpc-status", "14"), (":status", "503")]),
                  ch.client_encoder.encode([("grpc-status", "14"), (":status", "503")]),
                  b"\xbe\xbf\xc0"):
        got = ch.client(h2_frame(1, 0x05, stream, block))
        assert not grpc_of(got) and not got.get("h2_responses"), got
    assert not marked(clf)
    assert ch.check_state() == before


@FAMILIES
def test_gap_loses_the_state(clf, family):
    """A server segment the classifier did not walk (here: never sent to it) leaves the
    count unknown: the next error is counted unknown, not guessed."""
    ch = Channel(clf, family)
    ch.call(0)
    stream = ch.request()
    ch.seq["server"] += len(ch.answer(stream, 0, False, True))     # not seen
    got = ch.call(14, trailers_only=True)
    assert grpc_of(got) == {"grpc_status_unknown": 1} and got["hpack_gap"] == 1, got
    assert not marked(clf)
    assert ch.check_state().state == R.HPACK_LOST


@FAMILIES
def test_retransmission_keeps_the_state(clf, family):
    """A server segment sent again (a retransmission) holds nothing new: the state is
    kept, and the error after it read."""
    ch = Channel(clf, family)
    stream = ch.request()
    at = ch.seq["server"]
    answer = ch.answer(stream, 0, False, True)
    ch.server(answer)
    ch.server(answer, seq=at)
    got = ch.call(14)
    assert grpc_of(got) == {"grpc_errors": 1} and got["flows_marked"] == 1, got
    assert ch.check_state().state == R.HPACK_FOLLOWING


@FAMILIES
def test_repeated_status_resolved(clf, family):
    """Plain HTTP/2 through one encoder: a repeated 503 is a dynamic reference, read as
    the :status it names (nghttp2, Go and hpack servers repeat statuses so)."""
    ch = Channel(clf, family)
    enc = ch.server_encoder
    for code, expect in ((503, {"h2_responses": 1}), (503, {"h2_responses": 1})):
        stream = ch.request()
        block = enc.encode([(":status", str(code)), ("server", "t")])
        got = ch.server(h2_frame(1, 0x04, stream, block) + h2_frame(0, 1, stream, b"x"))
        assert {k: got[k] for k in ("h2_responses", "h2_status_unknown") if got.get(k)} == \
            expect, got
    assert marked(clf) == [503]
    assert ch.check_state().state == R.HPACK_FOLLOWING
