/* HTTP/2 :status in the classifier (RFC 9113 frames, RFC 7541 HPACK), without HPACK state.
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
 * A field that refers to the dynamic table (index >= 62, as a field or as a literal's
 * name) cannot be decoded without the connection's HPACK state, and neither can a
 * :status value that is not three digits or is cut by the end of the segment: they count
 * in C_H2_STATUS_UNKNOWN. Any other first field (a request's :method, trailers) is not a
 * response. Stream-ending HEADERS frames are read once more for gRPC's grpc-status
 * (h2_grpc_walk, below).
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
/* Smallest segment worth walking: a frame header and a one-byte block (0x8e = 500). */
#define H2_MIN_SEGMENT (H2_FRAME_HEADER_LEN + 1)
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
            return H2_UNKNOWN;          /* a dynamic table entry */
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
            return H2_UNKNOWN;          /* >= 128 more: dynamic */
        index += c;
        return index >= 62 ? H2_UNKNOWN : H2_NOT_STATUS;
    }
    if (index >= 62)
        return H2_UNKNOWN;
    if (index >= 1 && index <= 7)
        return H2_REQUEST;
    if (index < 8 || index > 14)
        return H2_NOT_STATUS;
    return h2_status_value(b, i + 1, avail);
}

/* gRPC's grpc-status (0-16), read in header blocks that end a stream (HEADERS with
 * END_STREAM: a gRPC response's trailers, or a "trailers-only" response that carries
 * :status 200 and grpc-status in one block). It is not in the static table, so the
 * first time a connection sends a given value it is a literal with the new name
 * "grpc-status" (raw, or Huffman 9a ca c8 b2 12 34 da 8f), any of the three literal
 * forms, value raw or Huffman ("0"-"16"). Later ones on the connection may refer to the
 * dynamic table: a dynamic reference in a block without a readable grpc-status counts
 * in C_GRPC_STATUS_UNKNOWN (it may be one; on h2 traffic that is not gRPC a bodiless
 * response with a dynamic reference counts there too).
 *
 * What servers send (captured): grpcio (C core) puts grpc-status first in trailers and
 * third in trailers-only blocks (:status, content-type, grpc-status), with incremental
 * indexing, raw name and value, a new literal for every new value and a dynamic
 * reference for a repeated one. @grpc/grpc-js (Node's nghttp2) sends it second in
 * trailers-only (:status, grpc-status) and first in trailers, with a Huffman name the
 * first time and a dynamic name reference (index 62+) after: only the first grpc-status
 * of a connection is readable there.
 *
 * The walk: the frame loop records where such blocks start (at most H2_GRPC_BLOCKS per
 * segment), and one flat loop of H2_GRPC_STEPS steps then reads them in turn. A step
 * reads one field's representation (an indexed field, a size update, a literal's name)
 * or one literal's value, skipping over strings of known length. 8 steps reach a
 * grpc-status after an indexed field and one literal (grpcio's trailers-only, 5 steps),
 * or after up to three literals; one flat loop keeps the verifier's work to the steps,
 * not steps times frames. Non-gRPC traffic pays nothing unless a HEADERS frame ends its
 * stream. */
#define H2_GRPC_BLOCKS 4
#define H2_GRPC_STEPS 8
#define GRPC_MAX_CODE 16
/* Step states (the `expect` variable of the walk). */
#define H2_GRPC_FIELD 0     /* a field's representation comes next */
#define H2_GRPC_VALUE 1     /* a literal's value comes next, not a grpc-status */
#define H2_GRPC_STATUS 2    /* the value of a grpc-status comes next */

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

/* One or two digits Huffman-coded in n (1 or 2) bytes b[1..n] (see h2_huffman_digits), padded with fewer than 8 one bits. The value or H2_UNKNOWN. */
static __always_inline int h2_huffman_small(const unsigned char *b, __u32 n)
{
    __u32 total = n * 8;
    __u32 w = ((__u32)b[1] << 8) | (n == 2 ? b[2] : 0);   /* left-aligned in 16 bits */
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

/* The grpc-status value whose string (its length byte) is b[0], of `avail` bytes read:
 * "0"-"16", raw or Huffman. */
static __always_inline int h2_grpc_value(const unsigned char *b, __u32 avail)
{
    __u8 l = b[0];
    __u32 n = l & 0x7f;
    if (n < 1 || n > 2 || 1 + n > avail)
        return H2_UNKNOWN;
    int code;
    if (l & 0x80) {
        code = h2_huffman_small(b, n);
    } else {
        if (b[1] < '0' || b[1] > '9' || (n == 2 && (b[2] < '0' || b[2] > '9')))
            return H2_UNKNOWN;
        code = n == 2 ? (b[1] - '0') * 10 + (b[2] - '0') : b[1] - '0';
    }
    if (code < 0 || code > GRPC_MAX_CODE)
        return H2_UNKNOWN;
    return code;
}

/* Where the blocks to read for a grpc-status are, filled in by the frame loop. */
/* A masked slot index the compiler cannot drop (as h2_idx). */
static __always_inline __u32 h2_grpc_slot(__u32 i)
{
    asm volatile("" : "+r"(i));
    return i & (H2_GRPC_BLOCKS - 1);
}
struct h2_grpc_blocks {
    __u32 off[H2_GRPC_BLOCKS];
    __u32 left[H2_GRPC_BLOCKS];     /* the block's bytes within the segment */
    __u32 n;
};

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

/* Reads the recorded blocks (see the comment above H2_GRPC_BLOCKS), counts what it
 * finds, and returns the first grpc-status in the trigger set (slots 0-16 of the
 * trigger array), or -1. */
static __always_inline int h2_grpc_walk(struct __sk_buff *skb, struct h2_grpc_blocks *g,
                                        __u32 direction)
{
    unsigned char b[H2_BUF_LEN];
    /* The walk's state but its offset, packed in one word so that one opaque() per step
     * merges it (each is a helper call): the block's bytes left (<= 16384) in bits
     * 0-15, expect in 16-17, dyn in 18, the block r in 19-21, armed + 1 in 22-26. */
    __u32 pos = g->off[0];
    __u32 st = (g->left[0] & 0xffff) | (H2_GRPC_FIELD << 16);
    for (int step = 0; step < H2_GRPC_STEPS; step++) {
        __u32 left = st & 0xffff, expect = (st >> 16) & 3, dyn = (st >> 18) & 1;
        __u32 r = (st >> 19) & 7;
        int armed = (int)((st >> 22) & 0x1f) - 1;
        __u32 n = left > H2_BUF_LEN ? H2_BUF_LEN : left;
        int done = 0, field = 0;
        __u32 next = 0;
        if (n == 0 || bpf_skb_load_bytes(skb, pos, b, ((n - 1) & (H2_BUF_LEN - 1)) + 1) < 0) {
            done = 1;                   /* the block (or what the segment holds) is read */
        } else if (expect != H2_GRPC_FIELD) {
            int len = h2_int(b, 0, n, 0x7f, &next);
            if (expect == H2_GRPC_STATUS) {
                field = h2_grpc_value(b, n);
                done = 2;
            } else if (len < 0) {
                done = 1;
            } else {
                next += len;
                expect = H2_GRPC_FIELD;
            }
        } else if (b[0] & 0x80) {       /* indexed field */
            int index = h2_int(b, 0, n, 0x7f, &next);
            if (index < 0)
                done = 1;
            else if (index >= 62)
                dyn = 1;
        } else if ((b[0] & 0xe0) == 0x20) {
            if (h2_int(b, 0, n, 0x1f, &next) < 0)
                done = 1;
        } else {                        /* a literal: 6-bit or 4-bit name index */
            int index = h2_int(b, 0, n, (b[0] & 0x40) ? 0x3f : 0x0f, &next);
            __u32 after = 0;
            int nlen = index == 0 ? h2_int(b, next, n, 0x7f, &after) : 0;
            if (index < 0 || nlen < 0) {
                done = 1;
            } else if (index == 0) {
                expect = h2_grpc_name(b, next, n) ? H2_GRPC_STATUS : H2_GRPC_VALUE;
                next = after + nlen;
            } else {
                dyn |= index >= 62;
                expect = H2_GRPC_VALUE;
            }
        }
        if (done == 2) {
            if (field == H2_UNKNOWN) {
                count_unknown(C_GRPC_STATUS_UNKNOWN);
            } else {
                grpc_count_status(skb, direction, field);
                if (armed < 0 && may_trigger(field))
                    armed = field;
            }
        } else if (done && dyn) {
            count_unknown(C_GRPC_STATUS_UNKNOWN);
        }
        if (done) {                     /* on to the next recorded block */
            r++;
            if (r >= g->n || r >= H2_GRPC_BLOCKS)
                return armed;
            pos = g->off[h2_grpc_slot(r)];
            left = g->left[h2_grpc_slot(r)];
            expect = H2_GRPC_FIELD;
            dyn = 0;
        } else {
            pos += next;
            left = next >= left ? 0 : left - next;
        }
        pos = opaque(pos);
        st = opaque((left & 0xffff) | (expect << 16) | (dyn << 18) | (r << 19) |
                    ((__u32)(armed + 1) << 22));
    }
    return (int)((st >> 22) & 0x1f) - 1;
}

/* Decodes the HEADERS frame whose payload starts at `off` and is `len` bytes long (maybe
 * cut by `end`, the end of the segment). */
static __always_inline int h2_headers_status(struct __sk_buff *skb, __u32 off, __u32 len,
                                             __u8 flags, __u32 end, struct h2_grpc_blocks *g)
{
    unsigned char b[H2_BUF_LEN] = {};
    __u32 skip = 0, pad = 0;
    if (flags & H2_F_PADDED) {
        if (off >= end || bpf_skb_load_bytes(skb, off, b, 1) < 0)
            return H2_UNKNOWN;
        pad = b[0];
        skip = 1;
    }
    if (flags & H2_F_PRIORITY)
        skip += 5;
    if (skip + pad > len)
        return H2_NOT_STATUS;           /* PROTOCOL_ERROR in a real frame */
    __u32 block = off + skip;
    __u32 block_len = len - skip - pad;
    if (block >= end || block_len == 0)
        return block_len ? H2_UNKNOWN : H2_NOT_STATUS;
    __u32 avail = end - block;
    if (avail > block_len)
        avail = block_len;
    if ((flags & H2_F_END_STREAM) && g->n < H2_GRPC_BLOCKS) {
        g->off[h2_grpc_slot(g->n)] = block;   /* for h2_grpc_walk */
        g->left[h2_grpc_slot(g->n)] = avail;
        g->n++;
    }
    if (avail > H2_BLOCK_PEEK)
        avail = H2_BLOCK_PEEK;
    /* avail is 1..H2_BLOCK_PEEK here; the mask shows the verifier 1..H2_BUF_LEN. */
    __u64 size = ((avail - 1) & (H2_BUF_LEN - 1)) + 1;
    if (bpf_skb_load_bytes(skb, block, b, size) < 0)
        return H2_UNKNOWN;
    return h2_block_status(b, avail);
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

/* Walks the frames of the segment [off, end), counts the status (or unknown) of every
 * HEADERS frame met, and returns the first status in the trigger set (100-999), else
 * the first grpc-status in it (0-16, from h2_grpc_walk), or -1.
 *
 * Verifier cost: the loop is not unrolled, and the verifier walks it once per iteration
 * and per distinct state at its head. The values the body refines in different ways
 * (the offset, the segment end, the status found) go through opaque() at the end of each
 * iteration, so that every iteration starts from one state: about 5,000 instructions
 * verified per frame instead of a product over the frames. */
static __always_inline int h2_trigger_status(struct __sk_buff *skb, __u32 off, __u32 end,
                                             __u32 direction)
{
    unsigned char h[H2_FRAME_HEADER_LEN];
    struct h2_grpc_blocks g = {};
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
            int status = opaque(h2_headers_status(skb, off, len, h[4], end, &g));
            if (status == H2_UNKNOWN) {
                count_unknown(C_H2_STATUS_UNKNOWN);
            } else if (status == H2_REQUEST) {
                note_h2_request();
            } else if (status >= 0 && status < STATUS_CODES) {
                h2_count_status(skb, direction, status);
                if (armed_status < 0 && status >= MIN_HTTP_STATUS && may_trigger(status))
                    armed_status = status;
            }
        }
        off = opaque(off + len);
        end = opaque(end);
        armed_status = opaque(armed_status);
        g.n = opaque(g.n);
    }
    if (g.n) {
        int grpc = h2_grpc_walk(skb, &g, direction);
        if (armed_status < 0)
            armed_status = grpc;
    }
    return armed_status;
}

#endif
