"""Runs the whole bench and returns everything measured as one JSON-able dict:

  microbench  BPF_PROG_TEST_RUN per frame class (bench/microbench.py): the breakdown
  cost        each workload at a fixed offered load, the same for every configuration;
              the figure is the CPU time all CPUs spent (softirq included) per request or
              per GB: what the configuration costs for the same work
  saturation  each workload as fast as it goes: the throughput an operator loses
  in-traffic  the cost runs again with program run-time statistics on: ns per
              invocation of each classifier in real traffic, the clone shown apart
  attach      python -m bench.attach: new interfaces attached, latency and packets missed;
              then python -m bench.containers: the same for real podman containers

Every pass runs in rounds; in each round the workloads, and the configurations within a
workload, run in a random order (seeded; the seed is in the JSON). Every run of every
configuration runs the same apparatus: a FIN/RST tcpdump on a debug interface (the
configuration's own, or one made for the watch), the CPU meter and the foreign-CPU
estimate; the mirror's controller with its sweep loop is part of what the mirror costs."""
from __future__ import annotations

import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

from mirror.lab.netns import cleanup_stale, unique_name

from . import microbench, workloads
from .completeness import Watch
from .configs import Shared, all_configs
from .lab import CLIENT_CPU, H2_PORT, OFFLOADS, SERVER_CPU, Lab
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
    (H1_0, ("untraced", "qdiscs", "tcpdump-w", "thesis", *MIRRORS, "mirror-nosnap",
            "mirror-noh2")),
    (H1_100, ("untraced", "tcpdump-w", "thesis", *MIRRORS, "mirror-nosnap", "mirror-noh2",
              "mirror-nobudget")),
    (H2C_0, ("untraced", "mirror-clsact", "mirror-noh2")),
    (H2C_100, ("untraced", "mirror-clsact", "mirror-nobudget")),
    (IPERF_OFF, ("untraced", "tcpdump-w", "thesis", "mirror-clsact", "mirror-tcx")),
)
SATURATION_PLAN = (
    (H1_0, ("untraced", "thesis", "mirror-clsact", "mirror-nobudget")),
    (H1_100, ("untraced", "thesis", "mirror-clsact", "mirror-nobudget")),
    (IPERF_OFF, ("untraced", "thesis", "mirror-clsact")),
    (IPERF_ON, ("untraced", "thesis", "mirror-clsact")),
)
IN_TRAFFIC_PLAN = (
    (H1_0, ("thesis", "mirror-clsact", "mirror-noh2", "mirror-nosnap")),
    (H1_100, ("thesis", "mirror-clsact", "mirror-nobudget", "mirror-decide", "mirror-noh2")),
    (H2C_0, ("mirror-clsact", "mirror-noh2")),
    (H2C_100, ("mirror-clsact", "mirror-nobudget")),
)
# Classifier counters recorded per run (their deltas), to read a storm's cost against.
CLASSIFIER_COUNTERS = ("flows_marked", "mirrored_packets", "mirrored_bytes", "events",
                       "events_lost", "skip_flow_packets", "skip_flow_bytes", "skip_cpu_rate")
PLANS = {"cost": COST_PLAN, "saturation": SATURATION_PLAN, "in_traffic": IN_TRAFFIC_PLAN}


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
    container_count: int = 20        # podman containers in the attach pass (bench.containers)
    seed: int = 0
    max_foreign: float = 1.0         # a group of runs with more foreign CPU is run again...
    retry_budget: int = 0            # ...at most this many times per bench run


QUICK = Settings("quick", rounds=1, seconds=1, http_rate=10000, h2c_rate=5000,
                 iperf_bitrate=1e9,
                 saturation_rounds=1, saturation_seconds=1, iperf_omit=0, stats_rounds=1,
                 micro_rounds=2, micro_repeat=20000, micro_singles=100, settle_seconds=0.1,
                 attach_count=5, container_count=2)
FULL = Settings("full", rounds=20, seconds=2.5, http_rate=25000, h2c_rate=12000,
                iperf_bitrate=2e9,
                saturation_rounds=5, saturation_seconds=3, iperf_omit=1, stats_rounds=8,
                micro_rounds=7, micro_repeat=500000, micro_singles=3000, settle_seconds=0.3,
                attach_count=200, container_count=20, max_foreign=0.10, retry_budget=10)

TOOLS = ("h2load", "iperf3", "nginx", "tcpdump", "taskset", "ip", "ss")


def preflight() -> None:
    if os.geteuid() != 0:
        sys.exit("bench: run as root: it loads BPF programs and builds network namespaces")
    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing:
        sys.exit(f"bench: missing {', '.join(missing)}; scripts/setup installs them")
    if os.cpu_count() < 2:
        sys.exit("bench: needs two CPUs (client and server are pinned to one each)")
    from mirror.bpfprog import check_environment
    check_environment()


def raise_interrupt(signum, frame):
    """A SIGTERM handler: the run unwinds like Ctrl-C, through every cleanup."""
    raise KeyboardInterrupt


class Progress:
    """One line per step on stderr, with the time spent and the time left."""
    PREFIX = "bench"

    def __init__(self, total: int):
        self.total, self.done, self.t0 = total, 0, time.monotonic()

    def step(self, text: str) -> None:
        self.done += 1
        elapsed = time.monotonic() - self.t0
        eta = elapsed / self.done * (self.total - self.done)
        print(f"[{self.done:3d}/{self.total}] {text:<78} {_mmss(elapsed)} eta {_mmss(eta)}",
              file=sys.stderr, flush=True)

    @classmethod
    def note(cls, text: str) -> None:
        print(f"{cls.PREFIX}: {text}", file=sys.stderr, flush=True)


def _mmss(s: float) -> str:
    return f"{int(s) // 60}:{int(s) % 60:02d}"


def machine_info() -> dict:
    def first(cmd):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True).stdout
            return (out.strip().splitlines() or [""])[0]
        except OSError:
            return ""
    model = ""
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit = first(["git", "-C", top, "rev-parse", "--short", "HEAD"])
    dirty = first(["git", "-C", top, "status", "--porcelain", "--", "bpf", "mirror", "bench",
                   ":!bench/results"])
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "cpu_model": model,
            "git_commit": commit + ("+uncommitted changes" if dirty else ""),
            "loadavg": open("/proc/loadavg").read().split()[:3],
            "h2load": first(["h2load", "--version"]), "iperf3": first(["iperf3", "--version"]),
            "nginx": subprocess.run(["nginx", "-v"], capture_output=True,
                                    text=True).stderr.strip(),
            "client_cpu": CLIENT_CPU, "server_cpu": SERVER_CPU}



class Apparatus:
    """What every run carries, whatever the configuration: a debug interface for the watch
    when the configuration has none (made once, silent: nothing is mirrored to it)."""

    def __init__(self, shared):
        from pyroute2 import IPRoute

        from mirror import debugif
        self.name = unique_name("w")
        with IPRoute() as ipr:
            debugif.ensure(ipr, self.name, lambda: shared.sink.fd)

    def close(self) -> None:
        from pyroute2 import IPRoute

        from mirror import debugif
        with IPRoute() as ipr:
            debugif.remove(ipr, self.name)


def run_one(cfg, lab, wl: Workload, st: Settings, pass_: str, app: Apparatus) -> dict:
    """One run: attach, settle, start the watch and the meters, run the workload, judge,
    detach."""
    rec = {"pass": pass_, "workload": wl.id, "config": cfg.key}
    fixed = pass_ in ("cost", "in_traffic")
    seconds = st.seconds if fixed else st.saturation_seconds
    cfg.setup(lab)
    watch = None
    try:
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


def run_pass(pass_: str, rounds: int, configs: dict, lab, st: Settings, app: Apparatus,
             rng: random.Random, progress: Progress, retries: list[int]) -> list[dict]:
    """`rounds` rounds of a plan; workloads and configurations shuffled in each round; a
    workload's group run again (budget permitting) when another tenant took more than
    max_foreign of the CPUs during one of its runs."""
    plan = [(wl, [configs[c] for c in cfgs if c in configs]) for wl, cfgs in PLANS[pass_]]
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
                    Progress.note(f"{len(busy)} run(s) of this group had more than "
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


def attach_pass(st: Settings, progress: Progress) -> dict:
    """python -m bench.attach per hook layout, in a child process of its own: it runs a
    `mirror run` and creates the interfaces itself."""
    out = {}
    for hook in ("clsact", "tcx"):
        cmd = [sys.executable, "-m", "bench.attach", "--count", str(st.attach_count),
               "--hook", hook, "--json"]
        top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        proc = subprocess.run(cmd, cwd=top, capture_output=True, text=True,
                              timeout=600 + 3 * st.attach_count)
        if proc.returncode != 0:
            out[hook] = {"error": (proc.stderr or proc.stdout).strip()[-500:]}
            progress.step(f"attach {hook}: FAILED")
            continue
        out[hook] = json.loads(proc.stdout)
        r = out[hook]
        progress.step(f"attach {hook}: p50 {r.get('attach_ms_p50') or 0:.1f} ms, p99 "
                      f"{r.get('attach_ms_p99') or 0:.1f} ms, {r.get('packets_missed')} "
                      f"packets missed of {r.get('packets_sent')}")
    out["containers"] = containers_pass(st, progress)
    return out


def containers_pass(st: Settings, progress: Progress) -> dict:
    """python -m bench.containers (clsact): real podman containers. Skipped, with the
    reason in the JSON, where podman or the image is missing."""
    from .containers import missing_prerequisite
    reason = missing_prerequisite()
    if reason:
        progress.step(f"attach podman containers: skipped ({reason})")
        return {"skipped": reason}
    cmd = [sys.executable, "-m", "bench.containers", "--count", str(st.container_count),
           "--json"]
    top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(cmd, cwd=top, capture_output=True, text=True,
                          timeout=300 + 10 * st.container_count)
    if proc.returncode != 0:
        progress.step("attach podman containers: FAILED")
        return {"error": (proc.stderr or proc.stdout).strip()[-500:]}
    r = json.loads(proc.stdout)
    progress.step(f"attach podman containers: podman run -> attached p50 "
                  f"{r.get('attach_ms_p50') or 0:.1f} ms, margin to the first packet p50 "
                  f"{r.get('margin_ms_p50') or 0:.1f} ms, {r.get('packets_missed')} packets "
                  f"missed of {r.get('packets_sent')}")
    return r


def run(st: Settings, only: list[str] | None = None, passes=("micro", "cost", "saturation",
                                                            "in_traffic", "attach")) -> dict:
    preflight()
    # The controller's ownership records go to a private directory: they mean nothing
    # once the bench is over.
    state_dir = tempfile.TemporaryDirectory(prefix="bench-state-")
    os.environ["MIRROR_STATE_DIR"] = state_dir.name
    removed = cleanup_stale()
    if removed:
        Progress.note(f"removed leftovers of a dead run: {', '.join(removed)}")
    started = time.time()
    info = machine_info()
    seed = st.seed or int(started)
    rng = random.Random(seed)
    Progress.note(f"{st.mode} mode: {st.rounds} cost round(s), {st.saturation_rounds} "
                  f"saturation, {st.stats_rounds} in-traffic; seed {seed}; load average "
                  f"{' '.join(info['loadavg'])}; compiling the classifiers")
    shared = Shared()
    configs = {k: c for k, c in all_configs(shared).items()
               if not only or k in only or k == "untraced"}
    rounds = {"cost": st.rounds, "saturation": st.saturation_rounds,
              "in_traffic": st.stats_rounds}
    total = sum(rounds[p] * sum(len([c for c in cfgs if c in configs]) for _, cfgs in PLANS[p])
                for p in PLANS if p in passes)
    total += ("micro" in passes) + 3 * ("attach" in passes)
    progress = Progress(total)
    result = {"settings": asdict(st), "seed": seed, "machine": info, "started": started,
              "configs": [{"key": c.key, "label": c.label, "mirrors": c.mirrors}
                          for c in configs.values()],
              "plans": {p: [[wl.id, list(cfgs)] for wl, cfgs in PLANS[p]] for p in PLANS},
              "workloads": workloads_meta(st), "runs": [], "microbench": [], "attach": {}}
    lab = Lab()
    app = None
    retries = [st.retry_budget]
    try:
        if "micro" in passes:
            result["microbench"] = microbench_pass(shared, st, progress)
        lab.start()
        app = Apparatus(shared)
        Progress.note(f"lab up: server namespace {lab.host.ns}, monitored veth {lab.host_if}")
        for p in ("cost", "saturation"):
            if p in passes:
                result["runs"] += run_pass(p, rounds[p], configs, lab, st, app, rng,
                                           progress, retries)
        if "in_traffic" in passes:
            with EnabledStats():
                result["runs"] += run_pass("in_traffic", st.stats_rounds, configs, lab, st,
                                           app, rng, progress, retries)
    finally:
        if app:
            app.close()
        lab.stop()
        state_dir.cleanup()
    if "attach" in passes:
        result["attach"] = attach_pass(st, progress)
    result["finished"] = time.time()
    result["machine"]["loadavg_after"] = open("/proc/loadavg").read().split()[:3]
    return result


def microbench_pass(shared, st: Settings, progress: Progress) -> list[dict]:
    from pyroute2 import IPRoute

    from mirror import debugif
    from mirror.lab.netns import unique_name
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
