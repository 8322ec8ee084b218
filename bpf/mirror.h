/* Structures shared by the classifier (bpf/mirror.c and the parse headers it includes)
 * and user space (mirror/bpfprog.py).
 * Any change here must be mirrored in the ctypes layouts of mirror/bpfprog.py. */
#ifndef MIRROR_H
#define MIRROR_H

/* Length of the prefix "HTTP/1.x NNN " (or "HTTP/1.x NNN\r") that identifies a status line. */
#define STATUS_LINE_LEN 13
/* Status codes are three digits: the trigger array is indexed by code, 0..999. */
#define STATUS_CODES 1000
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
    C_CLONES_DEDUPLICATED, /* not cloned at egress: entered through a monitored interface,
                            * whose ingress hook cloned it already */
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
    __u16 pad;
};

struct mirror_config {
    __u32 debug_ifindex;    /* 0: nowhere to mirror (counted in C_NO_DEBUG_IF) */
    __u32 pad;
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
    __u64 responses[6];     /* 1xx..5xx, then other */
    __u64 mirrored_packets;
    __u64 mirrored_bytes;
    __u32 ifindex;          /* owner of this CPU's copy of the slot; 0: unused */
    __u32 pad;
};

#endif
