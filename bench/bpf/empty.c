/* The empty classifier: the floor of what any tc BPF program costs (call, context
 * setup, return). Per-packet costs are reported as ratios to it, measured in the same
 * run on the same CPU. */
#include <uapi/linux/pkt_cls.h>

int empty_classifier(struct __sk_buff *skb)
{
    return TC_ACT_UNSPEC;
}
