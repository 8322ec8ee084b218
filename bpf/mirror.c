/* tc classifier of the HTTP-aware selective mirror.
 *
 * Runs direct-action on the ingress and egress hooks of a monitored interface and
 * returns the same pass verdict for every packet (PASS, below): the original packet is
 * never dropped, delayed or rewritten.
 * It parses Ethernet (one 802.1Q/802.1ad tag), IPv4 or IPv6 (with extension headers),
 * TCP, and reads the first bytes of the TCP payload with bpf_skb_load_bytes(), because a
 * socket's data usually sits in page fragments that direct packet access cannot see.
 * An HTTP/1.x response, or an HTTP/2 HEADERS frame (bpf/http2.h), whose status code is in
 * the trigger set marks the connection in an LRU per-CPU hash; that packet and every later packet of the connection, both
 * directions, is cloned to the debug interface.
 *
 * Compiled by bcc; MAX_FLOWS and MAX_IFACES come from the loader's cflags.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>

#include "mirror.h"

#ifndef MAX_FLOWS
#define MAX_FLOWS 65536
#endif

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
BPF_PERCPU_ARRAY(scratch, int, 1);

/* What the HTTP/2 path needs of the packet's flow, handed over through a per-CPU slot
 * rather than kept on the stack: see classify_h2. */
struct h2_pending {
    struct flow_key key;
    __u32 was_marked;
    __u32 pad;
};
BPF_PERCPU_ARRAY(h2_pending, struct h2_pending, 1);

struct vlan_tag {
    __be16 tci;
    __be16 proto;
};

struct ipv6_opt_hdr_min {
    __u8 nexthdr;
    __u8 hdrlen;        /* in 8-byte units, not counting the first 8 bytes */
    __be16 frag_off;    /* fragment header only: offset (13 bits) and flags */
};

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

/* Orders two endpoints: lexicographic on the address bytes, then the port. */
static __always_inline int endpoint_less(const __u32 *a, __u16 pa, const __u32 *b, __u16 pb,
                                         int words)
{
#pragma unroll
    for (int i = 0; i < 4; i++) {
        if (i >= words)
            break;
        __u32 x = bpf_ntohl(a[i]), y = bpf_ntohl(b[i]);
        if (x != y)
            return x < y;
    }
    return bpf_ntohs(pa) < bpf_ntohs(pb);
}

static __always_inline void set_key(struct flow_key *key, const __u32 *src, __u16 sport,
                                    const __u32 *dst, __u16 dport, int words)
{
    int src_low = endpoint_less(src, sport, dst, dport, words);
    const __u32 *lo = src_low ? src : dst;
    const __u32 *hi = src_low ? dst : src;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        if (i >= words)
            break;
        key->addr_lo[i] = lo[i];
        key->addr_hi[i] = hi[i];
    }
    key->port_lo = src_low ? sport : dport;
    key->port_hi = src_low ? dport : sport;
}

/* Returns the status code (0-999) of an HTTP/1.0 or HTTP/1.1 status line in b, the
 * first STATUS_LINE_LEN bytes of the payload, or -1 when there is none. The line must read
 * "HTTP/1.x NNN" followed by a space (or a CR when the reason phrase is absent). */
static __always_inline int read_status(const char *b)
{
    if (b[0] != 'H' || b[1] != 'T' || b[2] != 'T' || b[3] != 'P' || b[4] != '/' ||
        b[5] != '1' || b[6] != '.' || (b[7] != '0' && b[7] != '1') || b[8] != ' ')
        return -1;
    if (b[9] < '0' || b[9] > '9' || b[10] < '0' || b[10] > '9' || b[11] < '0' || b[11] > '9')
        return -1;
    if (b[12] != ' ' && b[12] != '\r')
        return -1;
    return (b[9] - '0') * 100 + (b[10] - '0') * 10 + (b[11] - '0');
}

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

/* Whether a status code is in the trigger set. */
static __always_inline int is_trigger(__u32 status)
{
    __u8 *armed = trigger.lookup(&status);
    return armed && *armed;
}

/* Returns v unchanged, through a per-CPU scratch slot: the verifier then knows nothing
 * about the value, which merges the many ways of computing it into one verifier state
 * (bpf/http2.h uses it where a bounded loop would otherwise multiply them). */
static __always_inline int opaque(int v)
{
    __u32 zero = 0;
    int *slot = scratch.lookup(&zero);
    if (slot) {
        *slot = v;
        v = *(volatile int *)slot;
    }
    return v;
}

#include "http2.h"

/* Marks the flow (or records the new status in the already marked flow's slot). */
static __always_inline void mark_flow(struct __sk_buff *skb, struct flow_key *key,
                                      struct flow_value *fv, __u64 now, __u32 status)
{
    if (fv) {
        fv->status = status;
        return;
    }
    if (!now)
        now = bpf_ktime_get_coarse_ns();
    struct flow_value nv = {
        .packets = 1, .bytes = skb->len, .first_ns = now, .last_ns = now,
        .ifindex = skb->ifindex, .status = status,
    };
    flows.update(key, &nv);
    count(C_FLOWS_MARKED, 1);
    /* After the insert: see enum marks_index for why the order matters. */
    __u32 made = MARKS_MADE;
    __u64 *n = marks.lookup(&made);
    if (n)
        __sync_fetch_and_add(n, 1);
}

/* The HTTP/2 path of a segment whose first bytes are a plausible frame header: reads
 * the statuses (bpf/http2.h), marks the flow on a trigger status and mirrors what is
 * marked. The flow key and whether the flow was marked come from h2_pending, not from the
 * caller's stack: nothing of the caller is live here, so the verifier walks the frame
 * loop once, not once per way the caller got here (IPv4 or IPv6, marked or not). */
static __always_inline void classify_h2(struct __sk_buff *skb, __u32 off, __u32 end,
                                        __u32 direction)
{
    int status = h2_trigger_status(skb, off, end, direction);
    __u32 zero = 0;
    struct h2_pending *p = h2_pending.lookup(&zero);
    if (!p)
        return;
    if (status >= 0) {
        struct flow_value *fv = p->was_marked ? flows.lookup(&p->key) : 0;
        mark_flow(skb, &p->key, fv, 0, status);
    }
    if (status >= 0 || p->was_marked)
        mirror_packet(skb, 0, direction);
}

static __always_inline int classify(struct __sk_buff *skb, __u32 direction)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct flow_key key = {};
    __u32 off = sizeof(struct ethhdr);
    __u32 l4, payload_end;
    __u16 proto;

    count(C_PACKETS, 1);

    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        goto malformed;
    proto = eth->h_proto;
    if (proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD)) {
        struct vlan_tag *tag = data + off;
        if ((void *)(tag + 1) > data_end)
            goto malformed;
        proto = tag->proto;
        off += sizeof(*tag);
    }

    if (proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *ip = data + off;
        if ((void *)(ip + 1) > data_end)
            goto truncated;
        count(C_IPV4, 1);
        __u32 ihl = ip->ihl * 4;
        __u32 tot_len = bpf_ntohs(ip->tot_len);
        if (ip->version != 4 || ihl < sizeof(*ip))
            goto malformed;
        if (ip->frag_off & bpf_htons(0x1fff) || ip->protocol != IPPROTO_TCP)
            goto other;
        /* tot_len 0 happens for BIG TCP super-packets: trust skb->len then. */
        if (tot_len) {
            if (tot_len < ihl)
                goto malformed;
            payload_end = off + tot_len;
        } else {
            payload_end = skb->len;
        }
        key.family = 4;
        l4 = off + ihl;
        struct tcphdr *tcp = data + l4;
        if ((void *)(tcp + 1) > data_end)
            goto truncated;
        set_key(&key, &ip->saddr, tcp->source, &ip->daddr, tcp->dest, 1);
    } else if (proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = data + off;
        if ((void *)(ip6 + 1) > data_end)
            goto truncated;
        count(C_IPV6, 1);
        if (ip6->version != 6)
            goto malformed;
        __u32 plen = bpf_ntohs(ip6->payload_len);
        __u8 nexthdr = ip6->nexthdr;
        payload_end = plen ? off + sizeof(*ip6) + plen : skb->len;
        l4 = off + sizeof(*ip6);
#pragma unroll
        for (int i = 0; i < MAX_IPV6_EXT_HDRS; i++) {
            if (nexthdr != IPPROTO_HOPOPTS && nexthdr != IPPROTO_ROUTING &&
                nexthdr != IPPROTO_DSTOPTS && nexthdr != IPPROTO_FRAGMENT)
                break;
            struct ipv6_opt_hdr_min *eh = data + l4;
            if ((void *)(eh + 1) > data_end)
                goto truncated;
            if (nexthdr == IPPROTO_FRAGMENT) {
                if (eh->frag_off & bpf_htons(0xfff8))
                    goto other;    /* not the first fragment: no TCP header here */
                l4 += 8;
            } else {
                l4 += (eh->hdrlen + 1) * 8;
            }
            nexthdr = eh->nexthdr;
        }
        if (nexthdr != IPPROTO_TCP)
            goto other;
        key.family = 6;
        struct tcphdr *tcp = data + l4;
        if ((void *)(tcp + 1) > data_end)
            goto truncated;
        set_key(&key, ip6->saddr.in6_u.u6_addr32, tcp->source,
                ip6->daddr.in6_u.u6_addr32, tcp->dest, 4);
    } else {
        goto other;
    }

    /* l4 points at a TCP header whose fixed part is in the linear data. */
    struct tcphdr *tcp = data + l4;
    if ((void *)(tcp + 1) > data_end)
        goto truncated;
    __u32 doff = tcp->doff * 4;
    if (doff < sizeof(*tcp))
        goto malformed;
    __u32 payload_off = l4 + doff;
    if (payload_end > skb->len)
        payload_end = skb->len;
    if (payload_off > payload_end)
        goto malformed;
    count(C_TCP, 1);

    /* The hot path: every TCP segment pays this one lookup (normalised key, so one
     * lookup covers both directions), unless the map is known to be empty (see enum
     * marks_index). The clock is read only when a flow is touched, and it is the coarse
     * one (tick resolution, a few ms): enough for idle expiry, several times cheaper. */
    __u64 now = 0;
    struct flow_value *fv = 0;
    if (maybe_marked())
        fv = flows.lookup(&key);
    if (fv) {
        now = bpf_ktime_get_coarse_ns();
        fv->packets++;
        fv->bytes += skb->len;
        if (!fv->first_ns)
            fv->first_ns = now;
        fv->last_ns = now;
        fv->ifindex = skb->ifindex;
    }

    /* One load serves both protocols: the first bytes are an HTTP/1.x status line, or
     * (only then is HTTP/2 tried) a plausible frame header. HTTP/1.x and bulk data pay
     * the compares of h2_header_ok and nothing more: bulk data fails them about 4 times
     * in 100,000 (a zero byte, a length <= 0x40xx, a type <= 9, valid flags). */
    int code = -1, try_h2 = 0;
    __u32 payload_len = payload_end - payload_off;
    char head[STATUS_LINE_LEN];
    if (payload_len >= STATUS_LINE_LEN) {
        if (bpf_skb_load_bytes(skb, payload_off, head, STATUS_LINE_LEN) == 0) {
            code = read_status(head);
            try_h2 = code < 0;
        }
    } else if (payload_len >= H2_MIN_SEGMENT) {
        try_h2 = bpf_skb_load_bytes(skb, payload_off, head, H2_FRAME_HEADER_LEN) == 0;
    }
    if (try_h2 && h2_header_ok((const unsigned char *)head)) {
        __u32 zero = 0;
        struct h2_pending *p = h2_pending.lookup(&zero);
        if (p) {
            p->key = key;
            p->was_marked = fv != 0;
            classify_h2(skb, payload_off, payload_end, direction);
        } else if (fv) {
            mirror_packet(skb, 0, direction);
        }
        return PASS;
    }
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
        mark_flow(skb, &key, fv, now, status);
        mirror_packet(skb, st, direction);
    } else if (fv) {
        mirror_packet(skb, st, direction);
    }
    return PASS;

truncated:
    /* Headers that the skb holds but not in its linear part are skipped, not pulled:
     * pulling could reallocate the production skb. */
    if (data_end - data < skb->len) {
        count(C_NONLINEAR, 1);
        return PASS;
    }
malformed:
    count(C_MALFORMED, 1);
    return PASS;
other:
    count(C_OTHER, 1);
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
