"""Reference model of the classifier (bpf/mirror.c): for any sequence of frames, what the
classifier must decide for each, and the connection states it must be left holding.

Written from the protocol specifications (IEEE 802.1Q, RFC 791, RFC 8200, RFC 9293,
RFC 9112, RFC 9113, RFC 7541) and the classifier's contract (bpf/mirror.h, and the
statement of its connection state), not by translating the C: tests/test_fuzz.py feeds
the same frames to both and any difference is a finding. Plain byte indexing rather than
dpkt: dpkt repairs or rejects exactly the frames (lying lengths, truncation) whose
handling is being specified.

The rules, in the order a frame meets them:

Run at all. BPF_PROG_TEST_RUN (the harness, not the classifier) refuses with EINVAL,
before the program runs, a frame shorter than an Ethernet header, longer than
fastmaps.TEST_RUN_MAX_FRAME, or whose outer ethertype is IPv4 (IPv6) and which is
shorter than 14 + 20 (14 + 40) bytes: it reads the network header to set up the test
socket. No counter moves.

A monitored loopback. On a loopback device every packet passes twice: out through the
egress hook, back in through the ingress hook. When the loopback (ifindex 1) is in the
`monitored` set, its egress pass is the one that counts, and its ingress pass counts
`packets` and `lo_second_pass` and nothing else, not even the parse. The test run
executes on the loopback device: this applies exactly when a test puts ifindex 1 in
`monitored`.

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
(address bytes, then port) first. The sender is the key's lo endpoint when it sorts
strictly lower; a segment from an endpoint to itself counts as sent by the hi one (both
directions look the same). Of the TCP header only the ports and the SYN and ACK flags
matter; window, sequence numbers and checksums play no part: the classifier is a passive
observer, not a TCP stack (a SYN-ACK is not checked against its SYN's sequence number).

Seen before. A packet at an egress hook whose skb->ingress_ifindex is non-zero and in
`monitored` came in through an interface whose ingress hook already counted, cloned and
reported it (a packet forwarded between two monitored interfaces). It counts
`seen_before` and keeps this interface's connection state like any other packet, but is
never counted as a response, cloned or reported here. A packet the host sends itself
has ingress_ifindex 0; at an ingress hook ingress_ifindex means nothing.

What the payload starts with. The TCP payload is what lies between the end of the TCP
header and the end of the IP packet. Of a payload of at least 13 bytes the classifier
asks, in this order:
- a status line (RFC 9112 status-line, narrowed): "HTTP/1.0 " or "HTTP/1.1 ", three
  ASCII digits, then a space or a CR; its code is 000-999. Case-sensitive (HTTP-name is
  "HTTP", %x48.54.54.50);
- a request start (RFC 9112 request-line; RFC 9110 section 9's methods and PATCH):
  GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, TRACE or PATCH and a space,
  case-sensitive;
- the HTTP/2 connection preface (RFC 9113 section 3.4), recognised by its first 13
  bytes "PRI * HTTP/2.": only a client sends it, as the first bytes of a connection;
- else, as for a payload of 9-12 bytes, whether it starts with a plausible HTTP/2 frame
  header (below): an HTTP/2 candidate.

Connection state. The classifier keeps one state per connection and interface (the flow
key and the ifindex: two interfaces never share one). A state knows whether the client
side is known and, if so, which endpoint is the client (the key's lo or hi) and on which
hook of this interface the client's packets pass (the client's direction); whether the
connection is marked, and by which status; whether a request is kept for it; since it
was marked, its packets, bytes and the reasons clones were skipped; the events reported
for it; and a generation number, which tells its incarnations apart.

States live in an array of slots grouped in buckets of four (CONN_WAYS). A key's bucket
is a seeded 32-bit hash of the 44-byte key read as 11 little-endian words (the flow key
as stored: lo address, hi address, the two ports in network byte order, the family and
three zero bytes; then the ifindex): MurmurHash3 x86_32's rounds over the words (for
IPv4 only the words 0, 4, 8, 9 and 10, the others being zero), no length mixed in, then its finalizer, masked to the slot count and rounded down to a
multiple of four. The seed is the classifier's config.hash_seed. A key's state is in one
of its bucket's four slots, or nowhere. Only a SYN without ACK, a request start or the preface (and
an HTTP/2 request header block, below) make a state for a connection that has none. It
takes the bucket's first empty slot, else the slot touched longest ago (the earliest in
the bucket when several were touched in the same tick of the classifier's coarse clock):
that state is gone (`conns_replaced`, and `flows_evicted` when it was marked). A state
that starts counts `conns_started`; the slot's generation goes up by one; the client
side is not known yet. A state is touched when it starts or restarts, and by every
packet that carries a SYN, a status line, a request start, the preface or HTTP/2 frames,
or that finds it marked (an HTTP/2 segment that marks it included).

SYN and SYN-ACK (RFC 9293 section 3.5). A segment with SYN and without ACK opens a
connection: its sender is the client and the hook it was seen on is the client's
direction. It restarts the state (makes one when there is none): client side known as it
says, not marked, no request kept, budgets and events back to zero, the generation up by
one, `syn_unmarked` when it was marked (a new connection reusing the 4-tuple). A segment
with SYN and ACK is the server's answer, but anyone can send one, a client included: it
never makes, restarts or names the sides of a state. It is judged like a status (the
modes below): from the server side of a state whose client is known (counts or silent),
it starts following the server's HPACK state at its sequence number + 1; otherwise it
does nothing but what any packet of the state does (touch, mirror when marked).

Whose status it is. What a status (an HTTP/1.x status line, an HTTP/2 :status, a
grpc-status) does depends on the packet's mode:
- UNKNOWN_SIDE: no state, or its client side is not known. Every status counts
  `status_side_unknown`, nothing else;
- FROM_CLIENT: the client endpoint sent it, or (except on a monitored loopback, where
  both sides pass the egress hook) it travels in the client's direction. A client does
  not send responses: a status line counts `status_from_client`; of HTTP/2 frames only
  a first HEADERS frame's first block byte is looked at (below);
- SILENT: from the server side in the server's direction, and seen before: counts
  nothing, but a trigger marks this interface's state;
- COUNTS: from the server side in the server's direction: a response.
A lone spoofed segment (no state), a client's own bytes (a status line or a HEADERS
frame with :status in its body) and a server's address on a segment travelling the
client's way never count, mark or report.

Requests. A request start or the preface on a state whose client side is not known (its
SYN went unseen) teaches it: the sender is the client, this hook its
direction (`side_from_request`); the packet is then the client's. A request start from
the client (mode FROM_CLIENT), with the request snapshot on (config.request_bytes > 0),
is kept for the connection (`requests`): the frame's first min(frame length,
request_bytes) bytes, the frame's length and the hook. Kept requests share an array of
one entry per four slots (the slot's index modulo the entry count): keeping one replaces
the entry, and each entry is tagged with the slot and generation it was kept for, so a
request is only ever used by the connection that sent it. A request start from the server
side is not kept. Seen-before packets keep requests like any other. A kept request
stays kept when the snapshot is turned off (until its connection restarts or its entry
is taken).

HTTP/1.x responses. A status line in mode COUNTS counts `responses` and its class,
`resp_1xx` .. `resp_5xx` for 100-599, `resp_other` for the rest, and the class under the
interface and hook. In SILENT nothing is counted. A code of 100 or more in the trigger
set, in COUNTS or SILENT, is a trigger (below).

HTTP/2 (RFC 9113 frames, RFC 7541 HPACK; bpf/http2.h's contract). An HTTP/2 candidate
in mode FROM_CLIENT is not read: a client's frames carry requests, never statuses. Only
when its first frame is HEADERS with a header block whose first byte is a :status field
by static index (an indexed field, or a literal of any form with its name indexed, 8-14)
is `status_from_client` counted, once for the segment. The block starts after the pad
length and priority fields; the padding's own length is not subtracted (a frame of
padding only is read as its first padding byte). In
any other mode the payload is read as a sequence of frames from its first byte, at most
16 of them. Every frame header must lie wholly in the payload and be plausible, or the
walk ends there: type 0-9; only that type's defined flags; length <= 16384; reserved bit
clear; HEADERS with END_HEADERS set and on an odd stream; DATA, PRIORITY, RST_STREAM,
PUSH_PROMISE, CONTINUATION on a non-zero stream, SETTINGS, PING, GOAWAY on stream 0;
PRIORITY 5 bytes, RST_STREAM 4, SETTINGS a multiple of 6 (0 with ACK), PING 8, GOAWAY
at least 8, WINDOW_UPDATE 4, PUSH_PROMISE at least 4. Every HEADERS frame met is read;
its header block (after the pad length and the priority fields its flags announce; a
padding longer than the frame is no status; the frame may be cut by the end of the
payload) gives the answer from its first field, after at most two dynamic table size
updates of at most 4 bytes each:
- an indexed field 8-14: that static :status; 1-7 (:authority, :method, :path,
  :scheme): a request's block; 62 and up (the dynamic table; a first byte of 0xff
  included, whatever follows): dynamic; any other: none;
- a literal (any of the three forms) whose name index is 8-14 or whose new name is
  ":status" (raw, or Huffman-coded in 5 bytes): its value, which must be 3 raw digits or
  2-3 Huffman bytes that decode (RFC 7541 Appendix B, strict padding) to 3 digits, else
  unknown; a name index of 1-7: a request's block; 62 and up (or a prefix of all ones
  followed by a byte with its high bit set): dynamic; other names: none;
- anything cut by the end of the data before the answer is known: unknown (the block is
  only read up to its first 24 bytes, enough for every form above).
RFC 9113 section 8.3 puts the pseudo-header fields first in a block, and only a request
has :method, :scheme, :authority or :path. A dynamic first field is left to the HPACK
walk (below) when the segment is in step and its block was recorded; else it is
unknown. Each status counts, in mode COUNTS,
`h2_responses` and its class in the interface's "h2_<class>", in mode UNKNOWN_SIDE
`status_side_unknown`, in SILENT nothing; each unknown counts `h2_status_unknown` in
mode COUNTS only. A request's block in mode UNKNOWN_SIDE teaches the client side as a
request start does (`side_from_request`; making a state when there is none, as a request
start would): its sender is the client. Such a segment does nothing more: nothing in it
triggers, and no state of an unknown side is marked.

The server's dynamic table (RFC 7541 section 2.3; bpf/http2.h's HPACK walk). An
encoder inserts each literal with incremental indexing at index 62 and refers only to
entries it still holds, so dynamic index N names the insertion numbered
inserted - (N - 62), insertions being numbered from 1 on the connection's server side.
Each state follows its server's encoder: state none, following or lost; the sequence
number of the server's next frame header; the insertions so far; a floor; and records
of insertions whose name is grpc-status or :status, in 8 slots taken in turn (the next
slot to take is kept), each the insertion's number and what it holds: 0x8000 | code
for a grpc-status (0x3ff when the value is not 0-16), 0x4000 | code for a :status
(0x3ff when not three digits), 0x2000 for an insertion whose own name could not be told.
A SYN-ACK on a state that is none starts following at its sequence number + 1 (a SYN,
restarting the state, makes it none again). A candidate in mode COUNTS or SILENT on a
state: a state that is none becomes lost (`hpack_start_unseen`); a following one whose
next frame header is where the segment starts walks it "in step"; one ahead of the
segment's end (the segment lies wholly before: a retransmission, or inside a frame
that spans segments) walks it as lost, the state unchanged; else the state is lost
(`hpack_gap`). In step, the frame walk records every HEADERS frame's block (else only
those with END_STREAM), at most 8; and the state is lost, at the end of the segment
(`hpack_bounds`), when anything was not followed: a 9th block, a block cut by the end
of the payload, a padding longer than its frame or a pad length cut, a CONTINUATION or
PUSH_PROMISE frame, frames left unwalked (an implausible or cut header, the 16-frame
bound), a reference to no insertion, a block that could not be walked to its end, or
the steps running out. Otherwise the next frame header is where the last frame walked
ends.

The walk reads the recorded blocks in frame order with at most 24 steps in all. A step
sees the block's next 32 bytes (or fewer at its end) and reads one field: an indexed
field (index 0 ends the block); a size update (0 empties the records and puts the floor
above every insertion so far); a literal: its name (a new name, "grpc-status" as 11 raw
bytes or the Huffman 9acac8b21234da8f, ":status" as 7 raw or Huffman b8848d36a3 wholly
seen within the first 16 bytes; a static index, 8-14 being :status; or a dynamic index)
and its value, skipped by its length. When the value's length, or for a name that
matters the value itself, lies past the 32 bytes and the block goes on, the step ends
at the value and the next reads it. HPACK integers are read up to 3 bytes; longer, cut,
or a field running past the block's end, end the block (which loses a state in step).
A dynamic index resolves, in step and not lost, to the record of its insertion (none:
an insertion that matters not); to nothing when it names no insertion (which loses the
state), an insertion under the floor (`hpack_forgotten` in mode COUNTS), or one recorded
0x2000. A literal with incremental indexing is an insertion, in step and not lost:
counted, and recorded when its name matters (a new record taking the slot of the oldest
raises the floor above it). In a block with END_STREAM, its first grpc-status (a
literal with that name, or a resolved record) is read: the code, or unknown for a value
that is not 0-16; a block that ends without one after an unresolved reference gives
unknown. The first field of a block left to the walk reads as the :status it resolves
to (the record's, or the literal's value), unknown when unresolved or when the block
ends (or the steps run out) before it; any other resolution is no status. Each
grpc-status counts, in mode COUNTS, `grpc_ok` (0) or `grpc_errors` (1-16) and
"grpc_ok"/"grpc_error" in the interface's stats, in mode UNKNOWN_SIDE
`status_side_unknown`; each unknown counts `grpc_status_unknown` in mode COUNTS only;
the walk's statuses count as the frame walk's.

Triggers. The trigger of an HTTP/2 segment is its first :status of 100 or more in the
trigger set that the frame walk read, else the first the HPACK walk read, else its first
grpc-status in the trigger set (slots 0-16 of the set are
grpc-status codes; the gRPC code is then the status). HTTP statuses below 100 (HTTP/1.x
or HTTP/2) never trigger. Only modes COUNTS and SILENT have triggers. A trigger marks the
connection when it is not marked (`flows_marked`; its packets, bytes and cut reasons
start from zero) and becomes its status either way. In SILENT the packet is then counted
in the connection's packets and bytes, and that is all (where it came in it was cloned
and reported). In COUNTS:
- the packet is mirrored (below);
- `resp_no_request` when no request is kept for this connection (its state has a kept
  request whose entry still carries its slot and generation);
- the error is counted whatever happens to its event: `errors`, and the `errors` map
  under (ifindex, status, protocol: h1, h2 or grpc); with a kept request, one more
  response time in the `response_time` buckets;
- an event is reported, unless the connection has had max_events_per_conn of them
  already (`events_conn_limited`), or else this CPU's event window holds
  max_events_per_window (`events_rate_limited`); 0 is unlimited. A reported event counts
  `events` (`events_lost` when the ring buffer is full: the harness keeps it drained)
  and one more event for the connection.

Mirroring (the marked connection). Every packet of a marked connection is mirrored,
unless it is seen before: an ACK, a request, a client's HTTP/2 frames, a status of
either side, a trigger again (the first packet being the one that marked it), a SYN-ACK
too. A SYN restarts a marked state first: it is not mirrored. Mirroring counts the packet
in the connection's packets and bytes (the whole frame). Then: no debug interface (none
configured, or the packet's own interface) -> `no_debug_if`; else the budgets
(bpf/mirror.h struct mirror_config; per connection, and per CPU: the tests run pinned):
the connection's packets over max_packets_per_flow -> `skip_flow_packets`, else its
bytes over max_bytes_per_flow -> `skip_flow_bytes`, else the CPU's clone window holding
max_clones_per_window -> `skip_cpu_rate`, else the clone takes a place in the window; 0
is unlimited; a skip adds its reason to the connection's cut reasons. A clone that is
made counts `mirrored_packets` and `mirrored_bytes` and the interface's
"mirrored_packets"/"mirrored_bytes" when the debug interface takes it, else
`clone_failures`. A packet that is not TCP, or whose TCP headers are malformed, is
never mirrored, even when its addresses belong to a marked connection (a non-first
fragment has no ports to tell). The model's rate windows never turn over: the tests give
them a width no run outlasts.

Not modelled: idle expiry (config.idle_ns; the tests leave it 0), a full `errors` map
(it holds far more keys than (ifindex, status, protocol) can take here), a full events
ring buffer, and the classifier's "nonlinear" path (headers outside the skb's linear
data), which cannot occur in BPF_PROG_TEST_RUN: it puts the whole frame in the linear
part.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import AbstractSet, Callable, Iterable, Mapping

from hpack.exceptions import HPACKDecodingError
from hpack.huffman_table import decode_huffman

from fastmaps import TEST_RUN_MAX_FRAME
from mirror.abi import (CONN_FLAGS, CONN_WAYS, COUNTERS, CUT_REASONS, DEFAULT_REQUEST_BYTES,
                        HPACK_NAMED, HPACK_STATES, TC_ACT_UNSPEC, request_capacity)
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
# HTTP statuses below this never trigger: 0-16 of the trigger set are grpc-status codes.
MIN_HTTP_STATUS = 100


@dataclass(frozen=True)
class Decision:
    """What the classifier must do with one frame.

    ran: the program ran (False: BPF_PROG_TEST_RUN refused the frame, nothing moved).
    verdict: the tc verdict, TC_ACT_UNSPEC whenever it ran.
    counters: the exact counter deltas, zero ones left out.
    path: the way the frame went (see PATHS), for statistics and messages.
    reason: a few words saying why.
    status: the code of an HTTP/1.x status line (whoever sent it), or the trigger of an
        HTTP/2 segment, else None.
    key: the normalised flow key of a TCP segment whose headers parsed, else None.
    mode: the packet's status mode (MODES) once its state was seen, else None.
    slot: the slot of the key's state after the packet (None: it has none).
    conn: a copy of that state after the packet, else None.
    before: a copy of the key's state before the packet, else None.
    marks: this packet marks its connection (it was not marked before).
    mirrored: the packet is (to be) cloned to the debug interface; counters say whether
        the clone went out.
    kept: the packet's request was kept (in the entry of `slot`).
    iface: per-interface statistics deltas under the packet's hook: class or
        "mirrored_packets"/"mirrored_bytes" -> delta.
    """
    ran: bool
    verdict: int | None
    counters: Mapping[str, int]
    path: str
    reason: str
    status: int | None = None
    key: FlowKey | None = None
    mode: str | None = None
    slot: int | None = None
    conn: "Conn | None" = None
    before: "Conn | None" = None
    marks: bool = False
    mirrored: bool = False
    kept: bool = False
    iface: Mapping[str, int] = field(default_factory=dict)


@dataclass
class Budget:
    """The clone budgets in force (0: unlimited), and the clones taken so far in the one
    CPU's rate window (decide() counts them)."""
    max_packets: int = 0
    max_bytes: int = 0
    max_clones: int = 0
    clones: int = 0


# The status modes (see "Whose status it is").
UNKNOWN_SIDE, FROM_CLIENT, SILENT, COUNTS = "unknown_side", "from_client", "silent", "counts"
MODES = (UNKNOWN_SIDE, FROM_CLIENT, SILENT, COUNTS)

# struct conn's flags and cut reasons (bpf/mirror.h), by the names mirror.abi reads there.
CLIENT_KNOWN = CONN_FLAGS["client_known"]
CLIENT_LO = CONN_FLAGS["client_lo"]
CLIENT_EGRESS = CONN_FLAGS["client_egress"]
MARKED = CONN_FLAGS["marked"]
CUT_BITS = {name: bit for bit, name in CUT_REASONS.items()}
LOOPBACK_IFINDEX = 1        # every network namespace's loopback device
# The app protocols of the `errors` map's keys, as Classifier.errors() names them.
PROTO_H1, PROTO_H2, PROTO_GRPC = "h1", "h2", "grpc"


# The server's HPACK encoder as followed (struct conn_hpack, enum hpack_state).
HPACK_NONE, HPACK_FOLLOWING, HPACK_LOST = (
    next(k for k, v in HPACK_STATES.items() if v == name) for name in ("none", "following", "lost"))
# What a recorded insertion holds (bpf/mirror.h): the kind | the value.
HPACK_GRPC, HPACK_STATUS, HPACK_UNSURE, HPACK_NO_VALUE = 0x8000, 0x4000, 0x2000, 0x3FF


@dataclass
class Hpack:
    """The server's HPACK encoder as the classifier follows it (see "The server's
    dynamic table"): the state, the sequence number of the next frame header, the
    insertions so far, the floor below which records were dropped, and the records
    (insertion number, what it holds) in their slots with the slot the next one takes."""
    state: int = HPACK_NONE
    next_seq: int = 0
    inserted: int = 0
    floor: int = 0
    next: int = 0
    named_at: list = field(default_factory=lambda: [0] * HPACK_NAMED)
    named_what: list = field(default_factory=lambda: [0] * HPACK_NAMED)

    def copy(self) -> "Hpack":
        return dataclasses.replace(self, named_at=list(self.named_at),
                                   named_what=list(self.named_what))


@dataclass
class Conn:
    """One connection's state on one interface (struct conn without its clocks).
    flags: CLIENT_KNOWN | CLIENT_LO | CLIENT_EGRESS | MARKED bits; cut: the
    cut reason bits; status: the trigger that marked it (0: none); hpack: the server's
    HPACK encoder as followed."""
    key: FlowKey
    ifindex: int
    flags: int = 0
    cut: int = 0
    status: int = 0
    gen: int = 0
    events: int = 0
    packets: int = 0
    bytes: int = 0
    hpack: Hpack = field(default_factory=Hpack)

    @property
    def marked(self) -> bool:
        return bool(self.flags & MARKED)

    @property
    def client_known(self) -> bool:
        return bool(self.flags & CLIENT_KNOWN)

    def copy(self) -> "Conn":
        return dataclasses.replace(self, hpack=self.hpack.copy())


@dataclass
class KeptRequest:
    """An entry of the kept-request array: for the connection in `slot` with `gen`."""
    slot: int
    gen: int
    frame_len: int
    length: int
    direction: str
    data: bytes


PATHS = ("rejected", "lo_second_pass", "malformed", "other", "tcp", "side_unknown",
         "from_client", "response", "silent", "marked", "mirrored")


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
    ack: bool
    payload: bytes
    seq: int = 0


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
                   bool(frame[l4 + 13] & 0x02), bool(frame[l4 + 13] & 0x10),
                   frame[payload_off:ip_end], int.from_bytes(frame[l4 + 4:l4 + 8], "big"))


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
    looked at (the classifier reads 13 bytes once for every question)."""
    if len(payload) < STATUS_LINE_LEN:
        return False
    return any(payload.startswith(m + b" ") for m in METHODS)


# RFC 9113 section 3.4: "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"; its first 13 bytes tell it.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def h2_preface(payload: bytes) -> bool:
    """The HTTP/2 connection preface at the start of a payload of 13 bytes or more."""
    return len(payload) >= STATUS_LINE_LEN and payload[:STATUS_LINE_LEN] == H2_PREFACE[:13]


H2_MIN_PAYLOAD = 9
H2_MAX_FRAMES = 16
H2_MAX_FRAME_LEN = 16384
H2_BLOCK_READ = 24
H2_UNKNOWN = "unknown"
H2_REQUEST = "request"      # a request's header block (its first field a request pseudo-header)
H2_DYNAMIC = "dynamic"      # a first field that refers to the dynamic table
H2_STATIC_STATUS = {8: 200, 9: 204, 10: 206, 11: 304, 12: 400, 13: 404, 14: 500}
# RFC 7541 Appendix A: 1 :authority, 2-3 :method, 4-5 :path, 6-7 :scheme.
H2_REQUEST_INDICES = range(1, 8)
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
    """The answer of a header block's first field: a status, H2_UNKNOWN, H2_REQUEST,
    H2_DYNAMIC (a dynamic table reference: only the connection's state can tell) or
    None."""
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
            if first & 0x7F == 0x7F:
                return H2_DYNAMIC                           # 127 and up
            index = first & 0x7F
            if index >= 62:
                return H2_DYNAMIC
            if index in H2_REQUEST_INDICES:
                return H2_REQUEST
            return H2_STATIC_STATUS.get(index)
        if first & 0xE0 == 0x20:                            # a third size update
            return None
        prefix = 6 if first & 0x40 else 4                   # literal forms
        limit = (1 << prefix) - 1
        if first & limit == limit and pos + 1 < len(block) and block[pos + 1] & 0x80:
            return H2_DYNAMIC                               # limit + 128 and up
        index, pos = _hpack_int(block, pos, prefix)
        if index >= 62:
            return H2_DYNAMIC
        if index in H2_REQUEST_INDICES:
            return H2_REQUEST
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


def h2_client_poses_as_server(payload: bytes) -> bool:
    """Whether an HTTP/2 candidate's first frame is HEADERS whose header block (RFC 9113
    6.2: after the Pad Length, then the priority fields, as its flags say) starts with a
    :status field named by static-table index (RFC 7541 6.1 and 6.2, Appendix A: 8-14),
    read from the representation's first byte alone."""
    length, kind, flags = int.from_bytes(payload[:3], "big"), payload[3], payload[4]
    if kind != 1:
        return False
    skip = (1 if flags & 0x08 else 0) + (5 if flags & 0x20 else 0)
    if length <= skip or 9 + skip >= len(payload):
        return False
    first = payload[9 + skip]
    if first & 0x80:
        index = first & 0x7F                    # 1xxxxxxx indexed
    elif first & 0x40:
        index = first & 0x3F                    # 01xxxxxx literal, incremental indexing
    elif first & 0x20:
        return False                            # 001xxxxx dynamic table size update
    else:
        index = first & 0x0F                    # 0000xxxx / 0001xxxx literal
    return index in H2_STATIC_STATUS


def h2_candidate(payload: bytes) -> bool:
    """Whether a payload (not a status line, request start or preface) is read as
    HTTP/2: 9 bytes or more, starting with a plausible frame header."""
    return len(payload) >= H2_MIN_PAYLOAD and h2_frame_plausible(payload[:9])


def h2_headers(payload: bytes) -> list:
    """What the HTTP/2 walk finds in a TCP payload: for each HEADERS frame met, a status,
    H2_UNKNOWN or H2_REQUEST (frames whose first field is none of these leave nothing)."""
    return [H2_UNKNOWN if r == H2_DYNAMIC else r for r in h2_segment(payload, False).found]


def h2_statuses(payload: bytes) -> list:
    """The statuses and H2_UNKNOWNs of h2_headers, in frame order."""
    return [r for r in h2_headers(payload) if r != H2_REQUEST]


def h2_status(payload: bytes):
    """The first thing h2_statuses finds, or None."""
    found = h2_statuses(payload)
    return found[0] if found else None


@dataclass
class _Block:
    data: bytes                 # the block's bytes within the payload
    end_stream: bool
    first_dyn: bool = False     # its first field is left to the HPACK walk


@dataclass
class _Segment:
    """What the frame loop makes of a segment: `found`, per HEADERS frame in order, what
    its first field says (not None); the blocks recorded for the HPACK walk; whether a
    segment in step could not be followed to its end; the payload offset of the frame
    header after the last frame walked."""
    found: list
    blocks: list
    lost: bool
    next_pos: int


def _headers_frame(payload: bytes, pos: int, length: int, flags: int, track: bool,
                   seg: _Segment):
    """A HEADERS frame: its first field's answer; records its block."""
    end_stream = bool(flags & 0x01)
    skip = pad = 0
    if flags & 0x08:                                        # PADDED
        if pos >= len(payload):
            seg.lost |= track
            return H2_UNKNOWN
        pad, skip = payload[pos], 1
    if flags & 0x20:                                        # PRIORITY
        skip += 5
    if skip + pad > length:
        seg.lost |= track
        return None
    block_len = length - skip - pad
    if block_len == 0:
        return None
    block = payload[pos + skip:pos + skip + block_len]
    if not block:
        seg.lost |= track
        return H2_UNKNOWN
    if len(block) < block_len:
        seg.lost |= track                                   # goes on in the next segment
    recorded = None
    if track or end_stream:
        if len(seg.blocks) < WALK_BLOCKS:
            recorded = _Block(block, end_stream)
            seg.blocks.append(recorded)
        else:
            seg.lost |= track
    found = h2_block_status(block)
    if found == H2_DYNAMIC and recorded is not None and track:
        recorded.first_dyn = True
        return None
    return found


def h2_segment(payload: bytes, track: bool) -> _Segment:
    """The frame loop over a candidate's payload. `track`: the segment is in step with
    its connection's followed HPACK state (every header block is recorded, and anything
    not walked loses the state); else only stream-ending blocks are recorded."""
    seg = _Segment([], [], False, 0)
    pos = 0
    for ftype, flags, start, length in h2_frames(payload):
        if ftype == 1:
            result = _headers_frame(payload, start, length, flags, track, seg)
            if result is not None:
                seg.found.append(result)
        elif ftype in (5, 9):                               # PUSH_PROMISE, CONTINUATION
            seg.lost |= track
        pos = start + length
    if pos < len(payload):
        seg.lost |= track
    seg.next_pos = pos
    return seg


WALK_BLOCKS = 8
WALK_STEPS = 24
WALK_VIEW = 32
GRPC_MAX_CODE = 16
GRPC_NAME_RAW = b"\x0bgrpc-status"
GRPC_NAME_HUFFMAN = bytes.fromhex("889acac8b21234da8f")
STATUS_NAMES = (b"\x07:status", bytes.fromhex("85b8848d36a3"))
_UNRESOLVED = None


def _walk_int(view: bytes, pos: int, prefix_bits: int):
    """An HPACK integer of at most 3 bytes wholly in `view`: (value, next), or None."""
    try:
        return _hpack_int(view, pos, prefix_bits, max_bytes=3)
    except (_Cut, _TooLong):
        return None


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
    """A grpc-status value (its string at view[0]): 0-16, or H2_UNKNOWN."""
    if not view:
        return H2_UNKNOWN
    length = view[0] & 0x7F
    if not 1 <= length <= 2 or 1 + length > len(view):
        return H2_UNKNOWN
    raw = view[1:1 + length]
    if view[0] & 0x80:
        code = _huffman_digits(raw)
    else:
        code = int(raw) if all(c in DIGITS for c in raw) else None
    return H2_UNKNOWN if code is None or code > GRPC_MAX_CODE else code


def _status_at(view: bytes, pos: int):
    """A :status value (its string at view[pos]): 000-999, or H2_UNKNOWN."""
    try:
        return _status_value(view, pos)
    except _Cut:
        return H2_UNKNOWN


class _Walk:
    """The HPACK walk of one segment's recorded blocks (see "The server's dynamic
    table"): `hp` the connection's followed state (changed as the server's encoder
    changed its table) when `track`; `found` collects ("status" | "grpc", code or
    H2_UNKNOWN) and ("forgotten", None) in order."""

    def __init__(self, hp: Hpack | None, track: bool):
        self.hp, self.track, self.lost = hp, track and hp is not None, False
        self.found: list = []

    # --- the followed table ---------------------------------------------------------------
    def resolve(self, index: int):
        """What insertion `index` names: its record's what, 0, or _UNRESOLVED."""
        hp = self.hp
        if not self.track or self.lost:
            return _UNRESOLVED
        back = index - 62
        if back >= hp.inserted:
            self.lost = True                # a reference to no insertion
            return _UNRESOLVED
        k = hp.inserted - back
        if k < hp.floor:
            self.found.append(("forgotten", None))
            return _UNRESOLVED
        what = next((w for at, w in zip(hp.named_at, hp.named_what) if at == k), 0)
        return _UNRESOLVED if what & HPACK_UNSURE else what

    def insert(self, what: int) -> None:
        hp = self.hp
        if not self.track or self.lost:
            return
        hp.inserted = (hp.inserted + 1) & 0xFFFFFFFF
        if not what:
            return
        j = hp.next % HPACK_NAMED
        if hp.named_what[j]:
            hp.floor = hp.named_at[j] + 1   # its record gives way
        hp.named_at[j], hp.named_what[j] = hp.inserted, what
        hp.next = j + 1

    def emptied(self) -> None:
        hp = self.hp
        if not self.track or self.lost:
            return
        hp.named_at = [0] * HPACK_NAMED
        hp.named_what = [0] * HPACK_NAMED
        hp.floor = hp.inserted + 1
        hp.next = 0

    # --- one block ---------------------------------------------------------------------------
    def field(self, what) -> None:
        """A field whose name and value `what` says (_UNRESOLVED: not known)."""
        first = self.first and self.block.first_dyn
        self.first = False
        if what is _UNRESOLVED or what & HPACK_UNSURE:
            self.dyn = True
            if first:
                self.found.append(("status", H2_UNKNOWN))
            return
        code = what & HPACK_NO_VALUE
        if what & HPACK_GRPC:
            if self.block.end_stream and not self.got:
                self.got = True
                self.found.append(("grpc", H2_UNKNOWN if code > GRPC_MAX_CODE else code))
        elif what & HPACK_STATUS and first:
            self.found.append(("status", H2_UNKNOWN if code >= 1000 else code))

    def step(self, view: bytes, rest: int):
        """One step on the block's next bytes (`rest` left in it): bytes read, or None
        when the block cannot be read on."""
        n = len(view)
        v = 0
        if self.expect == "field":
            f = view[0]
            if f & 0x80:                                    # indexed field
                got = _walk_int(view, 0, 7)
                if got is None or got[0] == 0:
                    return None
                if got[0] >= 62:
                    self.field(self.resolve(got[0]))
                else:
                    self.first = False
                return got[1]
            if f & 0xE0 == 0x20:                            # size update
                got = _walk_int(view, 0, 5)
                if got is None:
                    return None
                if got[0] == 0:
                    self.emptied()
                return got[1]
            incr = bool(f & 0x40)                           # a literal
            got = _walk_int(view, 0, 6 if incr else 4)
            if got is None:
                return None
            index, nxt = got
            if index == 0:
                name = _walk_int(view, nxt, 7)
                if name is None:
                    return None
                if view[nxt:nxt + len(GRPC_NAME_RAW)] == GRPC_NAME_RAW or \
                        view[nxt:nxt + len(GRPC_NAME_HUFFMAN)] == GRPC_NAME_HUFFMAN:
                    kind = HPACK_GRPC
                elif nxt < 16 and any(view[nxt:nxt + len(x)] == x for x in STATUS_NAMES):
                    kind = HPACK_STATUS
                else:
                    kind = 0
                v = name[1] + name[0]
            elif index >= 62:
                what = self.resolve(index)
                kind = HPACK_UNSURE if what is _UNRESOLVED else \
                    what & (HPACK_GRPC | HPACK_STATUS | HPACK_UNSURE)
                v = nxt
            else:
                kind = HPACK_STATUS if 8 <= index <= 14 else 0
                v = nxt
            self.kind, self.incr = kind, incr
        length = _walk_int(view, v, 7)
        kind = self.kind
        if v > 0 and n < rest and (length is None or (kind and length[1] + length[0] > n)):
            if v >= rest:
                return None
            self.expect = "value"                           # the next step reads it
            return v
        if length is None:
            return None
        code = HPACK_NO_VALUE
        if kind == HPACK_GRPC:
            g = _grpc_value(view[v:])
            code = code if g == H2_UNKNOWN else g
        elif kind == HPACK_STATUS:
            st = _status_at(view, v)
            code = code if st == H2_UNKNOWN else st
        if self.incr:
            self.insert(HPACK_UNSURE if kind == HPACK_UNSURE else kind | code if kind else 0)
        self.field(_UNRESOLVED if kind == HPACK_UNSURE else kind | code)
        self.expect = "field"
        return length[1] + length[0]

    def start(self, block: _Block) -> None:
        self.block, self.pos, self.rest = block, 0, len(block.data)
        self.expect, self.first, self.dyn, self.got = "field", True, False, False
        self.kind = self.incr = 0

    def block_end(self) -> None:
        if self.first and self.block.first_dyn:
            self.found.append(("status", H2_UNKNOWN))
        if self.block.end_stream and not self.got and self.dyn:
            self.found.append(("grpc", H2_UNKNOWN))

    def run(self, blocks: list) -> None:
        """At most WALK_STEPS steps over the blocks in turn; a block ends when its bytes
        are read or it cannot be read on (which loses a followed state)."""
        r = 0
        if blocks:
            self.start(blocks[0])
        for _ in range(WALK_STEPS):
            if r >= len(blocks):
                return
            got = self.step(self.block.data[self.pos:self.pos + WALK_VIEW], self.rest)
            if got is None or got >= self.rest:
                if got is None or got > self.rest:
                    self.lost |= self.track
                self.block_end()
                r += 1
                if r < len(blocks):
                    self.start(blocks[r])
            else:
                self.pos += got
                self.rest -= got
        if r >= len(blocks):
            return
        self.lost |= self.track                             # the steps ran out
        if self.first and self.block.first_dyn:
            self.found.append(("status", H2_UNKNOWN))
        for b in blocks[r + 1:]:
            if b.first_dyn:
                self.found.append(("status", H2_UNKNOWN))


def grpc_status(payload: bytes):
    """What the gRPC walk reads in a TCP payload without the connection's HPACK state
    (codes and H2_UNKNOWN, in order)."""
    walk = _Walk(None, False)
    walk.run(h2_segment(payload, False).blocks)
    return [code for kind, code in walk.found if kind == "grpc"]


def in_step(hp: Hpack, seq: int, length: int, seen: Counter) -> bool:
    """Whether a server segment at `seq` of `length` payload bytes is walked with the
    followed state (see "The server's dynamic table"); loses the state otherwise, but for
    bytes already walked."""
    if hp.state == HPACK_NONE:
        hp.state = HPACK_LOST
        seen["hpack_start_unseen"] += 1
        return False
    if hp.state != HPACK_FOLLOWING:
        return False
    ahead = (seq - hp.next_seq + (1 << 31)) % (1 << 32) - (1 << 31)
    if ahead == 0:
        return True
    if ahead < 0 and ahead + length <= 0:
        return False
    hp.state = HPACK_LOST
    seen["hpack_gap"] += 1
    return False


def h2_follow(payload: bytes, seq: int, hp: Hpack | None, seen: Counter):
    """The frame loop and the HPACK walk of a server's candidate segment: (the frame
    loop's findings, the walk's), the followed state `hp` (None: no state, or not the
    server's segment) updated."""
    track = hp is not None and in_step(hp, seq, len(payload), seen)
    seg = h2_segment(payload, track)
    walk = _Walk(hp, track)
    walk.lost = seg.lost                # what the frame loop could not follow
    walk.run(seg.blocks)
    if track:
        if walk.lost:
            hp.state = HPACK_LOST
            seen["hpack_bounds"] += 1
        else:
            hp.next_seq = (seq + seg.next_pos) & 0xFFFFFFFF
    return seg.found, walk.found

def follow_server(packets) -> list:
    """What the classifier reads in each of one connection's packets (in the order one
    hook sees them; objects with sport, flags, seq and payload, as a capture gives
    them), all on one interface in mode COUNTS, following the server's HPACK state from
    its SYN-ACK: per packet, (the :status codes and H2_UNKNOWNs, the grpc-status codes
    and H2_UNKNOWNs). A connection whose SYN-ACK is not among them reads nothing here."""
    synack = next((p for p in packets if p.flags & 0x12 == 0x12), None)
    hp = Hpack()
    if synack is not None:
        hp.state, hp.next_seq = HPACK_FOLLOWING, (synack.seq + 1) & 0xFFFFFFFF
    out = []
    for p in packets:
        payload = p.payload
        if synack is None or p.sport != synack.sport or status_code(payload) is not None \
                or request_start(payload) or h2_preface(payload) or not h2_candidate(payload):
            out.append(([], []))
            continue
        frames, walked = h2_follow(payload, p.seq, hp, Counter())
        statuses = [H2_UNKNOWN if f == H2_DYNAMIC else f for f in frames if f != H2_REQUEST]
        statuses += [code for kind, code in walked if kind == "status"]
        out.append((statuses, [code for kind, code in walked if kind == "grpc"]))
    return out


def status_class(code: int) -> str:
    return STATUS_CLASSES[code // 100 - 1] if 100 <= code < 600 else "other"


def flow_key(family: int, src: bytes, sport: int, dst: bytes, dport: int) -> FlowKey:
    """Endpoints ordered on (address bytes, port); both directions give one key."""
    a, b = (src, sport), (dst, dport)
    lo, hi = (a, b) if a <= b else (b, a)
    ip = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
    return FlowKey(family, str(ip(lo[0])), lo[1], str(ip(hi[0])), hi[1])


# --- where a state lives ------------------------------------------------------------------

_M32 = 0xFFFFFFFF
_KEY_WORDS = struct.Struct("<11I")


def _rotl32(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & _M32


def conn_hash(key: FlowKey, ifindex: int, seed: int) -> int:
    """The seeded 32-bit hash of a (flow key, ifindex): MurmurHash3 x86_32's rounds over
    the 44-byte key's 11 little-endian words (for IPv4 only words 0, 4, 8, 9 and 10: the
    others are zero), then its finalizer (no length mixed in)."""
    h = seed & _M32
    words = _KEY_WORDS.unpack(key.to_bytes() + ifindex.to_bytes(4, "little"))
    if key.family == 4:
        words = tuple(words[i] for i in (0, 4, 8, 9, 10))
    for w in words:
        k = (w * 0xCC9E2D51) & _M32
        k = (_rotl32(k, 15) * 0x1B873593) & _M32
        h = (_rotl32(h ^ k, 13) * 5 + 0xE6546B64) & _M32
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def conn_bucket(key: FlowKey, ifindex: int, seed: int, slots: int) -> int:
    """The first slot of the key's bucket in an array of `slots` (a power of two)."""
    return conn_hash(key, ifindex, seed) & (slots - 1) & ~(CONN_WAYS - 1)


# --- the model ----------------------------------------------------------------------------

class Model:
    """The classifier's connection states on one interface (`ifindex`; the test run's is
    the loopback's), its kept requests, error counts and rate windows, and decide(),
    which says what a frame does and updates them.

    `slots`, `hash_seed`: the connection array's size and hash seed (config.hash_seed).
    `triggers`: the trigger set. `debug`: a debug interface that takes clones (DEBUG_OK),
    none (DEBUG_NONE), or one that fails them (DEBUG_FAIL). `request_bytes`: the request
    snapshot's length (0: off), within the compiled `capacity`. `budget`: the clone
    budgets and the CPU's clone window. `events_per_conn`, `events_per_window`: the event
    bounds (0: unlimited). `monitored`: the ifindexes in the `monitored` map.

    The state is open: a harness may set slots, gens, requests, errors and the window
    counts to what the kernel holds."""

    def __init__(self, slots: int = 4096, hash_seed: int = 0,
                 triggers: AbstractSet[int] = frozenset(), debug: str = DEBUG_OK,
                 request_bytes: int = 0, capacity: int = request_capacity(DEFAULT_REQUEST_BYTES),
                 budget: Budget | None = None, events_per_conn: int = 0,
                 events_per_window: int = 0, monitored: Iterable[int] = (),
                 ifindex: int = LOOPBACK_IFINDEX):
        if debug not in (DEBUG_OK, DEBUG_NONE, DEBUG_FAIL):
            raise ValueError(f"debug must be ok, none or fail, not {debug!r}")
        self.slot_count = slots
        self.hash_seed = hash_seed
        self.triggers = frozenset(triggers)
        self.debug = debug
        self.request_bytes = request_bytes
        self.capacity = capacity
        self.budget = budget or Budget()
        self.events_per_conn = events_per_conn
        self.events_per_window = events_per_window
        self.events_in_window = 0
        self.monitored = set(monitored)
        self.ifindex = ifindex
        self.slots: list[Conn | None] = [None] * slots
        self.gens = [0] * slots
        self.requests: dict[int, KeptRequest] = {}
        self.errors: Counter = Counter()      # (ifindex, status, proto) -> count
        self.response_times = 0                 # errors timed from a kept request
        # When each slot was last touched, in packets: the model's own order for choosing
        # a slot to replace when decide() is given no `victim`.
        self.touched = [0] * slots
        self._clock = 0
        self._buckets: dict[FlowKey, int] = {}

    # --- lookups -------------------------------------------------------------------------
    def bucket(self, key: FlowKey) -> int:
        base = self._buckets.get(key)
        if base is None:
            base = conn_bucket(key, self.ifindex, self.hash_seed, self.slot_count)
            self._buckets[key] = base
        return base

    def find(self, key: FlowKey) -> int | None:
        """The slot of the key's state, or None."""
        base = self.bucket(key)
        for i in range(base, base + CONN_WAYS):
            c = self.slots[i]
            if c is not None and c.key == key and c.ifindex == self.ifindex:
                return i
        return None

    def conns(self) -> dict[int, Conn]:
        return {i: c for i, c in enumerate(self.slots) if c is not None}

    def kept_request(self, slot: int) -> KeptRequest | None:
        """The request kept for the state in `slot`, if it still has one."""
        c = self.slots[slot]
        if c is None:
            return None
        r = self.requests.get(slot % self.request_entries)
        if r is None or r.slot != slot or r.gen != c.gen:
            return None
        return r

    @property
    def request_entries(self) -> int:
        return self.slot_count // CONN_WAYS

    def kept_requests(self) -> dict[int, KeptRequest]:
        """slot -> its kept request, for every state that has one."""
        out = {}
        for slot in range(self.slot_count):
            r = self.kept_request(slot)
            if r is not None:
                out[slot] = r
        return out

    # --- changes -------------------------------------------------------------------------
    def _touch(self, slot: int) -> None:
        self._clock += 1
        self.touched[slot] = self._clock

    def _start(self, key: FlowKey, seen: Counter,
               victim: Callable[[int], int] | None) -> int:
        """A new state for `key` in its bucket: a free slot, else the one touched longest
        ago (`victim(bucket)` when given: the caller knows the clock)."""
        base = self.bucket(key)
        ways = range(base, base + CONN_WAYS)
        slot = next((i for i in ways if self.slots[i] is None), None)
        if slot is None:
            slot = victim(base) if victim else min(ways, key=lambda i: self.touched[i])
            seen["conns_replaced"] += 1
            if self.slots[slot].marked:
                seen["flows_evicted"] += 1
        self.gens[slot] += 1
        self.slots[slot] = Conn(key, self.ifindex, gen=self.gens[slot])
        self._touch(slot)
        seen["conns_started"] += 1
        return slot

    def _restart(self, slot: int, client_lo: bool, client_egress: bool, seen: Counter) -> None:
        c = self.slots[slot]
        if c.marked:
            seen["syn_unmarked"] += 1
        self.gens[slot] += 1
        self.slots[slot] = Conn(c.key, c.ifindex, gen=self.gens[slot], flags=CLIENT_KNOWN
                                | (CLIENT_LO if client_lo else 0)
                                | (CLIENT_EGRESS if client_egress else 0))
        self._touch(slot)

    def _learn(self, c: Conn, sender_lo: bool, direction: str, seen: Counter) -> None:
        c.flags |= CLIENT_KNOWN | (CLIENT_LO if sender_lo else 0) | \
            (CLIENT_EGRESS if direction == "egress" else 0)
        seen["side_from_request"] += 1

    def _mode(self, c: Conn | None, sender_lo: bool, direction: str, on_lo: bool,
              seen_before: bool) -> str:
        if c is None or not c.client_known:
            return UNKNOWN_SIDE
        if sender_lo == bool(c.flags & CLIENT_LO):
            return FROM_CLIENT
        if not on_lo and (direction == "egress") == bool(c.flags & CLIENT_EGRESS):
            return FROM_CLIENT
        return SILENT if seen_before else COUNTS

    def _keep(self, slot: int, frame: bytes, direction: str, seen: Counter) -> None:
        c = self.slots[slot]
        n = min(len(frame), self.request_bytes, self.capacity)
        self.requests[slot % self.request_entries] = KeptRequest(
            slot, c.gen, len(frame), n, direction, frame[:n])
        seen["requests"] += 1

    def _mirror(self, c: Conn, frame: bytes, seen: Counter, iface: Counter) -> None:
        """A packet of a marked connection to clone: its budgets, then the clone."""
        c.packets += 1
        c.bytes += len(frame)
        if self.debug == DEBUG_NONE:
            seen["no_debug_if"] += 1
            return
        b = self.budget
        why = None
        if b.max_packets and c.packets > b.max_packets:
            why = "flow_packets"
        elif b.max_bytes and c.bytes > b.max_bytes:
            why = "flow_bytes"
        elif b.max_clones:
            if b.clones >= b.max_clones:
                why = "cpu_rate"
            else:
                b.clones += 1
        if why:
            c.cut |= CUT_BITS[why]
            seen[f"skip_{why}"] += 1
        elif self.debug == DEBUG_OK:
            seen["mirrored_packets"] += 1
            seen["mirrored_bytes"] += len(frame)
            iface["mirrored_packets"] += 1
            iface["mirrored_bytes"] += len(frame)
        else:
            seen["clone_failures"] += 1

    def _trigger(self, slot: int, status: int, proto: str, mode: str, frame: bytes,
                 seen: Counter, iface: Counter) -> bool:
        """A trigger in mode COUNTS or SILENT; returns whether it marked the state."""
        c = self.slots[slot]
        marks = not c.marked
        if marks:
            c.flags |= MARKED
            c.packets = c.bytes = c.cut = 0
            seen["flows_marked"] += 1
        c.status = status
        if mode == SILENT:
            c.packets += 1
            c.bytes += len(frame)
            return marks
        self._mirror(c, frame, seen, iface)
        kept = self.kept_request(slot)
        if kept is None:
            seen["resp_no_request"] += 1
        self.errors[(self.ifindex, status, proto)] += 1
        seen["errors"] += 1
        if kept is not None:
            self.response_times += 1
        if self.events_per_conn and c.events >= self.events_per_conn:
            seen["events_conn_limited"] += 1
        elif self.events_per_window and self.events_in_window >= self.events_per_window:
            seen["events_rate_limited"] += 1
        else:
            if self.events_per_window:
                self.events_in_window += 1
            c.events += 1
            seen["events"] += 1
        return marks

    # --- the decision ----------------------------------------------------------------------
    def decide(self, frame: bytes, direction: str, ingress_ifindex: int = 0,
               victim: Callable[[int], int] | None = None) -> Decision:
        """What the classifier does with `frame` at hook `direction` ('ingress' or
        'egress') of this interface, skb->ingress_ifindex being `ingress_ifindex`; the
        model's state follows. `victim(bucket)`: the slot the classifier gives a new state
        when the bucket starting there is full (its clock decides; None: the model's)."""
        why = test_run_refuses(frame)
        if why:
            return Decision(False, None, {}, "rejected", why)
        seen = Counter(packets=1)
        on_lo = self.ifindex == LOOPBACK_IFINDEX and LOOPBACK_IFINDEX in self.monitored
        if on_lo and direction == "ingress":
            seen["lo_second_pass"] = 1
            return Decision(True, TC_ACT_UNSPEC, dict(seen), "lo_second_pass",
                            "a monitored loopback's ingress pass")
        try:
            p = _parse(frame, seen)
        except _Path as end:
            seen[end.path] = 1
            return Decision(True, TC_ACT_UNSPEC, dict(seen), end.path, end.reason)
        seen["tcp"] = 1
        key = flow_key(p.family, p.src, p.sport, p.dst, p.dport)
        sender_lo = (p.src, p.sport) < (p.dst, p.dport)
        seen_before = direction == "egress" and bool(ingress_ifindex) and \
            ingress_ifindex in self.monitored
        if seen_before:
            seen["seen_before"] = 1
        code = status_code(p.payload)
        request = code is None and request_start(p.payload)
        preface = code is None and not request and h2_preface(p.payload)
        h2 = code is None and not request and not preface and h2_candidate(p.payload)
        iface: Counter = Counter()
        out = _Outcome(seen, iface, key)

        slot = self.find(key)
        out.before = self.slots[slot].copy() if slot is not None else None
        if slot is None and ((p.syn and not p.ack) or request or preface):
            slot = self._start(key, seen, victim)
            out.path, out.reason = "tcp", "new state"
        c = self.slots[slot] if slot is not None else None
        if p.syn and not p.ack:
            # RFC 9293 3.5: the SYN's sender opens the connection. A SYN-ACK names no side:
            # its receiver is the client only if the SYN said so, and a client may send one.
            self._restart(slot, sender_lo, direction == "egress", seen)
            c = self.slots[slot]
            out.reason = "SYN: a new connection"
        mode = self._mode(c, sender_lo, direction, on_lo, seen_before)
        if p.syn and p.ack and mode in (COUNTS, SILENT) and c.hpack.state == HPACK_NONE:
            c.hpack.state = HPACK_FOLLOWING     # the server's data starts after its SYN-ACK
            c.hpack.next_seq = (p.seq + 1) & 0xFFFFFFFF
            out.reason = "SYN-ACK: the server's side confirmed"
        if (request or preface) and c is not None:
            if not c.client_known:
                self._learn(c, sender_lo, direction, seen)
                mode = FROM_CLIENT
                out.reason = "client side learned from a request"
            if request and mode == FROM_CLIENT and self.request_bytes:
                self._keep(slot, frame, direction, seen)
                out.kept = True
        marked = c is not None and c.marked
        if c is not None and (marked or p.syn or code is not None or request or preface or h2):
            self._touch(slot)
        out.mode = mode
        out.status = code

        if h2:
            if mode != FROM_CLIENT:
                self._h2(p.payload, p.seq, frame, direction, sender_lo, key, slot, mode,
                         marked, seen_before, out, victim)
                return out.decision(self)
            out.reason = "a client's HTTP/2 frames"
            if h2_client_poses_as_server(p.payload):
                seen["status_from_client"] += 1
                out.reason = "a client's HEADERS starting with :status"
            code = None
        elif code is not None and mode in (UNKNOWN_SIDE, FROM_CLIENT):
            seen["status_side_unknown" if mode == UNKNOWN_SIDE else "status_from_client"] += 1
            out.path = "side_unknown" if mode == UNKNOWN_SIDE else "from_client"
            out.reason = f"status {code:03d} {mode.replace('_', ' ')}"
            code = None
        if code is None:
            if marked and not seen_before:
                out.mirror(self, c, frame)
            return out.decision(self)

        if mode == COUNTS:
            cls = status_class(code)
            seen["responses"] += 1
            seen[f"resp_{cls}"] += 1
            iface[cls] += 1
            out.path, out.reason = "response", f"status {code:03d}"
        else:
            out.path, out.reason = "silent", f"status {code:03d} seen before"
        if code >= MIN_HTTP_STATUS and code in self.triggers:
            out.trigger(self, slot, code, PROTO_H1, mode, frame)
        elif marked and not seen_before:
            out.mirror(self, c, frame)
        return out.decision(self)

    def _h2(self, payload: bytes, seq: int, frame: bytes, direction: str, sender_lo: bool,
            key: FlowKey, slot: int | None, mode: str, marked: bool, seen_before: bool,
            out: "_Outcome", victim) -> None:
        """The HTTP/2 walk of a candidate that is not the client's."""
        seen, iface = out.seen, out.iface
        counts = mode == COUNTS
        may_trigger = mode in (COUNTS, SILENT)
        saw_request = False
        hp = self.slots[slot].hpack if slot is not None and mode in (COUNTS, SILENT) else None
        frames, walked = h2_follow(payload, seq, hp, seen)

        def status(found, armed):
            if found == H2_UNKNOWN:
                if counts:
                    seen["h2_status_unknown"] += 1
                return armed
            if mode == UNKNOWN_SIDE:
                seen["status_side_unknown"] += 1
            elif counts:
                seen["h2_responses"] += 1
                iface[f"h2_{status_class(found)}"] += 1
            out.path, out.reason = "response", f"h2 status {found:03d}"
            if armed is None and may_trigger and found >= MIN_HTTP_STATUS \
                    and found in self.triggers:
                return found
            return armed

        armed = None
        for found in frames:
            if found == H2_REQUEST:
                saw_request = True
            else:
                armed = status(H2_UNKNOWN if found == H2_DYNAMIC else found, armed)
        walk_armed = grpc_armed = None
        for kind, found in walked:
            if kind == "forgotten":
                if counts:
                    seen["hpack_forgotten"] += 1
            elif kind == "status":
                walk_armed = status(found, walk_armed)
            elif found == H2_UNKNOWN:
                if counts:
                    seen["grpc_status_unknown"] += 1
            else:
                if mode == UNKNOWN_SIDE:
                    seen["status_side_unknown"] += 1
                elif counts:
                    seen["grpc_errors" if found else "grpc_ok"] += 1
                    iface["grpc_error" if found else "grpc_ok"] += 1
                if grpc_armed is None and may_trigger and found in self.triggers:
                    grpc_armed = found
        if armed is None:
            armed = walk_armed
        if mode == UNKNOWN_SIDE and seen.get("status_side_unknown"):
            out.path, out.reason = "side_unknown", "h2 status, side unknown"
        elif mode == SILENT and out.path == "response":
            out.path = "silent"
        if saw_request and mode == UNKNOWN_SIDE:
            if slot is None:
                slot = self._start(key, seen, victim)
            c = self.slots[slot]
            if not c.client_known:
                self._learn(c, sender_lo, direction, seen)
            out.reason = "client side learned from an h2 request"
            return
        if slot is None:
            return
        self._touch(slot)
        status = armed if armed is not None else grpc_armed
        if status is not None:
            out.status = status
            proto = PROTO_GRPC if status < MIN_HTTP_STATUS else PROTO_H2
            out.trigger(self, slot, status, proto, mode, frame)
        elif self.slots[slot].marked:
            if not seen_before:
                out.mirror(self, self.slots[slot], frame)


class _Outcome:
    """What decide() has found so far about one frame."""

    def __init__(self, seen: Counter, iface: Counter, key: FlowKey):
        self.seen, self.iface, self.key = seen, iface, key
        self.path, self.reason = "tcp", "TCP segment"
        self.status = None
        self.mode = None
        self.before = None
        self.marks = self.mirrored = self.kept = False

    def mirror(self, model: Model, c: Conn, frame: bytes) -> None:
        model._mirror(c, frame, self.seen, self.iface)
        self.mirrored = True
        if self.path in ("tcp", "from_client", "side_unknown"):
            self.path = "mirrored"

    def trigger(self, model: Model, slot: int, status: int, proto: str, mode: str,
                frame: bytes) -> None:
        self.marks = model._trigger(slot, status, proto, mode, frame, self.seen, self.iface)
        self.mirrored = mode == COUNTS
        if self.marks:
            self.path, self.reason = "marked", f"trigger {proto} {status:03d} ({mode})"
        elif mode == COUNTS:
            self.path = "mirrored"

    def decision(self, model: Model) -> Decision:
        slot = model.find(self.key)
        seen = {k: v for k, v in self.seen.items() if v}
        unknown = set(seen) - set(COUNTERS)
        assert not unknown, f"reference uses unknown counters {unknown}"
        return Decision(True, TC_ACT_UNSPEC, seen, self.path, self.reason, status=self.status,
                        key=self.key, mode=self.mode, slot=slot,
                        conn=model.slots[slot].copy() if slot is not None else None,
                        before=self.before,
                        marks=self.marks, mirrored=self.mirrored, kept=self.kept,
                        iface={k: v for k, v in self.iface.items() if v})


def decide(frame: bytes, direction: str, triggers: AbstractSet[int],
           marked: AbstractSet[FlowKey] = frozenset(), debug: str = DEBUG_OK) -> Decision:
    """The decision for one frame on a classifier that holds no connection state but,
    for each flow in `marked`, a marked one as a SYN from this frame's receiver would have
    started it (the frame is then the server's, in the server's direction), with the
    request snapshot and every budget and event bound off."""
    model = Model(triggers=triggers, debug=debug)
    if marked:
        try:
            p = _parse(frame, {}) if not test_run_refuses(frame) else None
        except _Path:
            p = None
        for key in marked:
            slot = model._start(key, Counter(), None)
            c = model.slots[slot]
            if p is not None and flow_key(p.family, p.src, p.sport, p.dst, p.dport) == key:
                client_lo = not (p.src, p.sport) < (p.dst, p.dport)
                c.flags = CLIENT_KNOWN | (CLIENT_LO if client_lo else 0) | \
                    (CLIENT_EGRESS if direction == "ingress" else 0)
            else:
                c.flags = CLIENT_KNOWN
            c.flags |= MARKED
    return model.decide(frame, direction)
