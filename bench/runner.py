"""Runs the bench and returns everything measured as one JSON-able dict, in either of its
modes. The passes (python -m bench, run):

  microbench  BPF_PROG_TEST_RUN per frame class (bench/microbench.py): the breakdown
  state       python -m bench.statecost (one connection state per packet, by kind of map)
              and python -m bench.eventcost (user space's CPU per error event)
  cost        each workload at a fixed offered load, the same for every configuration;
              the figure is the CPU time all CPUs spent (softirq included) per request or
              per GB: what the configuration costs for the same work
  saturation  each workload as fast as it goes: the throughput an operator loses
  in-traffic  the cost runs again with program run-time statistics on: ns per
              invocation of each classifier in real traffic, the clone shown apart
  attach      python -m bench.attach: new interfaces attached, latency and packets missed;
              then python -m bench.containers: the same for real podman containers,
              attached by the link-event watcher and by the chained CNI plugin

Every pass runs in rounds; in each round the workloads, and the configurations within a
workload, run in a random order (seeded; the seed is in the JSON). Every run of every
configuration runs the same apparatus: a FIN/RST tcpdump on a debug interface (the
configuration's own, or one made for the watch), the CPU meter and the foreign-CPU
estimate; the mirror's controller with its sweep loop is part of what the mirror costs.

The scale mode (python -m bench.scale, run_scale; the experiment is described in
bench/scale.py): h2load saturation throughput at each CPU count k, on a lab spread over
the first k CPUs, every configuration once per error level in every round, in a random
order; judged by counters only.

Both modes begin and end the same way (Session), run their workloads through the same
h2load runner (bench/workloads.py), and are written by the same writer
(bench/report.py); the entry points run them through `guarded`, so that a machine the
bench cannot use, or an interruption, ends either mode the same way."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from pyroute2 import IPRoute

from mirror import debugif
from mirror.errors import UsageError
from mirror.lab.netns import cleanup_stale, unique_name

from . import microbench, workloads
from .completeness import Watch, counters_check
from .configs import CANDIDATE, Shared, all_configs, with_candidates
from .containers import ATTACH_MODES, missing_prerequisite
from .lab import CLIENT_CPU, H2_PORT, OFFLOADS, SERVER_CPU, Lab, link_stats
from .machine import (LAB_TOOLS, TOOLS, machine_info, preflight, raise_interrupt,
                      tree_commit, usable_cpus)
from .noise import CpuMeter, Sample
from .progs import EnabledStats, run_stats


@dataclass(frozen=True)
class Workload:
    id: str
    kind: str                   # "h2load" or "iperf3"
    proto: str = "h1"           # h2load: "h1" or "h2c"
    error_pct: int = 0
    offloads: str = "off"       # iperf3: "on" or "off"

    @property
    def port(self) -> int:
        return H2_PORT if self.proto == "h2c" else 80

    def describe(self) -> str:
        if self.kind == "iperf3":
            return f"iperf3 offloads {self.offloads}"
        return f"{'HTTP/1.1' if self.proto == 'h1' else 'h2c'} {self.error_pct}% errors"


H1_0 = Workload("http1-0", "h2load", "h1", 0)
H1_100 = Workload("http1-100", "h2load", "h1", 100)
H2C_0 = Workload("h2c-0", "h2load", "h2c", 0)
H2C_100 = Workload("h2c-100", "h2load", "h2c", 100)
IPERF_OFF = Workload("iperf3-off", "iperf3", offloads="off")
IPERF_ON = Workload("iperf3-on", "iperf3", offloads="on")

MIRRORS = ("mirror-clsact", "mirror-tcx", "mirror-htb")
# (workload, configurations) per pass. The features of this round are switched off one
# at a time where they can matter; the thesis cannot read h2c, so it sits out h2c.
COST_PLAN = (
    (H1_0, ("untraced", "qdiscs", "empty-clsact", "tcpdump-w", "thesis", *MIRRORS,
            "mirror-nosnap", "mirror-noh2")),
    (H1_100, ("untraced", "tcpdump-w", "thesis", *MIRRORS, "mirror-nosnap", "mirror-noh2",
              "mirror-nobudget")),
    (H2C_0, ("untraced", "mirror-clsact", "mirror-noh2")),
    (H2C_100, ("untraced", "mirror-clsact", "mirror-nobudget")),
    (IPERF_OFF, ("untraced", "tcpdump-w", "thesis", "mirror-clsact", "mirror-tcx")),
)
SATURATION_PLAN = (
    (H1_0, ("untraced", "thesis", "mirror-clsact", "mirror-nobudget")),
    (H1_100, ("untraced", "thesis", "tcpdump-w", "mirror-clsact", "mirror-nobudget")),
    (IPERF_OFF, ("untraced", "thesis", "mirror-clsact")),
    (IPERF_ON, ("untraced", "thesis", "mirror-clsact")),
)
IN_TRAFFIC_PLAN = (
    (H1_0, ("thesis", "mirror-clsact", "mirror-noh2", "mirror-nosnap")),
    (H1_100, ("thesis", "mirror-clsact", "mirror-nobudget", "mirror-decide",
              "mirror-decide-bounded", "mirror-noh2")),
    (H2C_0, ("mirror-clsact", "mirror-noh2")),
    (H2C_100, ("mirror-clsact", "mirror-nobudget")),
)
# Classifier counters recorded per run (their deltas), to read a storm's cost against.
CLASSIFIER_COUNTERS = ("flows_marked", "mirrored_packets", "mirrored_bytes", "errors",
                       "events", "events_lost", "events_rate_limited",
                       "events_conn_limited", "skip_flow_packets", "skip_flow_bytes",
                       "skip_cpu_rate", "conns_started", "conns_replaced")
PLANS = {"cost": COST_PLAN, "saturation": SATURATION_PLAN, "in_traffic": IN_TRAFFIC_PLAN}


def plans_for(configs: dict) -> dict:
    """PLANS with each configuration's candidate twin (bench/configs.py, --candidate)
    beside it, where the run has one: a twin runs for every workload its configuration
    runs for."""
    return {p: [(wl, [k for c in cfgs for k in (c, c + CANDIDATE) if k == c or k in configs])
                for wl, cfgs in plan] for p, plan in PLANS.items()}


@dataclass
class Settings:
    mode: str
    rounds: int                      # cost rounds
    seconds: float                   # per cost and in-traffic run
    http_rate: int                   # requests/s offered by all h2load clients together...
    h2c_rate: int                    # ...over HTTP/1.1 and over h2c (nginx serves less)
    iperf_bitrate: float             # bits/s offered by iperf3 in the cost runs
    saturation_rounds: int
    saturation_seconds: float
    iperf_omit: int
    stats_rounds: int                # in-traffic rounds
    micro_rounds: int
    micro_repeat: int
    micro_singles: int
    settle_seconds: float            # pause between attaching and starting traffic
    attach_count: int                # new interfaces per hook layout in the attach pass
    state_rounds: int = 7            # the state pass: rounds of bench.statecost and...
    state_repeat: int = 200_000      # ...its repetitions per figure; ...
    event_count: int = 1000          # ...events per bench.eventcost measurement, and...
    keep_up_seconds: float = 10      # ...how long bench.eventcost --keep-up offers errors
    container_count: int = 20        # podman containers per attach mode (bench.containers)
    seed: int = 0
    max_foreign: float = 1.0         # a group of runs with more foreign CPU is run again...
    retry_budget: int = 0            # ...at most this many times per bench run


QUICK = Settings("quick", rounds=1, seconds=1, http_rate=10000, h2c_rate=5000,
                 iperf_bitrate=1e9,
                 saturation_rounds=1, saturation_seconds=1, iperf_omit=0, stats_rounds=1,
                 micro_rounds=2, micro_repeat=20000, micro_singles=100, settle_seconds=0.1,
                 attach_count=5, state_rounds=1, state_repeat=20000, event_count=200,
                 keep_up_seconds=1, container_count=2)
FULL = Settings("full", rounds=20, seconds=2.5, http_rate=25000, h2c_rate=12000,
                iperf_bitrate=2e9,
                saturation_rounds=5, saturation_seconds=3, iperf_omit=1, stats_rounds=8,
                micro_rounds=7, micro_repeat=500000, micro_singles=3000, settle_seconds=0.3,
                attach_count=200, container_count=20, max_foreign=0.10, retry_budget=10)

class Progress:
    """One line per step on stderr, with the time spent and the time left; notes in
    between. Everything prefixed with the mode's name."""

    def __init__(self, prefix: str):
        self.prefix, self.total, self.done, self.t0 = prefix, 0, 0, time.monotonic()

    def start(self, total: int) -> None:
        """The clock starts here, after the programs are compiled: the time left is
        estimated from the runs alone."""
        self.total, self.done, self.t0 = total, 0, time.monotonic()

    def step(self, text: str) -> None:
        self.done += 1
        elapsed = time.monotonic() - self.t0
        eta = elapsed / self.done * (self.total - self.done)
        print(f"[{self.done:3d}/{self.total}] {text:<78} {_mmss(elapsed)} eta {_mmss(eta)}",
              file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        print(f"{self.prefix}: {text}", file=sys.stderr, flush=True)


def _mmss(s: float) -> str:
    return f"{int(s) // 60}:{int(s) % 60:02d}"


class Session:
    """What every mode does before its first run, in the same order: the preflight; the
    controller's ownership records in a private directory (they mean nothing once the
    bench is over); the leftovers of a killed run removed; the machine recorded; the seed
    of the run order drawn (the start time unless given). close() after the last run
    that needs the records."""

    def __init__(self, progress: Progress, tools: tuple[str, ...], min_cpus: int,
                 seed: int | None):
        preflight(tools, min_cpus)
        self.state_dir = tempfile.TemporaryDirectory(prefix="bench-state-")
        os.environ["MIRROR_STATE_DIR"] = self.state_dir.name
        removed = cleanup_stale()
        if removed:
            progress.note(f"removed leftovers of a dead run: {', '.join(removed)}")
        self.started = time.time()
        self.machine = machine_info()
        self.seed = seed if seed is not None else int(self.started)
        self.rng = random.Random(self.seed)

    def close(self) -> None:
        self.state_dir.cleanup()


def guarded(prog: str, run: Callable[..., dict], *args) -> tuple[dict | None, int]:
    """Runs one mode as every entry point does: SIGTERM unwinds like Ctrl-C; a machine the
    bench cannot use ends it with one line on stderr and exit status 2 (as the mirror's
    CLI), an interruption with one line and 130 once every cleanup has run. Returns the
    result (None when there is none) and the exit status."""
    signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        return run(*args), 0
    except UsageError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return None, 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; namespaces, qdiscs, filters and debug interfaces "
              "removed", file=sys.stderr)
        return None, 130


class Apparatus:
    """What every run carries, whatever the configuration: a debug interface for the watch
    when the configuration has none (made once, silent: nothing is mirrored to it)."""

    def __init__(self, shared):
        self.name = unique_name("w")
        with IPRoute() as ipr:
            debugif.ensure(ipr, self.name, lambda: shared.sink.fd)

    def close(self) -> None:
        with IPRoute() as ipr:
            debugif.remove(ipr, self.name)


def run_one(cfg, lab, wl: Workload, st: Settings, pass_: str, app: Apparatus) -> dict:
    """One run: attach, settle, start the watch and the meters, run the workload, judge,
    detach."""
    rec = {"pass": pass_, "workload": wl.id, "config": cfg.key}
    fixed = pass_ in ("cost", "in_traffic")
    seconds = st.seconds if fixed else st.saturation_seconds
    watch = None
    try:
        cfg.setup(lab)              # inside: teardown also undoes a half-done setup
        dbg = cfg.debug_iface or app.name
        time.sleep(st.settle_seconds)
        watch = Watch(lab, dbg, wl.port, wl.proto, cfg.budgeted).start()
        fds = cfg.prog_fds() if pass_ == "in_traffic" else {}
        before = {k: run_stats(fd) for k, fd in fds.items()}
        sink = cfg.sink_fd() if pass_ == "in_traffic" else None
        sink0 = run_stats(sink) if sink is not None else None
        counters0 = cfg.counters()
        s0, meter = Sample(), CpuMeter()
        if wl.kind == "iperf3":
            res = workloads.iperf3(lab, round(seconds), 0 if fixed else st.iperf_omit,
                                   st.iperf_bitrate if fixed else None)
        else:
            rate = st.http_rate if wl.proto == "h1" else st.h2c_rate
            res = workloads.h2load(lab, wl.error_pct, seconds, wl.proto,
                                   rate if fixed else None)
        cpu = meter.stop()
        rec.update(s0.shares(Sample()))
        after = {k: run_stats(fd) for k, fd in fds.items()}
        sink1 = run_stats(sink) if sink is not None else None
        if counters0 is not None:
            # what the classifier did: clones made and skipped by budget, events
            counters1 = cfg.counters()
            rec["classifier"] = {k: counters1[k] - counters0[k] for k in CLASSIFIER_COUNTERS}
        rec.update(res)
        rec.update(cpu)
        if wl.kind == "iperf3":
            gb = res["bytes_received"] / 1e9
            rec["cpu_s_per_gb"] = round(cpu["cpu_s"] / gb, 5) if gb else None
            watch.abort()
        else:
            rec["cpu_us_per_request"] = (round(cpu["cpu_s"] * 1e6 / res["requests"], 3)
                                         if res["requests"] else None)
            comp = watch.stop(res)
            if cfg.mirrors and (wl.proto == "h1" or cfg.reads_h2):
                rec["completeness"] = comp
        watch = None
        if fds:
            rec.update(_program_stats(before, after, sink0, sink1, res))
    finally:
        if watch:
            watch.abort()
        cfg.teardown()
    return rec


def _program_stats(before, after, sink0, sink1, res) -> dict:
    out, total = {}, None
    for k in before:
        d = after[k] - before[k]
        out[f"{k}_ns_per_run"] = _round(d.ns_per_run)
        out[f"{k}_runs"] = d.run_cnt
        total = d if total is None else total + d
    out["ns_per_run"] = _round(total.ns_per_run)
    out["runs"] = total.run_cnt
    requests = res.get("requests")
    out["runs_per_request"] = round(total.run_cnt / requests, 3) if requests else None
    if sink0 is not None:
        ds = sink1 - sink0
        out["sink_ns_per_clone"] = _round(ds.ns_per_run)
        out["sink_runs"] = ds.run_cnt
    return out


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def describe(rec: dict) -> str:
    if "error" in rec:
        return f"FAILED: {rec['error'][:60]}"
    busy = f"  foreign {100 * rec['foreign_cpu']:.0f}%" if rec.get("foreign_cpu") else ""
    if rec.get("ns_per_run") is not None:
        text = f"{rec['ns_per_run']:6.1f} ns/invocation"
    elif rec["workload"].startswith("iperf3"):
        text = f"{rec['bits_per_second'] / 1e9:6.2f} Gbit/s"
        if rec.get("cpu_s_per_gb"):
            text += f"  {rec['cpu_s_per_gb']:.3f} CPU-s/GB"
    else:
        text = f"{rec['req_per_s']:9,.0f} req/s"
        if rec.get("offered_req_per_s"):
            text += f"  {rec['cpu_us_per_request']:6.2f} CPU-us/req"
    comp = rec.get("completeness")
    if comp:
        text += (f"  mirrored {comp['error_flows_mirrored']}/{comp['error_connections']} "
                 f"{'ok' if comp['complete'] else 'INCOMPLETE'}")
    return text + busy


def run_pass(pass_: str, plan: list, rounds: int, configs: dict, lab, st: Settings,
             app: Apparatus, rng: random.Random, progress: Progress,
             retries: list[int]) -> list[dict]:
    """`rounds` rounds of a plan (plans_for); workloads and configurations shuffled in each
    round; a workload's group run again (budget permitting) when another tenant took more
    than max_foreign of the CPUs during one of its runs."""
    plan = [(wl, [configs[c] for c in cfgs if c in configs]) for wl, cfgs in plan]
    out = []
    for rnd in range(1, rounds + 1):
        order = plan[:]
        rng.shuffle(order)
        for wl, cfgs in order:
            while True:
                cfgs = cfgs[:]
                rng.shuffle(cfgs)
                group = run_group(pass_, cfgs, lab, wl, st, app, rnd, progress)
                busy = [r for r in group if (r.get("foreign_cpu") or 0) > st.max_foreign]
                if busy and retries[0] > 0:
                    retries[0] -= 1
                    for r in group:
                        r["discarded"] = "other work shared the CPUs: group run again"
                    out.extend(group)
                    progress.total += len(cfgs)
                    progress.note(f"{len(busy)} run(s) of this group had more than "
                                  f"{st.max_foreign:.0%} foreign CPU; running the group "
                                  f"again ({retries[0]} retries left)")
                    continue
                out.extend(group)
                break
    return out


def run_group(pass_, cfgs, lab, wl: Workload, st, app, rnd, progress) -> list[dict]:
    group = []
    if wl.kind == "iperf3":
        lab.set_offloads(wl.offloads == "on")
    try:
        for cfg in cfgs:
            try:
                rec = run_one(cfg, lab, wl, st, pass_, app)
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                rec = {"pass": pass_, "workload": wl.id, "config": cfg.key,
                       "error": f"{type(exc).__name__}: {exc}"}
            rec["round"] = rnd
            group.append(rec)
            progress.step(f"{pass_} round {rnd} {wl.describe():<22} {cfg.key:<15} "
                          f"{describe(rec)}")
    finally:
        if wl.kind == "iperf3":
            lab.set_offloads(True)
    return group


def run_child(module: str, args: list[str], timeout: float) -> dict:
    """python -m bench.<module> ARGS --json in a child process of its own, from the
    repository's top: its JSON result, or {"error": the end of what it said} when it
    failed."""
    top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", f"bench.{module}", *args, "--json"],
                          cwd=top, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip()[-500:]}
    return json.loads(proc.stdout)


def attach_pass(st: Settings, progress: Progress) -> dict:
    """python -m bench.attach per hook layout, in a child process of its own: it runs a
    `mirror run` and creates the interfaces itself."""
    out = {}
    for hook in ("clsact", "tcx"):
        out[hook] = r = run_child("attach", ["--count", str(st.attach_count), "--hook", hook],
                                  timeout=600 + 3 * st.attach_count)
        if "error" in r:
            progress.step(f"attach {hook}: FAILED")
            continue
        progress.step(f"attach {hook}: p50 {r.get('attach_ms_p50') or 0:.1f} ms, p99 "
                      f"{r.get('attach_ms_p99') or 0:.1f} ms, {r.get('packets_missed')} "
                      f"packets missed of {r.get('packets_sent')}")
    out["containers"] = containers_pass(st, progress)
    return out


def state_pass(st: Settings, progress: Progress) -> dict:
    """python -m bench.statecost (what one connection state costs per packet, by kind of
    map: the measurements behind the classifier's choice) and python -m bench.eventcost
    (user space's CPU per error event: what --max-events-per-second's default is chosen
    from; then --keep-up: whether the reader keeps up at that default), each in a child
    process of its own, before the lab's traffic."""
    out = {}
    for name, module, args in (
            ("statecost", "statecost", ["--rounds", str(st.state_rounds),
                                        "--repeat", str(st.state_repeat)]),
            ("eventcost", "eventcost", ["--rounds", str(st.state_rounds),
                                        "--events", str(st.event_count)]),
            ("keepup", "eventcost", ["--keep-up", f"{st.keep_up_seconds:g}"])):
        out[name] = r = run_child(module, args, timeout=1800)
        if "error" in r:
            progress.step(f"{name}: FAILED")
            continue
        if name == "statecost":
            ns = r["median_ns"]
            progress.step("state per packet, ns above base: " + ", ".join(
                f"{k} {ns[k + '_hit']:.0f}/{ns[k + '_new']:.0f}" for k in
                ("lru", "hash", "way4")) + " (hit/new)")
        elif name == "eventcost":
            progress.step("user space per event: " + ", ".join(
                f"{w} {v:.1f} us" for w, v in r["us_per_event"].items()))
        else:
            progress.step(f"at the bound: {r['events_per_second']:,} events/s read, "
                          f"{r['events_lost']} lost, reader at {r['reader_cpu_share']:.0%} "
                          "of a core")
    return out


def containers_pass(st: Settings, progress: Progress) -> dict:
    """python -m bench.containers (clsact) once per attach mode: real podman containers
    attached by the link-event watcher, then by the chained CNI plugin; what the plugin
    adds to a container's start is the difference of the two (bench/report.py). A mode
    is skipped, with the reason in the JSON, where podman, go or CNI is missing."""
    out = {}
    for mode in ATTACH_MODES:
        what = f"attach podman containers ({mode})"
        reason = missing_prerequisite(mode)
        if reason:
            progress.step(f"{what}: skipped ({reason})")
            out[mode] = {"skipped": reason}
            continue
        out[mode] = r = run_child("containers", ["--count", str(st.container_count),
                                                 "--attach-by", mode],
                                  timeout=900 + 10 * st.container_count)
        if "error" in r:
            progress.step(f"{what}: FAILED")
            continue
        progress.step(f"{what}: podman run -> attached p50 {r.get('attach_ms_p50') or 0:.1f} "
                      f"ms, -> first packet p50 {r.get('first_packet_ms_p50') or 0:.1f} ms, "
                      f"{r.get('packets_missed')} packets missed of {r.get('packets_sent')}")
    return out


ALL_PASSES = ("micro", "state", "cost", "saturation", "in_traffic", "attach")


def run(st: Settings, only: list[str] | None = None, passes=ALL_PASSES,
        candidate_dir: str | None = None) -> dict:
    progress = Progress("bench")
    session = Session(progress, TOOLS, 2, st.seed or None)
    info = {**session.machine, "client_cpu": CLIENT_CPU, "server_cpu": SERVER_CPU}
    lab = Lab()
    app = None
    try:
        progress.note(f"{st.mode} mode: {st.rounds} cost round(s), {st.saturation_rounds} "
                      f"saturation, {st.stats_rounds} in-traffic; seed {session.seed}; load "
                      f"average {' '.join(info['loadavg'])}; compiling the classifiers")
        shared = Shared(candidate_dir)
        configs = with_candidates(shared, {k: c for k, c in all_configs(shared).items()
                                           if not only or k in only or k == "untraced"})
        plans = plans_for(configs)
        rounds = {"cost": st.rounds, "saturation": st.saturation_rounds,
                  "in_traffic": st.stats_rounds}
        total = sum(rounds[p] * sum(len([c for c in cfgs if c in configs])
                                    for _, cfgs in plans[p])
                    for p in plans if p in passes)
        # bench.statecost, bench.eventcost twice; bench.attach once per hook (clsact,
        # tcx), then bench.containers once per mode.
        total += (("micro" in passes) + 3 * ("state" in passes)
                  + (2 + len(ATTACH_MODES)) * ("attach" in passes))
        progress.start(total)
        result = {"settings": asdict(st), "seed": session.seed, "machine": info,
                  "started": session.started,
                  "configs": [{"key": c.key, "label": c.label, "mirrors": c.mirrors}
                              for c in configs.values()],
                  "plans": {p: [[wl.id, list(cfgs)] for wl, cfgs in plans[p]] for p in plans},
                  "workloads": workloads_meta(st), "runs": [], "microbench": [],
                  "state": {}, "attach": {}}
        ran = [p for p in ALL_PASSES if p in passes]
        if len(ran) < len(ALL_PASSES) or only:
            # What the report's title names, so that a subset is never read as a full run.
            result["subset"] = {"passes": ran, "configs": sorted(configs)}
        if candidate_dir:
            result["candidate"] = {"dir": str(candidate_dir),
                                   "git_commit": tree_commit(candidate_dir)}
        retries = [st.retry_budget]
        if "micro" in passes:
            result["microbench"] = microbench_pass(shared, st, progress)
        if "state" in passes:
            result["state"] = state_pass(st, progress)
        lab.start()
        app = Apparatus(shared)
        progress.note(f"lab up: server namespace {lab.host.ns}, monitored veth {lab.host_if}")
        for p in ("cost", "saturation"):
            if p in passes:
                result["runs"] += run_pass(p, plans[p], rounds[p], configs, lab, st, app,
                                           session.rng, progress, retries)
        if "in_traffic" in passes:
            with EnabledStats():
                result["runs"] += run_pass("in_traffic", plans["in_traffic"], st.stats_rounds,
                                           configs, lab, st, app, session.rng, progress,
                                           retries)
    finally:
        if app:
            app.close()
        lab.stop()
        session.close()
    if "attach" in passes:
        result["attach"] = attach_pass(st, progress)
    result["finished"] = time.time()
    result["machine"]["loadavg_after"] = open("/proc/loadavg").read().split()[:3]
    return result


def microbench_pass(shared, st: Settings, progress: Progress) -> list[dict]:
    clf = shared.classifier
    clf.clear()
    clf.set_trigger(frozenset(range(500, 600)))
    name = unique_name("d")
    with IPRoute() as ipr:
        dbg = debugif.ensure(ipr, name, lambda: shared.sink.fd)
        try:
            subjects = microbench.subjects(clf, shared.thesis, shared.empty, dbg.ifindex)
            res = microbench.run(subjects, st.micro_rounds, st.micro_repeat, st.micro_singles,
                                 CLIENT_CPU)
        finally:
            debugif.remove(ipr, name)
            clf.clear()
            clf.set_debug_ifindex(0)
    rows = microbench.summarize(res)
    worst = max((r["ns"]["mirror"] / r["ns"]["thesis"] for r in rows
                 if "thesis" in r["handled_by"]), default=0)
    progress.step(f"per-packet cost: {len(rows)} frame classes, mirror/thesis worst "
                  f"{worst:.2f}x")
    return rows


def workloads_meta(st: Settings) -> dict:
    return {"h2load_instances": workloads.INSTANCES,
            "h2load_clients_per_instance": workloads.CLIENTS_PER_INSTANCE,
            "h2load_args": "[--h1] -c 4 -m 1 -t 1 -D <seconds> [--rps <rate/16>]",
            "iperf3_args": "-c <server> -t <seconds> -O <omit> -J -Z [-b <bitrate>]",
            "http_rate": st.http_rate, "h2c_rate": st.h2c_rate,
            "iperf_bitrate": st.iperf_bitrate,
            "offloads_switched": list(OFFLOADS)}


# --- the scale mode (python -m bench.scale) -------------------------------------------
def layout(k: int, cpus: list[int], how: str, per_cpu: int) -> dict:
    """Which CPUs clients and servers get at CPU count k, and how many threads, workers
    and connections."""
    use = cpus[:k]
    if k == 1 or how == "shared":
        clients = servers = use
    else:
        half = k - k // 2               # clients get the odd CPU: they send first
        clients, servers = use[:half], use[half:]
    threads = len(clients)
    conns = -(-per_cpu * k // threads) * threads     # a multiple of the threads
    return {"k": k, "cpus": use, "client_cpus": clients, "server_cpus": servers,
            "h2load_threads": threads, "nginx_workers": len(servers), "connections": conns,
            "shared": clients == servers}


def cpu_list(cpus: list[int]) -> str:
    return ",".join(map(str, cpus))


def _cpu_ticks(cpus: list[int]) -> tuple[int, int]:
    """(all, idle + iowait) ticks of the given CPUs, from /proc/stat."""
    total = idle = 0
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                vals = [int(x) for x in fields[:8]]
                total += sum(vals)
                idle += vals[3] + vals[4]
    return total, idle


def run_scale_one(cfg, lab, point: dict, pct: int, seconds: float, settle: float) -> dict:
    """Attach one configuration, saturate it with h2load, detach."""
    rec = {"k": point["k"], "config": cfg.key, "error_pct": pct}
    url = lab.error_url if pct == 100 else lab.ok_url
    try:
        cfg.setup(lab)              # inside: teardown also undoes a half-done setup
        time.sleep(settle)
        dbg0 = link_stats(cfg.debug_iface)["tx_packets"] if cfg.debug_iface else None
        opens0 = lab.passive_opens()
        s0, t0 = Sample(), _cpu_ticks(point["cpus"])
        h2 = workloads.h2load_spread(url, point["client_cpus"], point["connections"],
                                     point["h2load_threads"], seconds)
        t1, s1 = _cpu_ticks(point["cpus"]), Sample()
        h2["connections"] = point["connections"]
        rec["connections_accepted"] = lab.passive_opens() - opens0
        if dbg0 is not None:
            rec["mirror"] = counters_check(link_stats(cfg.debug_iface)["tx_packets"] - dbg0,
                                           h2, cfg.budgeted)
    finally:
        cfg.teardown()
    span = t1[0] - t0[0]
    rec.update({"req_per_s": h2["req_per_s"], "requests": h2["requests"],
                "status": h2["status"], "failed": h2["errored"] + h2["timeout"],
                "latency": h2["latency"], **s0.shares(s1),
                "cpu_busy": round(1 - (t1[1] - t0[1]) / span, 3) if span > 0 else None})
    return rec


def describe_scale(rec: dict) -> str:
    if "error" in rec:
        return f"FAILED: {' '.join(rec['error'].split())[:60]}"
    text = (f"{rec['req_per_s']:10,.0f} req/s  mean {rec['latency'].get('mean_us', 0):7.0f} us"
            f"  busy {100 * (rec['cpu_busy'] or 0):3.0f}%")
    if rec.get("foreign_cpu"):
        text += f"  foreign {100 * rec['foreign_cpu']:.0f}%"
    if "mirror" in rec:
        text += "  mirrored ok" if rec["mirror"]["complete"] else "  MIRROR INCOMPLETE"
    return text


def run_scale(args) -> dict:
    """The scale mode. `args`: bench/scale.py's options (cpus, layout, seconds, rounds,
    configs, errors, settle, connections_per_cpu, seed)."""
    progress = Progress("bench.scale")
    session = Session(progress, LAB_TOOLS, 1, args.seed)
    try:
        cpus = usable_cpus()
        points = [layout(k, cpus, args.layout, args.connections_per_cpu) for k in args.cpus]
        result = {"kind": "scale", "started": session.started, "machine": session.machine,
                  "settings": {"cpus": args.cpus, "layout": args.layout,
                               "seconds": args.seconds, "rounds": args.rounds,
                               "configs": args.configs, "error_levels": args.errors,
                               "settle": args.settle,
                               "connections_per_cpu": args.connections_per_cpu,
                               "seed": session.seed,
                               "h2load_args": "--h1 -m 1 -c <connections> -t <threads> -D "
                                              "<seconds>"},
                  "points": points, "runs": []}
        progress.note(f"{os.cpu_count()} CPUs ({len(cpus)} usable), CPU counts "
                      f"{', '.join(map(str, args.cpus))}; compiling the classifiers")
        every = all_configs(Shared())
        configs = [every[key] for key in args.configs]
        result["configs"] = [{"key": c.key, "label": c.label} for c in configs]
        progress.start(len(points) * args.rounds * len(args.errors) * len(configs))
        for point in points:
            result["runs"] += run_point(point, configs, args, session.rng, progress)
    finally:
        session.close()
    result["finished"] = time.time()
    return result


def run_point(point: dict, configs, args, order: random.Random,
              progress: Progress) -> list[dict]:
    """Every round at one CPU count, on a lab built for it."""
    lab = Lab(workers=point["nginx_workers"], server_cpus=point["server_cpus"])
    runs = []
    try:
        lab.start()
        progress.note(f"k={point['k']}: clients on CPUs {cpu_list(point['client_cpus'])} "
                      f"({point['h2load_threads']} h2load threads, {point['connections']} "
                      f"connections), nginx on {cpu_list(point['server_cpus'])} "
                      f"({point['nginx_workers']} workers)")
        for rnd in range(1, args.rounds + 1):
            for pct in args.errors:
                shuffled = order.sample(configs, len(configs))
                for pos, cfg in enumerate(shuffled):
                    try:
                        rec = run_scale_one(cfg, lab, point, pct, args.seconds, args.settle)
                    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                        rec = {"k": point["k"], "config": cfg.key, "error_pct": pct,
                               "error": f"{type(exc).__name__}: {exc}"}
                    rec.update({"round": rnd, "position": pos})
                    runs.append(rec)
                    progress.step(f"k={point['k']:<3} round {rnd} {pct:3d}% errors "
                                  f"{cfg.key:<14} {describe_scale(rec)}")
    finally:
        lab.stop()
    return runs
