"""Runs the whole bench: per-packet microbenchmark, the interleaved traffic rounds, the
in-traffic cost pass; returns everything measured as one JSON-able dict."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

from mirror.lab.netns import cleanup_stale

from . import microbench, workloads
from .completeness import Watch
from .configs import Shared, all_configs
from .lab import CLIENT_CPU, OFFLOADS, SERVER_CPU, Lab, link_stats
from .noise import Sample
from .progs import EnabledStats, run_stats


@dataclass
class Settings:
    mode: str
    rounds: int
    iperf_seconds: int
    iperf_omit: int
    h2load_seconds: float
    error_levels: tuple[int, ...]
    stats_seconds: float             # h2load runs of the in-traffic cost pass
    stats_levels: tuple[int, ...]
    micro_rounds: int
    micro_repeat: int
    micro_singles: int
    settle_seconds: float            # pause between attaching and starting traffic
    max_foreign: float = 1.0         # a group of runs with more foreign CPU is run again...
    retry_budget: int = 0            # ...at most this many times per bench run


QUICK = Settings("quick", rounds=1, iperf_seconds=1, iperf_omit=0, h2load_seconds=1,
                 error_levels=workloads.ERROR_LEVELS, stats_seconds=1, stats_levels=(0, 100),
                 micro_rounds=2, micro_repeat=20000, micro_singles=100, settle_seconds=0.1)
FULL = Settings("full", rounds=5, iperf_seconds=5, iperf_omit=1, h2load_seconds=5,
                error_levels=workloads.ERROR_LEVELS, stats_seconds=3,
                stats_levels=workloads.ERROR_LEVELS, micro_rounds=7, micro_repeat=500000,
                micro_singles=3000, settle_seconds=0.3, max_foreign=0.10, retry_budget=6)

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


class Progress:
    def __init__(self, total: int):
        self.total, self.done, self.t0 = total, 0, time.monotonic()

    def step(self, text: str) -> None:
        self.done += 1
        elapsed = time.monotonic() - self.t0
        eta = elapsed / self.done * (self.total - self.done)
        print(f"[{self.done:3d}/{self.total}] {text:<78} {_mmss(elapsed)} eta {_mmss(eta)}",
              file=sys.stderr, flush=True)

    @staticmethod
    def note(text: str) -> None:
        print(f"bench: {text}", file=sys.stderr, flush=True)


def _mmss(s: float) -> str:
    return f"{int(s) // 60}:{int(s) % 60:02d}"


def workload_list(st: Settings) -> list[tuple[str, object]]:
    return [("iperf3", "on"), ("iperf3", "off")] + [("h2load", p) for p in st.error_levels]


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


def run_traffic(cfg, lab, workload, st: Settings) -> dict:
    """One run: attach, let it settle, run the workload, detach."""
    kind, arg = workload
    rec = {"config": cfg.key, "workload": kind,
           "loadavg1": float(open("/proc/loadavg").read().split()[0])}
    cfg.setup(lab)
    watch = None
    try:
        time.sleep(st.settle_seconds)
        dbg0 = link_stats(cfg.debug_iface) if cfg.debug_iface else None
        if kind == "iperf3":
            rec["offloads"] = arg
            s0 = Sample()
            rec.update(workloads.iperf3(lab, st.iperf_seconds, st.iperf_omit))
            rec["foreign_cpu"] = s0.foreign_share(Sample())
            if dbg0:
                rec["mirrored_packets"] = (link_stats(cfg.debug_iface)["tx_packets"] -
                                           dbg0["tx_packets"])
        else:
            if cfg.mirrors:
                watch = Watch(lab, cfg.debug_iface).start()
            s0 = Sample()
            rec.update(workloads.h2load(lab, arg, st.h2load_seconds))
            rec["foreign_cpu"] = s0.foreign_share(Sample())
            if watch:
                rec["completeness"] = watch.stop(rec)
                watch = None
    finally:
        if watch:
            watch.abort()
        cfg.teardown()
    return rec


def run_group(configs, lab, wl, st: Settings, rnd: int, progress: Progress) -> list[dict]:
    """One workload on every configuration, back to back (A B C D E)."""
    group = []
    if wl[0] == "iperf3":
        lab.set_offloads(wl[1] == "on")
    try:
        for cfg in configs:
            try:
                rec = run_traffic(cfg, lab, wl, st)
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                rec = {"config": cfg.key, "workload": wl[0],
                       "error": f"{type(exc).__name__}: {exc}"}
                if wl[0] == "iperf3":
                    rec["offloads"] = wl[1]
                else:
                    rec["error_pct"] = wl[1]
            rec["round"] = rnd
            group.append(rec)
            what = (f"iperf3 offloads {wl[1]:<3}" if wl[0] == "iperf3"
                    else f"h2load {wl[1]:3d}% errors")
            progress.step(f"round {rnd} {what} {cfg.key:<14} {describe(rec)}")
    finally:
        if wl[0] == "iperf3":
            lab.set_offloads(True)
    return group


def describe(rec: dict) -> str:
    if "error" in rec:
        return f"FAILED: {rec['error'][:60]}"
    busy = ""
    if rec.get("foreign_cpu"):
        busy = f"  foreign cpu {100 * rec['foreign_cpu']:.0f}%"
    if rec["workload"] == "iperf3":
        return f"{rec['bits_per_second'] / 1e9:6.2f} Gbit/s{busy}"
    text = (f"{rec['req_per_s']:9,.0f} req/s  mean {rec['latency'].get('mean_us', 0):6.0f} us"
            f"  5xx {100 * (rec['error_share'] or 0):5.1f}%")
    comp = rec.get("completeness")
    if comp:
        text += (f"  mirrored {comp['error_flows_mirrored']}/{comp['error_connections']} "
                 f"{'ok' if comp['complete'] else 'INCOMPLETE'}")
    return text + busy


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def in_traffic_pass(configs, lab, st: Settings, progress: Progress) -> list[dict]:
    """h2load runs with program run-time statistics on: each classifier's mean ns per
    invocation in real traffic, and the debug sink's per clone."""
    out = []
    with EnabledStats():
        for pct in st.stats_levels:
            for cfg in configs:
                rec = {"config": cfg.key, "error_pct": pct}
                cfg.setup(lab)
                try:
                    time.sleep(st.settle_seconds)
                    fds = cfg.prog_fds()
                    before = {k: run_stats(fd) for k, fd in fds.items()}
                    sink0 = run_stats(cfg.sink_fd()) if cfg.sink_fd() is not None else None
                    s0 = Sample()
                    h2 = workloads.h2load(lab, pct, st.stats_seconds)
                    rec["foreign_cpu"] = s0.foreign_share(Sample())
                    after = {k: run_stats(fd) for k, fd in fds.items()}
                    sink1 = run_stats(cfg.sink_fd()) if sink0 is not None else None
                except Exception as exc:      # noqa: BLE001 - recorded, the bench goes on
                    rec["error"] = f"{type(exc).__name__}: {exc}"
                    progress.step(f"in-traffic {pct:3d}% {cfg.key:<14} FAILED: {exc}")
                    out.append(rec)
                    continue
                finally:
                    cfg.teardown()
                total = None
                for k in fds:
                    d = after[k] - before[k]
                    rec[f"{k}_ns_per_run"] = _round(d.ns_per_run)
                    rec[f"{k}_runs"] = d.run_cnt
                    total = d if total is None else total + d
                rec["ns_per_run"] = _round(total.ns_per_run)
                rec["runs"] = total.run_cnt
                rec["requests"] = h2["requests"]
                rec["req_per_s"] = h2["req_per_s"]
                rec["runs_per_request"] = round(total.run_cnt / h2["requests"], 3) \
                    if h2["requests"] else None
                if sink0 is not None:
                    ds = sink1 - sink0
                    rec["sink_ns_per_clone"] = _round(ds.ns_per_run)
                    rec["sink_runs"] = ds.run_cnt
                out.append(rec)
                ns = rec["ns_per_run"]
                progress.step(f"in-traffic {pct:3d}% {cfg.key:<14} "
                              f"{ns:6.1f} ns/packet" if ns else f"in-traffic {cfg.key} no runs")
    return out


def run(st: Settings, only: list[str] | None = None) -> dict:
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
    Progress.note(f"{st.mode} mode: {st.rounds} round(s); load average {' '.join(info['loadavg'])}"
                  f"; compiling the classifiers")
    shared = Shared()
    configs = [c for c in all_configs(shared) if not only or c.key in only]
    wls = workload_list(st)
    bpf_configs = [c for c in configs if c.bpf]
    total = (st.rounds * len(wls) * len(configs) + len(st.stats_levels) * len(bpf_configs)
             + 1)
    progress = Progress(total)
    result = {"settings": asdict(st), "machine": info, "started": started,
              "configs": [{"key": c.key, "label": c.label, "mirrors": c.mirrors}
                          for c in configs],
              "workloads": workloads_meta(), "runs": [], "in_traffic": [], "microbench": []}
    lab = Lab()
    try:
        result["microbench"] = microbench_pass(shared, st, progress)
        lab.start()
        Progress.note(f"lab up: server namespace {lab.host.ns}, monitored veth {lab.host_if}")
        retries = st.retry_budget
        for rnd in range(1, st.rounds + 1):
            for wl in wls:
                while True:
                    group = run_group(configs, lab, wl, st, rnd, progress)
                    busy = [r for r in group if (r.get("foreign_cpu") or 0) > st.max_foreign]
                    if busy and retries > 0:
                        retries -= 1
                        for r in group:
                            r["discarded"] = "other work shared the CPUs: group run again"
                        result["runs"].extend(group)
                        progress.total += len(configs)
                        Progress.note(f"{len(busy)} run(s) of this group had more than "
                                      f"{st.max_foreign:.0%} foreign CPU; running the group "
                                      f"again ({retries} retries left)")
                        continue
                    result["runs"].extend(group)
                    break
        result["in_traffic"] = in_traffic_pass(bpf_configs, lab, st, progress)
    finally:
        lab.stop()
        state_dir.cleanup()
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


def workloads_meta() -> dict:
    return {"h2load_instances": workloads.INSTANCES,
            "h2load_clients_per_instance": workloads.CLIENTS_PER_INSTANCE,
            "h2load_args": "--h1 -m 1 -t 1 -D <seconds>",
            "iperf3_args": "-c <server> -t <seconds> -O <omit> -J -Z",
            "offloads_switched": list(OFFLOADS)}
