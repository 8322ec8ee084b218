/* What a per-connection state costs the classifier, by kind of map (bench/statecost.py).
 *
 * Every program reads a connection key built from the frame's fixed fields and a
 * per-CPU sequence number (so that BPF_PROG_TEST_RUN's repetitions meet different
 * connections), and either looks up a connection that is there ("hit": the sequence
 * number modulo HOT keys, all inserted beforehand) or starts a new one ("new": a key
 * never seen, as at connection rate). The state is 64 bytes: what a packet of a
 * connection needs (which side is the client, the mark, budgets, times).
 *
 * Kinds:
 *   lru     BPF_MAP_TYPE_LRU_HASH, one for all CPUs
 *   lrupc   BPF_MAP_TYPE_LRU_PERCPU_HASH (each CPU its own value: a SYN seen on one CPU
 *           and the response on another do not meet, so it cannot hold the client side;
 *           measured for comparison)
 *   hash    BPF_MAP_TYPE_HASH, preallocated, one for all CPUs (no eviction: entries must
 *           be deleted by someone)
 *   way1    an array indexed by a seeded hash of the key, the key kept in the slot as its
 *           tag; a new connection takes its slot
 *   way4    the same with buckets of 4 slots: a lookup compares up to 4 tags, a new
 *           connection takes a free slot of its bucket or the one idle longest
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#ifndef SLOTS
#define SLOTS 65536             /* a power of two */
#endif
#ifndef HOT
#define HOT 1024
#endif
#define WAYS 4

struct conn_key {
    __u32 ifindex;
    __u32 addr_lo[4];
    __u32 addr_hi[4];
    __u16 port_lo;
    __u16 port_hi;
    __u8 family;
    __u8 pad[3];
};

struct conn_state {
    __u64 last_ns;
    __u64 words[7];
};

struct conn_slot {
    struct conn_key key;
    __u32 pad;
    struct conn_state state;
};

BPF_TABLE("lru_hash", struct conn_key, struct conn_state, lru, SLOTS);
BPF_TABLE("lru_percpu_hash", struct conn_key, struct conn_state, lrupc, SLOTS);
BPF_TABLE("hash", struct conn_key, struct conn_state, hash, SLOTS);
BPF_ARRAY(way1, struct conn_slot, SLOTS);
BPF_ARRAY(way4, struct conn_slot, SLOTS);
BPF_PERCPU_ARRAY(seq, __u64, 1);
BPF_PERCPU_ARRAY(scratch, struct conn_state, 1);
BPF_ARRAY(seed, __u32, 1);

static __always_inline __u64 next_seq(void)
{
    __u32 zero = 0;
    __u64 *s = seq.lookup(&zero);
    if (!s)
        return 0;
    return (*s)++;
}

/* A key as the classifier would build it: fixed addresses, ports from `n`. */
static __always_inline void make_key(struct conn_key *k, __u64 n)
{
    __builtin_memset(k, 0, sizeof(*k));
    k->ifindex = 7;
    k->addr_lo[0] = 0x0100a8c6;
    k->addr_hi[0] = 0x0200a8c6 + (__u32)(n >> 16);
    k->port_lo = 80;
    k->port_hi = (__u16)n;
    k->family = 4;
}

static __always_inline __u32 rotl(__u32 x, __u32 r)
{
    return (x << r) | (x >> (32 - r));
}

/* A seeded mix of the key's 11 words (murmur3's round and finalizer). */
static __always_inline __u32 key_hash(const struct conn_key *k)
{
    __u32 zero = 0;
    __u32 *sp = seed.lookup(&zero);
    __u32 h = sp ? *sp : 0;
    const __u32 *w = (const __u32 *)k;
#pragma unroll
    for (int i = 0; i < 11; i++) {
        __u32 x = w[i] * 0xcc9e2d51;
        x = rotl(x, 15) * 0x1b873593;
        h ^= x;
        h = rotl(h, 13) * 5 + 0xe6546b64;
    }
    h ^= h >> 16;
    h *= 0x85ebca6b;
    h ^= h >> 13;
    h *= 0xc2b2ae35;
    h ^= h >> 16;
    return h;
}

static __always_inline int key_eq(const struct conn_key *a, const struct conn_key *b)
{
    const __u64 *x = (const __u64 *)a, *y = (const __u64 *)b;
    const __u32 *x4 = (const __u32 *)a, *y4 = (const __u32 *)b;
    return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3] && x[4] == y[4] &&
           x4[10] == y4[10];
}

static __always_inline int touch(struct conn_state *s)
{
    if (!s)
        return 1;
    s->last_ns += 1;
    return 0;
}

/* --- hash maps ---------------------------------------------------------------------- */
/* (written out per map: bcc rewrites map calls only outside macros) */
int lru_fill(struct __sk_buff *skb)
{
    struct conn_key k;
    __u32 zero = 0;
    make_key(&k, next_seq() % HOT);
    struct conn_state *v = scratch.lookup(&zero);
    if (!v)
        return TC_ACT_SHOT;
    return lru.update(&k, v) ? TC_ACT_SHOT : TC_ACT_UNSPEC;
}

int lru_hit(struct __sk_buff *skb)
{
    struct conn_key k;
    make_key(&k, next_seq() % HOT);
    return touch(lru.lookup(&k)) ? TC_ACT_SHOT : TC_ACT_UNSPEC;
}

int lru_new(struct __sk_buff *skb)
{
    struct conn_key k;
    __u32 zero = 0;
    make_key(&k, HOT + next_seq());
    struct conn_state *v = scratch.lookup(&zero);
    if (!v)
        return TC_ACT_SHOT;
    return lru.update(&k, v) ? TC_ACT_SHOT : TC_ACT_UNSPEC;
}

int lrupc_fill(struct __sk_buff *skb)
{
    struct conn_key k;
    __u32 zero = 0;
    make_key(&k, next_seq() % HOT);
    struct conn_state *v = scratch.lookup(&zero);
    if (!v)
        return TC_ACT_SHOT;
    return lrupc.update(&k, v) ? TC_ACT_SHOT : TC_ACT_UNSPEC;
}

int lrupc_hit(struct __sk_buff *skb)
{
    struct conn_key k;
    make_key(&k, next_seq() % HOT);
    return touch(lrupc.lookup(&k)) ? TC_ACT_SHOT : TC_ACT_UNSPEC;
}

int lrupc_new(struct __sk_buff *skb)
{
    struct conn_key k;
    __u32 zero = 0;
    make_key(&k, HOT + next_seq());
    struct conn_state *v = scratch.lookup(&zero);
    if (!v)
        return TC_ACT_SHOT;
    return lrupc.update(&k, v) ? TC_ACT_SHOT : TC_ACT_UNSPEC;
}

int hash_fill(struct __sk_buff *skb)
{
    struct conn_key k;
    __u32 zero = 0;
    make_key(&k, next_seq() % HOT);
    struct conn_state *v = scratch.lookup(&zero);
    if (!v)
        return TC_ACT_SHOT;
    return hash.update(&k, v) ? TC_ACT_SHOT : TC_ACT_UNSPEC;
}

int hash_hit(struct __sk_buff *skb)
{
    struct conn_key k;
    make_key(&k, next_seq() % HOT);
    return touch(hash.lookup(&k)) ? TC_ACT_SHOT : TC_ACT_UNSPEC;
}

int hash_new(struct __sk_buff *skb)
{
    struct conn_key k;
    __u32 zero = 0;
    make_key(&k, HOT + next_seq());
    struct conn_state *v = scratch.lookup(&zero);
    if (!v)
        return TC_ACT_SHOT;
    return hash.update(&k, v) ? TC_ACT_SHOT : TC_ACT_UNSPEC;
}

/* --- hash-indexed arrays ------------------------------------------------------------ */
static __always_inline struct conn_slot *way1_find(const struct conn_key *k, int create)
{
    __u32 i = key_hash(k) & (SLOTS - 1);
    struct conn_slot *s = way1.lookup(&i);
    if (!s)
        return 0;
    if (key_eq(&s->key, k))
        return s;
    if (!create)
        return 0;
    __builtin_memcpy(&s->key, k, sizeof(*k));
    __builtin_memset(&s->state, 0, sizeof(s->state));
    return s;
}

static __always_inline struct conn_slot *way4_find(const struct conn_key *k, int create)
{
    __u32 base = key_hash(k) & (SLOTS - 1) & ~(WAYS - 1);
    struct conn_slot *victim = 0;
    __u64 oldest = ~0ULL;
#pragma unroll
    for (int w = 0; w < WAYS; w++) {
        __u32 i = base + w;
        struct conn_slot *s = way4.lookup(&i);
        if (!s)
            return 0;
        if (key_eq(&s->key, k))
            return s;
        if (s->state.last_ns < oldest) {
            oldest = s->state.last_ns;
            victim = s;
        }
    }
    if (!create || !victim)
        return 0;
    __builtin_memcpy(&victim->key, k, sizeof(*k));
    __builtin_memset(&victim->state, 0, sizeof(victim->state));
    return victim;
}

int way1_hit(struct __sk_buff *skb)
{
    struct conn_key k;
    make_key(&k, next_seq() % HOT);
    struct conn_slot *s = way1_find(&k, 0);
    return touch(s ? &s->state : 0) ? TC_ACT_SHOT : TC_ACT_UNSPEC;
}

int way1_fill(struct __sk_buff *skb)
{
    struct conn_key k;
    make_key(&k, next_seq() % HOT);
    return way1_find(&k, 1) ? TC_ACT_UNSPEC : TC_ACT_SHOT;
}

int way1_new(struct __sk_buff *skb)
{
    struct conn_key k;
    make_key(&k, HOT + next_seq());
    struct conn_slot *s = way1_find(&k, 1);
    return touch(s ? &s->state : 0) ? TC_ACT_SHOT : TC_ACT_UNSPEC;
}

int way4_hit(struct __sk_buff *skb)
{
    struct conn_key k;
    make_key(&k, next_seq() % HOT);
    struct conn_slot *s = way4_find(&k, 0);
    return touch(s ? &s->state : 0) ? TC_ACT_SHOT : TC_ACT_UNSPEC;
}

int way4_fill(struct __sk_buff *skb)
{
    struct conn_key k;
    make_key(&k, next_seq() % HOT);
    return way4_find(&k, 1) ? TC_ACT_UNSPEC : TC_ACT_SHOT;
}

int way4_new(struct __sk_buff *skb)
{
    struct conn_key k;
    make_key(&k, HOT + next_seq());
    struct conn_slot *s = way4_find(&k, 1);
    return touch(s ? &s->state : 0) ? TC_ACT_SHOT : TC_ACT_UNSPEC;
}

/* The floor: the key and the sequence number, no map. */
int base_only(struct __sk_buff *skb)
{
    struct conn_key k;
    make_key(&k, next_seq() % HOT);
    return k.port_hi == 0xffff && k.family == 9 ? TC_ACT_SHOT : TC_ACT_UNSPEC;
}
