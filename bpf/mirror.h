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
#define DEFAULT_MAX_FLOWS 65536         /* --max-flows */
#define DEFAULT_REQUEST_BYTES 512       /* --request-bytes */
#define MAX_MONITORED 4096              /* interfaces in the `monitored` map: --max-ifaces */
/* IPv6 extension headers skipped before giving up (hop-by-hop, routing, fragment, dest opts). */
#define MAX_IPV6_EXT_HDRS 6

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
    C_RESPONSES,        /* HTTP/1.x status lines seen */
    C_RESP_1XX,         /* ... by class; C_RESP_1XX + (code / 100 - 1) */
    C_RESP_2XX,
    C_RESP_3XX,
    C_RESP_4XX,
    C_RESP_5XX,
    C_RESP_OTHER,       /* a status code outside 100-599 */
    C_FLOWS_MARKED,     /* flows newly marked by a trigger code */
    C_MIRRORED_PACKETS, /* clones sent to the debug interface */
    C_MIRRORED_BYTES,
    C_CLONE_FAILURES,   /* clone not sent or dropped by the debug interface; original unaffected */
    C_NO_DEBUG_IF,      /* wanted to mirror but no debug interface is configured */
    C_IFACE_SLOT_TAKEN, /* per-interface stats not kept: slot owned by another ifindex */
    C_SYN_UNMARKED,     /* a SYN on a marked flow: a new connection reusing the 4-tuple,
                         * unmarked and not mirrored */
    C_REQUESTS,         /* HTTP/1.x request starts (a method and a space at the start of a
                         * payload) kept in the request snapshot (snapshot on) */
    C_STATUS_SAME_DIR,  /* status lines sent by the side that sent the flow's last request:
                         * not a response (snapshot on) */
    C_RESP_NO_REQUEST,  /* responses on a flow with no request snapshot (not seen, evicted,
                         * or snapshot off) */
    C_EVENTS,           /* error events handed to user space */
    C_EVENTS_LOST,      /* error events lost: the ring buffer was full */
    C_H2_RESPONSES,     /* HTTP/2 :status decoded (bpf/http2.h); by class in iface_stats */
    C_H2_STATUS_UNKNOWN,/* HTTP/2 HEADERS whose :status needs HPACK state or is cut/bogus */
    C_CLONES_DEDUPLICATED, /* not cloned at egress: entered through a monitored interface,
                            * whose ingress hook cloned it already */
    C_SKIP_FLOW_PACKETS,/* clones skipped: the flow's packet budget on this CPU is spent */
    C_SKIP_FLOW_BYTES,  /* clones skipped: the flow's byte budget on this CPU is spent */
    C_SKIP_CPU_RATE,    /* clones skipped: this CPU's clones per window are spent */
    C_GRPC_OK,          /* grpc-status 0 read (bpf/http2.h) */
    C_GRPC_ERRORS,      /* grpc-status 1-16 read */
    C_GRPC_STATUS_UNKNOWN, /* a stream-ending HEADERS block with no readable grpc-status but
                            * a dynamic table reference that may be one, or a grpc-status
                            * whose value is cut or not 0-16 */
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

/* Per-CPU value of a marked flow. "Marked" means the key exists; the slot of a CPU that
 * has not seen the flow since it was marked is all zero. */
struct flow_value {
    __u64 packets;      /* packets of the flow seen on this CPU since it was marked (each
                         * one cloned, or counted as a clone failure / no_debug_if) */
    __u64 bytes;
    __u64 first_ns;     /* bpf_ktime_get_coarse_ns() (CLOCK_MONOTONIC_COARSE) of the first
                         * one on this CPU */
    __u64 last_ns;
    __u32 ifindex;      /* interface of the last packet on this CPU */
    __u16 status;       /* last trigger status code seen on this CPU, 0 if none */
    __u16 cut;          /* enum cut_reason bits: clones of the flow skipped on this CPU */
};

/* Why a clone was skipped (bits of flow_value.cut and error_event.cut). */
enum cut_reason {
    CUT_FLOW_PACKETS = 1,
    CUT_FLOW_BYTES = 2,
    CUT_CPU_RATE = 4,
};

struct mirror_config {
    __u32 debug_ifindex;    /* 0: nowhere to mirror (counted in C_NO_DEBUG_IF) */
    __u32 request_bytes;    /* bytes of a request frame kept (<= REQUEST_BYTES); 0: off */
    /* Budgets (0: unlimited). Per flow they count against the flow's value on the CPU
     * at hand (flow_value.packets/bytes since the mark, the clone included), so a flow
     * handled by several CPUs gets the budget on each. */
    __u32 max_packets_per_flow;
    __u32 max_clones_per_window;    /* per CPU, per clone_window_ns */
    __u64 max_bytes_per_flow;
    __u64 clone_window_ns;  /* the rate window: 1 s (user space sets it; tests widen it) */
};

/* A CPU's clone count in its current rate window (the clone_rate per-CPU array). */
struct clone_window {
    __u64 start_ns;         /* bpf_ktime_get_coarse_ns() at the window's first clone */
    __u64 clones;
};

/* Bytes of a request frame the snapshot map can hold (the loader's --request-bytes,
 * rounded up to a multiple of 8). */
#ifndef REQUEST_BYTES
#define REQUEST_BYTES DEFAULT_REQUEST_BYTES
#endif

enum app_proto {
    PROTO_HTTP1 = 1,
    PROTO_HTTP2 = 2,
    PROTO_GRPC = 3,     /* status: the grpc-status code */
};

/* One error event: a trigger status seen, and the request that got it. The request
 * part is what the request snapshot map (`requests`, keyed by flow) holds; the response
 * part is filled in when a trigger status arrives, and the whole struct goes to user
 * space through the `events` ring buffer (without data[] when no request was kept).
 * Times are bpf_ktime_get_ns() (CLOCK_MONOTONIC). */
struct error_event {
    /* the response */
    __u64 response_ns;
    __u32 ifindex;
    __u16 status;
    __u8 direction;         /* enum direction */
    __u8 new_flow;          /* 1: this response marked the flow */
    __u8 proto;             /* enum app_proto */
    __u8 server_is_lo;      /* the response's sender is key's lo endpoint */
    __u8 cut;               /* the flow's enum cut_reason bits on this CPU, this response's
                             * clone decision included */
    __u8 pad0[5];
    struct flow_key key;
    /* the request (request_ns 0: none kept) */
    __u64 request_ns;
    __u32 request_ifindex;
    __u8 request_direction;
    __u8 request_from_lo;   /* the request's sender is key's lo endpoint */
    __u16 pad1;
    __u32 request_frame_len;/* the whole frame (skb->len) */
    __u32 request_len;      /* of which data[] holds this many bytes */
    __u8 data[REQUEST_BYTES];
};

/* The flow-lookup pre-filter. marks[MARKS_MADE] counts the flows the classifier has
 * marked (incremented after the insert); user space writes into marks[MARKS_CLEARED] the
 * count it read before a scan that found the flow map empty. While the two are equal no
 * flow can be in the map, and packets skip the hash lookup. A mark made after user space
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
