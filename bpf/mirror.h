/* Structures, enums and constants shared by the classifier (bpf/mirror.c and the parse
 * headers it includes) and user space. User space reads the enums and the #defines of this
 * file (mirror/abi.py); struct layouts are stated once more in mirror/abi.py, and checked
 * against what was compiled when the classifier loads: change both together. */
#ifndef MIRROR_H
#define MIRROR_H

/* Length of the prefix "HTTP/1.x NNN " (or "HTTP/1.x NNN\r") that identifies a status line. */
#define STATUS_LINE_LEN 13
/* Status codes are three digits: the trigger array is indexed by code, 0..999. */
#define STATUS_CODES 1000
/* HTTP statuses below this never trigger: slots 0-16 of the trigger array are gRPC's
 * grpc-status codes (bpf/http2.h), set by a trigger spec's grpc: part. */
#define MIN_HTTP_STATUS 100
/* Defaults and limits user space applies too (mirror/abi.py reads them from here). */
#define DEFAULT_MAX_FLOWS 65536         /* --max-flows: connection slots */
#define DEFAULT_REQUEST_BYTES 512       /* --request-bytes */
#define DEFAULT_MAX_EVENTS_PER_CONN 10  /* --max-events-per-connection */
#define MAX_MONITORED 4096              /* interfaces in the `monitored` map: --max-ifaces */
/* IPv6 extension headers skipped before giving up (hop-by-hop, routing, fragment, dest opts). */
#define MAX_IPV6_EXT_HDRS 6
/* Every network namespace's loopback device has this ifindex (include/net/net_namespace.h). */
#define LOOPBACK_IFINDEX 1
/* A connection slot array is divided into buckets of this many slots (see struct conn). */
#define CONN_WAYS 4
/* Distinct (interface, status, protocol) error counts kept (the `errors` map). */
#define ERROR_COUNT_KEYS 4096

enum direction {
    DIR_INGRESS = 0,
    DIR_EGRESS = 1,
};

/* Indices of the per-CPU counters array. User space sums over CPUs. */
enum counter {
    C_PACKETS = 0,      /* every packet the classifier saw */
    C_IPV4,             /* IPv4 packets (after at most one VLAN tag) */
    C_IPV6,             /* IPv6 packets */
    C_TCP,              /* TCP segments whose headers parsed */
    C_OTHER,            /* not IP, not TCP, or a non-first fragment: passed after counting */
    C_MALFORMED,        /* truncated or bogus headers (IHL, data offset, ext header lengths) */
    C_NONLINEAR,        /* headers valid but not in the linear part of the skb: skipped */
    C_RESPONSES,        /* HTTP/1.x status lines counted as responses (from the server side) */
    C_RESP_1XX,         /* ... by class; C_RESP_1XX + (code / 100 - 1) */
    C_RESP_2XX,
    C_RESP_3XX,
    C_RESP_4XX,
    C_RESP_5XX,
    C_RESP_OTHER,       /* a status code outside 100-599 */
    C_FLOWS_MARKED,     /* connections newly marked by a trigger status */
    C_MIRRORED_PACKETS, /* clones sent to the debug interface */
    C_MIRRORED_BYTES,
    C_CLONE_FAILURES,   /* clone not sent or dropped by the debug interface; original unaffected */
    C_NO_DEBUG_IF,      /* wanted to mirror but no debug interface is configured */
    C_IFACE_SLOT_TAKEN, /* per-interface stats not kept: slot owned by another ifindex */
    C_SYN_UNMARKED,     /* a SYN on a marked connection: a new connection reusing the
                         * 4-tuple, which starts unmarked */
    C_REQUESTS,         /* HTTP/1.x request starts from the client kept (snapshot on) */
    C_STATUS_FROM_CLIENT,  /* statuses sent by a connection's client side, or travelling
                            * in the client's direction (a status line, or an HTTP/2
                            * HEADERS block that starts with :status): not responses,
                            * never counted */
    C_RESP_NO_REQUEST,  /* error responses with no request kept for them (the request went
                         * by before the attach, was replaced, was being written on another
                         * CPU at that instant, or the snapshot is off) */
    C_EVENTS,           /* error events handed to user space */
    C_EVENTS_LOST,      /* error events lost: the ring buffer was full */
    C_H2_RESPONSES,     /* HTTP/2 :status decoded (bpf/http2.h); by class in iface_stats */
    C_H2_STATUS_UNKNOWN,/* HTTP/2 HEADERS whose :status needs HPACK state or is cut/bogus */
    C_SEEN_BEFORE,      /* packets at an egress hook that entered through a monitored
                         * interface (or looped back on a monitored lo): their ingress
                         * hook counted, cloned and reported them; here they only update
                         * this interface's connection state */
    C_SKIP_FLOW_PACKETS,/* clones skipped: the connection's packet budget is spent */
    C_SKIP_FLOW_BYTES,  /* clones skipped: the connection's byte budget is spent */
    C_SKIP_CPU_RATE,    /* clones skipped: this CPU's clones per window are spent */
    C_GRPC_OK,          /* grpc-status 0 read (bpf/http2.h) */
    C_GRPC_ERRORS,      /* grpc-status 1-16 read */
    C_GRPC_STATUS_UNKNOWN, /* a stream-ending HEADERS block with no readable grpc-status but
                            * a dynamic table reference that may be one, or a grpc-status
                            * whose value is cut or not 0-16 */
    C_CONNS_STARTED,    /* connection states started: by a SYN, or by a request (or the
                         * HTTP/2 preface) of a connection whose SYN was not seen */
    C_CONNS_REPLACED,   /* a connection's state gave its slot to a new one (the least
                         * recently active of its bucket) */
    C_SIDE_FROM_REQUEST,/* connections whose start was not seen, their client side learned
                         * from a request (HTTP/1.x, the HTTP/2 preface or request headers) */
    C_STATUS_SIDE_UNKNOWN, /* statuses on a connection whose client side is not known (its
                            * start and every request since went unseen): not counted */
    C_FLOWS_EXPIRED,    /* marked connections found idle past the idle timeout: unmarked */
    C_ERRORS,           /* error responses (trigger statuses from the server side) counted
                         * in the `errors` map */
    C_ERRORS_UNCOUNTED, /* error responses not in the `errors` map: it was full */
    C_EVENTS_RATE_LIMITED, /* events not emitted: this CPU's events per window were spent */
    C_EVENTS_CONN_LIMITED, /* events not emitted: the connection had its share */
    C_LO_SECOND_PASS,   /* packets at a monitored lo's ingress: already seen at its egress */
    C_FLOWS_EVICTED,    /* marked connections whose slot a new connection took */
    /* Connections whose server's HPACK encoder stopped being followed (struct conn_hpack;
     * each counted once, when it happens), by why: */
    C_HPACK_START_UNSEEN,  /*   an HTTP/2 segment of the server's on a connection whose
                            * SYN and SYN-ACK were not both seen */
    C_HPACK_GAP,        /*   a server segment that does not start where the last walked one
                         * left off: bytes in between were not walked as frames */
    C_HPACK_BOUNDS,     /*   a server segment not walked to its end: the walk's bounds
                         * (frames, header blocks, steps), a header block cut by the
                         * segment's end, CONTINUATION, PUSH_PROMISE, or a field the
                         * followed state cannot explain */
    C_HPACK_FORGOTTEN,  /* dynamic table references to an insertion whose record the
                         * connection had dropped for a newer one: unknown */
    C_REQUEST_BUSY,     /* request starts not kept: another CPU was writing their requests
                         * entry (shared by four connection slots) at that instant; the
                         * connection's next error is reported without a request */
    C_REQUEST_CHANGED,  /* error events whose request was rewritten while the event read
                         * it: sent without it (or lost, the ring being full) */
    NR_COUNTERS,
};

/* Normalised flow: the lower (address, port) endpoint first, so both directions of a
 * connection share one key. Addresses and ports in network byte order; IPv4 uses
 * addr_*[0] with the rest zero. */
struct flow_key {
    __u32 addr_lo[4];
    __u32 addr_hi[4];
    __u16 port_lo;
    __u16 port_hi;
    __u8 family;        /* 4 or 6 */
    __u8 pad[3];
};

/* What tells a connection's state apart: its flow on one interface. Two interfaces never
 * share a state (their address ranges may overlap, and a request seen on one is none of
 * the other's business). */
struct conn_key {
    struct flow_key flow;
    __u32 ifindex;
};

/* Bits of struct conn's flags. */
enum conn_flag {
    CONN_CLIENT_KNOWN = 1,  /* which side is the client is known: */
    CONN_CLIENT_LO = 2,     /*   the client is the key's lo endpoint */
    CONN_CLIENT_EGRESS = 4, /*   the client's packets pass this interface's egress hook */
    CONN_MARKED = 8,        /* a trigger status marked it: every packet is mirrored */
};
/* (Whether a request is kept for a connection is no flag here: its requests entry's tag,
 * the slot and gen, says it. The request's CPU and the response's would otherwise both
 * read-modify-write this byte, and one could undo the other's bit: a mark lost.) */

/* How far the classifier follows the HPACK encoder of a connection's server (RFC 7541:
 * the dynamic table of the header blocks it sends), in struct conn_hpack's state. */
enum hpack_state {
    HPACK_NONE = 0,         /* not started: no SYN-ACK seen since the connection started */
    HPACK_FOLLOWING = 1,    /* every header block the server sent since its SYN-ACK was
                             * walked: dynamic references resolve */
    HPACK_LOST = 2,         /* not followed (C_HPACK_*): dynamic references are unknown */
};
/* Insertions into the server's dynamic table whose name is grpc-status or :status, kept
 * per connection while they may be referenced. */
#define HPACK_NAMED 8
/* What such an insertion holds (conn_hpack.named_what; 0: an empty record): the kind | its
 * value, HPACK_NO_VALUE when the value was not a code (a reference to it is unknown). */
#define HPACK_GRPC 0x8000       /* grpc-status, | the code 0-16 */
#define HPACK_STATUS 0x4000     /* :status, | the code 0-999 */
#define HPACK_UNSURE 0x2000     /* an insertion whose name referred to a forgotten one */
#define HPACK_NO_VALUE 0x3ff

/* The server's HPACK encoder as the classifier follows it (bpf/http2.h). An encoder
 * inserts each "literal with incremental indexing" at the front of its dynamic table
 * (index 62) and references only entries still in it, so the entry that index N names
 * is insertion number `inserted - (N - 62)` (numbered from 1): no eviction needs to be
 * modelled, only the count and what the few insertions that matter named. The count is
 * right only while every header block the server sent since its SYN-ACK was walked, in
 * TCP sequence order (next_seq). */
struct conn_hpack {
    __u32 next_seq;         /* TCP sequence number of the server's next frame header */
    __u32 inserted;         /* insertions into the server's dynamic table so far */
    __u32 floor;            /* records of insertions below this number were dropped for
                             * newer ones (or emptied by a size update to 0): a reference
                             * to one is unknown */
    __u8 state;             /* enum hpack_state */
    __u8 next;              /* the named_* slot the next record takes (mod HPACK_NAMED) */
    __u16 pad;
    __u32 named_at[HPACK_NAMED];    /* insertion numbers whose name matters, */
    __u16 named_what[HPACK_NAMED];  /* and what they hold (HPACK_GRPC ...) */
};

/* One connection's state on one interface: the one lookup a packet of a connection pays.
 * The `conns` array is indexed by a seeded hash of the key into buckets of CONN_WAYS
 * slots; a lookup compares the key (the slot's tag) in each slot of the bucket, and a new
 * connection takes a free slot of its bucket or the one idle longest. Shared by all CPUs:
 * the SYN, the request and the response of a connection may each run on another CPU.
 * What a packet touches is in the first 64 bytes. */
struct conn {
    struct conn_key key;    /* 0: the tag */
    __u8 flags;             /* 44: enum conn_flag */
    __u8 cut;               /* 45: enum cut_reason bits: clones skipped since marked */
    __u16 status;           /* 46: the trigger status that marked it, 0 if none */
    __u32 gen;              /* 48: bumped whenever the slot starts a connection, and when
                             * a request of its finds its requests entry busy: tags the
                             * kept request, so that it never goes with another connection's
                             * error, nor with the error of a later request of its own */
    __u32 events;           /* 52: error events emitted for it */
    __u64 last_ns;          /* 56: bpf_ktime_get_coarse_ns() of the last packet that
                             * touched it (idle expiry, and which slot a new one takes) */
    __u64 first_ns;         /* 64: when it was marked (coarse) */
    __u64 packets;          /* 72: packets since it was marked (budgets), both directions,
                             * every CPU */
    __u64 bytes;            /* 80 */
    struct conn_hpack hpack;/* 88: the server's HTTP/2 header compression, followed */
};

/* A request kept for a connection: the `requests` array holds one per CONN_WAYS
 * connection slots (slot % its size), tagged with the slot and the slot's gen. */
struct kept_request {
    __u64 request_ns;       /* bpf_ktime_get_ns() */
    __u32 slot;             /* the conns slot it was kept for */
    __u32 gen;              /* that slot's gen then */
    __u32 frame_len;        /* the whole frame (skb->len) */
    __u32 len;              /* of which data[] holds this many bytes */
    __u8 direction;         /* enum direction */
    __u8 pad[7];
    __u64 seq;              /* even while the entry is whole, odd while one CPU writes it
                             * (a sequence lock: keep_request() in mirror.c says how) */
    __u8 data[REQUEST_BYTES];
};

#define REQUEST_NO_SLOT 0xffffffffu  /* kept_request.slot of an entry that holds none */

/* Why a clone was skipped (bits of conn.cut and error_event.cut). */
enum cut_reason {
    CUT_FLOW_PACKETS = 1,
    CUT_FLOW_BYTES = 2,
    CUT_CPU_RATE = 4,
};

struct mirror_config {
    __u32 debug_ifindex;    /* 0: nowhere to mirror (counted in C_NO_DEBUG_IF) */
    __u32 request_bytes;    /* bytes of a request frame kept (<= REQUEST_BYTES); 0: off */
    /* Budgets (0: unlimited). Per connection, counted from the packet that marked it on
     * (the clone included), whatever CPU handles it. */
    __u32 max_packets_per_flow;
    __u32 max_clones_per_window;    /* per CPU, per rate_window_ns */
    __u64 max_bytes_per_flow;
    __u64 rate_window_ns;   /* the rate windows: 1 s (user space sets it; tests widen it) */
    __u32 max_events_per_window;    /* per CPU, per rate_window_ns; 0: unlimited */
    __u32 max_events_per_conn;      /* 0: unlimited */
    __u64 idle_ns;          /* a marked connection idle this long is unmarked; 0: never */
    __u32 hash_seed;        /* of the conns index: chosen at random by user space */
    __u32 pad;
};

/* A CPU's count in its current rate window (the clone_rate and event_rate arrays). */
struct rate_window {
    __u64 start_ns;         /* bpf_ktime_get_coarse_ns() at the window's first use */
    __u64 count;
};

/* Bytes of a request frame the requests array can hold (the loader's --request-bytes,
 * rounded up to a multiple of 8). */
#ifndef REQUEST_BYTES
#define REQUEST_BYTES DEFAULT_REQUEST_BYTES
#endif

enum app_proto {
    PROTO_HTTP1 = 1,
    PROTO_HTTP2 = 2,
    PROTO_GRPC = 3,     /* status: the grpc-status code */
};

/* An error response, counted by the kernel whether or not an event is emitted for it:
 * the `errors` per-CPU hash, read by the metrics at scrape time. */
struct error_count_key {
    __u32 ifindex;
    __u16 status;           /* HTTP status, or the grpc-status code with PROTO_GRPC */
    __u8 proto;             /* enum app_proto */
    __u8 pad;
};

/* Upper bounds (ns) of the buckets of the time from a kept request to its error
 * response (mirror_error_response_seconds); the `response_time` per-CPU array holds a
 * count per bucket, one more for the rest, then the sum in ns. */
#define RESPONSE_BUCKETS 14
#define RESPONSE_BOUNDS_NS {1000000ULL, 5000000ULL, 10000000ULL, 25000000ULL, 50000000ULL, \
    100000000ULL, 250000000ULL, 500000000ULL, 1000000000ULL, 2500000000ULL, 5000000000ULL, \
    10000000000ULL, 30000000000ULL, 60000000000ULL}

/* One error event: an error response, and the request that got it, handed to user space
 * through the `events` ring buffer (without data[] when no request was kept). Bounded:
 * at most max_events_per_conn per connection and max_events_per_window per CPU; the
 * rest are counted (C_EVENTS_*_LIMITED) and, like every error, in `errors`.
 * Times are bpf_ktime_get_ns() (CLOCK_MONOTONIC). */
struct error_event {
    __u64 response_ns;
    __u64 request_ns;       /* 0: no request kept */
    struct flow_key key;
    __u32 ifindex;
    __u16 status;
    __u8 direction;         /* of the response: enum direction */
    __u8 proto;             /* enum app_proto */
    __u8 new_flow;          /* 1: this response marked the connection */
    __u8 server_is_lo;      /* the server is key's lo endpoint */
    __u8 cut;               /* the connection's enum cut_reason bits, this response's clone
                             * decision included */
    __u8 request_direction;
    __u32 request_frame_len;/* the whole frame (skb->len) */
    __u32 request_len;      /* of which data[] holds this many bytes */
    __u32 pad;
    __u8 data[REQUEST_BYTES];
};

/* The pre-filter of packets that carry nothing a connection's state needs (no SYN, no
 * payload that starts a request or a status): they look their connection up only to
 * learn whether it is marked. marks[MARKS_MADE] counts the connections the classifier has
 * marked (incremented after the mark); user space writes into marks[MARKS_CLEARED] the
 * count it read before a scan that found none marked. While the two are equal no
 * connection is marked, and such packets skip the lookup. A mark made after user space
 * read the count makes them differ, so no mark is ever missed. */
enum marks_index {
    MARKS_MADE = 0,
    MARKS_CLEARED = 1,
    NR_MARKS,
};

/* Per-interface statistics live in a per-CPU array of IFACE_SLOTS x 2 entries: slot
 * (ifindex % IFACE_SLOTS) * 2 + direction. A CPU's copy of a slot belongs to the first
 * interface that uses it on that CPU (ifindex is recorded); another interface mapping to
 * the same slot on that CPU is counted in C_IFACE_SLOT_TAKEN instead. The controller
 * warns when two monitored interfaces share a slot. An array lookup is far cheaper than
 * a hash lookup, and only responses and mirrored packets pay it. */
#define IFACE_SLOTS 1024

struct iface_stats {
    __u64 responses[6];     /* HTTP/1.x: 1xx..5xx, then other */
    __u64 mirrored_packets;
    __u64 mirrored_bytes;
    __u32 ifindex;          /* owner of this CPU's copy of the slot; 0: unused */
    __u32 pad;
    __u64 h2_responses[6];  /* HTTP/2, same classes (appended: earlier offsets unchanged) */
    __u64 grpc_responses[2];/* grpc-status 0, and 1-16 (appended too) */
};

#endif
