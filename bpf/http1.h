/* HTTP/1.x parse of the classifier (included by mirror.c): the status line at the start
 * of a TCP payload.
 *
 * The payload is read with bpf_skb_load_bytes(), never by direct packet access: the data
 * of a real socket usually sits in page fragments that data/data_end do not cover, so a
 * parser that only looks at the linear part passes every crafted frame and never fires
 * on real traffic. */
#ifndef MIRROR_HTTP1_H
#define MIRROR_HTTP1_H

#include "mirror.h"

/* Returns the status code (0-999) of an HTTP/1.0 or HTTP/1.1 status line at the start
 * of the payload, or -1 when there is none. The line must read "HTTP/1.x NNN" followed
 * by a space (or a CR when the reason phrase is absent). */
static __always_inline int http1_status(struct __sk_buff *skb, __u32 payload_off)
{
    char b[STATUS_LINE_LEN];
    if (bpf_skb_load_bytes(skb, payload_off, b, sizeof(b)) < 0)
        return -1;
    if (b[0] != 'H' || b[1] != 'T' || b[2] != 'T' || b[3] != 'P' || b[4] != '/' ||
        b[5] != '1' || b[6] != '.' || (b[7] != '0' && b[7] != '1') || b[8] != ' ')
        return -1;
    if (b[9] < '0' || b[9] > '9' || b[10] < '0' || b[10] > '9' || b[11] < '0' || b[11] > '9')
        return -1;
    if (b[12] != ' ' && b[12] != '\r')
        return -1;
    return (b[9] - '0') * 100 + (b[10] - '0') * 10 + (b[11] - '0');
}

#endif
