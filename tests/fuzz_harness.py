"""The differential fuzz's harness: runs frames through the classifier (bpf/mirror.c, with
BPF_PROG_TEST_RUN on the real kernel, through tests/fastmaps.py) and through the reference
model (tests/reference.py), and compares what each decided.

For every frame both must agree on: whether the program runs at all (this kernel's test
run refuses some frames with EINVAL), the verdict (TC_ACT_UNSPEC), the packet coming back
unchanged, the exact delta of every counter, the state of the frame's connection after it
(its slot, flags, cut reasons, status, generation, events, packets and bytes, and the
server's HPACK state as followed: every field of struct conn_hpack) and the
request it kept. Checkpoints compare every connection slot, the kept requests, the
`errors` map, the response-time count, the per-interface statistics, the clones that left
the debug interface and the CPU's clone window.

The model holds its own connection states across frames, so sequences (a handshake, a
request, a trigger, then the connection both ways; a 4-tuple reused; a bucket filling up)
are checked too. Only the classifier's coarse clock is read from the kernel: when a new
state needs a full bucket's slot, the harness reads the bucket's four last_ns before the
frame, so that the model replaces the slot the classifier will. After each frame the
model takes the kernel's version of the slot it compared (and at a checkpoint, of
everything), so that one disagreement does not cascade. The tests are tests/test_fuzz.py;
the frames they feed, tests/fuzz_frames.py."""
from __future__ import annotations

import errno
import os
import re
import struct
from collections import Counter
from dataclasses import dataclass

import fastmaps
import reference as R
from fastmaps import slot_key
from mirror.abi import (CONN, CONN_HPACK, COUNTERS, DEFAULT_MAX_EVENTS_PER_CONN, DIRECTIONS,
                        GRPC_CLASSES, IFACE_SLOTS, IFACE_STATS, KEPT_REQUEST_HEAD, STATUS_CLASSES,
                        TC_ACT_UNSPEC)
from mirror.bpfsys import batch_lookup, batch_update
from mirror.flowkey import KEY_SIZE, FlowKey

LO_IFINDEX = fastmaps.TEST_RUN_IFINDEX      # skb->ifindex in BPF_PROG_TEST_RUN
TRIGGER_5XX = frozenset(range(500, 600))
WIDE_WINDOW = 1 << 62               # a rate window no run outlasts (the model's never turns)
_LAST_NS = struct.Struct("=Q")
_LAST_NS_AT = CONN.offset("last_ns")


@dataclass
class Disagreement:
    index: int
    direction: str
    ingress_ifindex: int
    frame: bytes
    expected: R.Decision
    before: R.Conn | None
    problems: list

    def describe(self, seed=None) -> str:
        head = f"frame #{self.index}"
        if seed is not None:
            head += (f" (seed {seed}; replay: MIRROR_FUZZ_SEED={seed} "
                     f"MIRROR_FUZZ_FRAMES={self.index + 1})")
        if not self.frame:  # a checkpoint
            return f"at {head}: {'; '.join(self.problems)}"
        e = self.expected
        via = f" (ingress_ifindex {self.ingress_ifindex})" if self.ingress_ifindex else ""
        return (f"{head} on {self.direction}{via}: {'; '.join(self.problems)}\n"
                f"  reference: path={e.path} ({e.reason}) mode={e.mode} "
                f"counters={dict(e.counters)} key={e.key} slot={e.slot}\n"
                f"  state before: {self.before}\n  state after: {e.conn}\n"
                f"  frame: {self.frame.hex()}")


_FLOW_KEYS: dict[bytes, FlowKey] = {}


def decode_conn(fields: tuple) -> tuple[R.Conn | None, int, int]:
    """A struct conn's fields (CONN.struct) as (the model's Conn, or None for an empty
    slot; gen; last_ns)."""
    key, flags, cut, status, gen, events, last_ns, _first_ns, packets, nbytes, hpack = fields
    if not last_ns:
        return None, gen, 0
    flow = _FLOW_KEYS.get(key)
    if flow is None:
        flow = _FLOW_KEYS[key] = FlowKey.from_bytes(key[:KEY_SIZE])
    hp = CONN_HPACK.decode(hpack)
    conn = R.Conn(flow, int.from_bytes(key[KEY_SIZE:], "little"), flags, cut, status, gen,
                  events, packets, nbytes,
                  R.Hpack(hp["state"], hp["next_seq"], hp["inserted"], hp["floor"], hp["next"],
                          list(hp["named_at"]), list(hp["named_what"])))
    return conn, gen, last_ns


class Harness:
    """Runs frames through the classifier and the model and compares them. The
    classifier is set up here (and the model from what it then holds): triggers, the
    request snapshot, budgets with a rate window as wide as WIDE_WINDOW (its windows
    restarted), event bounds, the extra `monitored` ifindexes (close() removes them) and,
    with `hash_seed`, the seed of the connection slots' index."""

    def __init__(self, clf, triggers=TRIGGER_5XX, debug=R.DEBUG_OK, debug_iface=None,
                 budget: R.Budget | None = None, request_bytes: int = 0,
                 events_per_conn: int = DEFAULT_MAX_EVENTS_PER_CONN,
                 events_per_window: int = 0, monitored=(), hash_seed: int | None = None):
        self.clf = clf
        if hash_seed is not None:
            # Where the classifier puts a connection's state: the states it holds now must
            # be none (the fixture's), or they would sit in buckets of the old seed.
            clf._set_config(hash_seed=hash_seed)
        budget = budget or R.Budget()
        clf.set_trigger(frozenset(triggers))
        clf.set_request_bytes(request_bytes)
        clf.set_budgets(budget.max_packets, budget.max_bytes, budget.max_clones,
                        window_ns=WIDE_WINDOW)
        budget.clones = 0
        clf.set_event_limits(events_per_window, events_per_conn)
        self.added_monitored = [i for i in monitored if not self.is_monitored(i)]
        for i in self.added_monitored:
            clf.set_monitored(i, True)
        cfg = clf.config()
        self.model = R.Model(
            slots=clf.conn_slots, hash_seed=cfg["hash_seed"], triggers=triggers, debug=debug,
            request_bytes=cfg["request_bytes"], capacity=clf.request_capacity, budget=budget,
            events_per_conn=cfg["max_events_per_conn"],
            events_per_window=cfg["max_events_per_window"],
            monitored={k.value for k in clf._monitored.keys()}, ifindex=LO_IFINDEX)
        # With the debug interface: checkpoints also count the clones that left it.
        self.tx_path = (f"/sys/class/net/{debug_iface.name}/statistics/tx_packets"
                        if debug_iface is not None else None)
        self.tx_base = self.tx_packets()
        self.mirrored = 0
        self.runners = {d: fastmaps.TestRunner(clf.fd(d)) for d in DIRECTIONS}
        self.counters = fastmaps.PerCpuArray(clf._counters.map_fd, len(COUNTERS))
        self.conn_map = fastmaps.Hash(clf._conns.map_fd, 4, CONN.size, percpu=False)
        self.request_size = KEPT_REQUEST_HEAD.size + clf.request_capacity
        self.request_map = fastmaps.Hash(clf._requests.map_fd, 4, self.request_size,
                                         percpu=False)
        self.iface_map = fastmaps.Hash(clf._iface_stats.map_fd, 4, IFACE_STATS.size,
                                       percpu=True)
        affinity = os.sched_getaffinity(0)
        self.cpu = min(affinity) if len(affinity) == 1 else None
        self.sync()
        self.paths = Counter()
        self.reasons = Counter()
        self.modes = Counter()
        self.disagreements: list[Disagreement] = []
        self.frames = 0
        self.non_pass = 0       # verdicts other than TC_ACT_UNSPEC
        self.checkpoints = 0
        self.victims = 0        # new states that needed a full bucket's slot
        self.totals = Counter()  # every counter's deltas over the run (clears included)

    # --- setting up -------------------------------------------------------------------
    def is_monitored(self, ifindex: int) -> bool:
        return any(k.value == ifindex for k in self.clf._monitored.keys())

    def close(self) -> None:
        """Removes the `monitored` entries this harness added."""
        for i in self.added_monitored:
            self.clf.set_monitored(i, False)
        self.added_monitored = []

    def set_triggers(self, codes) -> None:
        self.clf.set_trigger(frozenset(codes))
        self.model.triggers = frozenset(codes)

    def set_budget(self, budget: R.Budget) -> None:
        """New budgets; every CPU's rate windows (clones and events) start empty again,
        the model's too."""
        self.clf.set_budgets(budget.max_packets, budget.max_bytes, budget.max_clones,
                             window_ns=WIDE_WINDOW)
        budget.clones = 0
        self.model.budget = budget
        self.model.events_in_window = 0

    def set_request_bytes(self, n: int) -> None:
        """The request snapshot's length (0: off); kept requests stay."""
        self.clf.set_request_bytes(n)
        self.model.request_bytes = n

    def set_event_limits(self, per_window: int, per_conn: int) -> None:
        """Event bounds, with every CPU's event window empty again."""
        self.clf.set_event_limits(per_window, per_conn)
        self.clf.set_event_window()
        self.model.events_per_window = per_window
        self.model.events_per_conn = per_conn
        self.model.events_in_window = 0

    def set_monitored(self, ifindex: int, on: bool) -> None:
        self.clf.set_monitored(ifindex, on)
        (self.model.monitored.add if on else self.model.monitored.discard)(ifindex)
        if on and ifindex not in self.added_monitored:
            self.added_monitored.append(ifindex)

    def tx_packets(self) -> int:
        return int(open(self.tx_path).read()) if self.tx_path else 0

    # --- the kernel's state -----------------------------------------------------------
    def kernel_slots(self) -> list[tuple[R.Conn | None, int, int]]:
        """Every slot of the conns array, as decode_conn gives it."""
        out = [(None, 0, 0)] * self.model.slot_count
        for keys, values, count in batch_lookup(self.clf._conns.map_fd, 4, CONN.size,
                                                per_cpu=False):
            slots = struct.unpack_from(f"<{count}I", keys)
            fields = CONN.struct.iter_unpack(values[:count * CONN.size])
            for slot, f in zip(slots, fields):
                out[slot] = decode_conn(f)
        return out

    def kernel_slot(self, slot: int) -> tuple[R.Conn | None, int, int]:
        return decode_conn(CONN.struct.unpack_from(self.conn_map.lookup(slot_key(slot))))

    def kernel_kept(self, slots, requests) -> dict[int, R.KeptRequest]:
        """slot -> the request kept for its state (bpf/mirror.h struct kept_request: the
        entry must carry the state's slot and gen)."""
        out = {}
        for slot, (conn, _, _) in enumerate(slots):
            if conn is not None:
                r = requests.get(slot % self.model.request_entries)
                if r is not None and r.slot == slot and r.gen == conn.gen:
                    out[slot] = r
        return out

    def lo_iface_stats(self) -> dict[str, Counter]:
        """The loopback's per-interface statistics by hook, summed over the CPUs whose
        copy of its slots it owns."""
        out = {}
        size = IFACE_STATS.size
        for d, direction in enumerate(DIRECTIONS):
            raw = self.iface_map.lookup(slot_key((LO_IFINDEX % IFACE_SLOTS) * 2 + d))
            total = Counter()
            for cpu in range(self.iface_map.value_len // size):
                v = IFACE_STATS.decode(raw, cpu * size)
                if v["ifindex"] != LO_IFINDEX:
                    continue
                for j, cls in enumerate(STATUS_CLASSES):
                    total[cls] += v["responses"][j]
                    total[f"h2_{cls}"] += v["h2_responses"][j]
                for j, cls in enumerate(GRPC_CLASSES):
                    total[f"grpc_{cls}"] += v["grpc_responses"][j]
                total["mirrored_packets"] += v["mirrored_packets"]
                total["mirrored_bytes"] += v["mirrored_bytes"]
            out[direction] = +total
        return out

    def kernel_request(self, entry: int) -> R.KeptRequest | None:
        raw = self.request_map.lookup(slot_key(entry))
        return self._request(raw)

    def _request(self, raw: bytes, at: int = 0) -> R.KeptRequest | None:
        request_ns, slot, gen, frame_len, length, direction, _seq = \
            KEPT_REQUEST_HEAD.struct.unpack_from(raw, at)
        if not request_ns:
            return None
        start = at + KEPT_REQUEST_HEAD.size
        return R.KeptRequest(slot, gen, frame_len, length, DIRECTIONS[direction],
                             bytes(raw[start:start + length]))

    def kernel_requests(self) -> dict[int, R.KeptRequest]:
        out = {}
        for keys, values, count in batch_lookup(self.clf._requests.map_fd, 4,
                                                self.request_size, per_cpu=False):
            for i, entry in enumerate(struct.unpack_from(f"<{count}I", keys)):
                r = self._request(values, i * self.request_size)
                if r is not None:
                    out[entry] = r
        return out

    def kernel_victim(self, base: int) -> int:
        """The slot of the bucket at `base` that the classifier gives a new state: the
        smallest last_ns, the first of equals (an empty slot's is 0)."""
        self.victims += 1
        stamps = [_LAST_NS.unpack_from(self.conn_map.lookup(slot_key(i)), _LAST_NS_AT)[0]
                  for i in range(base, base + R.CONN_WAYS)]
        return base + stamps.index(min(stamps))

    def sync(self) -> None:
        """The model takes every state, kept request and count the kernel holds."""
        m = self.model
        for slot, (conn, gen, _) in enumerate(self.kernel_slots()):
            m.slots[slot], m.gens[slot] = conn, gen
        m.requests = self.kernel_requests()
        m.errors = Counter(self.clf.errors())
        m.response_times = 0
        self.timed_base = self.timed()
        self.sums = self.counters.sums()
        self.iface: dict[str, Counter] = {d: Counter() for d in DIRECTIONS}
        self.iface_base = self.lo_iface_stats()

    def timed(self) -> int:
        """Errors counted in the response-time buckets (every CPU)."""
        return sum(self.clf.response_times()[0])

    def clear(self) -> None:
        """Empties the classifier's connection states, kept requests and error counts
        (what Classifier.clear does, without zeroing the counters and statistics the
        harness reads as deltas anyway)."""
        for table, size in ((self.clf._conns, CONN.size), (self.clf._requests, self.request_size)):
            n = table.max_entries
            keys = b"".join(slot_key(i) for i in range(n))
            batch_update(table.map_fd, keys, bytes(size * n), n)
        self.clf._errors.clear()

    # --- running ----------------------------------------------------------------------
    def feed(self, frame: bytes, direction: str, ingress_ifindex: int = 0) -> R.Decision:
        m = self.model
        exp = m.decide(frame, direction, ingress_ifindex, self.kernel_victim)
        err, retval, out = self.runners[direction].run(frame, ingress_ifindex)
        sums = self.counters.sums()
        deltas = {name: a - b for name, a, b in zip(COUNTERS, sums, self.sums) if a != b}
        self.sums = sums
        self.totals.update(deltas)
        problems = []
        if exp.ran:
            if err:
                problems.append(f"kernel refused it: {errno.errorcode.get(err, err)}")
            else:
                if retval != TC_ACT_UNSPEC:
                    self.non_pass += 1
                if retval != exp.verdict:
                    problems.append(f"verdict {retval}, expected {exp.verdict}")
                if out != frame:
                    problems.append("the packet came back changed")
        elif err != errno.EINVAL:
            problems.append(f"expected EINVAL ({exp.reason}), got "
                            f"{errno.errorcode.get(err, err) if err else 'a run'}")
        if deltas != dict(exp.counters):
            problems.append(f"counters {deltas}, expected {dict(exp.counters)}")
        if exp.slot is not None:
            conn, gen, _ = self.kernel_slot(exp.slot)
            if conn != exp.conn:
                problems.append(f"slot {exp.slot} holds {conn}, expected {exp.conn}")
            # Follow the kernel from here on, so one disagreement does not cascade.
            m.slots[exp.slot], m.gens[exp.slot] = conn, gen
            if exp.kept:
                entry = exp.slot % m.request_entries
                got = self.kernel_request(entry)
                if got != m.requests.get(entry):
                    problems.append(f"request entry {entry} holds {got}, expected "
                                    f"{m.requests.get(entry)}")
                m.requests[entry] = got
        for k, v in exp.iface.items():
            self.iface[direction][k] += v
        self.mirrored += exp.counters.get("mirrored_packets", 0)
        self.frames += 1
        self.paths[exp.path] += 1
        self.modes[exp.mode] += 1
        self.reasons[re.sub(r"0x[0-9a-f]+|(?<![A-Za-z])\d+", "N", exp.reason)] += 1
        if problems:
            self.disagreements.append(Disagreement(self.frames - 1, direction, ingress_ifindex,
                                                   frame, exp, exp.before, problems))
        return exp

    def checkpoint(self, clear: bool = False, reset: bool = False) -> None:
        """Compares everything the classifier holds with the model, then the model takes
        the kernel's version of it; drains the events ring buffer. With `clear`, empties
        the classifier's states, kept requests and error counts (and the model with
        them); with `reset`, Classifier.clear does (which also zeroes counters and
        statistics, and lets the classifier skip lookups while nothing is marked)."""
        self.checkpoints += 1
        m = self.model
        problems = []
        kernel = self.kernel_slots()
        differ = [i for i, (conn, gen, _) in enumerate(kernel)
                  if conn != m.slots[i] or gen != m.gens[i]]
        if differ:
            problems.append(f"{len(differ)} connection slots differ, e.g. " + "; ".join(
                f"slot {i}: kernel {kernel[i][0]} gen {kernel[i][1]}, model {m.slots[i]} "
                f"gen {m.gens[i]}" for i in differ[:3]))
        got_kept = {slot: (r.gen, r.frame_len, r.length, r.direction, r.data) for slot, r in
                    self.kernel_kept(kernel, self.kernel_requests()).items()}
        want_kept = {slot: (r.gen, r.frame_len, r.length, r.direction, r.data)
                     for slot, r in m.kept_requests().items()}
        if got_kept != want_kept:
            diff = sorted(k for k in set(got_kept) | set(want_kept)
                          if got_kept.get(k) != want_kept.get(k))
            problems.append(f"kept requests differ for slots {diff[:5]} ({len(diff)})")
        errors = {k: v for k, v in self.clf.errors().items() if v}
        if errors != +m.errors:
            problems.append(f"errors map {errors}, expected {dict(+m.errors)}")
        timed = self.timed() - self.timed_base
        if timed != m.response_times:
            problems.append(f"{timed} response times counted, expected {m.response_times}")
        got = {d: dict(v) for d, v in self.lo_iface_stats().items() if v}
        want = {d: dict(+(self.iface_base[d] + self.iface[d])) for d in DIRECTIONS}
        want = {d: v for d, v in want.items() if v}
        if got != want:
            problems.append(f"iface_stats {got}, expected {want}")
        if self.tx_path and self.tx_packets() - self.tx_base != self.mirrored:
            problems.append(f"{self.tx_packets() - self.tx_base} clones left the debug "
                            f"interface, expected {self.mirrored}")
        if self.cpu is not None and m.budget.max_clones:
            clones = self.clf.clone_window()[self.cpu][1]
            if clones != m.budget.clones:
                problems.append(f"{clones} clones in the CPU's window, expected "
                                f"{m.budget.clones}")
            m.budget.clones = clones
        if problems:
            dummy = R.Decision(True, None, {}, "checkpoint", "checkpoint")
            self.disagreements.append(
                Disagreement(self.frames, "-", 0, b"", dummy, None, problems))
        self.clf.poll_events(0)
        if reset:
            self.clf.clear()
        elif clear:
            self.clear()
        self.sync()


def report(h: Harness, seed=None, limit: int = 20) -> str:
    lines = [d.describe(seed) for d in h.disagreements[:limit]]
    more = len(h.disagreements) - limit
    if more > 0:
        lines.append(f"... and {more} more")
    return "\n".join(lines)
