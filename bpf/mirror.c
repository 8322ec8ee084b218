/* tc classifier of the HTTP-aware selective mirror.
 *
 * Runs direct-action on the ingress and egress hooks of a monitored interface and
 * returns the same pass verdict for every packet (PASS, below): the original packet is
 * never dropped, delayed or rewritten.
 * It parses Ethernet (one 802.1Q/802.1ad tag), IPv4 or IPv6 (with extension headers),
 * TCP, and reads the first bytes of the TCP payload with bpf_skb_load_bytes(), because a
 * socket's data usually sits in page fragments that direct packet access cannot see.
 * An HTTP/1.x response whose status code is in the trigger set marks the connection in
 * an LRU per-CPU hash; that packet and every later packet of the connection, both
 * directions, is cloned to the debug interface.
 *
 * The parse is split by layer: parse.h (Ethernet, IP, TCP), http1.h (the status line).
 * This file holds the maps, the counters and the decision: mark, mirror, pass.
 *
 * Compiled by bcc; MAX_FLOWS comes from the loader's cflags.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#include "mirror.h"

#ifndef MAX_FLOWS
#define MAX_FLOWS 65536
#endif
/* Interfaces this controller monitors (set by user space on attach and detach). */
#define MAX_MONITORED 4096

/* The verdict for every packet. TC_ACT_UNSPEC means "no opinion": the packet goes on to the
 * next filter of the hook (another tool's), or passes when there is none. TC_ACT_OK would
 * end the filter chain and silently disable every filter behind ours. */
#define PASS TC_ACT_UNSPEC

BPF_TABLE("lru_percpu_hash", struct flow_key, struct flow_value, flows, MAX_FLOWS);
BPF_ARRAY(trigger, __u8, STATUS_CODES);
BPF_ARRAY(config, struct mirror_config, 1);
BPF_ARRAY(marks, __u64, NR_MARKS);
BPF_PERCPU_ARRAY(counters, __u64, NR_COUNTERS);
BPF_PERCPU_ARRAY(iface_stats, struct iface_stats, IFACE_SLOTS * 2);
BPF_HASH(monitored, __u32, __u8, MAX_MONITORED);

static __always_inline void count(__u32 idx, __u64 n)
{
    __u64 *v = counters.lookup(&idx);
    if (v)
        *v += n;
}

static __always_inline struct iface_stats *stats_of(__u32 ifindex, __u32 direction)
{
    __u32 slot = (ifindex % IFACE_SLOTS) * 2 + (direction & 1);
    struct iface_stats *s = iface_stats.lookup(&slot);
    if (!s)
        return 0;
    if (s->ifindex == ifindex)
        return s;
    if (s->ifindex == 0) {      /* this CPU's copy: no other CPU writes it */
        s->ifindex = ifindex;
        return s;
    }
    count(C_IFACE_SLOT_TAKEN, 1);
    return 0;
}

/* False only when the flow map is known to be empty (enum marks_index). */
static __always_inline int maybe_marked(void)
{
    __u32 made_idx = MARKS_MADE, cleared_idx = MARKS_CLEARED;
    __u64 *made = marks.lookup(&made_idx);
    __u64 *cleared = marks.lookup(&cleared_idx);
    if (!made || !cleared)
        return 1;
    return *(volatile __u64 *)made != *(volatile __u64 *)cleared;
}

#include "parse.h"
#include "http1.h"

/* Clones the packet to the debug interface. `st` is the interface's stats when the
 * caller already looked them up; the lookup is done here otherwise (cheap next to the
 * clone itself). */
static __always_inline void mirror_packet(struct __sk_buff *skb, struct iface_stats *st,
                                          __u32 direction)
{
    __u32 zero = 0;
    __u32 len = skb->len;
    struct mirror_config *cfg = config.lookup(&zero);
    if (!cfg || !cfg->debug_ifindex || cfg->debug_ifindex == skb->ifindex) {
        count(C_NO_DEBUG_IF, 1);
        return;
    }
    /* A packet forwarded from one monitored interface out of another (container to
     * container through a bridge, or routed between two host-side veths) was cloned at
     * the ingress hook of the first already: at egress, clone only packets that did not
     * enter through a monitored interface (locally sent ones have ingress_ifindex 0). */
    __u32 in_ifindex = skb->ingress_ifindex;
    if (direction == DIR_EGRESS && in_ifindex && monitored.lookup(&in_ifindex)) {
        count(C_CLONES_DEDUPLICATED, 1);
        return;
    }
    /* Invalidates packet pointers: nothing below touches packet data. Negative: the
     * clone was not sent (no such device, no memory); positive: a NET_XMIT_* drop or
     * congestion code from the debug interface's qdisc (a down device drops there). */
    if (bpf_clone_redirect(skb, cfg->debug_ifindex, 0) != 0) {
        count(C_CLONE_FAILURES, 1);
        return;
    }
    count(C_MIRRORED_PACKETS, 1);
    count(C_MIRRORED_BYTES, len);
    if (!st)
        st = stats_of(skb->ifindex, direction);
    if (st) {
        st->mirrored_packets++;
        st->mirrored_bytes += len;
    }
}

static __always_inline int classify(struct __sk_buff *skb, __u32 direction)
{
    struct tcp_segment seg = {};

    count(C_PACKETS, 1);
    switch (parse_tcp_segment(skb, &seg)) {
    case PARSED_TCP:
        break;
    case PARSE_OTHER:
        count(C_OTHER, 1);
        return PASS;
    case PARSE_NONLINEAR:
        count(C_NONLINEAR, 1);
        return PASS;
    default:
        count(C_MALFORMED, 1);
        return PASS;
    }
    count(C_TCP, 1);

    /* The hot path: every TCP segment pays this one lookup (normalised key, so one
     * lookup covers both directions), unless the map is known to be empty (see enum
     * marks_index). The clock is read only when a flow is touched, and it is the coarse
     * one (tick resolution, a few ms): enough for idle expiry, several times cheaper. */
    __u64 now = 0;
    struct flow_value *fv = 0;
    if (maybe_marked())
        fv = flows.lookup(&seg.key);
    if (fv) {
        now = bpf_ktime_get_coarse_ns();
        fv->packets++;
        fv->bytes += skb->len;
        if (!fv->first_ns)
            fv->first_ns = now;
        fv->last_ns = now;
        fv->ifindex = skb->ifindex;
    }

    int code = -1;
    if (seg.payload_end - seg.payload_off >= STATUS_LINE_LEN)
        code = http1_status(skb, seg.payload_off);
    if (code < 0) {
        if (fv)
            mirror_packet(skb, 0, direction);
        return PASS;
    }

    __u32 status = code;
    count(C_RESPONSES, 1);
    __u32 cls = (status >= 100 && status < 600) ? status / 100 - 1 : 5;
    count(C_RESP_1XX + cls, 1);
    struct iface_stats *st = stats_of(skb->ifindex, direction);
    /* Keep the bound check: clang proves cls < 6 and drops it, the verifier cannot. */
    asm volatile("" : "+r"(cls));
    if (st && cls < 6)
        st->responses[cls]++;

    __u8 *armed = trigger.lookup(&status);
    if (armed && *armed) {
        if (fv) {
            fv->status = status;
        } else {
            if (!now)
                now = bpf_ktime_get_coarse_ns();
            struct flow_value nv = {
                .packets = 1, .bytes = skb->len, .first_ns = now, .last_ns = now,
                .ifindex = skb->ifindex, .status = status,
            };
            flows.update(&seg.key, &nv);
            count(C_FLOWS_MARKED, 1);
            /* After the insert: see enum marks_index for why the order matters. */
            __u32 made = MARKS_MADE;
            __u64 *n = marks.lookup(&made);
            if (n)
                __sync_fetch_and_add(n, 1);
        }
        mirror_packet(skb, st, direction);
    } else if (fv) {
        mirror_packet(skb, st, direction);
    }
    return PASS;
}

int mirror_ingress(struct __sk_buff *skb)
{
    return classify(skb, DIR_INGRESS);
}

int mirror_egress(struct __sk_buff *skb)
{
    return classify(skb, DIR_EGRESS);
}
