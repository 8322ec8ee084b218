"""The differential fuzz's harness: runs frames through the classifier (bpf/mirror.c, with
BPF_PROG_TEST_RUN on the real kernel, through tests/fastmaps.py) and through the reference
model (tests/reference.py), and compares what each decided.

For every frame both must agree on: whether the program runs at all (this kernel's test
run refuses some frames with EINVAL), the verdict (TC_ACT_UNSPEC), the packet coming back
unchanged, the exact delta of every counter, and the flow map (the frame's flow marked or
not, looked up by the key the reference computes); checkpoints compare the whole flow
set, the per-interface statistics, each flow's packets/bytes/cut and the request
snapshots. The model keeps its own set of marked flows across frames, so sequences (a
trigger, then later packets of the flow in both directions and on both hooks) are checked
too. The tests are tests/test_fuzz.py; the frames they feed, tests/fuzz_frames.py."""
from __future__ import annotations

import errno
import re
from collections import Counter
from dataclasses import dataclass

import fastmaps
import reference as R
from mirror.abi import (COUNTERS, DEFAULT_REQUEST_BYTES, DIRECTIONS, EVENT_HEAD, FLOW_VALUE,
                        TC_ACT_UNSPEC, event_layout, request_capacity)
from mirror.flowkey import KEY_SIZE, FlowKey

LO_IFINDEX = 1          # skb->ifindex in BPF_PROG_TEST_RUN
FLOW_VALUE_SIZE = FLOW_VALUE.size
TRIGGER_5XX = frozenset(range(500, 600))
SNAPSHOT_BYTES = 256                # the request snapshot's length when a run turns it on
# struct error_event, as the session classifier has it (compiled with the default)
REQUEST_VALUE_SIZE = event_layout(request_capacity(DEFAULT_REQUEST_BYTES)).size
REQUEST_FROM_LO = EVENT_HEAD.offset("request_from_lo")
WIDE_WINDOW = 1 << 62               # a rate window no run outlasts (the model's never turns)


@dataclass
class Disagreement:
    index: int
    direction: str
    frame: bytes
    was_marked: bool | None
    expected: R.Decision
    problems: list

    triggers: frozenset = TRIGGER_5XX

    def describe(self, seed=None) -> str:
        head = f"frame #{self.index}"
        if seed is not None:
            head += (f" (seed {seed}; replay: MIRROR_FUZZ_SEED={seed} "
                     f"MIRROR_FUZZ_FRAMES={self.index + 1})")
        if not self.frame:  # a checkpoint
            return f"at {head}: {'; '.join(self.problems)}"
        key = self.expected.key
        trig = ("frozenset(range(500, 600))" if self.triggers == TRIGGER_5XX
                else repr(set(sorted(self.triggers))))
        marked = f"{{FlowKey.from_bytes(bytes.fromhex('{key.to_bytes().hex()}'))}}" \
            if self.was_marked else "set()"
        return (f"{head} on {self.direction}: {'; '.join(self.problems)}\n"
                f"  reference: path={self.expected.path} ({self.expected.reason}) "
                f"counters={dict(self.expected.counters)} key={key} "
                f"marked before={self.was_marked}\n"
                f"  the reference alone: reference.decide(bytes.fromhex('{self.frame.hex()}'), "
                f"'{self.direction}', {trig}, {marked})")


class Harness:
    """Runs frames through the classifier and the reference and compares them."""

    def __init__(self, clf, triggers=TRIGGER_5XX, debug=R.DEBUG_OK, debug_iface=None,
                 budget: R.Budget | None = None):
        """`budget`: the budgets to run with (set in the classifier here, its rate window
        as wide as WIDE_WINDOW); None: none, as the fixture leaves the classifier. The
        model tracks every marked flow's packets, bytes and cut reasons either way, and
        checkpoints compare them with the kernel's."""
        self.clf = clf
        self.budget = budget or R.Budget()
        if budget is not None:
            clf.set_budgets(budget.max_packets, budget.max_bytes, budget.max_clones,
                            window_ns=WIDE_WINDOW)
            budget.clones = 0
        # With the debug interface: checkpoints also count the clones that left it.
        self.tx_path = (f"/sys/class/net/{debug_iface.name}/statistics/tx_packets"
                        if debug_iface is not None else None)
        self.tx_base = self.tx_packets()
        self.mirrored = 0
        self.runners = {d: fastmaps.TestRunner(clf.fd(d)) for d in DIRECTIONS}
        self.counters = fastmaps.PerCpuArray(clf._counters.map_fd, len(COUNTERS))
        self.flows = fastmaps.Hash(clf._flows.map_fd, KEY_SIZE, FLOW_VALUE_SIZE, percpu=True)
        self.request_map = fastmaps.Hash(clf._requests.map_fd, KEY_SIZE, REQUEST_VALUE_SIZE,
                                         percpu=False)
        self.requests: dict[FlowKey, bool] | None = None      # None: snapshot off
        self.triggers = frozenset(triggers)
        self.debug = debug
        self.marked: set[FlowKey] = set(FlowKey.from_bytes(k) for k in self.flows.keys())
        self.budget.flows = self.kernel_use()
        self.iface: dict[str, Counter] = {d: Counter() for d in DIRECTIONS}
        self.iface_base = {d: Counter(v) for (i, d), v in clf.iface_stats().items()
                           if i == LO_IFINDEX}
        self.sums = self.counters.sums()
        self.paths = Counter()
        self.reasons = Counter()
        self.disagreements: list[Disagreement] = []
        self.frames = 0
        self.non_pass = 0       # verdicts other than TC_ACT_UNSPEC
        self.checkpoints = 0

    def tx_packets(self) -> int:
        return int(open(self.tx_path).read()) if self.tx_path else 0

    def set_triggers(self, codes) -> None:
        self.clf.set_trigger(frozenset(codes))
        self.triggers = frozenset(codes)

    def set_budget(self, budget: R.Budget) -> None:
        """New budgets; every CPU's rate window starts empty again, the model's too."""
        self.clf.set_budgets(budget.max_packets, budget.max_bytes, budget.max_clones,
                             window_ns=WIDE_WINDOW)
        budget.clones = 0
        budget.flows = self.budget.flows
        self.budget = budget

    def set_snapshot(self, on: bool) -> None:
        """Turns the request snapshot on (the model starts from what the kernel holds)
        or off."""
        self.clf.set_request_bytes(SNAPSHOT_BYTES if on else 0)
        self.requests = self.kernel_requests() if on else None

    def kernel_use(self) -> dict[FlowKey, list]:
        """Each marked flow's [packets, bytes, cut reasons] in the kernel (one CPU's:
        the harness runs pinned)."""
        return {k: [v["packets"], v["bytes"], set(v["cut"])]
                for k, v in self.clf.flows().items()}

    def kernel_requests(self) -> dict[FlowKey, bool]:
        return {FlowKey.from_bytes(k): bool(self.request_map.lookup(k)[REQUEST_FROM_LO])
                for k in self.request_map.keys()}

    def feed(self, frame: bytes, direction: str) -> R.Decision:
        exp = R.decide(frame, direction, self.triggers, self.marked, self.debug,
                       self.requests, self.budget)
        was_marked = exp.key in self.marked if exp.key is not None else None
        err, retval, out = self.runners[direction].run(frame)
        sums = self.counters.sums()
        deltas = {name: a - b for name, a, b in zip(COUNTERS, sums, self.sums) if a != b}
        self.sums = sums
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
        if exp.key is not None:
            present = self.flows.contains(exp.key.to_bytes())
            if present != exp.marked_after:
                problems.append(f"flow {exp.key} {'marked' if present else 'not marked'} "
                                f"in the map, expected {'marked' if exp.marked_after else 'not'}")
            # Follow the kernel from here on, so one disagreement does not cascade.
            (self.marked.add if present else self.marked.discard)(exp.key)
            if not present:
                self.budget.flows.pop(exp.key, None)
            if self.requests is not None and exp.request_from_lo is not None:
                self.requests[exp.key] = exp.request_from_lo
        for k, v in exp.iface.items():
            self.iface[direction][k] += v
        self.mirrored += exp.counters.get("mirrored_packets", 0)
        self.frames += 1
        self.paths[exp.path] += 1
        self.reasons[re.sub(r"0x[0-9a-f]+|(?<![A-Za-z])\d+", "N", exp.reason)] += 1
        if problems:
            self.disagreements.append(Disagreement(self.frames - 1, direction, frame,
                                                   was_marked, exp, problems, self.triggers))
        return exp

    def checkpoint(self, empty: bool) -> None:
        """Compares the whole flow set and the per-interface statistics with the model;
        with `empty`, deletes every flow from the map and the model."""
        self.checkpoints += 1
        keys = self.flows.keys()
        kernel = {FlowKey.from_bytes(k) for k in keys}
        problems = []
        if kernel != self.marked:
            problems.append(f"flow map differs: only in the kernel {sorted(kernel - self.marked)}"
                            f", only in the model {sorted(self.marked - kernel)}")
        got = {d: {k: v for k, v in s.items() if v} for (i, d), s in
               self.clf.iface_stats().items() if i == LO_IFINDEX}
        want = {}
        for d in DIRECTIONS:
            total = self.iface_base.get(d, Counter()) + self.iface[d]
            if +total:
                want[d] = dict(+total)
        if got != want:
            problems.append(f"iface_stats {got}, expected {want}")
        use = self.kernel_use()
        if use != self.budget.flows:
            diff = sorted(k for k in set(use) | set(self.budget.flows)
                          if use.get(k) != self.budget.flows.get(k))
            problems.append(f"flow packets/bytes/cut differ for {len(diff)} flows, e.g. "
                            + "; ".join(f"{k}: kernel {use.get(k)} model "
                                        f"{self.budget.flows.get(k)}" for k in diff[:3]))
        self.budget.flows = use
        if self.requests is not None and self.kernel_requests() != self.requests:
            kernel_req = self.kernel_requests()
            diff = {k for k in set(kernel_req) | set(self.requests)
                    if kernel_req.get(k) != self.requests.get(k)}
            problems.append(f"request snapshots differ for {sorted(diff)[:5]} "
                            f"({len(diff)} flows)")
        if self.tx_path and self.tx_packets() - self.tx_base != self.mirrored:
            problems.append(f"{self.tx_packets() - self.tx_base} clones left the debug "
                            f"interface, expected {self.mirrored}")
        if problems:
            dummy = R.Decision(True, None, {}, "checkpoint", "checkpoint")
            self.disagreements.append(
                Disagreement(self.frames, "-", b"", None, dummy, problems, self.triggers))
        self.marked = kernel
        if self.requests is not None:
            self.requests = self.kernel_requests()
        if empty:
            for k in keys:
                self.flows.delete(k)
            self.marked = set()
            self.budget.flows = {}
            for k in self.request_map.keys():
                self.request_map.delete(k)
            if self.requests is not None:
                self.requests = {}


def report(h: Harness, seed=None, limit: int = 20) -> str:
    lines = [d.describe(seed) for d in h.disagreements[:limit]]
    more = len(h.disagreements) - limit
    if more > 0:
        lines.append(f"... and {more} more")
    return "\n".join(lines)
