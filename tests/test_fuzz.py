"""Differential tests: the classifier (bpf/mirror.c, through BPF_PROG_TEST_RUN on the real
kernel) against the reference model (tests/reference.py), frame by frame, through the
harness in tests/fuzz_harness.py (what is compared is described there).

test_fuzz generates MIRROR_FUZZ_FRAMES frames (default 100000) from a seeded random
generator (tests/fuzz_frames.py): seed from MIRROR_FUZZ_SEED, else random, printed, and
quoted in every failure. The same seed and frame count replay the same frames in the same
order.

    MIRROR_FUZZ_SEED=1234 .venv/bin/python -m pytest tests/test_fuzz.py::test_fuzz

The stream of a seed does not depend on the frame count, so MIRROR_FUZZ_FRAMES=N+1 with
the same seed stops right after frame #N.
"""
from __future__ import annotations

import ipaddress
import os
import random
import time
from collections import Counter

import pytest

import fastmaps
import frames as F
import reference as R
from frames import (TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, cut, dest_opts, eth, fragment,
                    hop_by_hop, ipv4, ipv6, tcp_options)
from fuzz_frames import (NEAR_MISSES, Generator, addresses_allowed, build, conversation,
                         random_conn, response)
from fuzz_harness import LO_IFINDEX, TRIGGER_5XX, Harness, report
from mirror.abi import COUNTERS, DIRECTIONS
from mirror.flowkey import FlowKey

BOGUS_IFINDEX = 999999
# The last tenth of every TRIGGER_CYCLE frames of the fuzz runs with this trigger set:
# codes outside 100-599 (0 and 14 are also gRPC codes), a 1xx, a 2xx.
TRIGGER_ODD = frozenset({0, 14, 100, 204, 404, 599, 600, 999})
TRIGGER_CYCLE = 10000
# A checkpoint compares the whole flow map and the per-interface statistics with the model
# and empties the map: after this many frames, or sooner when this many flows are marked
# (the session classifier holds 4096 and is an LRU: it must never evict one).
CHECKPOINT_FRAMES = 1000
CHECKPOINT_FLOWS = 200
# The second half of every SNAPSHOT_CYCLE frames runs with the request snapshot on (the
# first half with it off, as the crafted cases do). The snapshot map (a quarter of the
# flow map, 1024 entries here) is an LRU too: checkpoints empty it before it could evict.
SNAPSHOT_CYCLE = 10000
CHECKPOINT_REQUESTS = 200


# --- tests -----------------------------------------------------------------------------

@pytest.mark.unit
def test_generator_is_deterministic():
    """A seed gives the same frames, and a shorter run is a prefix of a longer one (so a
    failure at frame N replays with MIRROR_FUZZ_FRAMES=N+1)."""
    def frames_of(seed, total):
        return [x for x in Generator(seed, total) if x is not None]
    a = frames_of(42, 3000)
    assert len(a) == 3000
    assert a == frames_of(42, 3000)
    assert a[:1234] == frames_of(42, 1234)
    assert a != frames_of(43, 3000)


@pytest.mark.unit
def test_generated_addresses_allowed():
    frames = [x[0] for x in Generator(7, 20000) if x is not None]
    assert len(frames) == 20000
    assert all(addresses_allowed(f) for f in frames)


@pytest.mark.unit
def test_reference_reads_realistic_frames_like_dpkt():
    """On well-formed frames the reference sees what dpkt sees: the same flow key and
    the same status line."""
    dpkt = pytest.importorskip("dpkt")
    rng = random.Random(5)
    checked = 0
    for conn in [random_conn(rng) for _ in range(60)]:
        for spec, _ in conversation(rng, conn):
            frame = build(spec)[0]
            d = R.decide(frame, "egress", TRIGGER_5XX, set())
            e = dpkt.ethernet.Ethernet(frame)
            ip = e.data
            seg = ip.data
            if isinstance(ip, dpkt.ip6.IP6) and not isinstance(seg, dpkt.tcp.TCP):
                seg = dpkt.tcp.TCP(seg)  # dpkt leaves TCP behind a fragment header raw
            assert isinstance(seg, dpkt.tcp.TCP)
            fam = 4 if isinstance(ip, dpkt.ip.IP) else 6
            src = ipaddress.ip_address(ip.src)
            dst = ipaddress.ip_address(ip.dst)
            assert d.key == FlowKey.from_endpoints(str(src), seg.sport, str(dst), seg.dport)
            assert d.key.family == fam
            code = None
            if seg.data[:5] == b"HTTP/":
                # The status line and a header end: the body may be in later segments.
                head = seg.data.split(b"\r\n", 1)[0] + b"\r\n\r\n"
                code = int(dpkt.http.Response(head).status)
            assert d.status == code
            checked += 1
    assert checked > 500


@pytest.mark.testrun
def test_test_run_limits(clf):
    """The harness limits the reference models: frames this kernel's test run refuses."""
    h = Harness(clf)
    big = eth(b"\0" * (fastmaps.TEST_RUN_MAX_FRAME - 14), 0x1234)
    cases = [b"", b"\0" * 13, eth(b"", 0x1234), eth(b"\x45" + b"\0" * 18),
             eth(b"\x45" + b"\0" * 19), eth(b"\x60" + b"\0" * 38, F.ETH_P_IPV6),
             eth(b"\x60" + b"\0" * 39, F.ETH_P_IPV6),
             eth(b"\x45", vlans=[1]), big, big + b"\0"]
    for frame in cases:
        for d in DIRECTIONS:
            h.feed(frame, d)
    assert [h.feed(f, "egress").ran for f in cases] == [
        False, False, True, False, True, False, True, True, True, False]
    assert not h.disagreements, report(h)


# --- crafted edge cases ----------------------------------------------------------------

C4, S4, C6, S6 = "198.19.7.10", "198.18.0.80", "2001:db8:7::10", "2001:db8::80"
ERR500 = response(500)


def r4(payload=ERR500, **kw):
    return F.tcp4(S4, 80, C4, 40000, payload, **kw)


def r6(payload=ERR500, **kw):
    return F.tcp6(S6, 80, C6, 40000, payload, **kw)


def ack4(**kw):
    return F.tcp4(C4, 40000, S4, 80, **{"flags": TCP_ACK, **kw})


def ack6(**kw):
    return F.tcp6(C6, 40000, S6, 80, **{"flags": TCP_ACK, **kw})


def _crafted():
    """(id, [frames]): each list runs in order on both hooks, from empty maps."""
    c = []

    def add(name, *frames_):
        c.append(pytest.param(list(frames_), id=name))

    # Sequences: trigger, then the flow both ways; a non-trigger first.
    add("v4-trigger-then-flow", ack4(), r4(), ack4(), r4(response(200)), ack4(flags=TCP_FIN | TCP_ACK))
    add("v6-trigger-then-flow", ack6(), r6(), ack6(), r6(b"body"), ack6(flags=TCP_RST))
    add("v4-non-trigger-then-trigger", r4(response(404)), ack4(), r4(response(503)), ack4())
    add("vlan-trigger-then-untagged", r4(vlans=[7]), ack4(), ack4(vlans=[(F.ETH_P_8021AD, 9)]))
    add("v6-ext-trigger-then-plain",
        r6(ip={"ext": [hop_by_hop(), fragment(0, True)]}), ack6())
    add("trigger-in-first-ipv4-fragment", r4(ip={"mf": True}), r4(b"rest", ip={"frag_offset": 8}),
        ack4())
    add("trigger-in-first-ipv6-fragment", r6(ip={"ext": [fragment(0, True)]}),
        r6(b"rest", ip={"ext": [fragment(8, False)]}), ack6())
    add("malformed-segment-of-marked-flow", r4(), ack4(doff=4), ack4(ip={"ihl": 4}), ack4())
    add("trigger-with-rst-flag", r4(flags=TCP_RST | TCP_ACK), ack4())
    add("trigger-with-syn-flag", r4(flags=TCP_SYN), ack4())
    add("trigger-with-no-flags", r4(flags=0), ack4())
    add("trigger-zero-window", r4(window=0), ack4(window=0))
    # Status lines: every near miss, both families.
    for i, p in enumerate(NEAR_MISSES):
        add(f"near-miss-{i}", r4(p), r6(p), ack4(), ack6())
    for code in (0, 1, 99, 100, 199, 200, 499, 500, 599, 600, 999):
        add(f"status-{code:03d}", r4(b"HTTP/1.1 %03d x\r\n" % code), ack4())
    # Link layer.
    add("qinq-two-tags", r4(vlans=[1, 2]), ack4())
    add("tag-9100", r4(vlans=[(0x9100, 5)]))
    add("ethertype-802.3-length", eth(b"\0" * 46, 46))
    # IPv4 lengths.
    add("ipv4-tot-len-0", r4(ip={"tot_len": 0}), ack4())
    add("ipv4-tot-len-short-of-status", r4(ip={"tot_len": 40 + 12}))
    add("ipv4-tot-len-exact-status", r4(ip={"tot_len": 40 + 13}), ack4())
    add("ipv4-udp-ihl-past-frame", cut(F.udp4(S4, 53, C4, 5353, b""), 14 + 20),
        eth(ipv4(b"", S4, C4, F.IPPROTO_UDP, ihl=15)))
    add("ipv4-udp-tot-len-below-ihl", eth(ipv4(b"\0" * 8, S4, C4, F.IPPROTO_UDP, tot_len=10)))
    add("ipv4-fragment-tot-len-below-ihl", r4(ip={"frag_offset": 1, "tot_len": 3}))
    add("ipv4-ihl-past-frame-tcp", cut(r4(ip={"ihl": 15}), 14 + 40))
    # IPv6 extension headers: lengths and truncation.
    udp_body = F.udp(53, 5353, b"x")
    add("ipv6-hbh-cut-then-udp",
        cut(eth(ipv6(udp_body, S6, C6, F.IPPROTO_UDP, ext=[hop_by_hop(3)]), F.ETH_P_IPV6),
            14 + 40 + 4))
    add("ipv6-hbh-len-past-frame-then-udp",
        eth(ipv6(udp_body, S6, C6, F.IPPROTO_UDP, ext=[hop_by_hop(hdrlen=200)]), F.ETH_P_IPV6))
    add("ipv6-hbh-past-payload-len-then-udp",
        eth(ipv6(udp_body, S6, C6, F.IPPROTO_UDP, ext=[hop_by_hop(1)], payload_len=8),
            F.ETH_P_IPV6))
    add("ipv6-nonfirst-fragment-header-cut",
        cut(r6(ip={"ext": [fragment(5, True)]}), 14 + 40 + 4))
    add("ipv6-nonfirst-fragment-header-cut-3",
        cut(r6(ip={"ext": [fragment(5, True)]}), 14 + 40 + 3))
    add("ipv6-first-fragment-header-cut", cut(r6(ip={"ext": [fragment(0, True)]}), 14 + 40 + 4))
    add("ipv6-nonfirst-fragment-past-payload-len",
        r6(ip={"ext": [fragment(5, True)], "payload_len": 4}))
    add("ipv6-ext-past-payload-len-tcp", r6(ip={"ext": [dest_opts(2)], "payload_len": 16}))
    add("ipv6-hbh-not-first", r6(ip={"ext": [dest_opts(), hop_by_hop()]}), ack6())
    add("ipv6-7-ext-headers", r6(ip={"ext": [dest_opts()] * 7}))
    add("ipv6-6-ext-then-udp",
        eth(ipv6(udp_body, S6, C6, F.IPPROTO_UDP, ext=[dest_opts()] * 6), F.ETH_P_IPV6))
    add("ipv6-plen-0", r6(ip={"payload_len": 0}), ack6())
    # TCP header lengths.
    add("tcp-doff-15-options", r4(options=tcp_options(40)), ack4())
    add("tcp-doff-past-ip-end", r4(doff=15, ip={"tot_len": 20 + 40}))
    # Flow key order: addresses byte by byte, then ports in network byte order.
    for a, pa, b, pb in [(S4, 512, S4, 511), (S4, 511, S4, 512), (S4, 1, S4, 256),
                         ("198.18.0.255", 80, "198.18.1.0", 80), ("198.18.1.0", 80, "198.18.0.255", 80),
                         (S6, 512, S6, 511), (S6, 1, S6, 256),
                         ("2001:db8::1:0", 80, "2001:db8::ff", 80),
                         ("2001:db8:1::", 80, "2001:db8::ffff:ffff", 80)]:
        tcpx = F.tcp6 if ":" in a else F.tcp4
        add(f"key-{a}-{pa}-{b}-{pb}", tcpx(a, pa, b, pb, ERR500),
            tcpx(b, pb, a, pa, flags=TCP_ACK), tcpx(a, pa, b, pb, flags=TCP_ACK))
    return c


@pytest.mark.testrun
@pytest.mark.parametrize("frames_", _crafted())
def test_crafted(clf, pinned, debug_iface, frames_):
    for d in DIRECTIONS:
        h = Harness(clf, debug_iface=debug_iface)
        for frame in frames_:
            h.feed(frame, d)
        h.checkpoint(empty=True)
        assert not h.disagreements, report(h)


# Budgets the crafted cases run with: each one alone at its tightest, and all together.
BUDGETS = {"packets-1": (1, 0, 0), "packets-2": (2, 0, 0), "bytes-1": (0, 1, 0),
           "bytes-150": (0, 150, 0), "rate-1": (0, 0, 1), "rate-3": (0, 0, 3),
           "all": (3, 300, 4)}


@pytest.mark.testrun
@pytest.mark.parametrize("limits", BUDGETS.values(), ids=BUDGETS.keys())
@pytest.mark.parametrize("frames_", _crafted()[:12] + _crafted()[-9:])
def test_crafted_with_budgets(clf, pinned, debug_iface, frames_, limits):
    """The sequences and key-order cases again, with budgets: the model decides every
    skip exactly (one CPU, a window no run outlasts)."""
    for d in DIRECTIONS:
        h = Harness(clf, debug_iface=debug_iface, budget=R.Budget(*limits))
        for frame in frames_ * 2:           # twice: every budget above is reached
            h.feed(frame, d)
        h.checkpoint(empty=True)
        assert not h.disagreements, report(h)


@pytest.mark.testrun
@pytest.mark.parametrize("frames_", _crafted()[:12])
def test_crafted_byte_budget_boundaries(clf, pinned, debug_iface, frames_):
    """Byte budgets that a flow's bytes reach exactly (whichever frame marks it), and one
    byte either side: the budget is inclusive."""
    seq = frames_ * 2
    sums = {sum(len(f) for f in seq[start:start + n]) for start in range(3)
            for n in range(1, 4)}
    for budget in sorted(b + d for b in sums for d in (-1, 0, 1)):
        h = Harness(clf, debug_iface=debug_iface, budget=R.Budget(0, budget, 0))
        for frame in seq:
            h.feed(frame, "egress")
        h.checkpoint(empty=True)
        assert not h.disagreements, f"byte budget {budget}: " + report(h)


@pytest.mark.testrun
@pytest.mark.parametrize("debug, ifindex", [(R.DEBUG_NONE, 0), (R.DEBUG_NONE, LO_IFINDEX),
                                            (R.DEBUG_FAIL, BOGUS_IFINDEX)])
def test_crafted_debug_interface_states(clf, pinned, debug, ifindex):
    clf.set_debug_ifindex(ifindex)
    h = Harness(clf, debug=debug)
    for frame, d in [(r4(), "egress"), (ack4(), "ingress"), (r6(response(502)), "egress"),
                     (ack6(), "egress"), (r4(response(200)), "ingress"), (ack4(doff=3), "egress")]:
        h.feed(frame, d)
    h.checkpoint(empty=True)
    assert not h.disagreements, report(h)


@pytest.mark.unit
def test_classifier_cases_agree_with_reference():
    """The hand-written expectations of tests/test_classifier.py's parse-path cases, as
    the reference computes them (no kernel involved)."""
    import test_classifier as tc
    wrong = []
    for param in tc._cases():
        frame, expected = param.values
        got = dict(R.decide(frame, "egress", TRIGGER_5XX, set()).counters)
        if got != expected:
            wrong.append(f"{param.id}: reference {got}, test_classifier {expected}")
    assert not wrong, "\n".join(wrong)


# --- the fuzz --------------------------------------------------------------------------

@pytest.mark.testrun
@pytest.mark.slow
def test_fuzz(clf, pinned, debug_iface, capsys):
    seed = int(os.environ.get("MIRROR_FUZZ_SEED") or random.SystemRandom().randrange(1 << 32))
    total = int(os.environ.get("MIRROR_FUZZ_FRAMES") or 100000)
    with capsys.disabled():
        print(f"\nmirror fuzz: seed={seed} frames={total} (replay: MIRROR_FUZZ_SEED={seed} "
              f"MIRROR_FUZZ_FRAMES={total})", flush=True)
    gen = Generator(seed, total)
    h = Harness(clf, debug_iface=debug_iface)
    whats = Counter()
    started = time.monotonic()
    last_checkpoint = 0
    for item in gen:
        if item is None:
            if (len(h.marked) >= CHECKPOINT_FLOWS
                    or len(h.requests or ()) >= CHECKPOINT_REQUESTS
                    or h.frames - last_checkpoint >= CHECKPOINT_FRAMES):
                h.checkpoint(empty=True)
                last_checkpoint = h.frames
            continue
        frame, direction, what = item
        phase = h.frames % TRIGGER_CYCLE
        if phase == TRIGGER_CYCLE - TRIGGER_CYCLE // 10:
            h.set_triggers(TRIGGER_ODD)
        elif phase == 0 and h.triggers != TRIGGER_5XX:
            h.set_triggers(TRIGGER_5XX)
        snapshot_on = h.frames % SNAPSHOT_CYCLE >= SNAPSHOT_CYCLE // 2
        if snapshot_on != (h.requests is not None):
            h.set_snapshot(snapshot_on)
        h.feed(frame, direction)
        whats[what.split("+")[0]] += 1
    h.checkpoint(empty=True)
    h.set_snapshot(False)
    elapsed = time.monotonic() - started
    paths = " ".join(f"{p}={h.paths[p]}" for p in R.PATHS)
    dirs = Counter(d.direction for d in h.disagreements)
    with capsys.disabled():
        print(f"mirror fuzz summary: frames={h.frames} seed={seed} "
              f"disagreements={len(h.disagreements)} non_pass_verdicts={h.non_pass} "
              f"paths: {paths} "
              f"sweeps={gen.sweeps_done}/{len(gen.sweep_base)} checkpoints={h.checkpoints} "
              f"seconds={elapsed:.1f}", flush=True)
        print("mirror fuzz reasons: " + ", ".join(
            f"{r}={n}" for r, n in sorted(h.reasons.items(), key=lambda x: -x[1])), flush=True)
        print("mirror fuzz sources: " + ", ".join(
            f"{w}={n}" for w, n in sorted(whats.items(), key=lambda x: -x[1])), flush=True)
    assert h.frames == total
    assert not h.disagreements, (
        f"seed {seed}: {len(h.disagreements)} disagreements "
        f"({dict(dirs)}; replay with MIRROR_FUZZ_SEED={seed} MIRROR_FUZZ_FRAMES={total})\n"
        + report(h, seed))
    assert h.non_pass == 0, f"seed {seed}: {h.non_pass} verdicts other than TC_ACT_UNSPEC"


# Budgets the budget fuzz cycles through, one per checkpoint interval.
FUZZ_BUDGETS = [R.Budget(3, 0, 0), R.Budget(0, 1500, 0), R.Budget(0, 0, 60),
                R.Budget(6, 4000, 150), R.Budget(1, 0, 0)]


@pytest.mark.testrun
@pytest.mark.slow
def test_fuzz_with_budgets(clf, pinned, debug_iface, capsys):
    """The fuzz's frames with budgets on: a new set of budgets (and an empty rate window)
    at every checkpoint. MIRROR_FUZZ_SEED as for test_fuzz; MIRROR_FUZZ_BUDGET_FRAMES
    frames (default 20000)."""
    seed = int(os.environ.get("MIRROR_FUZZ_SEED") or random.SystemRandom().randrange(1 << 32))
    total = int(os.environ.get("MIRROR_FUZZ_BUDGET_FRAMES") or 20000)
    with capsys.disabled():
        print(f"\nmirror budget fuzz: seed={seed} frames={total}", flush=True)
    h = Harness(clf, debug_iface=debug_iface, budget=FUZZ_BUDGETS[0])
    last_checkpoint = 0
    for item in Generator(seed, total):
        if item is None:
            if len(h.marked) >= CHECKPOINT_FLOWS or h.frames - last_checkpoint >= CHECKPOINT_FRAMES:
                h.checkpoint(empty=True)
                last_checkpoint = h.frames
                h.set_budget(FUZZ_BUDGETS[h.checkpoints % len(FUZZ_BUDGETS)])
            continue
        frame, direction, _ = item
        h.feed(frame, direction)
    h.checkpoint(empty=True)
    skips = Counter()
    for name in ("skip_flow_packets", "skip_flow_bytes", "skip_cpu_rate"):
        skips[name] = h.counters.sums()[COUNTERS.index(name)]
    with capsys.disabled():
        print(f"mirror budget fuzz summary: frames={h.frames} "
              f"disagreements={len(h.disagreements)} checkpoints={h.checkpoints} "
              + " ".join(f"{k}={v}" for k, v in skips.items()), flush=True)
    assert h.frames == total
    assert not h.disagreements, (f"seed {seed}: {len(h.disagreements)} disagreements\n"
                                 + report(h, seed))
    assert all(skips.values()), f"a budget never skipped anything: {dict(skips)}"

