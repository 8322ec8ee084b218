/* HTTP/1.x parse of the classifier (included by mirror.c): what the first bytes of a TCP
 * payload say. One load of STATUS_LINE_LEN bytes serves both questions: is this a status
 * line (a response), and is this the start of a request.
 *
 * The payload is read with bpf_skb_load_bytes(), never by direct packet access: the data
 * of a real socket usually sits in page fragments that data/data_end do not cover, so a
 * parser that only looks at the linear part passes every crafted frame and never fires
 * on real traffic. */
#ifndef MIRROR_HTTP1_H
#define MIRROR_HTTP1_H

#include "mirror.h"

/* Loads the first STATUS_LINE_LEN bytes of the payload; 0 on success. */
static __always_inline int http1_load(struct __sk_buff *skb, __u32 payload_off, char *b)
{
    return bpf_skb_load_bytes(skb, payload_off, b, STATUS_LINE_LEN);
}

/* Returns the status code (0-999) of an HTTP/1.0 or HTTP/1.1 status line, or -1 when
 * `b` does not start with one. The line must read "HTTP/1.x NNN" followed by a space (or
 * a CR when the reason phrase is absent). */
static __always_inline int http1_status(const char *b)
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

/* Whether `b` starts a request: a registered method (RFC 9110 section 9, and PATCH,
 * RFC 5789) and a space. Case-sensitive, as methods are. */
static __always_inline int http1_request_start(const char *b)
{
    switch (b[0]) {
    case 'G':
        return b[1] == 'E' && b[2] == 'T' && b[3] == ' ';
    case 'H':
        return b[1] == 'E' && b[2] == 'A' && b[3] == 'D' && b[4] == ' ';
    case 'P':
        if (b[1] == 'U')
            return b[2] == 'T' && b[3] == ' ';
        if (b[1] == 'O')
            return b[2] == 'S' && b[3] == 'T' && b[4] == ' ';
        return b[1] == 'A' && b[2] == 'T' && b[3] == 'C' && b[4] == 'H' && b[5] == ' ';
    case 'D':
        return b[1] == 'E' && b[2] == 'L' && b[3] == 'E' && b[4] == 'T' && b[5] == 'E' &&
               b[6] == ' ';
    case 'C':
        return b[1] == 'O' && b[2] == 'N' && b[3] == 'N' && b[4] == 'E' && b[5] == 'C' &&
               b[6] == 'T' && b[7] == ' ';
    case 'O':
        return b[1] == 'P' && b[2] == 'T' && b[3] == 'I' && b[4] == 'O' && b[5] == 'N' &&
               b[6] == 'S' && b[7] == ' ';
    case 'T':
        return b[1] == 'R' && b[2] == 'A' && b[3] == 'C' && b[4] == 'E' && b[5] == ' ';
    }
    return 0;
}

/* Whether `b` starts the HTTP/2 connection preface (RFC 9113 3.4: "PRI * HTTP/2.0\r\n\r\n
 * SM\r\n\r\n"), which only a client sends, first thing on a connection. */
static __always_inline int http2_preface(const char *b)
{
    return b[0] == 'P' && b[1] == 'R' && b[2] == 'I' && b[3] == ' ' && b[4] == '*' &&
           b[5] == ' ' && b[6] == 'H' && b[7] == 'T' && b[8] == 'T' && b[9] == 'P' &&
           b[10] == '/' && b[11] == '2' && b[12] == '.';
}

#endif
