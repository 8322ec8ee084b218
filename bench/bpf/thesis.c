/* The 2019 thesis monitor, rebuilt as the bench's baseline (thesis section 4.1.1).
 *
 * Faithful to the original where it matters for cost:
 *  - IPv4 only, no VLAN; status 500 only;
 *  - one global BPF_MAP_TYPE_LRU_HASH keyed by the 4-tuple as the packet carries it,
 *    looked up in both orders (as sent, then reversed) on every TCP packet;
 *  - a classic (non-direct-action) cls_bpf filter: returning 0 (TC_ACT_OK) means "no
 *    match", returning TC_ACT_SHOT (2) is a match with classid 2, which runs the
 *    filter's act_mirred "egress mirror" action to the debug interface; the packet itself
 *    then passes (mirred mirror returns TC_ACT_PIPE, which neither qdisc treats as drop).
 * One deliberate change: the status line is read with bpf_skb_load_bytes(). The original
 * read it by direct packet access, which on real sockets never sees it (a socket's data
 * sits in page fragments), so a literal copy would mirror nothing and look cheaper than a
 * working monitor can be.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>

#ifndef MAX_CONNECTIONS
#define MAX_CONNECTIONS 65536
#endif

/* The thesis's struct ConnectionInfo. */
struct connection_info {
    __u32 src_ip;
    __u32 dst_ip;
    __u16 src_port;
    __u16 dst_port;
};

/* The value is never read ("not relevant to the function of the monitor"). */
BPF_TABLE("lru_hash", struct connection_info, __u32, connections, MAX_CONNECTIONS);

#define PASS TC_ACT_OK      /* 0: no match, next filter / pass */
#define MIRROR TC_ACT_SHOT  /* non-zero: match, classid 2, actions run */

int thesis_mirror(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;

    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
        return PASS;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > data_end || ip->protocol != IPPROTO_TCP)
        return PASS;
    __u32 ihl = ip->ihl * 4;
    if (ihl < sizeof(*ip))
        return PASS;
    struct tcphdr *tcp = (void *)ip + ihl;
    if ((void *)(tcp + 1) > data_end)
        return PASS;

    struct connection_info conn = {
        .src_ip = ip->saddr, .dst_ip = ip->daddr,
        .src_port = tcp->source, .dst_port = tcp->dest,
    };
    if (connections.lookup(&conn))
        return MIRROR;
    struct connection_info reverse = {
        .src_ip = conn.dst_ip, .dst_ip = conn.src_ip,
        .src_port = conn.dst_port, .dst_port = conn.src_port,
    };
    if (connections.lookup(&reverse))
        return MIRROR;

    /* "HTTP/1.x 500": the start of the payload, 12 bytes. */
    __u32 payload_off = sizeof(*eth) + ihl + tcp->doff * 4;
    char b[12];
    if (bpf_skb_load_bytes(skb, payload_off, b, sizeof(b)) < 0)
        return PASS;
    if (b[0] != 'H' || b[1] != 'T' || b[2] != 'T' || b[3] != 'P' || b[4] != '/' ||
        b[5] != '1' || b[6] != '.' || (b[7] != '0' && b[7] != '1') || b[8] != ' ')
        return PASS;
    if (b[9] != '5' || b[10] != '0' || b[11] != '0')
        return PASS;
    __u32 one = 1;
    connections.update(&conn, &one);
    return MIRROR;
}
