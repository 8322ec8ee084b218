/* L2-L4 parse of the classifier (included by mirror.c): Ethernet with at most one
 * 802.1Q/802.1ad tag, IPv4 or IPv6 (extension headers skipped, bounded), TCP. Headers are
 * read by direct packet access, so they must be in the skb's linear part; the payload is
 * not read here (see http1.h for why it is read with bpf_skb_load_bytes()).
 *
 * Expects count() and the counters of mirror.h to be defined by the including program. */
#ifndef MIRROR_PARSE_H
#define MIRROR_PARSE_H

#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>

#include "mirror.h"

enum parse_result {
    PARSED_TCP = 0,     /* a TCP segment: struct tcp_segment is filled in */
    PARSE_OTHER,        /* not IP, not TCP, or a non-first fragment */
    PARSE_MALFORMED,    /* truncated or bogus headers */
    PARSE_NONLINEAR,    /* headers valid so far but beyond the skb's linear part */
};

/* What the classifier needs of a TCP segment. */
struct tcp_segment {
    struct flow_key key;    /* normalised: both directions give the same key */
    __u32 payload_off;      /* offset of the TCP payload from the start of the frame */
    __u32 payload_end;      /* end of the TCP payload (IP length, capped at skb->len) */
    __u8 src_is_lo;         /* the sender is key.addr_lo/port_lo */
    __u8 syn;               /* the SYN flag is set */
    __u8 ack;               /* the ACK flag is set */
    __u32 seq;              /* the sequence number (host order) */
};

struct vlan_tag {
    __be16 tci;
    __be16 proto;
};

struct ipv6_opt_hdr_min {
    __u8 nexthdr;
    __u8 hdrlen;        /* in 8-byte units, not counting the first 8 bytes */
    __be16 frag_off;    /* fragment header only: offset (13 bits) and flags */
};

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

/* Returns whether the sender (src) is the key's lo endpoint. */
static __always_inline int set_key(struct flow_key *key, const __u32 *src, __u16 sport,
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
    return src_low;
}

/* Parses the frame down to the TCP payload; `seg` must be zeroed by the caller. */
static __always_inline int parse_tcp_segment(struct __sk_buff *skb, struct tcp_segment *seg)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct flow_key *key = &seg->key;
    __u32 off = sizeof(struct ethhdr);
    __u32 l4, payload_end;
    __u16 proto;

    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return PARSE_MALFORMED;
    proto = eth->h_proto;
    if (proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD)) {
        struct vlan_tag *tag = data + off;
        if ((void *)(tag + 1) > data_end)
            return PARSE_MALFORMED;
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
            return PARSE_MALFORMED;
        if (ip->frag_off & bpf_htons(0x1fff) || ip->protocol != IPPROTO_TCP)
            return PARSE_OTHER;
        /* tot_len 0 happens for BIG TCP super-packets: trust skb->len then. */
        if (tot_len) {
            if (tot_len < ihl)
                return PARSE_MALFORMED;
            payload_end = off + tot_len;
        } else {
            payload_end = skb->len;
        }
        key->family = 4;
        l4 = off + ihl;
        struct tcphdr *tcp = data + l4;
        if ((void *)(tcp + 1) > data_end)
            goto truncated;
        seg->src_is_lo = set_key(key, &ip->saddr, tcp->source, &ip->daddr, tcp->dest, 1);
    } else if (proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = data + off;
        if ((void *)(ip6 + 1) > data_end)
            goto truncated;
        count(C_IPV6, 1);
        if (ip6->version != 6)
            return PARSE_MALFORMED;
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
                    return PARSE_OTHER;    /* not the first fragment: no TCP header here */
                l4 += 8;
            } else {
                l4 += (eh->hdrlen + 1) * 8;
            }
            nexthdr = eh->nexthdr;
        }
        if (nexthdr != IPPROTO_TCP)
            return PARSE_OTHER;
        key->family = 6;
        struct tcphdr *tcp = data + l4;
        if ((void *)(tcp + 1) > data_end)
            goto truncated;
        seg->src_is_lo = set_key(key, ip6->saddr.in6_u.u6_addr32, tcp->source,
                                 ip6->daddr.in6_u.u6_addr32, tcp->dest, 4);
    } else {
        return PARSE_OTHER;
    }

    /* l4 points at a TCP header whose fixed part is in the linear data. */
    struct tcphdr *tcp = data + l4;
    if ((void *)(tcp + 1) > data_end)
        goto truncated;
    __u32 doff = tcp->doff * 4;
    if (doff < sizeof(*tcp))
        return PARSE_MALFORMED;
    __u32 payload_off = l4 + doff;
    if (payload_end > skb->len)
        payload_end = skb->len;
    if (payload_off > payload_end)
        return PARSE_MALFORMED;
    seg->payload_off = payload_off;
    seg->payload_end = payload_end;
    seg->syn = tcp->syn;
    seg->ack = tcp->ack;
    seg->seq = bpf_ntohl(tcp->seq);
    return PARSED_TCP;

truncated:
    /* Headers that the skb holds but not in its linear part are skipped, not pulled:
     * pulling could reallocate the production skb. */
    if (data_end - data < skb->len)
        return PARSE_NONLINEAR;
    return PARSE_MALFORMED;
}

#endif
