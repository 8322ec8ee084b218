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
 * An HTTP/2 HEADERS frame whose :status is in the trigger set (bpf/http2.h) marks the
 * connection the same way, and so does a gRPC grpc-status in a stream-ending HEADERS
 * frame whose code is in the trigger array's slots 0-16.
 *
 * The parse is split by layer: parse.h (Ethernet, IP, TCP), http1.h (status line and
 * request start), http2.h (frames and :status). This file holds the maps, the counters
 * and the decisions: keep a request, pair a response with it, mark, mirror, report, pass.
 *
 * Compiled by bcc; MAX_FLOWS comes from the loader's cflags.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#include "mirror.h"

#ifndef MAX_FLOWS
#define MAX_FLOWS DEFAULT_MAX_FLOWS
#endif
#ifndef MAX_REQUESTS
#define MAX_REQUESTS 16384
#endif
/* 0 compiles the HTTP/2 parser out (the bench's "HTTP/2 parser off"), leaving HTTP/1.x. */
#ifndef MIRROR_HTTP2
#define MIRROR_HTTP2 1
#endif
#ifndef EVENT_WAKEUP_NS
#define EVENT_WAKEUP_NS 10000000ULL     /* 10 ms: at most 100 reader wakeups/s per CPU */
#endif
#ifndef EVENT_PAGES
#define EVENT_PAGES 256
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
/* The request snapshot: per flow, the last request start seen (struct error_event's
 * request part). Shared by all CPUs: the response may run on another CPU. */
BPF_TABLE("lru_hash", struct flow_key, struct error_event, requests, MAX_REQUESTS);
/* Where an event or a snapshot is put together: too large for the stack. */
BPF_PERCPU_ARRAY(event_scratch, struct error_event, 1);
BPF_RINGBUF_OUTPUT(events, EVENT_PAGES);
/* When this CPU last woke the events reader (ns): see report_error. */
BPF_PERCPU_ARRAY(event_wakeup, __u64, 1);
BPF_PERCPU_ARRAY(scratch, int, 1);
/* Each CPU's clones in its current rate window (struct clone_window). */
BPF_PERCPU_ARRAY(clone_rate, struct clone_window, 1);

/* What the HTTP/2 path needs of the packet's flow, handed over through a per-CPU slot
 * rather than kept on the stack: see classify_h2. */
struct h2_pending {
    struct flow_key key;
    __u32 was_marked;
    __u32 src_is_lo;
};
BPF_PERCPU_ARRAY(h2_pending, struct h2_pending, 1);
/* Interfaces this controller monitors (set by user space on attach and detach). */
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

/* Takes one clone from this CPU's rate window; 0 when the window's clones are spent.
 * The window restarts at the first clone at least clone_window_ns after its start. The
 * difference is unsigned: a start ahead of the clock (tests write one) reads as past,
 * unless it is ahead by more than 2^64 minus the window. */
static __always_inline int take_clone_token(const struct mirror_config *cfg)
{
    __u32 zero = 0;
    struct clone_window *w = clone_rate.lookup(&zero);
    if (!w)
        return 1;
    __u64 now = bpf_ktime_get_coarse_ns();
    if (now - w->start_ns >= cfg->clone_window_ns) {
        w->start_ns = now;
        w->clones = 0;
    }
    if (w->clones >= cfg->max_clones_per_window)
        return 0;
    w->clones++;
    return 1;
}

/* The budgets (struct mirror_config): the enum cut_reason that skips this clone, 0 to
 * clone. `fv` is the flow's value on this CPU with this packet already counted (0 only
 * if the flow left the map under us: then only the rate applies). A skip is counted by
 * reason and flagged on the flow. */
static __always_inline __u32 over_budget(const struct mirror_config *cfg,
                                         struct flow_value *fv)
{
    __u32 why = 0;
    if (fv && cfg->max_packets_per_flow && fv->packets > cfg->max_packets_per_flow) {
        why = CUT_FLOW_PACKETS;
        count(C_SKIP_FLOW_PACKETS, 1);
    } else if (fv && cfg->max_bytes_per_flow && fv->bytes > cfg->max_bytes_per_flow) {
        why = CUT_FLOW_BYTES;
        count(C_SKIP_FLOW_BYTES, 1);
    } else if (cfg->max_clones_per_window && !take_clone_token(cfg)) {
        why = CUT_CPU_RATE;
        count(C_SKIP_CPU_RATE, 1);
    }
    if (why && fv)
        fv->cut |= why;
    return why;
}

/* Clones the packet to the debug interface. `st` is the interface's stats when the
 * caller already looked them up; the lookup is done here otherwise (cheap next to the
 * clone itself). `fv`: the flow's value on this CPU, for the budgets. */
static __always_inline void mirror_packet(struct __sk_buff *skb, struct iface_stats *st,
                                          __u32 direction, struct flow_value *fv)
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
    /* Budgets: the cost of an error storm is bounded (per flow, per CPU). */
    if (over_budget(cfg, fv))
        return;
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

/* Keeps the first bytes of a request frame (the whole frame from its Ethernet header, up
 * to config.request_bytes) as the flow's request snapshot, replacing the previous one.
 * Only request starts pay this. A connection's first request is put together in the
 * per-CPU scratch and inserted (an LRU element allocation and a copy); later ones on the
 * same keep-alive connection overwrite its entry in place, which costs about half. A
 * response being reported on another CPU at that moment could copy a mix of two
 * requests: only when a client sends its next request before the previous response
 * (pipelining), where the README already says which request is reported. */
static __always_inline void keep_request(struct __sk_buff *skb, struct tcp_segment *seg,
                                         __u32 direction, const struct mirror_config *cfg)
{
    __u32 zero = 0;
    struct error_event *kept = requests.lookup(&seg->key);
    struct error_event *ev = kept ? kept : event_scratch.lookup(&zero);
    if (!ev)
        return;
    __u64 len = skb->len;
    if (len > cfg->request_bytes)
        len = cfg->request_bytes;
    if (len > REQUEST_BYTES)
        len = REQUEST_BYTES;
    if (len == 0)
        return;
    if (bpf_skb_load_bytes(skb, 0, ev->data, len) < 0)
        return;
    ev->request_ns = bpf_ktime_get_ns();
    ev->request_ifindex = skb->ifindex;
    ev->request_direction = direction;
    ev->request_from_lo = seg->src_is_lo;
    ev->request_frame_len = skb->len;
    ev->request_len = len;
    if (!kept)
        requests.update(&seg->key, ev);
    count(C_REQUESTS, 1);
}

/* Hands an error event to user space: the response's facts and, when there is one, the
 * request snapshot they are written into (`req`, the flow's entry in `requests`). Never
 * waits: a full ring buffer loses the event, counted. */
static __always_inline void report_error(struct __sk_buff *skb, const struct flow_key *key,
                                         __u8 src_is_lo, struct error_event *req,
                                         __u32 status, __u32 direction, __u8 new_flow,
                                         __u8 proto, const struct flow_value *fv)
{
    __u32 zero = 0;
    struct error_event *ev = req;
    if (!ev) {
        ev = event_scratch.lookup(&zero);
        if (!ev)
            return;
        ev->request_ns = 0;
        ev->request_len = 0;
    }
    ev->response_ns = bpf_ktime_get_ns();
    ev->ifindex = skb->ifindex;
    ev->status = status;
    ev->direction = direction;
    ev->new_flow = new_flow;
    ev->proto = proto;
    ev->server_is_lo = src_is_lo;
    ev->cut = fv ? fv->cut : 0;
    __builtin_memcpy(&ev->key, key, sizeof(ev->key));
    /* Wake the reader for the first event after a quiet spell, then at most once per
     * EVENT_WAKEUP_NS on this CPU: in an error storm a wakeup per event (a context switch
     * for every error response) cost more than everything else the mirror does. Events
     * written without one wait for the reader's next poll (it also reads on a timer). */
    __u64 flags = BPF_RB_NO_WAKEUP;
    __u64 *woke = event_wakeup.lookup(&zero);
    if (woke && ev->response_ns - *woke >= EVENT_WAKEUP_NS) {
        *woke = ev->response_ns;
        flags = BPF_RB_FORCE_WAKEUP;
    }
    int err;
    if (req)
        err = events.ringbuf_output(ev, sizeof(*ev), flags);
    else
        err = events.ringbuf_output(ev, __builtin_offsetof(struct error_event, data), flags);
    count(err ? C_EVENTS_LOST : C_EVENTS, 1);
}

/* Marks the flow (or records the new status in the already marked flow's slot).
 * Returns the flow's value on this CPU (the budgets count against it), 0 if the new
 * entry is already gone again. */
static __always_inline struct flow_value *mark_flow(struct __sk_buff *skb,
                                                    struct flow_key *key,
                                                    struct flow_value *fv, __u64 now,
                                                    __u32 status)
{
    if (fv) {
        fv->status = status;
        return fv;
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
    return flows.lookup(key);
}

/* The HTTP/2 path of a segment whose first bytes are a plausible frame header: reads
 * the statuses (bpf/http2.h), marks the flow on a trigger status, mirrors what is
 * marked and reports the error (HTTP/2 requests are not kept: their header blocks are
 * HPACK-compressed against the connection's state). The flow key and whether the flow
 * was marked come from h2_pending, not from the caller's stack: nothing of the caller is
 * live here, so the verifier walks the frame loop once, not once per way the caller got
 * here (IPv4 or IPv6, marked or not). */
static __always_inline void classify_h2(struct __sk_buff *skb, __u32 off, __u32 end,
                                        __u32 direction)
{
    int status = h2_trigger_status(skb, off, end, direction);
    __u32 zero = 0;
    struct h2_pending *p = h2_pending.lookup(&zero);
    if (!p)
        return;
    struct flow_value *fv = p->was_marked ? flows.lookup(&p->key) : 0;
    if (status >= 0)
        fv = mark_flow(skb, &p->key, fv, 0, status);
    if (status >= 0 || p->was_marked)
        mirror_packet(skb, 0, direction, fv);
    if (status >= 0)
        report_error(skb, &p->key, p->src_is_lo, 0, status, direction, !p->was_marked,
                     status < MIN_HTTP_STATUS ? PROTO_GRPC : PROTO_HTTP2, fv);
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
    if (fv && seg.syn) {
        /* A new connection reusing the 4-tuple of a marked one (the client port came
         * round again within the idle timeout): not the connection that failed. */
        flows.delete(&seg.key);
        count(C_SYN_UNMARKED, 1);
        fv = 0;
    }
    if (fv) {
        now = bpf_ktime_get_coarse_ns();
        fv->packets++;
        fv->bytes += skb->len;
        if (!fv->first_ns)
            fv->first_ns = now;
        fv->last_ns = now;
        fv->ifindex = skb->ifindex;
    }

    /* One load of the payload's first bytes answers all three: an HTTP/1.x status line,
     * a request start, or (only when neither) a plausible HTTP/2 frame header. HTTP/1.x
     * and bulk data pay the compares of h2_header_ok and nothing more: bulk data passes
     * them about 4 times in 100,000 (a zero byte, a length <= 0x40xx, a type <= 9, valid
     * flags). */
    char head[STATUS_LINE_LEN];
    int code = -1, try_h2 = 0;
    struct mirror_config *cfg = 0;
    struct error_event *req = 0;
    __u32 zero = 0;
    __u32 payload_len = seg.payload_end - seg.payload_off;
    if (payload_len >= STATUS_LINE_LEN) {
        if (http1_load(skb, seg.payload_off, head) == 0) {
            code = http1_status(head);
            if (code < 0 && http1_request_start(head)) {
                cfg = config.lookup(&zero);
                if (cfg && cfg->request_bytes)
                    keep_request(skb, &seg, direction, cfg);
            } else {
                try_h2 = code < 0;
            }
        }
    } else if (payload_len >= H2_MIN_SEGMENT) {
        try_h2 = bpf_skb_load_bytes(skb, seg.payload_off, head, H2_FRAME_HEADER_LEN) == 0;
    }
    if (MIRROR_HTTP2 && try_h2 && h2_header_ok((const unsigned char *)head)) {
        struct h2_pending *p = h2_pending.lookup(&zero);
        if (p) {
            p->key = seg.key;
            p->was_marked = fv != 0;
            p->src_is_lo = seg.src_is_lo;
            classify_h2(skb, seg.payload_off, seg.payload_end, direction);
        } else if (fv) {
            mirror_packet(skb, 0, direction, fv);
        }
        return PASS;
    }
    if (code >= 0) {
        /* With the request snapshot on, a status line counts only when it travels
         * opposite to the flow's last request: a client cannot mark its own connection
         * by sending one. With no request kept for the flow, it counts (as with the
         * snapshot off): a response whose request was missed is still an error. */
        cfg = config.lookup(&zero);
        if (cfg && cfg->request_bytes) {
            req = requests.lookup(&seg.key);
            if (!req) {
                count(C_RESP_NO_REQUEST, 1);
            } else if (req->request_from_lo == seg.src_is_lo) {
                count(C_STATUS_SAME_DIR, 1);
                code = -1;
            }
        }
    }
    if (code < 0) {
        if (fv)
            mirror_packet(skb, 0, direction, fv);
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

    if (status >= MIN_HTTP_STATUS && is_trigger(status)) {
        struct flow_value *mfv = mark_flow(skb, &seg.key, fv, now, status);
        mirror_packet(skb, st, direction, mfv);
        /* After the clone: the request frame user space writes for this event follows
         * the response on the debug interface, never precedes it. */
        report_error(skb, &seg.key, seg.src_is_lo, req, status, direction, !fv, PROTO_HTTP1,
                     mfv);
    } else if (fv) {
        mirror_packet(skb, st, direction, fv);
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
