"""Per-packet cost: BPF_PROG_TEST_RUN over crafted frames, kernel-timed.

Every program runs every frame class, interleaved (class by class, program by program,
`rounds` times), on one pinned CPU; the figure kept is the median over rounds. Two
timing methods, each also applied to the empty classifier so that ratios compare like
with like:
  - repeat: one BPF_PROG_TEST_RUN call with a large `repeat`; `duration` is the kernel's
    mean ns per repetition. Used for every frame class whose state does not change between
    repetitions (a marked flow stays marked).
  - single: `repeat=1` calls, the flow unmarked again between calls, for the packet that
    marks a flow; the median of the per-call durations.

Map state: the maps hold at most the measured flow and one other, except in the
large-map rows (bench/bigmaps.py), where the mirror's flow and request maps and the
thesis's connection map are 90 % full of other flows. Filling them takes longer than a
measurement, so the filler flows stay from the first large-map row of a round to the
next row that wants the maps empty (the large-map rows come last in each round).

Programs: the empty classifier, the thesis reproduction, the mirror deciding only (its
debug ifindex 0, so a packet to mirror is counted and not cloned: the thesis's clone is
an act_mirred action outside its program, which BPF_PROG_TEST_RUN never runs), and the
mirror with its clone to a real debug interface (the full in-program cost)."""
from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, field
from typing import Callable

from mirror.bpfsys import test_run
from mirror.flowkey import FlowKey

from . import bigmaps
from . import frames as fr


@dataclass
class Subject:
    name: str
    fd_for: Callable[[str], int]                  # direction -> prog fd
    handles: Callable[[fr.FrameClass], bool]      # whether it parses this frame class
    unmark: Callable[[fr.FrameClass], None]       # unmarks the measured flow only
    clear: Callable[[], None]                     # empties the maps (nothing marked)
    prepare: Callable[[], None] = lambda: None    # called before each measurement
    # puts the large-map filler flows in (True) or takes them out (False), idempotent;
    # returns {map name: entries held after the fill} ({} when there are none)
    fill: Callable[[bool], dict[str, int]] = lambda on: {}


@dataclass
class Result:
    frame: str
    method: str
    ns: dict[str, list[int]] = field(default_factory=dict)   # subject -> per round
    handled: list[str] = field(default_factory=list)         # subjects that parse it
    large_map: bool = False
    one_flow: str | None = None                               # its one-flow counterpart
    maps: dict[str, dict[str, int]] = field(default_factory=dict)   # subject -> held

    def median(self, subject: str) -> float:
        return statistics.median(self.ns[subject])


def _flow_key(fc: fr.FrameClass) -> FlowKey:
    return FlowKey.from_endpoints(fr.CLIENT[fc.family], fr.CLIENT_PORT, fr.SERVER[fc.family],
                                  fr.SERVER_PORT)


def subjects(classifier, thesis, empty, debug_ifindex: int) -> list[Subject]:
    def open_measured():
        # The measured connections, and the other one the "other flows marked" rows
        # mark, as a real connection starts: its client's SYN (the classifier counts a
        # status only from the server of a connection whose client it knows).
        for fam in (4, 6):
            for port in (fr.CLIENT_PORT, fr.CLIENT_PORT + 1):
                test_run(classifier.fd("egress"), fr.syn(fam, port), 1)

    maps = bigmaps.mirror_maps(classifier, on_empty=open_measured)

    def mirror_unmark(fc):
        # A new SYN on the 4-tuple restarts the connection: unmarked, no request kept
        # (left from a request row, it would send the next row's response down another
        # path than in the one-flow rows). The h2 rows' server then answers it: its
        # segments are followed from there.
        test_run(classifier.fd("egress"), fr.syn(fc.family), 1)
        if fc.server_start:
            test_run(classifier.fd("ingress"), fr.synack(fc.family), 1)

    def mirror_clear():
        classifier.clear()
        open_measured()

    def decide_only():
        classifier.set_debug_ifindex(0)

    def with_clone():
        classifier.set_debug_ifindex(debug_ifindex)

    # Classifier.clear() empties the states and, as the classifier skips the lookups of
    # packets that only ask "marked?" while none is, tells it so: "nothing marked" then
    # really is the state a host with no error connection is in.
    return baseline_subjects(thesis, empty) + [
        Subject("mirror", classifier.fd, lambda fc: True, mirror_unmark, mirror_clear,
                decide_only, maps.set),
        Subject("mirror+clone", classifier.fd, lambda fc: True, mirror_unmark,
                mirror_clear, with_clone, maps.set),
    ]


def baseline_subjects(thesis, empty) -> list[Subject]:
    """The empty classifier and the thesis reproduction."""
    def thesis_unmark(fc):
        key = thesis.connections.Key(*_thesis_key(fc))
        try:
            del thesis.connections[key]
        except KeyError:
            pass

    return [
        Subject("empty", lambda d: empty.fd, lambda fc: True, lambda fc: None, lambda: None),
        Subject("thesis", lambda d: thesis.fd,
                lambda fc: fc.family == 4 and not fc.h2, thesis_unmark,
                thesis.clear, fill=bigmaps.thesis_maps(thesis).set),
    ]


def _thesis_key(fc: fr.FrameClass) -> tuple[int, int, int, int]:
    """The thesis map's key for the 500 response of the measured flow (server to client,
    as the packet carries it; addresses and ports in network byte order)."""
    import ipaddress
    import socket
    s = int.from_bytes(ipaddress.ip_address(fr.SERVER[4]).packed, "little")
    c = int.from_bytes(ipaddress.ip_address(fr.CLIENT[4]).packed, "little")
    return s, c, socket.htons(fr.SERVER_PORT), socket.htons(fr.CLIENT_PORT)


def _reset(subject: Subject, fc: fr.FrameClass) -> None:
    """Nothing marked, before and after a measurement; for a large-map row nothing but
    the filler flows and the other marked flow (which keeps the mirror's empty-map
    pre-filter off: filler flows were not marked by the classifier)."""
    if fc.large_map:
        subject.fill(True)
        subject.unmark(fc)
    else:
        subject.fill(False)
        subject.clear()


def _measure(subject: Subject, fc: fr.FrameClass, repeat: int, singles: int) -> int:
    fd = subject.fd_for(fc.direction)
    subject.prepare()
    _reset(subject, fc)
    try:
        if fc.others_marked:
            test_run(subject.fd_for("ingress"), fr.other_marking_frame(fc.family), 1)
        if fc.fresh:
            samples = []
            for _ in range(singles):
                subject.unmark(fc)
                samples.append(test_run(fd, fc.frame, 1).duration_ns)
            return int(statistics.median(samples))
        if fc.marked:
            test_run(subject.fd_for("ingress"), fr.marking_frame(fc.family), 1)
        test_run(fd, fc.frame, max(1, repeat // 100))      # warm caches and branch predictors
        return test_run(fd, fc.frame, repeat).duration_ns
    finally:
        _reset(subject, fc)


def run(subjs: list[Subject], rounds: int, repeat: int, singles: int, cpu: int,
        progress: Callable[[str], None] = lambda s: None) -> list[Result]:
    """Measures every subject on every frame class; BPF_PROG_TEST_RUN runs on the CPU the
    calling thread is on, so the thread is pinned to `cpu` meanwhile."""
    classes = fr.frame_classes()
    results = {fc.key: Result(fc.key, "single" if fc.fresh else "repeat",
                              large_map=fc.large_map, one_flow=fc.one_flow) for fc in classes}
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        for r in range(rounds):
            progress(f"per-packet cost: round {r + 1}/{rounds}")
            for fc in classes:
                for s in subjs:
                    ns = _measure(s, fc, repeat, singles)
                    results[fc.key].ns.setdefault(s.name, []).append(ns)
                    if fc.large_map:
                        _note_held(results[fc.key].maps, s.name, s.fill(True))
    finally:
        os.sched_setaffinity(0, old)
        for s in subjs:
            s.fill(False)
            s.clear()
    for fc in classes:
        results[fc.key].handled = [s.name for s in subjs if s.handles(fc)]
    return [results[fc.key] for fc in classes]


def _note_held(maps: dict, subject: str, held: dict[str, int]) -> None:
    """Keeps the fewest entries each map held over the rounds (an LRU map may evict)."""
    if not held:
        return
    mine = maps.setdefault(subject, dict(held))
    for name, n in held.items():
        mine[name] = min(mine.get(name, n), n)


def summarize(results: list[Result]) -> list[dict]:
    """Rows for the report: median ns per subject, and the ratio to the empty classifier
    measured the same way."""
    rows = []
    for res in results:
        base = res.median("empty")
        row = {"frame": res.frame, "method": res.method, "handled_by": res.handled,
               "ns": {}, "ratio_to_empty": {}, "raw_ns": res.ns}
        for name in res.ns:
            m = res.median(name)
            row["ns"][name] = m
            row["ratio_to_empty"][name] = round(m / base, 3) if base else None
        if res.large_map:
            row["large_map"] = {"one_flow": res.one_flow, "entries": res.maps}
        rows.append(row)
    return rows
