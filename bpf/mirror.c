/* tc classifier of the HTTP-aware selective mirror.
 *
 * Runs direct-action on the ingress and egress hooks of a monitored interface and
 * returns the same pass verdict for every packet (PASS, below): the original packet is
 * never dropped, delayed or rewritten.
 * It parses Ethernet (one 802.1Q/802.1ad tag), IPv4 or IPv6 (with extension headers),
 * TCP, and reads the first bytes of the TCP payload with bpf_skb_load_bytes(), because a
 * socket's data usually sits in page fragments that direct packet access cannot see.
 *
 * One state per connection and interface (struct conn, in the `conns` array) says which
 * side is the client (from the SYN, or from a request when the SYN went unseen),
 * holds the mark and the budgets, and tags the request kept for it. A status (an HTTP/1.x
 * status line, an HTTP/2 :status, a gRPC grpc-status) counts only when it comes from the
 * server side of a connection whose client is known, in the server's direction on this
 * interface: a client's bytes, a lone spoofed segment and a client's HTTP/2 HEADERS never
 * mark, count as a response or report (a client's status is only counted apart). A counted status in the trigger set marks the connection; that
 * packet and every later one of the connection, both directions, is cloned to the debug
 * interface within the budgets, the error is counted by (interface, status, protocol) and,
 * within the event bounds, reported with its request through a ring buffer.
 *
 * The parse is split by layer: parse.h (Ethernet, IP, TCP), http1.h (status line and
 * request start), http2.h (frames, :status, grpc-status). This file holds the maps, the
 * counters and the decisions.
 *
 * Compiled by bcc; CONN_SLOTS and REQUEST_SLOTS come from the loader's cflags.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#include "mirror.h"

#ifndef CONN_SLOTS
#define CONN_SLOTS DEFAULT_MAX_FLOWS    /* a power of two, a multiple of CONN_WAYS */
#endif
#ifndef REQUEST_SLOTS
#define REQUEST_SLOTS (CONN_SLOTS / CONN_WAYS)  /* a power of two */
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

BPF_ARRAY(conns, struct conn, CONN_SLOTS);
BPF_ARRAY(requests, struct kept_request, REQUEST_SLOTS);
BPF_ARRAY(trigger, __u8, STATUS_CODES);
BPF_ARRAY(config, struct mirror_config, 1);
BPF_ARRAY(marks, __u64, NR_MARKS);
BPF_PERCPU_ARRAY(counters, __u64, NR_COUNTERS);
BPF_PERCPU_ARRAY(iface_stats, struct iface_stats, IFACE_SLOTS * 2);
BPF_PERCPU_HASH(errors, struct error_count_key, __u64, ERROR_COUNT_KEYS);
BPF_PERCPU_ARRAY(response_time, __u64, RESPONSE_BUCKETS + 2);
/* Never written: it gives user space the compiled layout of struct error_event to check
 * its own against (mirror/abi.py), as the ring buffer carries no type. */
BPF_PERCPU_ARRAY(event_scratch, struct error_event, 1);
BPF_RINGBUF_OUTPUT(events, EVENT_PAGES);
/* When this CPU last woke the events reader (ns): see report_error. */
BPF_PERCPU_ARRAY(event_wakeup, __u64, 1);
BPF_PERCPU_ARRAY(scratch, int, 1);
/* Each CPU's clones and events in their current rate windows. */
BPF_PERCPU_ARRAY(clone_rate, struct rate_window, 1);
BPF_PERCPU_ARRAY(event_rate, struct rate_window, 1);

/* What a packet's decision needs beyond its own stack frame, handed to the HTTP/2 walk
 * (a program of its own: see mirror_h2) through a per-CPU slot, and read by the status
 * counting of http2.h. */
struct pending {
    struct conn_key key;
    __u32 payload_off;
    __u32 payload_end;
    __u32 direction;
    __u32 slot;             /* the connection's slot, and */
    __u32 gen;              /* its gen when it was looked up (0 slot: none) */
    __u8 has_conn;
    __u8 src_is_lo;         /* the sender is the key's lo endpoint */
    __u8 mode;              /* enum status_mode: what a status found in this packet does */
    __u8 saw_request;       /* HTTP/2: a request's header block was seen (http2.h) */
    __u8 seen_before;
    __u8 pad[3];
    __u32 seq;              /* the segment's TCP sequence number */
};
BPF_PERCPU_ARRAY(pending, struct pending, 1);
/* The HTTP/2 walk, reached by a tail call (slot 0; user space puts mirror_h2 there): the
 * verifier checks it once, from one state, instead of once for every way a packet can
 * reach it (which is more than its complexity limit allows). */
BPF_PROG_ARRAY(h2_walk, 1);
/* Interfaces this controller monitors (set by user space on attach and detach). */
BPF_HASH(monitored, __u32, __u8, MAX_MONITORED);

/* What a status found in a packet does, by who sent it (struct pending's mode). */
enum status_mode {
    STATUS_COUNTS = 0,      /* the server's, first seen here: counted, may trigger */
    STATUS_SILENT = 1,      /* the server's, already counted at a monitored ingress: may
                             * mark this interface's state, counts nothing */
    STATUS_UNKNOWN_SIDE = 2,/* the connection's client side is not known */
    STATUS_FROM_CLIENT = 3, /* sent by the client side, or in its direction */
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

/* False only when no connection is known to be marked (enum marks_index). */
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

/* The status mode of the packet at hand (struct pending), for http2.h. */
static __always_inline int status_mode(void)
{
    __u32 zero = 0;
    struct pending *p = pending.lookup(&zero);
    return p ? p->mode : STATUS_UNKNOWN_SIDE;
}

/* A status found by http2.h that is not the server's counts apart, here. Returns whether
 * it counts as the server's (and so may be counted by class and may trigger). */
static __always_inline int status_counts(int mode)
{
    if (mode == STATUS_UNKNOWN_SIDE)
        count(C_STATUS_SIDE_UNKNOWN, 1);
    else if (mode == STATUS_FROM_CLIENT)
        count(C_STATUS_FROM_CLIENT, 1);
    return mode == STATUS_COUNTS;
}

/* Whether a status found by http2.h may mark the connection: the server's (counted here
 * or where it entered) and in the trigger set. */
static __always_inline int may_trigger(__u32 code)
{
    int mode = status_mode();
    return (mode == STATUS_COUNTS || mode == STATUS_SILENT) && is_trigger(code);
}

/* An undecodable status, counted only where the server's statuses count. */
static __always_inline void count_unknown(__u32 idx)
{
    if (status_mode() == STATUS_COUNTS)
        count(idx, 1);
}

/* http2.h found a request's header block in the packet at hand. */
static __always_inline void note_h2_request(void)
{
    __u32 zero = 0;
    struct pending *p = pending.lookup(&zero);
    if (p)
        p->saw_request = 1;
}

#include "http2.h"

/* The HPACK walk's state (bpf/http2.h), per CPU: read afresh at every step. */
BPF_PERCPU_ARRAY(h2_walk_states, struct h2_walk_state, 1);

/* --- the connection state --------------------------------------------------------------- */

static __always_inline __u32 rotl32(__u32 x, __u32 r)
{
    return (x << r) | (x >> (32 - r));
}

/* One round of murmur3 x86_32: mixes word x into h. */
static __always_inline __u32 murmur_round(__u32 h, __u32 x)
{
    x *= 0xcc9e2d51;
    x = rotl32(x, 15) * 0x1b873593;
    h ^= x;
    return rotl32(h, 13) * 5 + 0xe6546b64;
}

/* The first slot of the key's bucket: a seeded hash (murmur3's rounds and finalizer) of
 * the key's words: all eleven for IPv6, and for IPv4 the five that can be other than zero
 * (the two addresses, the ports, the family word, the ifindex), which halves what every
 * lookup of the common case pays. The seed, random per load, keeps a sender from choosing
 * 4-tuples that land in a victim's bucket. */
static __always_inline __u32 conn_bucket(const struct conn_key *k, __u32 seed)
{
    const __u32 *w = (const __u32 *)k;
    __u32 h = seed;
    if (k->flow.family == 4) {
        h = murmur_round(h, w[0]);
        h = murmur_round(h, w[4]);
        h = murmur_round(h, w[8]);
        h = murmur_round(h, w[9]);
        h = murmur_round(h, w[10]);
    } else {
#pragma unroll
        for (int i = 0; i < (int)(sizeof(*k) / 4); i++)
            h = murmur_round(h, w[i]);
    }
    h ^= h >> 16;
    h *= 0x85ebca6b;
    h ^= h >> 13;
    h *= 0xc2b2ae35;
    h ^= h >> 16;
    return h & (CONN_SLOTS - 1) & ~(CONN_WAYS - 1);
}

/* Whether two keys are the same: for IPv4 (the family word is compared first) only the
 * words the hash reads can differ. */
static __always_inline int conn_key_eq(const struct conn_key *a, const struct conn_key *b)
{
    const __u32 *x = (const __u32 *)a, *y = (const __u32 *)b;
    if (x[9] != y[9] || x[8] != y[8] || x[10] != y[10] || x[0] != y[0] || x[4] != y[4])
        return 0;
    if (a->flow.family == 4)
        return 1;
    int same = 1;
#pragma unroll
    for (int i = 1; i < 8; i++) {
        if (i != 4)             /* compared above */
            same &= x[i] == y[i];
    }
    return same;
}

/* The connection's slot index in *slot, and its state, or 0 when it has none. With
 * `create`, a connection without one gets a slot of its bucket: a free one, else the one
 * idle longest (its state is gone: C_CONNS_REPLACED), started afresh with a new gen.
 * The slot found or chosen goes through opaque() and is looked up once more: however the
 * bucket's ways compared, the caller goes on from one verifier state. */
static __always_inline struct conn *conn_find(const struct conn_key *k, __u32 seed,
                                              int create, __u64 now, __u32 *slot)
{
    __u32 base = conn_bucket(k, seed);
    __u32 found = CONN_SLOTS, victim = base;
    __u64 oldest = ~0ULL;
#pragma unroll
    for (int w = 0; w < CONN_WAYS; w++) {
        __u32 i = base + w;
        struct conn *c = conns.lookup(&i);
        if (!c)
            break;
        if (c->last_ns && conn_key_eq(&c->key, k)) {
            found = i;
            break;
        }
        if (c->last_ns < oldest) {
            oldest = c->last_ns;
            victim = i;
        }
    }
    found = opaque(found);
    if (found < CONN_SLOTS) {
        *slot = found;
        return conns.lookup(&found);
    }
    if (!create)
        return 0;
    victim = opaque(victim);
    struct conn *c = conns.lookup(&victim);
    if (!c)
        return 0;
    if (c->last_ns) {
        count(C_CONNS_REPLACED, 1);
        if (c->flags & CONN_MARKED)
            count(C_FLOWS_EVICTED, 1);
    }
    __u32 gen = c->gen + 1;
    __builtin_memset(c, 0, sizeof(*c));
    __builtin_memcpy(&c->key, k, sizeof(*k));
    c->gen = gen;
    c->last_ns = now;
    count(C_CONNS_STARTED, 1);
    *slot = victim;
    return c;
}

/* Notes that a packet touched the connection. The state is shared by every CPU and the
 * coarse clock moves once a tick, so most packets find last_ns already current: writing
 * it anyway made the request's CPU and the response's CPU take the line from each other
 * on every packet (the profile in traffic, bench.profile, put the largest share of the
 * classifier's time on reading the state). */
static __always_inline void touch(struct conn *c, __u64 now)
{
    if (c->last_ns != now)
        c->last_ns = now;
}

/* The connection starts (afresh) with its client side known: `client_lo` says whether the
 * client is the key's lo endpoint, `client_egress` whether its packets pass this
 * interface's egress hook. A new connection that reuses the 4-tuple of a marked one
 * forgets the mark and the kept request. */
static __always_inline void conn_restart(struct conn *c, int client_lo, int client_egress,
                                         __u64 now)
{
    if (c->flags & CONN_MARKED)
        count(C_SYN_UNMARKED, 1);
    c->flags = CONN_CLIENT_KNOWN | (client_lo ? CONN_CLIENT_LO : 0) |
               (client_egress ? CONN_CLIENT_EGRESS : 0);
    c->gen++;
    c->cut = 0;
    c->status = 0;
    c->events = 0;
    c->packets = 0;
    c->bytes = 0;
    c->first_ns = 0;
    c->last_ns = now;
    __builtin_memset(&c->hpack, 0, sizeof(c->hpack));
}

/* The client side of a connection whose start went unseen, from a request it sent. */
static __always_inline void conn_learn_client(struct conn *c, int sender_lo, __u32 direction)
{
    c->flags |= CONN_CLIENT_KNOWN | (sender_lo ? CONN_CLIENT_LO : 0) |
                (direction == DIR_EGRESS ? CONN_CLIENT_EGRESS : 0);
    count(C_SIDE_FROM_REQUEST, 1);
}

/* What a status in this packet does (enum status_mode). On a monitored lo every packet is
 * seen at egress, both sides', so only the side tells. */
static __always_inline int conn_status_mode(const struct conn *c, int sender_lo,
                                            __u32 direction, int on_lo, int seen_before)
{
    if (!c || !(c->flags & CONN_CLIENT_KNOWN))
        return STATUS_UNKNOWN_SIDE;
    int client_lo = !!(c->flags & CONN_CLIENT_LO);
    int client_egress = !!(c->flags & CONN_CLIENT_EGRESS);
    if (sender_lo == client_lo || (!on_lo && (direction == DIR_EGRESS) == client_egress))
        return STATUS_FROM_CLIENT;
    return seen_before ? STATUS_SILENT : STATUS_COUNTS;
}

/* Whether the connection is marked, unmarking it (C_FLOWS_EXPIRED) when it has been idle
 * longer than the idle timeout. */
static __always_inline int conn_marked(struct conn *c, const struct mirror_config *cfg,
                                       __u64 now)
{
    if (!c || !(c->flags & CONN_MARKED))
        return 0;
    if (cfg && cfg->idle_ns && now - c->last_ns > cfg->idle_ns) {
        c->flags &= ~CONN_MARKED;
        count(C_FLOWS_EXPIRED, 1);
        return 0;
    }
    return 1;
}

/* Marks the connection with a trigger status; returns whether it was not marked before. */
static __always_inline int conn_mark(struct conn *c, __u32 status, __u64 now)
{
    if (c->flags & CONN_MARKED) {
        c->status = status;
        return 0;
    }
    c->flags |= CONN_MARKED;
    c->status = status;
    c->first_ns = now;
    c->packets = 0;
    c->bytes = 0;
    c->cut = 0;
    count(C_FLOWS_MARKED, 1);
    /* After the mark: see enum marks_index for why the order matters. */
    __u32 made = MARKS_MADE;
    __u64 *n = marks.lookup(&made);
    if (n)
        __sync_fetch_and_add(n, 1);
    return 1;
}

/* --- budgets and the clone -------------------------------------------------------------- */

/* Takes one from this CPU's window `w` of `limit` per `window_ns`; 0 when they are spent.
 * The window restarts at the first use at least window_ns after its start. The difference
 * is unsigned: a start ahead of the clock (tests write one) reads as past, unless it is
 * ahead by more than 2^64 minus the window. */
static __always_inline int take_token(struct rate_window *w, __u64 limit, __u64 window_ns)
{
    if (!w)
        return 1;
    __u64 now = bpf_ktime_get_coarse_ns();
    if (now - w->start_ns >= window_ns) {
        w->start_ns = now;
        w->count = 0;
    }
    if (w->count >= limit)
        return 0;
    w->count++;
    return 1;
}

/* The budgets (struct mirror_config): the enum cut_reason that skips this clone, 0 to
 * clone. `c` is the marked connection with this packet already counted. A skip is counted
 * by reason and flagged on the connection. */
static __always_inline __u32 over_budget(const struct mirror_config *cfg, struct conn *c)
{
    __u32 why = 0, zero = 0;
    if (cfg->max_packets_per_flow && c->packets > cfg->max_packets_per_flow) {
        why = CUT_FLOW_PACKETS;
        count(C_SKIP_FLOW_PACKETS, 1);
    } else if (cfg->max_bytes_per_flow && c->bytes > cfg->max_bytes_per_flow) {
        why = CUT_FLOW_BYTES;
        count(C_SKIP_FLOW_BYTES, 1);
    } else if (cfg->max_clones_per_window &&
               !take_token(clone_rate.lookup(&zero), cfg->max_clones_per_window,
                           cfg->rate_window_ns)) {
        why = CUT_CPU_RATE;
        count(C_SKIP_CPU_RATE, 1);
    }
    if (why)
        c->cut |= why;
    return why;
}

/* Counts the packet against its marked connection's budgets and clones it to the debug
 * interface. `st`: the interface's stats when the caller looked them up already. */
static __always_inline void mirror_packet(struct __sk_buff *skb, const struct mirror_config *cfg,
                                          struct conn *c, struct iface_stats *st,
                                          __u32 direction)
{
    __u32 len = skb->len;
    __sync_fetch_and_add(&c->packets, 1);
    __sync_fetch_and_add(&c->bytes, len);
    if (!cfg->debug_ifindex || cfg->debug_ifindex == skb->ifindex) {
        count(C_NO_DEBUG_IF, 1);
        return;
    }
    /* Budgets: the cost of an error storm is bounded (per connection, per CPU). */
    if (over_budget(cfg, c))
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

/* --- the request, the error, the event -------------------------------------------------- */

/* Takes a requests entry for writing (keep_request's sequence lock, below): its seq,
 * even, in *seq, or 0 when another CPU holds it (its seq odd, or the swap lost). */
static __always_inline int request_lock(struct kept_request *r, __u64 *seq)
{
    __u64 s = *(volatile __u64 *)&r->seq;
    if ((s & 1) || __sync_val_compare_and_swap(&r->seq, s, s + 1) != s)
        return 0;
    *seq = s;
    return 1;
}

/* Leaves an entry taken with request_lock() at `seq`: even again, one write later. */
static __always_inline void request_unlock(struct kept_request *r, __u64 seq)
{
    __atomic_exchange_n(&r->seq, seq + 2, __ATOMIC_SEQ_CST);
}

/* Keeps the first bytes of a request frame (the whole frame from its Ethernet header, up
 * to config.request_bytes) for the connection in `slot`, replacing what its requests
 * entry held. Only a client's request starts pay this: a copy, the clock and two atomic
 * operations on a line this CPU mostly holds already.
 *
 * A requests entry is shared by four connection slots (slot modulo REQUEST_SLOTS: four
 * buckets apart), and read by an error's event on whatever CPU its response passes; so
 * it is written under a sequence lock. The writer takes the entry by moving seq from even
 * to odd with a compare-and-swap (one writer at a time: a second finds it odd, or loses
 * the swap, and keeps nothing), writes, and makes seq even again with an exchange. Both
 * are BPF atomics that return a value, fully ordered as the kernel's value-returning
 * atomics are (x86 lock cmpxchg and xchg; arm64 with LSE casal and swpal), so the writes
 * fall between them on any CPU. A reader (request_read_begin/_end) trusts
 * what it read only when seq was even and the same before and after. The entry's tag
 * (slot, gen) alone says whose request it holds. A request not kept leaves the connection
 * none: its entry untagged (the copy failed) or its gen moved on (the entry was busy),
 * so its next error is reported without a request, never with the one before. */
static __always_inline void keep_request(struct __sk_buff *skb, const struct mirror_config *cfg,
                                         struct conn *c, __u32 slot, __u32 direction)
{
    __u32 ri = slot & (REQUEST_SLOTS - 1);
    struct kept_request *r = requests.lookup(&ri);
    if (!r)
        return;
    __u64 len = skb->len;
    if (len > cfg->request_bytes)
        len = cfg->request_bytes;
    if (len > REQUEST_BYTES)
        len = REQUEST_BYTES;
    if (len == 0)
        return;
    __u64 seq = 0;
    if (!request_lock(r, &seq)) {
        /* A new gen unties the entry from the connection, whatever it holds when the
         * other writer is done (an atomic add: the connection's other CPU may touch it). */
        __sync_fetch_and_add(&c->gen, 1);
        count(C_REQUEST_BUSY, 1);
        return;
    }
    int kept = bpf_skb_load_bytes(skb, 0, r->data, len) == 0;
    if (kept) {
        r->request_ns = bpf_ktime_get_ns();
        r->frame_len = skb->len;
        r->len = len;
        r->direction = direction;
        r->slot = slot;
        r->gen = c->gen;
    } else {
        /* The helper zeroed the bytes it was to fill: whichever connection the entry held
         * has lost its request. */
        r->request_ns = 0;
        r->slot = REQUEST_NO_SLOT;
    }
    request_unlock(r, seq);
    if (kept)
        count(C_REQUESTS, 1);
}

/* Starts reading the request kept for the connection in `slot` (keep_request's sequence
 * lock): the entry, its seq in *seq, or 0 when there is none to read (none kept, taken by
 * another connection's since, or being written this instant). The fetch-and-add of 0 is
 * the read of seq: an atomic that returns a value, fully ordered, so the entry's reads
 * that follow come after it on any CPU. */
static __always_inline struct kept_request *request_read_begin(const struct conn *c,
                                                               __u32 slot, __u64 *seq)
{
    __u32 ri = slot & (REQUEST_SLOTS - 1);
    struct kept_request *r = requests.lookup(&ri);
    if (!r)
        return 0;
    __u64 s = __sync_fetch_and_add(&r->seq, 0);
    if ((s & 1) || r->slot != slot || r->gen != c->gen)
        return 0;
    *seq = s;
    return r;
}

/* Whether what was read of `r` since request_read_begin() returned `seq` is whole and
 * still the connection's: no writer took the entry meanwhile. */
static __always_inline int request_read_end(struct kept_request *r, __u64 seq)
{
    return __sync_fetch_and_add(&r->seq, 0) == seq;
}

/* Counts an error response by (interface, status, protocol): exact whatever the events'
 * bounds drop. */
static __always_inline void count_error(__u32 ifindex, __u32 status, __u8 proto)
{
    struct error_count_key k = {.ifindex = ifindex, .status = status, .proto = proto};
    __u64 *n = errors.lookup(&k);
    if (n) {
        *n += 1;
    } else {
        __u64 one = 1;
        if (errors.update(&k, &one))
            count(C_ERRORS_UNCOUNTED, 1);
    }
    count(C_ERRORS, 1);
}

/* Counts the time from a request (read whole: request_read_end) to its error response in
 * the response-time buckets; nothing when no request was. */
static __always_inline void count_response_time(__u64 request_ns, __u64 now_ns)
{
    if (!request_ns || now_ns < request_ns)
        return;
    __u64 took = now_ns - request_ns;
    const __u64 bounds[RESPONSE_BUCKETS] = RESPONSE_BOUNDS_NS;
    __u32 b = RESPONSE_BUCKETS;
#pragma unroll
    for (int i = RESPONSE_BUCKETS - 1; i >= 0; i--) {
        if (took <= bounds[i])
            b = i;
    }
    __u64 *slot = response_time.lookup(&b);
    if (slot)
        *slot += 1;
    __u32 sum = RESPONSE_BUCKETS + 1;
    slot = response_time.lookup(&sum);
    if (slot)
        *slot += took;
}

/* Copies n bytes of a kept request, n a constant. clang's BPF backend expands a
 * __builtin_memcpy inline up to 1024 bytes only; beyond, it emits a call to memcpy, which
 * BPF has not, and bcc's compile ends the process ("A call to built-in function 'memcpy'
 * is not supported"): --request-bytes above 1024 did exactly that until the copy was cut
 * in chunks. */
#define COPY_CHUNK 1024
static __always_inline void copy_request(__u8 *dst, const __u8 *src, const __u32 n)
{
#pragma unroll
    for (__u32 off = 0; off + COPY_CHUNK <= n; off += COPY_CHUNK)
        __builtin_memcpy(dst + off, src + off, COPY_CHUNK);
    if (n % COPY_CHUNK)
        __builtin_memcpy(dst + n - n % COPY_CHUNK, src + n - n % COPY_CHUNK, n % COPY_CHUNK);
}

/* An error event reserved in the ring with room for n bytes of the kept request `r`,
 * copied in; 0 when the ring is full. n is a constant once inlined, as the verifier
 * needs for the reservation and the copy. A function, not a macro: bcc refuses a map
 * call inside a macro's expansion ("cannot use map function inside a macro"). */
#define EVENT_HEAD_BYTES __builtin_offsetof(struct error_event, data)
static __always_inline struct error_event *reserve_with_request(const struct kept_request *r,
                                                                const __u32 n)
{
    struct error_event *ev = events.ringbuf_reserve(EVENT_HEAD_BYTES + n);
    if (ev)
        copy_request(ev->data, r->data, n);
    return ev;
}

/* Reserves an error event in the ring, written in place (one copy of the request, not
 * two), with the kept request `r` copied in, or its head alone without one; 0 when the
 * ring is full. The request travels in the smallest of a few constant steps that holds
 * its `len` bytes rather than in the whole REQUEST_BYTES: an error event whose request is
 * 200 bytes copies 256, not 512 (the event was the one piece of the decision path the
 * ablation of 2026-12-04 showed; the smaller copy itself did not show in traffic, section
 * "Partial runs of 2026-12-04 17:00 UTC" of docs/bench.md). `len` is r->len read once by
 * the caller, which reports it as request_len: the entry may take another request
 * meanwhile, and the event never claims more bytes than it holds. The bytes between
 * `len` and the step are whatever that requests entry held before; user space reads
 * request_len bytes only. One #if per step, not an unrolled loop over a table of steps:
 * clang does not fold the table's sizes into constants before it lowers the copy, and
 * emits a call to memcpy again. */
static __always_inline struct error_event *reserve_event(const struct kept_request *r,
                                                         __u32 len)
{
    if (!r)
        return events.ringbuf_reserve(EVENT_HEAD_BYTES);
#if REQUEST_BYTES > 128
    if (len <= 128)
        return reserve_with_request(r, 128);
#endif
#if REQUEST_BYTES > 256
    if (len <= 256)
        return reserve_with_request(r, 256);
#endif
#if REQUEST_BYTES > 384
    if (len <= 384)
        return reserve_with_request(r, 384);
#endif
#if REQUEST_BYTES > 512
    if (len <= 512)
        return reserve_with_request(r, 512);
#endif
#if REQUEST_BYTES > 1024
    if (len <= 1024)
        return reserve_with_request(r, 1024);
#endif
#if REQUEST_BYTES > 2048
    if (len <= 2048)
        return reserve_with_request(r, 2048);
#endif
    return reserve_with_request(r, REQUEST_BYTES);
}

/* Hands an error event to user space: the response's facts and the request kept for it,
 * within the bounds (max_events_per_conn, max_events_per_window per CPU). Never waits: a
 * full ring buffer loses the event, counted. `r` and `seq` come from request_read_begin();
 * returns the request's time when what was read of it proved whole and the connection's
 * (request_read_end), else 0: an event whose request changed while it was copied goes
 * without one (C_REQUEST_CHANGED), its record reserved afresh without the bytes copied
 * (the discarded record's stay in the ring's memory until overwritten; user space never
 * reads them). */
static __always_inline __u64 report_error(struct __sk_buff *skb, const struct mirror_config *cfg,
                                          struct conn *c, struct kept_request *r, __u64 seq,
                                          __u32 status, __u32 direction, __u8 new_flow,
                                          __u8 proto, __u64 now_ns)
{
    __u32 zero = 0;
    __u64 request_ns = 0;
    __u32 request_len = 0, request_frame_len = 0, request_direction = 0;
    if (r) {
        request_ns = r->request_ns;
        request_frame_len = r->frame_len;
        request_direction = r->direction;
        /* once: the step and request_len must agree (see reserve_event) */
        request_len = *(volatile __u32 *)&r->len;
        if (request_len > REQUEST_BYTES)
            request_len = REQUEST_BYTES;
    }
    if (cfg->max_events_per_conn && c->events >= cfg->max_events_per_conn) {
        count(C_EVENTS_CONN_LIMITED, 1);
        return r && request_read_end(r, seq) ? request_ns : 0;
    }
    if (cfg->max_events_per_window &&
        !take_token(event_rate.lookup(&zero), cfg->max_events_per_window, cfg->rate_window_ns)) {
        count(C_EVENTS_RATE_LIMITED, 1);
        return r && request_read_end(r, seq) ? request_ns : 0;
    }
    __sync_fetch_and_add(&c->events, 1);
    struct error_event *ev = reserve_event(r, request_len);
    int whole = !r || request_read_end(r, seq);
    if (ev && !whole) {
        events.ringbuf_discard(ev, BPF_RB_NO_WAKEUP);
        ev = reserve_event(0, 0);
    }
    if (!whole) {
        count(C_REQUEST_CHANGED, 1);
        r = 0;
        request_ns = 0;
    }
    if (!ev) {
        count(C_EVENTS_LOST, 1);    /* the ring is full: never wait for the reader */
        return request_ns;
    }
    ev->response_ns = now_ns;
    __builtin_memcpy(&ev->key, &c->key.flow, sizeof(ev->key));
    ev->ifindex = skb->ifindex;
    ev->status = status;
    ev->direction = direction;
    ev->proto = proto;
    ev->new_flow = new_flow;
    ev->server_is_lo = !(c->flags & CONN_CLIENT_LO);
    ev->cut = c->cut;
    ev->request_ns = 0;
    ev->request_direction = 0;
    ev->request_frame_len = 0;
    ev->request_len = 0;
    ev->pad = 0;
    if (r) {
        ev->request_ns = request_ns;
        ev->request_direction = request_direction;
        ev->request_frame_len = request_frame_len;
        ev->request_len = request_len;
    }
    /* Wake the reader for the first event after a quiet spell, then at most once per
     * EVENT_WAKEUP_NS on this CPU: in an error storm a wakeup per event (a context switch
     * for every error response) cost more than everything else the mirror does. Events
     * written without one wait for the reader's next poll (it also reads on a timer). */
    __u64 flags = BPF_RB_NO_WAKEUP;
    __u64 *woke = event_wakeup.lookup(&zero);
    if (woke && now_ns - *woke >= EVENT_WAKEUP_NS) {
        *woke = now_ns;
        flags = BPF_RB_FORCE_WAKEUP;
    }
    events.ringbuf_submit(ev, flags);
    count(C_EVENTS, 1);
    return request_ns;
}

/* A counted trigger status (`mode` STATUS_COUNTS) or one seen before (STATUS_SILENT):
 * marks the connection, mirrors the packet and, when counted here, counts the error and
 * reports it. */
static __always_inline void on_trigger(struct __sk_buff *skb, const struct mirror_config *cfg,
                                       struct conn *c, __u32 slot, struct iface_stats *st,
                                       __u32 status, __u32 direction, __u8 proto, int mode,
                                       __u64 now)
{
    int new_flow = conn_mark(c, status, now);
    if (mode != STATUS_COUNTS) {
        __sync_fetch_and_add(&c->packets, 1);   /* its clone was made where it entered */
        __sync_fetch_and_add(&c->bytes, skb->len);
        return;
    }
    mirror_packet(skb, cfg, c, st, direction);
    /* After the clone: the request frame user space writes for this event follows the
     * response on the debug interface, never precedes it. */
    __u64 seq = 0;
    struct kept_request *r = request_read_begin(c, slot, &seq);
    if (!r)
        count(C_RESP_NO_REQUEST, 1);
    __u64 now_ns = bpf_ktime_get_ns();
    /* Before the event: a reader that has its event finds the error counted. */
    count_error(skb->ifindex, status, proto);
    __u64 request_ns = report_error(skb, cfg, c, r, seq, status, direction, new_flow, proto,
                                    now_ns);
    /* After it: the response time counts only a request read whole. */
    count_response_time(request_ns, now_ns);
}

/* Forgets the request kept for the connection in `slot`, bytes and all, when its entry
 * still holds it: a SYN on its 4-tuple starts another connection, and the old one's
 * request (a token in its target, an Authorization header) should not outlive it in the
 * kernel, where no event can reach it any more (the new generation sees to that). Taken
 * as keep_request() takes the entry; when another CPU holds it at that instant, the bytes
 * stay until a later request overwrites them. Only a SYN of a state whose request the
 * entry still holds pays more than a look at the entry's tag. */
#define ZERO_CHUNK 512      /* clang expands a __builtin_memset inline up to here (as for
                             * COPY_CHUNK: beyond, a call to memset that BPF has not) */
static __always_inline void request_forget(const struct conn *c, __u32 slot)
{
    __u32 ri = slot & (REQUEST_SLOTS - 1);
    struct kept_request *r = requests.lookup(&ri);
    if (!r || r->slot != slot || r->gen != c->gen)
        return;     /* not its request: most SYNs end here, without the lock */
    __u64 seq = 0;
    if (!request_lock(r, &seq))
        return;
    if (r->slot == slot && r->gen == c->gen) {
#pragma unroll
        for (__u32 off = 0; off + ZERO_CHUNK <= REQUEST_BYTES; off += ZERO_CHUNK) {
            __builtin_memset(r->data + off, 0, ZERO_CHUNK);
            asm volatile("" ::: "memory");  /* or clang merges the chunks into one memset */
        }
        if (REQUEST_BYTES % ZERO_CHUNK)
            __builtin_memset(r->data + REQUEST_BYTES - REQUEST_BYTES % ZERO_CHUNK, 0,
                             REQUEST_BYTES % ZERO_CHUNK);
        r->request_ns = 0;
        r->len = 0;
        r->frame_len = 0;
        r->slot = REQUEST_NO_SLOT;
    }
    request_unlock(r, seq);
}

/* --- the server's HPACK state ------------------------------------------------------------ */

/* Whether the server's segment at `seq` (of `len` payload bytes) is in step with the
 * connection's followed HPACK state: it starts at the frame header after the last one
 * walked. A segment wholly before that point holds nothing new (a retransmission, or the
 * inside of a frame that spans segments) and leaves the state as it is; any other loses
 * it (counted once), as does a connection whose SYN-ACK went unseen. */
static __always_inline int hpack_in_step(struct conn *c, __u32 seq, __u32 len)
{
    if (c->hpack.state == HPACK_NONE) {
        c->hpack.state = HPACK_LOST;
        count(C_HPACK_START_UNSEEN, 1);
        return 0;
    }
    if (c->hpack.state != HPACK_FOLLOWING)
        return 0;
    __s32 ahead = (__s32)(seq - c->hpack.next_seq);
    if (ahead == 0)
        return 1;
    if (ahead < 0 && (__s64)ahead + len <= 0)
        return 0;
    c->hpack.state = HPACK_LOST;
    count(C_HPACK_GAP, 1);
    return 0;
}

/* A SYN-ACK: the server's first data byte comes next. Only a state that has not started
 * following: a retransmitted SYN-ACK changes nothing. */
static __always_inline void hpack_start(struct conn *c, __u32 syn_ack_seq)
{
    if (c->hpack.state != HPACK_NONE)
        return;
    c->hpack.state = HPACK_FOLLOWING;
    c->hpack.next_seq = syn_ack_seq + 1;
}

/* --- the decisions ---------------------------------------------------------------------- */

/* The HTTP/2 path of a segment whose first bytes are a plausible frame header: reads the
 * statuses in the mode `pending` says (bpf/http2.h), then marks, mirrors and reports on a
 * trigger status (HTTP/2 requests are not kept: their header blocks are HPACK-compressed
 * against the connection's state). Its own program, tail-called by classify() with what it
 * needs in `pending`; the connection is found again by its slot. */
int mirror_h2(struct __sk_buff *skb)
{
    __u32 zero = 0;
    struct pending *p = pending.lookup(&zero);
    struct mirror_config *cfg = config.lookup(&zero);
    struct h2_walk_state *w = h2_walk_states.lookup(&zero);
    if (!p || !cfg || !w)
        return PASS;
    __u32 direction = p->direction & 1;
    __u32 slot = p->slot;
    struct conn *c = 0;
    if (p->has_conn) {
        c = conns.lookup(&slot);
        if (c && c->gen != p->gen)
            c = 0;      /* taken by another connection meanwhile (or, on a connection
                         * that also carries HTTP/1.x requests, an h2c upgrade, one of
                         * them found its requests entry busy: the segment is then
                         * judged without its connection, and its HPACK state is lost) */
    }
    w->n = 0;
    w->lost = 0;
    w->armed_h2 = -1;
    w->armed_grpc = -1;
    w->track = c && (p->mode == STATUS_COUNTS || p->mode == STATUS_SILENT) &&
               hpack_in_step(c, p->seq, p->payload_end - p->payload_off);
    int status = h2_trigger_status(skb, p->payload_off, p->payload_end, direction, w, c);
    p = pending.lookup(&zero);
    if (!p)
        return PASS;
    if (c && w->track) {
        if (w->lost) {
            c->hpack.state = HPACK_LOST;
            count(C_HPACK_BOUNDS, 1);
        } else {
            c->hpack.next_seq = p->seq + (w->next_off - p->payload_off);
        }
    }
    __u64 now = bpf_ktime_get_coarse_ns();
    if (p->saw_request && p->mode == STATUS_UNKNOWN_SIDE) {
        /* A request's header block: its sender is the client (a connection whose start
         * and preface went unseen). */
        if (!c)
            c = conn_find(&p->key, cfg->hash_seed, 1, now, &slot);
        if (c && !(c->flags & CONN_CLIENT_KNOWN))
            conn_learn_client(c, p->src_is_lo, direction);
        return PASS;
    }
    if (!c)
        return PASS;
    int marked = conn_marked(c, cfg, now);
    touch(c, now);
    if (status >= 0)
        on_trigger(skb, cfg, c, slot, 0, status, direction,
                   status < MIN_HTTP_STATUS ? PROTO_GRPC : PROTO_HTTP2, p->mode, now);
    else if (marked && !p->seen_before)
        mirror_packet(skb, cfg, c, 0, direction);
    return PASS;
}

static __always_inline int classify(struct __sk_buff *skb, __u32 direction)
{
    struct tcp_segment seg = {};
    __u32 zero = 0;

    count(C_PACKETS, 1);
    /* Read once: clang would otherwise keep a pointer into the context for later reads,
     * which the verifier refuses. */
    __u32 ifindex = skb->ifindex;
    asm volatile("" : "+r"(ifindex));
    /* On a monitored lo every packet passes egress, then ingress: it is handled once. */
    int on_lo = 0;
    if (ifindex == LOOPBACK_IFINDEX) {
        __u32 lo = LOOPBACK_IFINDEX;
        on_lo = monitored.lookup(&lo) != 0;
        if (on_lo && direction == DIR_INGRESS) {
            count(C_LO_SECOND_PASS, 1);
            return PASS;
        }
    }
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

    /* A packet forwarded from one monitored interface out of another (container to
     * container through a bridge, or routed between two host-side veths) was counted,
     * cloned and reported at the ingress hook of the first: here it only keeps this
     * interface's connection state. Locally sent packets have ingress_ifindex 0. */
    int seen_before = 0;
    __u32 in_ifindex = skb->ingress_ifindex;
    asm volatile("" : "+r"(in_ifindex));
    if (direction == DIR_EGRESS && in_ifindex && monitored.lookup(&in_ifindex)) {
        seen_before = 1;
        count(C_SEEN_BEFORE, 1);
    }

    /* One load of the payload's first bytes answers it all: an HTTP/1.x status line, a
     * request start (or the HTTP/2 preface), or (only when neither) a plausible HTTP/2
     * frame header. HTTP/1.x and bulk data pay the compares of h2_header_ok and nothing
     * more: bulk data passes them about 4 times in 100,000. */
    char head[STATUS_LINE_LEN];
    int code = -1, request = 0, preface = 0, try_h2 = 0;
    __u32 payload_len = seg.payload_end - seg.payload_off;
    /* A bare ACK tells the state nothing: it looks it up only while a connection may be
     * marked (enum marks_index), and before the join below, which it need not pay. */
    if (payload_len == 0 && !seg.syn && !maybe_marked())
        return PASS;
    if (payload_len >= STATUS_LINE_LEN) {
        if (http1_load(skb, seg.payload_off, head) == 0) {
            code = http1_status(head);
            if (code < 0) {
                request = http1_request_start(head);
                preface = !request && http2_preface(head);
                try_h2 = !request && !preface;
            }
        }
    } else if (payload_len >= H2_MIN_SEGMENT) {
        try_h2 = bpf_skb_load_bytes(skb, seg.payload_off, head, H2_FRAME_HEADER_LEN) == 0;
    }
    try_h2 = MIRROR_HTTP2 && try_h2 && h2_header_ok((const unsigned char *)head);
    /* Where the header block starts when the first frame is HEADERS with a block (0
     * otherwise): a client's own block is looked at for a :status (below). */
    __u32 headers_block = 0;
    if (try_h2 && head[3] == H2_HEADERS) {
        __u32 frame_len = ((__u32)(__u8)head[0] << 16) | ((__u32)(__u8)head[1] << 8) |
                          (__u8)head[2];
        __u32 off = h2_headers_block_off(head[4]);
        if (frame_len > off - H2_FRAME_HEADER_LEN)
            headers_block = off;
    }

    /* From here on the packet's facts and its status code are one word, through opaque():
     * the paths that computed them join in one verifier state before the connection's
     * lookup, whose branches would otherwise multiply with theirs. code + 1 fits 10 bits
     * (-1 for none, else at most 999). */
    __u32 facts = opaque(seg.syn | seg.ack << 1 | request << 2 | preface << 3 | try_h2 << 4 |
                         seen_before << 5 | on_lo << 6 | seg.src_is_lo << 7 |
                         (__u32)(code + 1) << 8 | (__u32)(payload_len == 0) << 18 |
                         headers_block << 19);
    int syn = facts & 1, ack = facts >> 1 & 1;
    request = facts >> 2 & 1;
    preface = facts >> 3 & 1;
    try_h2 = facts >> 4 & 1;
    seen_before = facts >> 5 & 1;
    on_lo = facts >> 6 & 1;
    code = (int)(facts >> 8 & 0x3ff) - 1;

    /* The hot path: the packets that tell a connection's state something look it up;
     * the others only to learn whether it is marked, and not at all while no connection
     * is (enum marks_index). A payload-less one got here only because one may be. */
    int empty = facts >> 18 & 1;
    if (!syn && code < 0 && !request && !preface && !try_h2 && !empty && !maybe_marked())
        return PASS;

    struct mirror_config *cfg = config.lookup(&zero);
    if (!cfg)
        return PASS;
    struct conn_key ck = {};
    __builtin_memcpy(&ck.flow, &seg.key, sizeof(ck.flow));
    ck.ifindex = ifindex;
    __u64 now = bpf_ktime_get_coarse_ns();
    __u32 slot = 0;
    int sender_lo = facts >> 7 & 1;
    /* Only a SYN starts a state or restarts one, never a SYN-ACK: a SYN-ACK names as the
     * client the host it is sent to, so a client that sends one of its own (a raw socket,
     * or a spoofed segment) would make itself the server of its connection and its next
     * bytes a status that counts. A connection whose SYN went unseen learns its sides from
     * its next request instead. */
    struct conn *c = conn_find(&ck, cfg->hash_seed, (syn && !ack) || request || preface, now,
                               &slot);

    if (syn && !ack && c) {
        /* A new connection (perhaps on the 4-tuple of an old one): the SYN's sender is the
         * client, and its direction on this interface is the client's. */
        request_forget(c, slot);
        conn_restart(c, sender_lo, direction == DIR_EGRESS, now);
    }
    int mode = conn_status_mode(c, sender_lo, direction, on_lo, seen_before);
    /* A SYN-ACK is believed as a status is: only from the server side of a connection
     * whose client is known. It says where the server's data starts. */
    if (syn && ack && c && (mode == STATUS_COUNTS || mode == STATUS_SILENT))
        hpack_start(c, seg.seq);
    if ((request || preface) && c) {
        if (!(c->flags & CONN_CLIENT_KNOWN)) {
            conn_learn_client(c, sender_lo, direction);
            mode = STATUS_FROM_CLIENT;
        }
        if (request && mode == STATUS_FROM_CLIENT && cfg->request_bytes)
            keep_request(skb, cfg, c, slot, direction);
    }
    /* A packet that tells the state something, or of a marked connection, touches it:
     * the slot a new connection takes is the bucket's least recently touched one, and
     * idle expiry counts from here. (Not every packet that looks up: whether the others
     * do depends on the marks pre-filter, which says nothing about this connection.) */
    int marked = conn_marked(c, cfg, now);
    if (c && (marked || syn || code >= 0 || request || preface || try_h2))
        touch(c, now);

    if (try_h2) {
        if (mode == STATUS_FROM_CLIENT) {
            /* The client's frames: requests, never statuses, and not walked. A HEADERS
             * frame whose block starts with :status (a client posing as a server) counts
             * apart, as a client's status line does. */
            __u32 block_off = facts >> 19 & 0xf;
            __u8 first = 0;
            if (block_off && block_off < payload_len &&
                bpf_skb_load_bytes(skb, seg.payload_off + block_off, &first, 1) == 0 &&
                h2_first_byte_is_status(first))
                count(C_STATUS_FROM_CLIENT, 1);
            if (marked && !seen_before)
                mirror_packet(skb, cfg, c, 0, direction);
            return PASS;
        }
        struct pending *p = pending.lookup(&zero);
        if (p) {
            __builtin_memcpy(&p->key, &ck, sizeof(ck));
            p->has_conn = c != 0;
            p->slot = slot;
            p->gen = c ? c->gen : 0;
            p->src_is_lo = sender_lo;
            p->mode = mode;
            p->saw_request = 0;
            p->seen_before = seen_before;
            p->payload_off = seg.payload_off;
            p->payload_end = seg.payload_end;
            p->direction = direction;
            p->seq = seg.seq;
            h2_walk.call(skb, 0);
        }
        /* Only when the tail call did not happen (no walk loaded: MIRROR_HTTP2 0). */
        if (marked && !seen_before)
            mirror_packet(skb, cfg, c, 0, direction);
        return PASS;
    }

    if (code >= 0 && mode != STATUS_COUNTS && mode != STATUS_SILENT) {
        status_counts(mode);    /* counted apart, and nothing more */
        code = -1;
    }
    if (code < 0) {
        if (marked && !seen_before)
            mirror_packet(skb, cfg, c, 0, direction);
        return PASS;
    }

    __u32 status = code;
    struct iface_stats *st = 0;
    if (mode == STATUS_COUNTS) {
        count(C_RESPONSES, 1);
        __u32 cls = (status >= 100 && status < 600) ? status / 100 - 1 : 5;
        count(C_RESP_1XX + cls, 1);
        st = stats_of(ifindex, direction);
        /* Keep the bound check: clang proves cls < 6 and drops it, the verifier cannot. */
        asm volatile("" : "+r"(cls));
        if (st && cls < 6)
            st->responses[cls]++;
    }
    if (status >= MIN_HTTP_STATUS && is_trigger(status))
        on_trigger(skb, cfg, c, slot, st, status, direction, PROTO_HTTP1, mode, now);
    else if (marked && !seen_before)
        mirror_packet(skb, cfg, c, st, direction);
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
