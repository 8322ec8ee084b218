/* Ingress program of the debug veth's far end: drops every mirrored clone so that none
 * enters a network stack. The near end's packet taps (tcpdump) have already seen it. */
#include <uapi/linux/pkt_cls.h>

int sink_drop(struct __sk_buff *skb)
{
    return TC_ACT_SHOT;
}
