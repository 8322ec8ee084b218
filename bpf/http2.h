/* HTTP/2 :status and gRPC's grpc-status in the classifier (RFC 9113 frames, RFC 7541 HPACK),
 * following each server's HPACK dynamic table where the connection was seen from its start.
 *
 * Included by bpf/mirror.c after its helpers (count, stats_of, may_trigger, status_mode,
 * status_counts, count_unknown, note_h2_request): bcc rewrites map calls (table.lookup())
 * only in the main source file, so the maps are reached through those helpers. Whether a
 * status found here counts, is counted apart or only marks is the packet's status mode,
 * decided by mirror.c from which side of the connection sent it.
 *
 * A segment is tried as HTTP/2 only when it is not an HTTP/1.x status line and its first
 * 9 bytes are a plausible frame header (h2_frame_ok). The walk then reads frame headers
 * one after the other from the start of the TCP payload (at most H2_MAX_FRAMES), and
 * decodes the first header field of every HEADERS frame it meets:
 *   - indexed field, static entries 8-14 (200 204 206 304 400 404 500);
 *   - literal with incremental indexing / without indexing / never indexed, whose name is
 *     static entry 8-14 or a new name ":status" (raw or Huffman), and whose value is three
 *     raw digits or 2-3 bytes of Huffman-coded digits (RFC 7541 Appendix B);
 *   after at most two dynamic table size updates.
 * A first field that refers to the dynamic table (index >= 62, as a field or as a
 * literal's name) is left to the HPACK walk (below) when the segment is in step with the
 * connection's followed state, which resolves it; else it counts in C_H2_STATUS_UNKNOWN,
 * as does a :status value that is not three digits or is cut by the end of the segment.
 * Any other first field (a request's :method, trailers) is not a response. The header
 * blocks are then walked again, field by field, for gRPC's grpc-status and the server's
 * dynamic table (h2_walk, below).
 *
 * Plausibility, so that a segment starting in the middle of a frame (or bulk data that is
 * not HTTP/2 at all) does not trigger: every frame header on the way must have a known
 * type (0-9), only the flags defined for that type, a length within the default maximum
 * frame size (H2_MAX_FRAME_LEN) and the per-type fixed lengths (PRIORITY 5, RST_STREAM 4,
 * SETTINGS a multiple of 6 and 0 with ACK, PING 8, GOAWAY >= 8, WINDOW_UPDATE 4), the
 * stream id's reserved bit clear, and the stream id rules (DATA, PRIORITY, RST_STREAM,
 * PUSH_PROMISE, CONTINUATION on a non-zero stream; SETTINGS, PING, GOAWAY on stream 0).
 * A HEADERS frame must moreover be on an odd (client-initiated) stream and carry
 * END_HEADERS: a response is on the client's stream (server push is gone from browsers
 * and nginx), and its block never needs CONTINUATION frames unless it is over 16 KB.
 * Each halves the chance that bytes in the middle of a frame pass for a HEADERS frame;
 * none of the servers tested (nginx, Node, Python h2) sent a response they reject. A HEADERS frame's pad length must
 * fit in the frame. The first implausible header ends the walk.
 *
 * A segment that starts mid-frame can still get back in step: a few bytes that pass for
 * a short frame can end exactly where a real frame begins (the walk then reads a real
 * status, which is no false trigger). tests/test_http2.py measures both on cuts of real
 * streams and on payloads that are not HTTP/2. */
#ifndef MIRROR_HTTP2_H
#define MIRROR_HTTP2_H

#define H2_FRAME_HEADER_LEN 9
/* Smallest segment worth walking: a frame header alone. It holds no status, but nghttp2
 * (Node's grpc-js) sends a DATA frame's header in a segment of its own, the data in the
 * next: walking the header tells where the next frame starts, which keeps the server's
 * followed HPACK state in step across the data. */
#define H2_MIN_SEGMENT H2_FRAME_HEADER_LEN
/* Frames walked per segment before giving up. A bound the verifier can see, and a cost
 * bound: each frame passed over is one 9-byte load and a few compares. A response's
 * HEADERS frame follows at most a handful of control frames (SETTINGS, its ACK,
 * WINDOW_UPDATE, PING) or the DATA frames of other streams. A segment whose HEADERS
 * frame comes later is not decoded: a server answering 10 streams in one write (20
 * frames) loses its last two responses there (README). 32 would cost twice the worst
 * case per segment and twice the verifier's work. */
#define H2_MAX_FRAMES 16
/* SETTINGS_MAX_FRAME_SIZE's initial value, which nginx, nghttp2, Go and hyper keep for
 * what they send unless the peer raises it. A longer frame ends the walk: a missed status
 * at worst, never a false trigger. */
#define H2_MAX_FRAME_LEN 16384
/* Bytes of a header block read at once: two size updates of up to 4 bytes each and the
 * longest :status form, a new-name literal (1 + 1 + 7 + 1 + 3 = 13 bytes), fit in 21. */
#define H2_BLOCK_PEEK 24
/* The buffer they are read into is a power of two, and every variable index into it is
 * masked (H2_AT): the verifier then needs no bound proof for any read, and the compiler
 * barrier keeps clang from turning "buffer + index" into a bitwise or on the stack
 * pointer, which the verifier refuses. Bytes past the ones read are zero. */
#define H2_BUF_LEN 32
static __always_inline __u32 h2_idx(__u32 i)
{
    asm volatile("" : "+r"(i));
    return i & (H2_BUF_LEN - 1);
}
#define H2_AT(b, i) ((b)[h2_idx(i)])
/* Largest size update accepted: the 5-bit prefix and up to 3 continuation bytes. */
#define H2_SIZE_UPDATE_MAX 4

#define H2_DATA 0
#define H2_HEADERS 1
#define H2_PRIORITY 2
#define H2_RST_STREAM 3
#define H2_SETTINGS 4
#define H2_PUSH_PROMISE 5
#define H2_PING 6
#define H2_GOAWAY 7
#define H2_WINDOW_UPDATE 8
#define H2_CONTINUATION 9

#define H2_F_END_STREAM 0x01
#define H2_F_ACK 0x01
#define H2_F_END_HEADERS 0x04
#define H2_F_PADDED 0x08
#define H2_F_PRIORITY 0x20

/* Outcomes of decoding a header block's first field (a status is 0-999). */
#define H2_NOT_STATUS (-1)
#define H2_UNKNOWN (-2)
#define H2_REQUEST (-3)     /* a request's pseudo-header (:authority, :method, :path, :scheme) */
#define H2_DYNAMIC (-4)     /* a reference to the dynamic table (the field, or a literal's
                             * name): resolved by the HPACK walk when the connection's state
                             * is followed, else unknown */

/* The static table's :status entries 8-14. If-chains rather than a switch here and below:
 * clang turns a dense switch into a jump table, an indirect jump the verifier refuses. */
static __always_inline int h2_static_status(__u32 index)
{
    if (index == 8) return 200;
    if (index == 9) return 204;
    if (index == 10) return 206;
    if (index == 11) return 304;
    if (index == 12) return 400;
    if (index == 13) return 404;
    if (index == 14) return 500;
    return H2_NOT_STATUS;
}

/* Where the header block of a HEADERS frame starts, from its frame header's flags: after
 * the pad length (PADDED) and the stream dependency and weight (PRIORITY). */
static __always_inline __u32 h2_headers_block_off(__u8 flags)
{
    return H2_FRAME_HEADER_LEN + ((flags & H2_F_PADDED) ? 1 : 0) +
           ((flags & H2_F_PRIORITY) ? 5 : 0);
}

/* Whether a header block's first byte is a :status field by its static-table index (8-14:
 * the field indexed, or a literal of any of the three forms with its name indexed): how
 * every encoder starts a response's block (pseudo-header fields come first, RFC 9113
 * 8.3). What a client's HEADERS frame is checked for; a :status behind other fields, a
 * size update or a new name is not looked for. */
static __always_inline int h2_first_byte_is_status(__u8 f)
{
    __u32 index;
    if (f & 0x80)
        index = f & 0x7f;           /* indexed field */
    else if (f & 0x40)
        index = f & 0x3f;           /* literal with incremental indexing */
    else if ((f & 0xe0) == 0x20)
        return 0;                   /* a dynamic table size update */
    else
        index = f & 0x0f;           /* literal without indexing, or never indexed */
    return h2_static_status(index) != H2_NOT_STATUS;
}

/* Whether a frame header could be a real one (see the comment at the top). */
static __always_inline int h2_frame_ok(__u32 len, __u8 type, __u8 flags, __u32 sid)
{
    if (len > H2_MAX_FRAME_LEN || (sid & 0x80000000))
        return 0;
    if (type == H2_DATA)
        return sid && !(flags & ~(H2_F_END_STREAM | H2_F_PADDED));
    if (type == H2_HEADERS)         /* see the top comment for END_HEADERS and odd ids */
        return (sid & 1) && (flags & H2_F_END_HEADERS) &&
               !(flags & ~(H2_F_END_STREAM | H2_F_END_HEADERS | H2_F_PADDED | H2_F_PRIORITY));
    if (type == H2_PRIORITY)
        return sid && !flags && len == 5;
    if (type == H2_RST_STREAM)
        return sid && !flags && len == 4;
    if (type == H2_SETTINGS)
        return !sid && !(flags & ~H2_F_ACK) && len % 6 == 0 && !(flags && len);
    if (type == H2_PUSH_PROMISE)
        return sid && !(flags & ~(H2_F_END_HEADERS | H2_F_PADDED)) && len >= 4;
    if (type == H2_PING)
        return !sid && !(flags & ~H2_F_ACK) && len == 8;
    if (type == H2_GOAWAY)
        return !sid && !flags && len >= 8;
    if (type == H2_WINDOW_UPDATE)
        return !flags && len == 4;
    if (type == H2_CONTINUATION)
        return sid && !(flags & ~H2_F_END_HEADERS);
    return 0;
}

static __always_inline int h2_header_ok(const unsigned char *h)
{
    __u32 len = ((__u32)h[0] << 16) | ((__u32)h[1] << 8) | h[2];
    __u32 sid = ((__u32)h[5] << 24) | ((__u32)h[6] << 16) | ((__u32)h[7] << 8) | h[8];
    return h2_frame_ok(len, h[3], h[4], sid);
}

/* Three digits Huffman-coded in `n` (2 or 3) bytes b[i..i+n-1] (RFC 7541 Appendix B:
 * '0'-'2' are 00000-00010, '3'-'9' 011001-011111), padded with 1 bits to the byte
 * boundary (fewer than 8 of them). Returns the code or H2_UNKNOWN. */
static __always_inline int h2_huffman_digits(const unsigned char *b, __u32 i, __u32 n)
{
    __u32 bits = ((__u32)H2_AT(b, i) << 16) | ((__u32)H2_AT(b, i + 1) << 8) |
                 (n == 3 ? H2_AT(b, i + 2) : 0xff);
    __u32 used = 0;
    int code = 0;
#pragma unroll
    for (int i = 0; i < 3; i++) {
        __u32 five = (bits >> (19 - used)) & 0x1f;
        __u32 six = (bits >> (18 - used)) & 0x3f;
        if (five <= 2) {
            code = code * 10 + five;
            used += 5;
        } else if (six >= 0x19 && six <= 0x1f) {
            code = code * 10 + 3 + (six - 0x19);
            used += 6;
        } else {
            return H2_UNKNOWN;
        }
    }
    /* 15-18 bits of code: 2 bytes for 15-16, 3 for 17-18; the rest is padding. */
    if ((used <= 16) != (n == 2))
        return H2_UNKNOWN;
    __u32 pad = n * 8 - used;
    __u32 mask = (1u << pad) - 1;
    __u32 last = n == 3 ? bits : (bits >> 8);
    if ((last & mask) != mask)
        return H2_UNKNOWN;
    return code;
}

/* A string literal's value at b[i], of `avail` bytes read: three raw digits or 2-3
 * Huffman bytes. */
static __always_inline int h2_status_value(const unsigned char *b, __u32 i, __u32 avail)
{
    if (i >= H2_BLOCK_PEEK - 3 || i + 1 > avail)
        return H2_UNKNOWN;
    __u8 vlen = H2_AT(b, i);
    if (vlen == 3) {
        if (i + 4 > avail)
            return H2_UNKNOWN;
        __u8 d0 = H2_AT(b, i + 1), d1 = H2_AT(b, i + 2), d2 = H2_AT(b, i + 3);
        if (d0 < '0' || d0 > '9' || d1 < '0' || d1 > '9' || d2 < '0' || d2 > '9')
            return H2_UNKNOWN;
        return (d0 - '0') * 100 + (d1 - '0') * 10 + (d2 - '0');
    }
    if (vlen == 0x82 || vlen == 0x83) {
        __u32 n = vlen & 0x7f;
        if (i + 1 + n > avail)
            return H2_UNKNOWN;
        return h2_huffman_digits(b, i + 1, n);
    }
    return H2_UNKNOWN;
}

/* Whether b[i..] is the new name ":status", raw (07 ":status") or Huffman (85 b8 84 8d
 * 36 a3). Returns the index after the name, 0 when it is another name, -1 when cut. */
static __always_inline int h2_status_name(const unsigned char *b, __u32 i, __u32 avail)
{
    if (i >= avail || i >= H2_BLOCK_PEEK - 8)
        return -1;
    if (H2_AT(b, i) == 0x07) {
        if (i + 8 > avail)
            return -1;
        if (H2_AT(b, i + 1) == ':' && H2_AT(b, i + 2) == 's' && H2_AT(b, i + 3) == 't' &&
            H2_AT(b, i + 4) == 'a' && H2_AT(b, i + 5) == 't' && H2_AT(b, i + 6) == 'u' &&
            H2_AT(b, i + 7) == 's')
            return i + 8;
        return 0;
    }
    if (H2_AT(b, i) == 0x85) {
        if (i + 6 > avail)
            return -1;
        if (H2_AT(b, i + 1) == 0xb8 && H2_AT(b, i + 2) == 0x84 && H2_AT(b, i + 3) == 0x8d &&
            H2_AT(b, i + 4) == 0x36 && H2_AT(b, i + 5) == 0xa3)
            return i + 6;
        return 0;
    }
    return 0;
}

/* The :status of the header block in b[0..avail-1] (the first bytes of the block), or
 * H2_NOT_STATUS / H2_UNKNOWN. */
static __always_inline int h2_block_status(const unsigned char *b, __u32 avail)
{
    __u32 i = 0;
    /* Dynamic table size updates (001xxxxx), at most two. */
#pragma unroll
    for (int u = 0; u < 2; u++) {
        if (i >= avail || i >= H2_BLOCK_PEEK)
            return H2_UNKNOWN;
        if ((H2_AT(b, i) & 0xe0) != 0x20)
            break;
        if ((H2_AT(b, i) & 0x1f) == 0x1f) {
            /* Continuation bytes: high bit set on all but the last. */
            int end = 0;
#pragma unroll
            for (int k = 1; k < H2_SIZE_UPDATE_MAX; k++) {
                if (i + k >= avail || i + k >= H2_BLOCK_PEEK)
                    return H2_UNKNOWN;
                if (!(H2_AT(b, i + k) & 0x80)) {
                    end = k;
                    break;
                }
            }
            if (!end)
                return H2_NOT_STATUS;
            i += end;
        }
        i++;
    }
    i = opaque(i);
    if (i >= avail || i >= H2_BLOCK_PEEK)
        return H2_UNKNOWN;
    __u8 f = H2_AT(b, i);
    __u32 index;
    if (f & 0x80) {                     /* indexed field, 7-bit prefix */
        index = f & 0x7f;
        if (index == 0x7f || index >= 62)
            return H2_DYNAMIC;          /* a dynamic table entry */
        if (index >= 1 && index <= 7)
            return H2_REQUEST;          /* static 1-7: a request's pseudo-headers */
        return h2_static_status(index);
    }
    if ((f & 0xe0) == 0x20)
        return H2_NOT_STATUS;           /* a third size update */
    if (f & 0x40)                       /* literal with incremental indexing, 6-bit prefix */
        index = f & 0x3f;
    else                                /* without / never indexed, 4-bit prefix */
        index = f & 0x0f;
    if (index == 0) {
        int next = h2_status_name(b, i + 1, avail);
        if (next < 0)
            return H2_UNKNOWN;
        if (next == 0)
            return H2_NOT_STATUS;
        return h2_status_value(b, next, avail);
    }
    if (index == ((f & 0x40) ? 0x3f : 0x0f)) {
        /* A multi-byte name index: 15 or 63 and up. Static names beyond 14 are not
         * :status; a continuation that reaches 62 is the dynamic table. */
        if (i + 1 >= avail || i + 1 >= H2_BLOCK_PEEK)
            return H2_UNKNOWN;
        __u8 c = H2_AT(b, i + 1);
        if (c & 0x80)
            return H2_DYNAMIC;          /* >= 128 more: dynamic */
        index += c;
        return index >= 62 ? H2_DYNAMIC : H2_NOT_STATUS;
    }
    if (index >= 62)
        return H2_DYNAMIC;
    if (index >= 1 && index <= 7)
        return H2_REQUEST;
    if (index < 8 || index > 14)
        return H2_NOT_STATUS;
    return h2_status_value(b, i + 1, avail);
}

/* --- the HPACK walk: grpc-status, and the server's dynamic table ----------------------
 *
 * gRPC's grpc-status (0-16) is read in header blocks that end a stream (HEADERS with
 * END_STREAM: a gRPC response's trailers, or a "trailers-only" response that carries
 * :status 200 and grpc-status in one block). It is not in the static table: the first
 * time a connection's server sends it, it is a literal with the new name "grpc-status"
 * (raw, or Huffman 9a ca c8 b2 12 34 da 8f), in any of the three literal forms, value raw
 * or Huffman ("0"-"16"); later ones may refer to the dynamic table, as a whole field
 * (grpcio repeats a value so) or as a literal's name (@grpc/grpc-js, Go).
 *
 * A dynamic reference resolves through the server's encoder state, followed per
 * connection (struct conn_hpack): the count of its insertions and what the insertions
 * whose name was grpc-status or :status held. A segment of the server's is walked "in
 * step" when the connection's state is followed and the segment starts where the last
 * walked one left off (its sequence number is conn_hpack.next_seq): then every header
 * block in it is walked field by field, counting the insertions and recording the ones
 * that matter, and a dynamic reference names the insertion `inserted - (N - 62)`. A
 * block's first field that is a dynamic reference (which the frame loop cannot read) is
 * resolved here too: a :status. Anything that keeps a segment from being walked to its
 * end loses the state for good (C_HPACK_*): then, as for a connection whose start was
 * not seen, only the stream-ending blocks are walked, and a dynamic reference in one
 * without a readable grpc-status counts in C_GRPC_STATUS_UNKNOWN, never guessed.
 *
 * The walk: the frame loop records the blocks to walk (at most H2_WALK_BLOCKS per
 * segment), and one flat loop of H2_WALK_STEPS steps then reads them in turn. A step
 * reads one field: its representation, its name (an index, or a new name compared with
 * the two that matter) and its value, skipping strings by their length; a field whose
 * value starts past the 32 bytes a step sees takes a second step. One flat loop keeps
 * the verifier's work to the steps, not steps times frames, and the step's state lives
 * in a per-CPU struct read at the start of each step (struct h2_walk_state): the
 * verifier knows nothing of it, so every step starts from one verifier state.
 * Non-gRPC traffic pays the walk only for the header blocks of a followed connection
 * (once lost, only for stream-ending ones, as before). */
#define H2_WALK_BLOCKS 8
#ifndef H2_WALK_STEPS
#define H2_WALK_STEPS 24
#endif
#define GRPC_MAX_CODE 16
/* Bits of h2_walk_state.bflags. */
#define H2_B_END_STREAM 1   /* the block ends its stream: read for grpc-status */
#define H2_B_FIRST_DYN 2    /* its first field is a dynamic reference: its :status is
                             * resolved by the walk */
/* What comes next in a block (h2_walk_state.expect). */
#define H2_W_FIELD 0
#define H2_W_VALUE 1        /* a literal's value, its name's kind in `kind` */
/* h2_resolve's answer when the entry cannot be told. */
#define H2_UNRESOLVED 0xffff

/* What the frame loop hands to the walk, and the walk's state between steps. */
struct h2_walk_state {
    __u32 off[H2_WALK_BLOCKS];      /* where each recorded block starts in the skb */
    __u32 left[H2_WALK_BLOCKS];     /* its bytes within the segment */
    __u8 bflags[H2_WALK_BLOCKS];    /* H2_B_* */
    __u32 n;                /* blocks recorded */
    __u32 track;            /* the segment is in step: every header block is recorded */
    __u32 lost;             /* in step, but something could not be walked */
    __u32 next_off;         /* skb offset of the frame header after the last frame */
    __u32 r;                /* the block being walked */
    __u32 pos;              /* where its next step reads */
    __u32 rest;             /* its bytes from there */
    __u32 expect;           /* H2_W_FIELD or H2_W_VALUE */
    __u32 kind;             /* the literal's name: HPACK_GRPC, HPACK_STATUS, HPACK_UNSURE, 0 */
    __u32 incr;             /* the literal is inserted (incremental indexing) */
    __u32 v;                /* where in the step's bytes the literal's value starts */
    __u32 code;             /* the value read (HPACK_NO_VALUE: none) */
    __u32 op;               /* the field's representation (H2_OP_*) */
    __u32 index;            /* its index (or a size update's size) */
    __u32 what;             /* what a dynamic index named (h2_resolve), or the literal */
    __u32 report;           /* the field is one h2_walk_found looks at */
    __u32 adv;              /* the bytes the step read */
    __u32 first;            /* no field of the block read yet (size updates aside) */
    __u32 dyn;              /* an unresolved reference in the block */
    __u32 got;              /* the block's grpc-status was read */
    int armed_h2;           /* the first :status the walk resolved in the trigger set */
    int armed_grpc;         /* the first grpc-status in the trigger set */
};
/* A read the compiler cannot cache: see the comment on the walk above. */
#define H2V(x) (*(volatile __typeof__(x) *)&(x))

/* The HPACK integer (RFC 7541 5.1) at b[i] with prefix `mask`, of at most 3 bytes
 * (values below mask + 2^14, enough for any string of a frame up to 16 KB). Returns the
 * value and sets *next, or -1 when longer or past `avail`. */
static __always_inline int h2_int(const unsigned char *b, __u32 i, __u32 avail, __u32 mask,
                                  __u32 *next)
{
    if (i >= avail)
        return -1;
    __u32 v = H2_AT(b, i) & mask;
    if (v < mask) {
        *next = i + 1;
        return v;
    }
    if (i + 1 >= avail)
        return -1;
    __u32 c = H2_AT(b, i + 1);
    v += c & 0x7f;
    if (!(c & 0x80)) {
        *next = i + 2;
        return v;
    }
    if (i + 2 >= avail || (H2_AT(b, i + 2) & 0x80))
        return -1;
    v += (__u32)H2_AT(b, i + 2) << 7;
    *next = i + 3;
    return v;
}

/* Whether the new name at b[i] (its length byte) is "grpc-status", raw or Huffman. */
static __always_inline int h2_grpc_name(const unsigned char *b, __u32 i, __u32 avail)
{
    if (i >= avail)
        return 0;
    __u8 l = H2_AT(b, i);
    if (l == 11 && i + 12 <= avail)
        return H2_AT(b, i + 1) == 'g' && H2_AT(b, i + 2) == 'r' && H2_AT(b, i + 3) == 'p' &&
               H2_AT(b, i + 4) == 'c' && H2_AT(b, i + 5) == '-' && H2_AT(b, i + 6) == 's' &&
               H2_AT(b, i + 7) == 't' && H2_AT(b, i + 8) == 'a' && H2_AT(b, i + 9) == 't' &&
               H2_AT(b, i + 10) == 'u' && H2_AT(b, i + 11) == 's';
    if (l == 0x88 && i + 9 <= avail)
        return H2_AT(b, i + 1) == 0x9a && H2_AT(b, i + 2) == 0xca && H2_AT(b, i + 3) == 0xc8 &&
               H2_AT(b, i + 4) == 0xb2 && H2_AT(b, i + 5) == 0x12 && H2_AT(b, i + 6) == 0x34 &&
               H2_AT(b, i + 7) == 0xda && H2_AT(b, i + 8) == 0x8f;
    return 0;
}

/* One or two digits Huffman-coded in n (1 or 2) bytes b[i+1..i+n] (see
 * h2_huffman_digits), padded with fewer than 8 one bits. The value or H2_UNKNOWN. */
static __always_inline int h2_huffman_small(const unsigned char *b, __u32 i, __u32 n)
{
    __u32 total = n * 8;
    __u32 w = ((__u32)H2_AT(b, i + 1) << 8) | (n == 2 ? H2_AT(b, i + 2) : 0);  /* left-aligned */
    __u32 used = 0;
    int code = 0, digits = 0;
#pragma unroll
    for (int d = 0; d < 2; d++) {
        __u32 rem = total - used;
        __u32 rest = ((w << used) & 0xffff) >> (16 - rem);
        if (rem < 8 && rest == (1u << rem) - 1)
            break;                      /* the padding */
        __u32 five = (w >> (11 - used)) & 0x1f;
        __u32 six = (w >> (10 - used)) & 0x3f;
        if (rem >= 5 && five <= 2) {
            code = code * 10 + five;
            used += 5;
        } else if (rem >= 6 && six >= 0x19 && six <= 0x1f) {
            code = code * 10 + 3 + (six - 0x19);
            used += 6;
        } else {
            return H2_UNKNOWN;
        }
        digits++;
    }
    __u32 rem = total - used;
    if (!digits || rem >= 8 || (((w << used) & 0xffff) >> (16 - rem)) != (1u << rem) - 1)
        return H2_UNKNOWN;
    return code;
}

/* The grpc-status value whose string (its length byte) is b[i], of `avail` bytes read:
 * "0"-"16", raw or Huffman. */
static __always_inline int h2_grpc_value(const unsigned char *b, __u32 i, __u32 avail)
{
    if (i >= avail)
        return H2_UNKNOWN;
    __u8 l = H2_AT(b, i);
    __u32 n = l & 0x7f;
    if (n < 1 || n > 2 || i + 1 + n > avail)
        return H2_UNKNOWN;
    int code;
    if (l & 0x80) {
        code = h2_huffman_small(b, i, n);
    } else {
        __u8 d0 = H2_AT(b, i + 1), d1 = H2_AT(b, i + 2);
        if (d0 < '0' || d0 > '9' || (n == 2 && (d1 < '0' || d1 > '9')))
            return H2_UNKNOWN;
        code = n == 2 ? (d0 - '0') * 10 + (d1 - '0') : d0 - '0';
    }
    if (code < 0 || code > GRPC_MAX_CODE)
        return H2_UNKNOWN;
    return code;
}

/* A masked slot index the compiler cannot drop (as h2_idx). */
static __always_inline __u32 h2_walk_slot(__u32 i)
{
    asm volatile("" : "+r"(i));
    return i & (H2_WALK_BLOCKS - 1);
}

/* Counts a grpc-status: globally and in the interface's stats (ok / error). */
static __always_inline void grpc_count_status(struct __sk_buff *skb, __u32 direction,
                                              __u32 code)
{
    if (!status_counts(status_mode()))
        return;
    count(code ? C_GRPC_ERRORS : C_GRPC_OK, 1);
    struct iface_stats *st = stats_of(skb->ifindex, direction);
    if (st)
        st->grpc_responses[code ? 1 : 0]++;
}

/* Counts an h2 status: globally and in the interface's stats by class. */
static __always_inline void h2_count_status(struct __sk_buff *skb, __u32 direction,
                                            __u32 code)
{
    if (!status_counts(status_mode()))
        return;
    count(C_H2_RESPONSES, 1);
    __u32 cls = (code >= 100 && code < 600) ? code / 100 - 1 : 5;
    struct iface_stats *st = stats_of(skb->ifindex, direction);
    asm volatile("" : "+r"(cls));
    if (st && cls < 6)
        st->h2_responses[cls]++;
}

/* What dynamic index `index` (62 and up) names on the connection: the record of that
 * insertion (HPACK_GRPC | code ...), 0 for an insertion whose name does not matter, or
 * H2_UNRESOLVED. An index the followed state cannot explain (past every insertion) loses
 * the state. */
static __always_inline __u32 h2_resolve(struct h2_walk_state *w, struct conn *c, __u32 index)
{
    if (!c || !H2V(w->track) || H2V(w->lost))
        return H2_UNRESOLVED;
    __u32 inserted = H2V(c->hpack.inserted), back = index - 62;
    if (back >= inserted) {
        w->lost = 1;
        return H2_UNRESOLVED;
    }
    __u32 k = inserted - back;
    if (k < H2V(c->hpack.floor)) {
        count_unknown(C_HPACK_FORGOTTEN);
        return H2_UNRESOLVED;
    }
    __u32 what = 0;
#pragma unroll
    for (int j = 0; j < HPACK_NAMED; j++) {
        if (H2V(c->hpack.named_at[j]) == k)
            what = H2V(c->hpack.named_what[j]);
    }
    return (what & HPACK_UNSURE) ? H2_UNRESOLVED : what;
}

/* The server inserted a field: counted, and recorded when `what` names a kind. The
 * oldest record gives way: references to it and older insertions are unknown from then
 * on (the encoder drops its oldest entries first too, but by size, which is not kept). */
static __always_inline void h2_insert(struct h2_walk_state *w, struct conn *c, __u32 what)
{
    if (!c || !H2V(w->track) || H2V(w->lost))
        return;
    __u32 k = H2V(c->hpack.inserted) + 1;
    c->hpack.inserted = k;
    if (!what)
        return;
    __u32 j = h2_walk_slot(H2V(c->hpack.next)) & (HPACK_NAMED - 1);
    if (H2V(c->hpack.named_what[j]))
        c->hpack.floor = H2V(c->hpack.named_at[j]) + 1;
    c->hpack.named_at[j] = k;
    c->hpack.named_what[j] = what;
    c->hpack.next = j + 1;
}

/* A dynamic table size update to 0: the table is empty, no earlier insertion is
 * referenced again. (Other sizes evict only what the encoder will not reference.) */
static __always_inline void h2_table_emptied(struct h2_walk_state *w, struct conn *c)
{
    if (!c || !H2V(w->track) || H2V(w->lost))
        return;
#pragma unroll
    for (int j = 0; j < HPACK_NAMED; j++) {
        c->hpack.named_at[j] = 0;
        c->hpack.named_what[j] = 0;
    }
    c->hpack.floor = H2V(c->hpack.inserted) + 1;
    c->hpack.next = 0;
}

/* A field whose name and value `what` says (a record, or a literal's kind | its value;
 * H2_UNRESOLVED when not known): a grpc-status in a stream-ending block, the :status of a
 * block whose first field the frame loop left to the walk. */
static __always_inline void h2_walk_found(struct __sk_buff *skb, struct h2_walk_state *w,
                                          __u32 direction, __u32 what)
{
    __u32 bf = H2V(w->bflags[h2_walk_slot(H2V(w->r))]);
    int first = H2V(w->first) && (bf & H2_B_FIRST_DYN);
    __u32 code = what & HPACK_NO_VALUE;
    w->first = 0;
    if (what == H2_UNRESOLVED || (what & HPACK_UNSURE)) {
        w->dyn = 1;
        if (first)
            count_unknown(C_H2_STATUS_UNKNOWN);
    } else if (what & HPACK_GRPC) {
        if ((bf & H2_B_END_STREAM) && !H2V(w->got)) {
            w->got = 1;
            if (code > GRPC_MAX_CODE) {
                count_unknown(C_GRPC_STATUS_UNKNOWN);
            } else {
                grpc_count_status(skb, direction, code);
                if (H2V(w->armed_grpc) < 0 && may_trigger(code))
                    w->armed_grpc = code;
            }
        }
    } else if ((what & HPACK_STATUS) && first) {
        if (code >= STATUS_CODES) {
            count_unknown(C_H2_STATUS_UNKNOWN);
        } else {
            h2_count_status(skb, direction, code);
            if (H2V(w->armed_h2) < 0 && code >= MIN_HTTP_STATUS && may_trigger(code))
                w->armed_h2 = code;
        }
    }
}

/* What a step found the field to be (h2_walk_state.op). */
#define H2_OP_END 0         /* nothing readable: the block ends */
#define H2_OP_INDEXED 1     /* an indexed field, index in `index` */
#define H2_OP_SIZE 2        /* a dynamic table size update, the size in `index` */
#define H2_OP_LITERAL 3     /* a literal: its name's index in `index` (0: a new name, or
                             * the value of one whose name an earlier step read) */

/* A step's first part: what the field's representation and name are, into w (op, index,
 * kind, incr, v: where the value starts). */
static __always_inline void h2_walk_decode(struct h2_walk_state *w, const unsigned char *b,
                                           __u32 n)
{
    __u32 next = 0;
    w->op = H2_OP_END;
    if (H2V(w->expect) != H2_W_FIELD) {
        w->op = H2_OP_LITERAL;          /* the value of the literal before: kind, incr kept */
        w->index = 0;
        w->v = 0;
        return;
    }
    __u8 f = b[0];
    if (f & 0x80) {
        int index = h2_int(b, 0, n, 0x7f, &next);
        if (index <= 0)
            return;                     /* index 0 is a decoding error */
        w->op = H2_OP_INDEXED;
        w->index = index;
        w->v = next;
        return;
    }
    if ((f & 0xe0) == 0x20) {
        int size = h2_int(b, 0, n, 0x1f, &next);
        if (size < 0)
            return;
        w->op = H2_OP_SIZE;
        w->index = size;
        w->v = next;
        return;
    }
    /* A literal: incremental indexing (6-bit name index) or not (4-bit). */
    __u32 incr = (f & 0x40) != 0;
    int index = h2_int(b, 0, n, incr ? 0x3f : 0x0f, &next);
    if (index < 0)
        return;
    __u32 kind = 0, v = next;
    if (index == 0) {
        __u32 after = 0;
        int nlen = h2_int(b, next, n, 0x7f, &after);
        if (nlen < 0)
            return;
        if (h2_grpc_name(b, next, n))
            kind = HPACK_GRPC;
        else if (h2_status_name(b, next, n) > 0)
            kind = HPACK_STATUS;
        v = after + nlen;
    } else if (index >= 8 && index <= 14) {
        kind = HPACK_STATUS;
    }
    w->op = H2_OP_LITERAL;
    w->index = index;
    w->kind = kind;
    w->incr = incr;
    w->v = v;
}

/* One step on the block's next bytes b[0..n-1] (`rest` of them left in the block):
 * returns how many bytes it read, or -1 when the block cannot be read on. Its parts meet
 * through w (each reads what the one before left there), so that however a part went,
 * the next starts from one verifier state: the verifier's work stays a sum over the
 * parts, not a product. */
static __always_inline int h2_walk_step(struct __sk_buff *skb, struct h2_walk_state *w,
                                        struct conn *c, const unsigned char *b, __u32 n,
                                        __u32 rest, __u32 direction)
{
    h2_walk_decode(w, b, n);
    /* A dynamic index, as the field or as a literal's name: one resolution. */
    __u32 op = H2V(w->op), index = H2V(w->index);
    w->what = 0;
    if ((op == H2_OP_INDEXED || op == H2_OP_LITERAL) && index >= 62) {
        __u32 what = h2_resolve(w, c, index);
        w->what = what;
        if (op == H2_OP_LITERAL)
            w->kind = what == H2_UNRESOLVED ? HPACK_UNSURE
                                            : what & (HPACK_GRPC | HPACK_STATUS | HPACK_UNSURE);
    }
    op = H2V(w->op);
    if (op == H2_OP_END)
        return -1;
    w->report = 0;
    w->adv = H2V(w->v);
    if (op == H2_OP_SIZE) {
        if (H2V(w->index) == 0)
            h2_table_emptied(w, c);
    } else if (op == H2_OP_INDEXED) {
        if (H2V(w->index) >= 62)
            w->report = 1;              /* what the record says */
        else
            w->first = 0;
    } else {
        /* The literal's value at b[v]. Its length, and the value itself when its name
         * matters, must be in view: else, when the block goes on past the view, the
         * next step reads from the value on. */
        __u32 v = H2V(w->v), after = 0;
        int vlen = h2_int(b, v, n, 0x7f, &after);
        __u32 kind = H2V(w->kind);
        if (v > 0 && n < rest && (vlen < 0 || (kind && after + vlen > n))) {
            if (v >= rest)
                return -1;
            w->expect = H2_W_VALUE;
            return v;
        }
        if (vlen < 0)
            return -1;
        w->code = HPACK_NO_VALUE;
        if (kind == HPACK_GRPC) {
            int g = h2_grpc_value(b, v, n);
            if (g >= 0)
                w->code = g;
        } else if (kind == HPACK_STATUS) {
            int st = h2_status_value(b, v, n);
            if (st >= 0)
                w->code = st;
        }
        w->adv = after + vlen;
        w->expect = H2_W_FIELD;
        kind = H2V(w->kind);
        __u32 code = H2V(w->code);
        if (H2V(w->incr))
            h2_insert(w, c, kind == HPACK_UNSURE ? HPACK_UNSURE : kind ? kind | code : 0);
        w->what = kind == HPACK_UNSURE ? H2_UNRESOLVED : kind | H2V(w->code);
        w->report = 1;
    }
    if (H2V(w->report))
        h2_walk_found(skb, w, direction, H2V(w->what));
    return H2V(w->adv);
}

/* The end of a block (its bytes read, or not readable on): what it leaves unknown. */
static __always_inline void h2_walk_block_end(struct h2_walk_state *w)
{
    __u32 bf = H2V(w->bflags[h2_walk_slot(H2V(w->r))]);
    if (H2V(w->first) && (bf & H2_B_FIRST_DYN))
        count_unknown(C_H2_STATUS_UNKNOWN);
    if ((bf & H2_B_END_STREAM) && !H2V(w->got) && H2V(w->dyn))
        count_unknown(C_GRPC_STATUS_UNKNOWN);
}

/* Starts walking block r. */
static __always_inline void h2_walk_start(struct h2_walk_state *w, __u32 r)
{
    __u32 slot = h2_walk_slot(r);
    w->r = r;
    w->pos = H2V(w->off[slot]);
    w->rest = H2V(w->left[slot]);
    w->expect = H2_W_FIELD;
    w->v = 0;
    w->first = 1;
    w->dyn = 0;
    w->got = 0;
}

/* Walks the recorded blocks (see the comment above H2_WALK_BLOCKS), counting what it
 * finds; the armed statuses are left in w. */
static __always_inline void h2_walk_blocks(struct __sk_buff *skb, struct h2_walk_state *w,
                                    struct conn *c, __u32 direction)
{
    unsigned char b[H2_BUF_LEN];
    if (!H2V(w->n))
        return;
    h2_walk_start(w, 0);
    for (int step = 0; step < H2_WALK_STEPS; step++) {
        __u32 r = H2V(w->r);
        if (r >= H2V(w->n) || r >= H2_WALK_BLOCKS)
            return;
        __u32 rest = H2V(w->rest);
        __u32 n = rest > H2_BUF_LEN ? H2_BUF_LEN : rest;
        int got = -1;
        if (n && bpf_skb_load_bytes(skb, H2V(w->pos), b, ((n - 1) & (H2_BUF_LEN - 1)) + 1) == 0)
            got = h2_walk_step(skb, w, c, b, n, rest, direction);
        rest = H2V(w->rest);
        if (got < 0 || (__u32)got >= rest) {
            if (got < 0 || (__u32)got > rest)
                w->lost |= H2V(w->track);   /* a block that is not what it says */
            h2_walk_block_end(w);
            h2_walk_start(w, H2V(w->r) + 1);
        } else {
            w->pos = H2V(w->pos) + got;
            w->rest = rest - got;
        }
    }
    /* The steps ran out: the blocks not walked to their end leave the state unknown,
     * and their first fields left to the walk unknown. */
    __u32 r = H2V(w->r);
    if (r >= H2V(w->n))
        return;
    w->lost |= H2V(w->track);
    if (H2V(w->first) && (H2V(w->bflags[h2_walk_slot(r)]) & H2_B_FIRST_DYN))
        count_unknown(C_H2_STATUS_UNKNOWN);
#pragma unroll
    for (int i = 1; i < H2_WALK_BLOCKS; i++) {
        if (r + i < H2V(w->n) && (H2V(w->bflags[h2_walk_slot(r + i)]) & H2_B_FIRST_DYN))
            count_unknown(C_H2_STATUS_UNKNOWN);
    }
}

/* Decodes the HEADERS frame whose payload starts at `off` and is `len` bytes long (maybe
 * cut by `end`, the end of the segment), and records its block for the walk: every block
 * when the segment is in step, the stream-ending ones otherwise. */
static __always_inline int h2_headers_status(struct __sk_buff *skb, __u32 off, __u32 len,
                                             __u8 flags, __u32 end, struct h2_walk_state *w)
{
    unsigned char b[H2_BUF_LEN] = {};
    __u32 skip = 0, pad = 0, track = H2V(w->track);
    if (flags & H2_F_PADDED) {
        if (off >= end || bpf_skb_load_bytes(skb, off, b, 1) < 0) {
            w->lost |= track;
            return H2_UNKNOWN;
        }
        pad = b[0];
        skip = 1;
    }
    if (flags & H2_F_PRIORITY)
        skip += 5;
    if (skip + pad > len) {
        w->lost |= track;
        return H2_NOT_STATUS;           /* PROTOCOL_ERROR in a real frame */
    }
    __u32 block = off + skip;
    __u32 block_len = len - skip - pad;
    if (block_len == 0)
        return H2_NOT_STATUS;
    if (block >= end) {
        w->lost |= track;
        return H2_UNKNOWN;
    }
    __u32 avail = end - block;
    if (avail > block_len)
        avail = block_len;
    if (avail < block_len)
        w->lost |= track;               /* the rest is in the next segment: not followed */
    __u32 peek = avail > H2_BLOCK_PEEK ? H2_BLOCK_PEEK : avail;
    /* peek is 1..H2_BLOCK_PEEK here; the mask shows the verifier 1..H2_BUF_LEN. */
    __u64 size = ((peek - 1) & (H2_BUF_LEN - 1)) + 1;
    int status = H2_UNKNOWN;
    if (bpf_skb_load_bytes(skb, block, b, size) == 0)
        status = h2_block_status(b, peek);
    /* Recorded for the walk after the status is known: one verifier state for the
     * decode above, whichever way the recording goes. */
    if (!H2V(w->track) && !(flags & H2_F_END_STREAM))
        return status == H2_DYNAMIC ? H2_UNKNOWN : status;
    __u32 n = H2V(w->n);
    if (n >= H2_WALK_BLOCKS) {
        w->lost |= H2V(w->track);
        return status == H2_DYNAMIC ? H2_UNKNOWN : status;
    }
    __u32 slot = h2_walk_slot(n);
    w->off[slot] = block;
    w->left[slot] = avail;
    w->bflags[slot] = ((flags & H2_F_END_STREAM) ? H2_B_END_STREAM : 0) |
                      ((status == H2_DYNAMIC && H2V(w->track)) ? H2_B_FIRST_DYN : 0);
    w->n = n + 1;
    if (status != H2_DYNAMIC)
        return status;
    return H2V(w->track) ? H2_NOT_STATUS : H2_UNKNOWN;   /* the walk resolves it */
}

/* Walks the frames of the segment [off, end), counts the status (or unknown) of every
 * HEADERS frame met, records the header blocks for the HPACK walk and runs it, and
 * returns the first status in the trigger set (100-999), else the first grpc-status in
 * it (0-16), or -1. `w` comes with `track` set (the segment is in step) and leaves with
 * `lost` set when it could not be followed to its end, and next_off.
 *
 * Verifier cost: the loop is not unrolled, and the verifier walks it once per iteration
 * and per distinct state at its head. The values the body refines in different ways
 * (the offset, the segment end, the status found) go through opaque() at the end of each
 * iteration, so that every iteration starts from one state: about 5,000 instructions
 * verified per frame instead of a product over the frames. */
static __always_inline int h2_trigger_status(struct __sk_buff *skb, __u32 off, __u32 end,
                                             __u32 direction, struct h2_walk_state *w,
                                             struct conn *c)
{
    unsigned char h[H2_FRAME_HEADER_LEN];
    int armed_status = -1;
    off = opaque(off);
    end = opaque(end);
    for (int i = 0; i < H2_MAX_FRAMES; i++) {
        if (off + H2_FRAME_HEADER_LEN > end)
            break;
        if (bpf_skb_load_bytes(skb, off, h, H2_FRAME_HEADER_LEN) < 0)
            break;
        if (!h2_header_ok(h))
            break;
        __u32 len = ((__u32)h[0] << 16) | ((__u32)h[1] << 8) | h[2];
        off += H2_FRAME_HEADER_LEN;
        if (h[3] == H2_HEADERS) {
            int status = opaque(h2_headers_status(skb, off, len, h[4], end, w));
            if (status == H2_UNKNOWN) {
                count_unknown(C_H2_STATUS_UNKNOWN);
            } else if (status == H2_REQUEST) {
                note_h2_request();
            } else if (status >= 0 && status < STATUS_CODES) {
                h2_count_status(skb, direction, status);
                if (armed_status < 0 && status >= MIN_HTTP_STATUS && may_trigger(status))
                    armed_status = status;
            }
        } else if (h[3] == H2_CONTINUATION || h[3] == H2_PUSH_PROMISE) {
            w->lost |= H2V(w->track);   /* header blocks the walk does not follow */
        }
        off = opaque(off + len);
        end = opaque(end);
        armed_status = opaque(armed_status);
    }
    /* Frames left unwalked (a header not plausible or cut, the frame bound): the state
     * cannot account for them. A last frame running past the end is fine unless it holds
     * a header block (h2_headers_status said so): the next segment starts inside it. */
    if (off < end)
        w->lost |= H2V(w->track);
    w->next_off = off;
    h2_walk_blocks(skb, w, c, direction);
    if (armed_status < 0)
        armed_status = H2V(w->armed_h2);
    if (armed_status < 0)
        armed_status = H2V(w->armed_grpc);
    return armed_status;
}

#endif
