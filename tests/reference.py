"""Reference model of the classifier (bpf/mirror.c): for any frame, what the classifier
must decide.

Written from the protocol specifications (IEEE 802.1Q, RFC 791, RFC 8200, RFC 9293,
RFC 9112) and the contract stated in bpf/mirror.h and bpf/mirror.c's comments, not by
translating the C: tests/test_fuzz.py feeds the same frames to both and any difference
is a finding. Plain byte indexing rather than dpkt: dpkt repairs or rejects exactly the
frames (lying lengths, truncation) whose handling is being specified.

The rules, in the order a frame meets them:

Run at all. BPF_PROG_TEST_RUN (the harness, not the classifier) refuses with EINVAL,
before the program runs, a frame shorter than an Ethernet header, longer than
fastmaps.TEST_RUN_MAX_FRAME, or whose outer ethertype is IPv4 (IPv6) and which is
shorter than 14 + 20 (14 + 40) bytes: it reads the network header to set up the test
socket. No counter moves.

Link layer. Every frame the program sees counts `packets`. At most one 802.1Q (0x8100)
or 802.1ad (0x88A8) tag is skipped; a frame too short for the tag is `malformed`. The
(inner) ethertype must then be IPv4 or IPv6, otherwise `other` (ARP, LLDP, 802.3 length
fields, a second VLAN tag, 0x9100 QinQ).

IPv4 (RFC 791). A frame too short for the 20-byte fixed header is `malformed` and not
counted as IPv4. Otherwise `ipv4` counts, then: version not 4, or IHL under 5 words ->
`malformed`. A non-first fragment (offset != 0; the MF flag alone marks the first
fragment, which carries the TCP header) or a protocol other than TCP -> `other`, without
looking further at lengths: a packet the classifier does not parse is not judged.
Total length 0 means "trust the frame" (BIG TCP super-packets); a non-zero total length
shorter than the IHL -> `malformed`. The IP packet ends at the total length or at the
end of the frame, whichever is first (Ethernet padding is not payload; a capture may be
cut short).

IPv6 (RFC 8200). A frame too short for the 40-byte header is `malformed`, not counted as
IPv6. Otherwise `ipv6` counts; version not 6 -> `malformed`. Payload length 0 means
"trust the frame" (jumbograms, BIG TCP). Up to MAX_IPV6_EXT_HDRS (6) hop-by-hop (0),
routing (43), destination options (60) and fragment (44) headers are walked; any other
next header ends the walk (AH, ESP, mobility, ... are not walked: TCP behind them is
"other"), and a seventh walkable header is given up on as `other`. Of each walked
header the first 4 bytes (Next Header, Hdr Ext Len, and the fragment header's offset)
must be in the frame, else `malformed`. A fragment header with a non-zero offset is a
non-first fragment -> `other`. A next header that is not TCP -> `other`. The rest of a
header, and whether it stays inside the payload length, is judged only by what has to be
read after it: the next header's first bytes, or the TCP header, which must end inside
the packet.

Reconciled with the C: the first version of this model called an extension header that
runs past the frame or the payload length `malformed` whatever followed it (the
contract's "bogus ... ext header lengths"); the classifier counts such a packet `other`
when what follows is not TCP, or when it is a non-first fragment. The classifier is the
consistent one: IPv4 packets it does not parse (other protocols, non-first fragments) are
`other` whatever their IHL or total length say (tests/test_classifier.py,
ipv4-nonfirst-fragment-bogus-tot-len), and IPv6 gets the same rule: lengths are judged
only on the way to a TCP header. No marking or mirroring decision depends on it.

TCP (RFC 9293). The 20-byte fixed header must be in the frame, and the data offset must
be at least 5 words and the header with its options must end inside the IP packet;
otherwise `malformed`. Then `tcp` counts and the flow key is the two endpoints, lower
(address bytes, then port) first. TCP flags, window, sequence numbers and checksums play
no part: the classifier is a passive observer, not a TCP stack.

HTTP (RFC 9112, narrowed by the contract). The TCP payload is what lies between the end
of the TCP header and the end of the IP packet. When it is at least 13 bytes long and
starts with "HTTP/1.0 " or "HTTP/1.1 ", three ASCII digits, and then a space or a CR,
the segment is a response with that status code (000-999): `responses` counts and the
class counter, `resp_1xx` .. `resp_5xx` for 100-599, `resp_other` for the rest. The
check is case-sensitive (RFC 9112: HTTP-name is "HTTP", %x48.54.54.50).

Requests (RFC 9112 request-line, RFC 9110 section 9 methods plus PATCH). A payload of at
least 13 bytes that starts with GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, TRACE or
PATCH and a space (case-sensitive) starts a request. With the request snapshot on, the
flow remembers which endpoint sent its last request start (`requests` counts), and a
status line from that same endpoint is that side's own data, not a response
(`status_same_dir`; not counted as a response, never marks); a status line on a flow
with no remembered request is a response as with the snapshot off, counted in
`resp_no_request` as well. With the snapshot off none of this moves.

A new connection. A segment with the SYN flag on a marked flow is a new connection that
reuses the 4-tuple: the flow is unmarked (`syn_unmarked`) and the segment is not
mirrored (unless it itself carries a trigger status, which marks the flow anew).

Marking and mirroring. A response whose code is in the trigger set is reported to user
space as an error event (`events`), whether or not the flow was marked already, and
marks the flow when it is not marked yet (`flows_marked`). Every TCP packet of a marked flow (marked before,
or by this very packet) is mirrored: `mirrored_packets` and `mirrored_bytes` (the whole
frame) when the debug interface takes the clone, else `clone_failures`, or
`no_debug_if` when no debug interface is configured. A packet that is not TCP, or whose
TCP headers are malformed, is never mirrored, even if its addresses belong to a marked
flow (a non-first fragment has no ports to tell).

Per-interface statistics: a response counts in its class under (ifindex, direction);
a mirrored packet counts there too.

HTTP/2 (RFC 9113 frames, RFC 7541 HPACK; bpf/http2.h's contract). A payload that is not
an HTTP/1.x status line and is at least 10 bytes long (a frame header and one byte) is
read as a sequence of frames from its first byte, at most 16 of them. Every frame header
must lie wholly in the payload and be plausible, or the walk ends with nothing: type
0-9; only that type's defined flags; length <= 16384; reserved bit clear; HEADERS with
END_HEADERS set and on an odd stream; DATA, PRIORITY, RST_STREAM, PUSH_PROMISE,
CONTINUATION on a non-zero stream, SETTINGS, PING, GOAWAY on stream 0; PRIORITY 5 bytes, RST_STREAM 4, SETTINGS a multiple of 6 (0 with
ACK), PING 8, GOAWAY at least 8, WINDOW_UPDATE 4, PUSH_PROMISE at least 4. Every HEADERS
frame met is read; its header block (after the pad length and the priority
fields its flags announce; a padding longer than the frame is no status; the frame may be
cut by the end of the payload) gives the answer from its first field, after at most two
dynamic table size updates of at most 4 bytes each:
- an indexed field 8-14: that static :status; 62 and up: unknown; any other: none;
- a literal (any of the three forms) whose name index is 8-14 or whose new name is
  ":status" (raw, or Huffman-coded in 5 bytes): its value, which must be 3 raw digits or
  2-3 Huffman bytes that decode (RFC 7541 Appendix B, strict padding) to 3 digits, else
  unknown; a name index of 62 and up: unknown; other names: none;
- anything cut by the end of the data before the answer is known: unknown (the block is
  only read up to its first 24 bytes, enough for every form above).
Each status counts `h2_responses` and its class in the interface's "h2_<class>"; each
unknown counts `h2_status_unknown`. A segment with a status in the trigger set marks and
mirrors exactly as an HTTP/1.x response (the flow records the first such status).

gRPC (bpf/http2.h, h2_grpc_walk). The header block of every HEADERS frame that has
END_STREAM and whose block starts within the payload (at most the first 4 such frames)
is read again for a grpc-status, in frame order, by one walk of at most 8 steps for all
of them. A step reads, from the start of the block's part in the payload (only its first
32 bytes are visible to a step), one item: an indexed field (a static or dynamic index;
62 and up notes a dynamic reference), a size update, a literal's name index and new
name, or a literal's value (skipped by its length). HPACK integers of more than 3 bytes,
or cut, end the block. A new name "grpc-status" (11 raw bytes, or Huffman 8 bytes
9acac8b21234da8f) wholly visible makes the next step read its value: 1-2 raw digits, or
1-2 Huffman bytes decoding to 1-2 digits with strict padding, of value 0-16; else (value
cut, too long, not digits) unknown. A block ends when its grpc-status is read, when its
bytes in the payload are used up, or on a bad integer; ending without a grpc-status
after a dynamic reference counts unknown. A step budget spent mid-block ends the walk
with nothing more counted. Each grpc-status counts `grpc_ok` (0) or `grpc_errors`
(1-16) and "grpc_ok"/"grpc_error" in the interface's stats; each unknown counts
`grpc_status_unknown`. Slots 0-16 of the trigger set are grpc-status codes: a segment
with no HTTP/2 :status in the trigger set whose first grpc-status in it is (the first
one in the set) marks and mirrors as a response would, with the gRPC code as its status.
HTTP statuses below 100 (HTTP/1.x or HTTP/2) never trigger.

Budgets (bpf/mirror.h struct mirror_config; modelled for one CPU: the fuzz runs pinned).
A marked flow's packets and bytes are counted from the packet that marked it (included)
through every TCP packet of the flow seen since, mirrored or not; a SYN that unmarks the
flow forgets them, and a trigger that marks it anew starts them again. A packet to be
mirrored, with a debug interface configured, is skipped when the flow's packets (this
one counted) exceed max_packets_per_flow (`skip_flow_packets`), else when its bytes
(this one counted) exceed max_bytes_per_flow (`skip_flow_bytes`), else when the CPU's
rate window already holds max_clones_per_window clones (`skip_cpu_rate`); otherwise the
clone takes a place in the window, whether or not the debug interface takes it. 0 is
unlimited. A skip flags the flow with its reason. The model's window never turns over:
the tests give it a width no run outlasts.

The classifier's "nonlinear" path (headers outside the skb's linear data) cannot occur
in BPF_PROG_TEST_RUN, which puts the whole frame in the linear part; the model never
predicts it.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import AbstractSet, Mapping

from hpack.exceptions import HPACKDecodingError
from hpack.huffman_table import decode_huffman

from fastmaps import TEST_RUN_MAX_FRAME
from mirror.abi import COUNTERS, TC_ACT_UNSPEC
from mirror.flowkey import FlowKey

ETH_LEN = 14
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
VLAN_TPIDS = (0x8100, 0x88A8)
IPPROTO_TCP = 6
IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPPROTO_FRAGMENT, IPPROTO_DSTOPTS = 0, 43, 44, 60
WALKED_EXT = (IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPPROTO_DSTOPTS, IPPROTO_FRAGMENT)
MAX_IPV6_EXT_HDRS = 6
# Bytes of an extension header that are read: Next Header, Hdr Ext Len, and the fragment
# header's offset. Every extension header is at least 8 bytes long.
EXT_READ = 4
STATUS_LINE_LEN = 13
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "other")
DIGITS = b"0123456789"

DEBUG_OK, DEBUG_NONE, DEBUG_FAIL = "ok", "none", "fail"


@dataclass(frozen=True)
class Decision:
    """What the classifier must do with one frame.

    ran: the program ran (False: BPF_PROG_TEST_RUN refused the frame, nothing moved).
    verdict: the tc verdict, TC_ACT_UNSPEC whenever it ran.
    counters: the exact counter deltas, zero ones left out.
    path: the counter path taken (see PATHS), for statistics and messages.
    reason: a few words saying why.
    status: the status code of an HTTP/1.x status line or an HTTP/2 :status, else None.
    key: the normalised flow key of a TCP segment whose headers parsed, else None.
    marks: this packet marks its flow (it was not marked before).
    mirrored: the packet is (to be) cloned to the debug interface; counters say whether
        the clone went out.
    marked_after: whether `key` is marked once the packet has been seen.
    iface: per-interface statistics deltas under (direction): class or
        "mirrored_packets"/"mirrored_bytes" -> delta.
    request_from_lo: with the request snapshot on, this packet starts a request, sent
        by the key's lo endpoint (True) or hi endpoint (False); else None.
    """
    ran: bool
    verdict: int | None
    counters: Mapping[str, int]
    path: str
    reason: str
    status: int | None = None
    key: FlowKey | None = None
    marks: bool = False
    mirrored: bool = False
    marked_after: bool = False
    iface: Mapping[str, int] = field(default_factory=dict)
    request_from_lo: bool | None = None


@dataclass
class Budget:
    """The budgets in force (0: unlimited) and what they have used on the one CPU: per
    marked flow [packets, bytes, set of cut reasons], and the clones in the window.
    decide() updates it."""
    max_packets: int = 0
    max_bytes: int = 0
    max_clones: int = 0
    clones: int = 0
    flows: dict = field(default_factory=dict)

    def skip(self, key: FlowKey) -> str | None:
        """The reason a clone of `key`'s current packet is skipped, or None (the clone
        then takes its place in the window)."""
        packets, nbytes, cut = self.flows[key]
        why = None
        if self.max_packets and packets > self.max_packets:
            why = "flow_packets"
        elif self.max_bytes and nbytes > self.max_bytes:
            why = "flow_bytes"
        elif self.max_clones and self.clones >= self.max_clones:
            why = "cpu_rate"
        elif self.max_clones:
            self.clones += 1
        if why:
            cut.add(why)
        return why


PATHS = ("rejected", "malformed", "other", "tcp", "unmarked", "response", "marked",
         "mirrored")


def _u16(b: bytes, off: int) -> int:
    return (b[off] << 8) | b[off + 1]


def test_run_refuses(frame: bytes) -> str | None:
    """Why BPF_PROG_TEST_RUN refuses `frame` with EINVAL before the program runs, or
    None when it runs it."""
    n = len(frame)
    if n < ETH_LEN:
        return f"{n} bytes: shorter than an Ethernet header"
    if n > TEST_RUN_MAX_FRAME:
        return f"{n} bytes: longer than the test run's {TEST_RUN_MAX_FRAME}-byte limit"
    ethertype = _u16(frame, 12)
    if ethertype == ETH_P_IP and n < ETH_LEN + 20:
        return "untagged IPv4 frame shorter than the IPv4 header"
    if ethertype == ETH_P_IPV6 and n < ETH_LEN + 40:
        return "untagged IPv6 frame shorter than the IPv6 header"
    return None


class _Path(Exception):
    """Ends parsing on a counter path ('malformed' or 'other')."""

    def __init__(self, path: str, reason: str):
        super().__init__(reason)
        self.path = path
        self.reason = reason


@dataclass
class _Parsed:
    family: int
    src: bytes
    dst: bytes
    sport: int
    dport: int
    syn: bool
    payload: bytes


def _parse(frame: bytes, seen: dict) -> _Parsed:
    """Walks the headers; raises _Path for the 'malformed'/'other' outcomes. `seen`
    collects the counters that move on the way ('ipv4'/'ipv6')."""
    n = len(frame)
    ethertype = _u16(frame, 12)
    off = ETH_LEN
    if ethertype in VLAN_TPIDS:
        if n < off + 4:
            raise _Path("malformed", "VLAN tag cut")
        ethertype = _u16(frame, off + 2)
        off += 4

    if ethertype == ETH_P_IP:
        if n < off + 20:
            raise _Path("malformed", "IPv4 header cut")
        seen["ipv4"] = 1
        vihl = frame[off]
        version, ihl = vihl >> 4, (vihl & 0x0F) * 4
        if version != 4:
            raise _Path("malformed", f"IPv4 version {version}")
        if ihl < 20:
            raise _Path("malformed", f"IPv4 IHL {ihl // 4}")
        frag = _u16(frame, off + 6)
        if frag & 0x1FFF:
            raise _Path("other", "IPv4 non-first fragment")
        proto = frame[off + 9]
        if proto != IPPROTO_TCP:
            raise _Path("other", f"IPv4 protocol {proto}")
        tot_len = _u16(frame, off + 2)
        if tot_len == 0:
            ip_end = n
        elif tot_len < ihl:
            raise _Path("malformed", f"IPv4 total length {tot_len} < IHL {ihl}")
        else:
            ip_end = min(off + tot_len, n)
        src, dst = frame[off + 12:off + 16], frame[off + 16:off + 20]
        l4 = off + ihl
        family = 4
    elif ethertype == ETH_P_IPV6:
        if n < off + 40:
            raise _Path("malformed", "IPv6 header cut")
        seen["ipv6"] = 1
        version = frame[off] >> 4
        if version != 6:
            raise _Path("malformed", f"IPv6 version {version}")
        plen = _u16(frame, off + 4)
        ip_end = n if plen == 0 else min(off + 40 + plen, n)
        nexthdr = frame[off + 6]
        src, dst = frame[off + 8:off + 24], frame[off + 24:off + 40]
        l4 = off + 40
        walked = 0
        while nexthdr in WALKED_EXT:
            if walked == MAX_IPV6_EXT_HDRS:
                raise _Path("other", f"more than {MAX_IPV6_EXT_HDRS} extension headers")
            walked += 1
            if l4 + EXT_READ > n:
                raise _Path("malformed", "extension header cut")
            if nexthdr == IPPROTO_FRAGMENT:
                if _u16(frame, l4 + 2) & 0xFFF8:
                    raise _Path("other", "IPv6 non-first fragment")
                size = 8
            else:
                size = (frame[l4 + 1] + 1) * 8
            nexthdr = frame[l4]
            l4 += size
        if nexthdr != IPPROTO_TCP:
            raise _Path("other", f"IPv6 next header {nexthdr}")
        family = 6
    else:
        raise _Path("other", f"ethertype {ethertype:#06x}")

    # TCP
    if l4 + 20 > n:
        raise _Path("malformed", "TCP header cut")
    doff = (frame[l4 + 12] >> 4) * 4
    if doff < 20:
        raise _Path("malformed", f"TCP data offset {doff // 4}")
    payload_off = l4 + doff
    if payload_off > ip_end:
        raise _Path("malformed", "TCP header past the end of the IP packet")
    return _Parsed(family, src, dst, _u16(frame, l4), _u16(frame, l4 + 2),
                   bool(frame[l4 + 13] & 0x02), frame[payload_off:ip_end])


def status_code(payload: bytes) -> int | None:
    """The code of an HTTP/1.0 or HTTP/1.1 status line at the start of `payload`."""
    if len(payload) < STATUS_LINE_LEN:
        return None
    if payload[:7] != b"HTTP/1." or payload[7] not in b"01" or payload[8] != 0x20:
        return None
    d = payload[9:12]
    if not all(c in DIGITS for c in d):
        return None
    if payload[12] not in (0x20, 0x0D):
        return None
    return int(d)


METHODS = (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE",
           b"PATCH")


def request_start(payload: bytes) -> bool:
    """A registered method and a space at the start of a payload long enough to be
    looked at (the classifier reads 13 bytes once for both questions)."""
    if len(payload) < STATUS_LINE_LEN:
        return False
    return any(payload.startswith(m + b" ") for m in METHODS)


H2_MIN_PAYLOAD = 10
H2_MAX_FRAMES = 16
H2_MAX_FRAME_LEN = 16384
H2_BLOCK_READ = 24
H2_UNKNOWN = "unknown"
H2_STATIC_STATUS = {8: 200, 9: 204, 10: 206, 11: 304, 12: 400, 13: 404, 14: 500}
# frame type -> (allowed flags, stream: "zero"|"nonzero"|"any", length rule)
H2_FRAME_RULES = {
    0: (0x09, "nonzero", lambda n: True),                  # DATA
    1: (0x2D, "odd", lambda n: True),                      # HEADERS, END_HEADERS set
    2: (0x00, "nonzero", lambda n: n == 5),                # PRIORITY
    3: (0x00, "nonzero", lambda n: n == 4),                # RST_STREAM
    4: (0x01, "zero", lambda n: n % 6 == 0),               # SETTINGS
    5: (0x0C, "nonzero", lambda n: n >= 4),                # PUSH_PROMISE
    6: (0x01, "zero", lambda n: n == 8),                   # PING
    7: (0x00, "zero", lambda n: n >= 8),                   # GOAWAY
    8: (0x00, "any", lambda n: n == 4),                    # WINDOW_UPDATE
    9: (0x04, "nonzero", lambda n: True),                  # CONTINUATION
}


class _Cut(Exception):
    """The header block's bytes ran out before the answer was known."""


def h2_frame_plausible(header: bytes) -> bool:
    length = int.from_bytes(header[0:3], "big")
    ftype, flags = header[3], header[4]
    stream = int.from_bytes(header[5:9], "big")
    if length > H2_MAX_FRAME_LEN or stream >> 31 or ftype not in H2_FRAME_RULES:
        return False
    allowed, stream_rule, length_ok = H2_FRAME_RULES[ftype]
    if flags & ~allowed or not length_ok(length):
        return False
    if ftype == 4 and flags and length:
        return False                                        # SETTINGS ACK is empty
    if ftype == 1 and not flags & 0x04:
        return False                                        # HEADERS without END_HEADERS
    if stream_rule == "odd":
        return stream % 2 == 1
    if stream_rule == "zero":
        return stream == 0
    if stream_rule == "nonzero":
        return stream != 0
    return True


class _TooLong(Exception):
    """An integer longer than the classifier reads (a size update over 4 bytes)."""


def _hpack_int(block: bytes, pos: int, prefix_bits: int,
               max_bytes: int = 0) -> tuple[int, int]:
    """RFC 7541 5.1: the integer at block[pos] with an N-bit prefix; (value, next pos).
    With max_bytes, an integer that has not ended within that many bytes is _TooLong."""
    if pos >= len(block):
        raise _Cut
    start = pos
    limit = (1 << prefix_bits) - 1
    value = block[pos] & limit
    pos += 1
    if value < limit:
        return value, pos
    shift = 0
    while True:
        if max_bytes and pos - start >= max_bytes:
            raise _TooLong
        if pos >= len(block):
            raise _Cut
        byte = block[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _string(block: bytes, pos: int) -> tuple[bool, int, int]:
    """RFC 7541 5.2: (Huffman?, length, position of the string's first byte)."""
    if pos >= len(block):
        raise _Cut
    huffman = bool(block[pos] & 0x80)
    length, pos = _hpack_int(block, pos, 7)
    return huffman, length, pos


def _status_value(block: bytes, pos: int):
    huffman, length, pos = _string(block, pos)
    if length not in ((2, 3) if huffman else (3,)):
        return H2_UNKNOWN
    raw = block[pos:pos + length]
    if len(raw) < length:
        raise _Cut
    if huffman:
        try:
            raw = decode_huffman(raw)
        except HPACKDecodingError:
            return H2_UNKNOWN
    if len(raw) != 3 or not all(c in DIGITS for c in raw):
        return H2_UNKNOWN
    return int(raw)


def _is_status_name(block: bytes, pos: int):
    """(True, position after the name) for a new name ":status", (False, None) else.
    Its length must be 7 raw or 5 Huffman bytes, which a one-byte length says: a longer
    length field is another name, whatever follows."""
    if pos >= len(block):
        raise _Cut
    huffman, length, start = bool(block[pos] & 0x80), block[pos] & 0x7F, pos + 1
    if length != (5 if huffman else 7):
        return False, None
    name = block[start:start + length]
    if len(name) < length:
        raise _Cut
    if huffman:
        try:
            name = decode_huffman(name)
        except HPACKDecodingError:
            return False, None
    return name == b":status", start + length


def h2_block_status(block: bytes):
    """The answer of a header block's first field: a status, H2_UNKNOWN or None."""
    block = block[:H2_BLOCK_READ]
    pos = 0
    try:
        for _ in range(2):                                  # dynamic table size updates
            if pos >= len(block):
                raise _Cut
            if block[pos] & 0xE0 != 0x20:
                break
            try:
                _, pos = _hpack_int(block, pos, 5, max_bytes=4)
            except _TooLong:
                return None
        if pos >= len(block):
            raise _Cut
        first = block[pos]
        if first & 0x80:                                    # indexed field
            index, _ = _hpack_int(block, pos, 7)
            if index >= 62:
                return H2_UNKNOWN
            return H2_STATIC_STATUS.get(index)
        if first & 0xE0 == 0x20:                            # a third size update
            return None
        prefix = 6 if first & 0x40 else 4                   # literal forms
        index, pos = _hpack_int(block, pos, prefix)
        if index >= 62:
            return H2_UNKNOWN
        if index in H2_STATIC_STATUS:
            return _status_value(block, pos)
        if index:
            return None
        named, pos = _is_status_name(block, pos)
        return _status_value(block, pos) if named else None
    except _Cut:
        return H2_UNKNOWN


def h2_frames(payload: bytes):
    """The frames the classifier's walk visits, as (type, flags, body start, length):
    at most H2_MAX_FRAMES, each with a plausible header, the first at the payload's
    start; nothing for a segment too short to hold one."""
    if len(payload) < H2_MIN_PAYLOAD or not h2_frame_plausible(payload[:9]):
        return
    pos = 0
    for _ in range(H2_MAX_FRAMES):
        header = payload[pos:pos + 9]
        if len(header) < 9 or not h2_frame_plausible(header):
            return
        length = int.from_bytes(header[:3], "big")
        yield header[3], header[4], pos + 9, length
        pos += 9 + length


def h2_statuses(payload: bytes) -> list:
    """What the HTTP/2 walk finds in a TCP payload: for each HEADERS frame met, a status
    or H2_UNKNOWN (frames whose first field is no status leave nothing)."""
    found = []
    for ftype, flags, pos, length in h2_frames(payload):
        if ftype == 1:
            result = _headers_frame_status(payload, pos, length, flags)
            if result is not None:
                found.append(result)
    return found


def h2_status(payload: bytes):
    """The first thing h2_statuses finds, or None."""
    found = h2_statuses(payload)
    return found[0] if found else None


def _headers_frame_status(payload: bytes, pos: int, length: int, flags: int):
    skip = pad = 0
    if flags & 0x08:                                        # PADDED
        if pos >= len(payload):
            return H2_UNKNOWN
        pad, skip = payload[pos], 1
    if flags & 0x20:                                        # PRIORITY
        skip += 5
    if skip + pad > length:
        return None
    block_len = length - skip - pad
    if block_len == 0:
        return None
    block = payload[pos + skip:pos + skip + block_len]
    if not block:
        return H2_UNKNOWN
    return h2_block_status(block)


GRPC_BLOCKS = 4
GRPC_STEPS = 8
GRPC_VIEW = 32
GRPC_MAX_CODE = 16
GRPC_NAME_RAW = b"\x0bgrpc-status"
GRPC_NAME_HUFFMAN = bytes.fromhex("889acac8b21234da8f")
MIN_HTTP_STATUS = 100


def _grpc_int(view: bytes, pos: int, prefix_bits: int):
    """An HPACK integer of at most 3 bytes wholly in `view`: (value, next), or None."""
    try:
        value, nxt = _hpack_int(view, pos, prefix_bits, max_bytes=3)
    except (_Cut, _TooLong):
        return None
    return value, nxt


def _huffman_digits(raw: bytes):
    """1-2 digits Huffman-coded (codes '0'-'2' 5 bits, '3'-'9' 6 bits) with fewer than 8
    one bits of padding, as an int; None otherwise."""
    bits = "".join(f"{b:08b}" for b in raw)
    digits = ""
    while True:
        if len(bits) < 8 and bits == "1" * len(bits) and digits:
            return int(digits)
        if len(digits) == 2:
            return None
        if len(bits) >= 5 and int(bits[:5], 2) <= 2:
            digits, bits = digits + str(int(bits[:5], 2)), bits[5:]
        elif len(bits) >= 6 and 0x19 <= int(bits[:6], 2) <= 0x1F:
            digits, bits = digits + str(3 + int(bits[:6], 2) - 0x19), bits[6:]
        else:
            return None


def _grpc_value(view: bytes):
    length = view[0] & 0x7F
    if not 1 <= length <= 2 or 1 + length > len(view):
        return H2_UNKNOWN
    raw = view[1:1 + length]
    if view[0] & 0x80:
        code = _huffman_digits(raw)
    else:
        code = int(raw) if all(c in DIGITS for c in raw) else None
    return H2_UNKNOWN if code is None or code > GRPC_MAX_CODE else code


def _grpc_step(view: bytes, expect: str):
    """One step of the walk on `view` (the block's next bytes, at most 32): returns
    (done, found, advance, expect, dynamic)."""
    if expect != "field":
        if expect == "status":
            return True, _grpc_value(view), 0, expect, False
        got = _grpc_int(view, 0, 7)
        if got is None:
            return True, None, 0, expect, False
        return False, None, got[1] + got[0], "field", False
    first = view[0]
    if first & 0x80 or first & 0xE0 == 0x20:
        got = _grpc_int(view, 0, 7 if first & 0x80 else 5)
        if got is None:
            return True, None, 0, expect, False
        return False, None, got[1], expect, bool(first & 0x80) and got[0] >= 62
    got = _grpc_int(view, 0, 6 if first & 0x40 else 4)
    if got is None:
        return True, None, 0, expect, False
    index, nxt = got
    if index:
        return False, None, nxt, "value", index >= 62
    name = _grpc_int(view, nxt, 7)
    if name is None:
        return True, None, 0, expect, False
    is_status = any(view[nxt:nxt + len(n)] == n for n in (GRPC_NAME_RAW, GRPC_NAME_HUFFMAN))
    return False, None, name[1] + name[0], "status" if is_status else "value", False


def grpc_statuses(blocks: list) -> list:
    """What the gRPC walk finds in the blocks (their bytes within the payload): a code
    or H2_UNKNOWN per block that gives one, in order."""
    found = []
    steps = 0
    for block in blocks[:GRPC_BLOCKS]:
        pos, expect, dynamic = 0, "field", False
        while True:
            if steps == GRPC_STEPS:
                return found
            steps += 1
            view = block[pos:pos + GRPC_VIEW]
            if not view:
                done, code = True, None
            else:
                done, code, advance, expect, dyn = _grpc_step(view, expect)
                dynamic |= dyn
            if done:
                if code is not None:
                    found.append(code)
                elif dynamic:
                    found.append(H2_UNKNOWN)
                break
            pos += advance
    return found


def grpc_blocks(payload: bytes) -> list:
    """The END_STREAM header blocks the frame walk records (bytes within the payload)."""
    blocks = []
    for ftype, flags, pos, length in h2_frames(payload):
        if ftype == 1 and flags & 0x01 and pos < len(payload):
            skip = (1 if flags & 0x08 else 0) + (5 if flags & 0x20 else 0)
            pad = payload[pos] if flags & 0x08 else 0
            block = payload[pos + skip:pos + skip + length - skip - pad]
            if skip + pad <= length and length - skip - pad and block:
                blocks.append(block)
    return blocks


def grpc_status(payload: bytes):
    """The gRPC walk's findings in a TCP payload (codes and H2_UNKNOWN)."""
    return grpc_statuses(grpc_blocks(payload))


def status_class(code: int) -> str:
    return STATUS_CLASSES[code // 100 - 1] if 100 <= code < 600 else "other"


def flow_key(family: int, src: bytes, sport: int, dst: bytes, dport: int) -> FlowKey:
    """Endpoints ordered on (address bytes, port); both directions give one key."""
    a, b = (src, sport), (dst, dport)
    lo, hi = (a, b) if a <= b else (b, a)
    ip = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
    return FlowKey(family, str(ip(lo[0])), lo[1], str(ip(hi[0])), hi[1])


def decide(frame: bytes, direction: str, triggers: AbstractSet[int],
           marked: AbstractSet[FlowKey], debug: str = DEBUG_OK,
           requests: Mapping[FlowKey, bool] | None = None,
           budget: Budget | None = None) -> Decision:
    """The classifier's decision for `frame` seen on hook `direction` ('ingress' or
    'egress'), with trigger codes `triggers`, flows `marked` before it, and a debug
    interface that takes clones (DEBUG_OK), is not configured (DEBUG_NONE), or fails
    them (DEBUG_FAIL). `requests`: None with the request snapshot off; with it on, for
    each flow with a remembered request, whether its lo endpoint sent it. `budget`: the
    budgets and their use so far, updated here (None: no budgets, nothing tracked)."""
    why = test_run_refuses(frame)
    if why:
        return Decision(False, None, {}, "rejected", why)
    seen = {"packets": 1}
    try:
        p = _parse(frame, seen)
    except _Path as end:
        seen[end.path] = 1
        return Decision(True, TC_ACT_UNSPEC, seen, end.path, end.reason)

    seen["tcp"] = 1
    key = flow_key(p.family, p.src, p.sport, p.dst, p.dport)
    # The sender is the lo endpoint when it sorts strictly lower; a segment from an
    # endpoint to itself counts as sent by the hi one (both directions look the same).
    src_is_lo = (p.src, p.sport) < (p.dst, p.dport)
    was_marked = key in marked
    path, reason = "tcp", "TCP segment"
    if was_marked and p.syn:
        was_marked = False
        if budget is not None:
            budget.flows.pop(key, None)
        seen["syn_unmarked"] = 1
        path, reason = "unmarked", "SYN on a marked flow"
    code = status_code(p.payload)
    starts_request = code is None and request_start(p.payload)
    request_from_lo = None
    if starts_request and requests is not None:
        seen["requests"] = 1
        request_from_lo = src_is_lo
    if code is not None and requests is not None:
        if key not in requests:
            seen["resp_no_request"] = 1
        elif requests[key] == src_is_lo:
            seen["status_same_dir"] = 1
            code = None
            path, reason = "tcp", "status line from the requesting side"
    iface: dict[str, int] = {}
    marks = False
    grpc_armed = None
    if code is not None:
        cls = status_class(code)
        seen["responses"] = 1
        seen[f"resp_{cls}"] = 1
        iface[cls] = 1
        path, reason = "response", f"status {code:03d}"
    elif status_code(p.payload) is None and not starts_request:
        # HTTP/2 only where the payload is neither a status line nor a request start.
        found = h2_statuses(p.payload)
        codes = [c for c in found if c != H2_UNKNOWN]
        if len(codes) < len(found):
            seen["h2_status_unknown"] = len(found) - len(codes)
            reason = "h2 status unknown"
        for c in codes:
            seen["h2_responses"] = seen.get("h2_responses", 0) + 1
            cls = f"h2_{status_class(c)}"
            iface[cls] = iface.get(cls, 0) + 1
        if codes:
            armed = [c for c in codes if c in triggers and c >= MIN_HTTP_STATUS]
            code = armed[0] if armed else codes[0]
            path, reason = "response", f"h2 status {code:03d}"
        grpc = grpc_status(p.payload)
        for c in grpc:
            name = "grpc_status_unknown" if c == H2_UNKNOWN else \
                ("grpc_errors" if c else "grpc_ok")
            seen[name] = seen.get(name, 0) + 1
            if c != H2_UNKNOWN:
                cls = "grpc_error" if c else "grpc_ok"
                iface[cls] = iface.get(cls, 0) + 1
        grpc_armed = next((c for c in grpc if c != H2_UNKNOWN and c in triggers), None)
        if grpc_armed is not None and not (codes and armed):
            code = grpc_armed
            path, reason = "response", f"grpc-status {code}"
    if code is not None:
        armed_now = code in triggers and (code >= MIN_HTTP_STATUS or code == grpc_armed)
        if armed_now:
            seen["events"] = 1
        if armed_now and not was_marked:
            marks = True
            seen["flows_marked"] = 1
            path, reason = "marked", f"trigger status {code:03d}"
    mirrored = was_marked or marks
    skipped = None
    if budget is not None and mirrored:
        use = budget.flows.setdefault(key, [0, 0, set()])
        if marks:
            use[:] = [1, len(frame), set()]
        else:
            use[0] += 1
            use[1] += len(frame)
        if debug != DEBUG_NONE:
            skipped = budget.skip(key)
    if mirrored:
        if path != "marked":
            path = "mirrored"
        if skipped:
            seen[f"skip_{skipped}"] = 1
        elif debug == DEBUG_OK:
            seen["mirrored_packets"] = 1
            seen["mirrored_bytes"] = len(frame)
            iface["mirrored_packets"] = 1
            iface["mirrored_bytes"] = len(frame)
        elif debug == DEBUG_NONE:
            seen["no_debug_if"] = 1
        elif debug == DEBUG_FAIL:
            seen["clone_failures"] = 1
        else:
            raise ValueError(f"debug must be ok, none or fail, not {debug!r}")
    unknown = set(seen) - set(COUNTERS)
    assert not unknown, f"reference uses unknown counters {unknown}"
    return Decision(True, TC_ACT_UNSPEC, seen, path, reason, status=code, key=key,
                    marks=marks, mirrored=mirrored, marked_after=mirrored, iface=iface,
                    request_from_lo=request_from_lo)
