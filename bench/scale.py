"""python -m bench.scale: HTTP saturation throughput as a function of the CPU count, for
untraced traffic, the mirror and the thesis monitor reproduced (bench issue 13, item 5).

The thesis's figure 5.8 (chapter 5.3) varied the CPU cores given to the HTTP benchmark
on a 48-core server: untraced throughput grew linearly to 24 cores, the monitored one
followed it to 12 cores and then stopped growing, a bottleneck on the tc path the thesis
could not pin down (its figure 5.9: mean request time kept rising). This module redoes
that experiment on whatever machine it runs on, with the bench's lab (bench/lab.py) and
configurations (bench/configs.py).

For every CPU count k (default: 1, 2, 4, ... up to every CPU this process may use, and
that count itself) it builds the lab with its processes spread over the first k usable
CPUs with taskset:
  split layout (default)  clients on ceil(k/2) CPUs (h2load, one thread per CPU),
                          servers on the other floor(k/2) (nginx, one worker per CPU);
                          k = 1 puts both on the one CPU;
  shared layout           h2load with k threads and nginx with k workers, both over all
                          k CPUs.
h2load opens CONNECTIONS_PER_CPU x k HTTP/1.1 connections (`--h1 -m 1`), all to /ok (0 %
errors) or all to /error (100 %). Every round runs each error level on every
configuration in a random order; the ratio to untraced is paired per round (median over
rounds), as in the main bench.

A veth delivers to its peer in the sender's context, so the softirq work of both
directions stays on the CPUs of the process that sent: the k CPUs carry all of it.

Mirroring is checked by counters only (packets on the debug interface against the 5xx
responses), so every configuration runs the same apparatus: no tcpdump. The mirror's
controller thread does run in this process during its runs, as in production."""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mirror.errors import UsageError
from mirror.lab.netns import cleanup_stale

from . import runner
from .configs import Mirror, QdiscsOnly, Shared, Thesis, Untraced
from .lab import Lab, link_stats, taskset
from .noise import Sample
from .workloads import parse_h2load

BASE = "untraced"
CONFIGS = {                 # key -> factory; the default set is DEFAULT_CONFIGS
    "untraced": Untraced,
    "qdiscs": QdiscsOnly,
    "mirror-htb": lambda shared: Mirror(shared, "htb"),
    "mirror-clsact": lambda shared: Mirror(shared, "clsact"),
    "mirror-nobudget": lambda shared: Mirror(shared, variant="nobudget"),
    "thesis": Thesis,
}
DEFAULT_CONFIGS = ("untraced", "mirror-clsact", "thesis")
ERROR_LEVELS = (0, 100)
CONNECTIONS_PER_CPU = 8     # 16 on the main bench's 2-CPU lab, as there
TOOLS = ("h2load", "nginx", "taskset", "ip", "ss")
SATURATED = 0.9             # busy share of the k CPUs below which a run was not saturated

EPILOG = """\
examples:
  python -m bench.scale                       # every CPU count 1, 2, 4, ... up to all CPUs
  python -m bench.scale --cpus 1,4,16,48 --rounds 5 --seconds 10
  python -m bench.scale --layout shared       # clients and servers over the same k CPUs
  python -m bench.scale --configs mirror-clsact --errors 0
  python -m bench.scale --out bench/results/scale.json    # also writes scale.md
  python -m bench.scale --report bench/results/scale.json # Markdown of an earlier run

It saturates the CPUs it uses for the whole run: run it on an otherwise idle machine.
Needs root and what scripts/setup installs (bcc, nginx, h2load)."""


# --- arguments -------------------------------------------------------------------------
def usable_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def default_counts(n: int) -> list[int]:
    """1, 2, 4, ... below n, and n itself."""
    counts, k = [], 1
    while k < n:
        counts.append(k)
        k *= 2
    return counts + [n]


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("expected comma-separated integers, "
                                         f"got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("empty list")
    return sorted(set(values))


def cpu_counts(text: str) -> list[int]:
    n = len(usable_cpus())
    if text == "all":
        return default_counts(n)
    counts = _int_list(text)
    bad = [k for k in counts if not 1 <= k <= n]
    if bad:
        raise argparse.ArgumentTypeError(
            f"{bad} out of range; this process may use {n} CPUs: give counts "
            f"from 1 to {n}")
    return counts


def error_levels(text: str) -> list[int]:
    levels = _int_list(text)
    bad = [p for p in levels if p not in ERROR_LEVELS]
    if bad:
        raise argparse.ArgumentTypeError(
            f"{bad} not supported; give 0 and/or 100 (all connections ask /ok or "
            "all ask /error: mixed levels need separate client processes per URL)")
    return levels


def config_keys(text: str) -> list[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in keys if k not in CONFIGS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {bad}; choose from "
                                         f"{', '.join(CONFIGS)}")
    return [BASE] + [k for k in CONFIGS if k in keys and k != BASE]   # untraced first


def positive(kind):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            v = 0
        if v <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return v
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.scale", description=__doc__.split("\n\n")[0],
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpus", type=cpu_counts, default="all", metavar="LIST",
                   help="comma-separated CPU counts to run (default: 1, 2, 4, ... up to "
                   "every usable CPU, and that count)")
    p.add_argument("--layout", choices=("split", "shared"), default="split",
                   help="split: clients and servers on separate halves of the k CPUs "
                   "(default); shared: both over all k CPUs")
    p.add_argument("--seconds", type=positive(float), default=5.0,
                   help="h2load seconds per run (default 5)")
    p.add_argument("--rounds", type=positive(int), default=3,
                   help="rounds; each runs every configuration once per error level, in "
                   "a random order (default 3)")
    p.add_argument("--configs", type=config_keys, default=list(DEFAULT_CONFIGS),
                   metavar="LIST", help="comma-separated subset of "
                   f"{', '.join(CONFIGS)} (default {','.join(DEFAULT_CONFIGS)}; "
                   "untraced is always included)")
    p.add_argument("--errors", type=error_levels, default=list(ERROR_LEVELS),
                   metavar="LIST", help="error levels in percent: 0, 100 or both (default)")
    p.add_argument("--connections-per-cpu", type=positive(int), default=CONNECTIONS_PER_CPU,
                   metavar="N", help=f"h2load connections per CPU of k (default "
                   f"{CONNECTIONS_PER_CPU})")
    p.add_argument("--settle", type=float, default=0.3, metavar="SECONDS",
                   help="pause between attaching a configuration and starting h2load "
                   "(default 0.3)")
    p.add_argument("--seed", type=int, help="seed of the configuration order (default: "
                   "from the clock; recorded in the JSON)")
    p.add_argument("--json", action="store_true",
                   help="print the JSON result on stdout instead of the Markdown section")
    p.add_argument("--out", type=Path, metavar="FILE.json",
                   help="also write the JSON there and the Markdown beside it (.md)")
    p.add_argument("--report", type=Path, metavar="FILE.json",
                   help="only print the Markdown section of an earlier run's JSON")
    return p.parse_args(argv)


# --- layout ----------------------------------------------------------------------------
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


# --- one run ---------------------------------------------------------------------------
_REQUEST_TIME = re.compile(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)")
_UNIT_US = {"us": 1.0, "ms": 1000.0, "s": 1e6}


def _to_us(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise RuntimeError(f"unexpected h2load time {text!r}")
    return float(m.group(1)) * _UNIT_US[m.group(2)]


def request_time(text: str) -> dict:
    """h2load's own request-time summary line (min, max, mean, sd), in microseconds."""
    m = _REQUEST_TIME.search(text)
    if not m:
        return {}
    lo, hi, mean, sd = (_to_us(x) for x in m.groups())
    return {"min_us": lo, "max_us": hi, "mean_us": mean, "sd_us": sd}


def duration(seconds: float) -> str:
    """h2load's <DURATION>: an integer with a unit (it rejects "1.0")."""
    return f"{round(seconds * 1000)}ms"


def h2load(url: str, point: dict, seconds: float) -> dict:
    """One h2load process: all connections ask `url`, threads spread over the client CPUs."""
    cmd = taskset(cpu_list(point["client_cpus"]), "h2load", "--h1", "-m", "1",
                  "-c", str(point["connections"]), "-t", str(point["h2load_threads"]),
                  "-D", duration(seconds), url)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        text, _ = proc.communicate(timeout=seconds + 60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"h2load exited {proc.returncode}:\n{text[-800:]}")
    out = parse_h2load(text)
    out["latency"] = request_time(text)
    return out


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


def mirror_check(mirrored: int, h2: dict, budgeted: bool = False) -> dict:
    """Counters-only completeness: at least one clone per request and per 500 response
    after each connection's first 500 (with per-flow budgets, at least one per
    connection), none when no 500 was sent."""
    n5xx = h2["status"]["5xx"]
    conns = h2["connections"] if n5xx else 0
    least = conns if budgeted else max(0, 2 * n5xx - conns)
    problems = []
    if mirrored < least:
        problems.append(f"{mirrored} packets mirrored, expected at least {least}")
    if not n5xx and mirrored:
        problems.append(f"{mirrored} packets mirrored without a single error response")
    return {"mirrored_packets": mirrored, "min_packets_expected": least,
            "complete": not problems, "problems": problems}


def run_one(cfg, lab, point: dict, pct: int, seconds: float, settle: float) -> dict:
    """Attach one configuration, saturate it with h2load, detach."""
    rec = {"k": point["k"], "config": cfg.key, "error_pct": pct}
    url = lab.error_url if pct == 100 else lab.ok_url
    try:
        cfg.setup(lab)              # inside: teardown also undoes a half-done setup
        time.sleep(settle)
        dbg0 = link_stats(cfg.debug_iface)["tx_packets"] if cfg.debug_iface else None
        opens0 = lab.passive_opens()
        s0, t0 = Sample(), _cpu_ticks(point["cpus"])
        h2 = h2load(url, point, seconds)
        t1, s1 = _cpu_ticks(point["cpus"]), Sample()
        h2["connections"] = point["connections"]
        rec["connections_accepted"] = lab.passive_opens() - opens0
        if dbg0 is not None:
            rec["mirror"] = mirror_check(link_stats(cfg.debug_iface)["tx_packets"] - dbg0, h2,
                                         cfg.budgeted)
    finally:
        cfg.teardown()
    span = t1[0] - t0[0]
    rec.update({"req_per_s": h2["req_per_s"], "requests": h2["requests"],
                "status": h2["status"], "failed": h2["errored"] + h2["timeout"],
                "latency": h2["latency"], **s0.shares(s1),
                "cpu_busy": round(1 - (t1[1] - t0[1]) / span, 3) if span > 0 else None})
    return rec


# --- the whole run ---------------------------------------------------------------------
class Progress(runner.Progress):
    PREFIX = "bench.scale"


def describe(rec: dict) -> str:
    if "error" in rec:
        return f"FAILED: {_one_line(rec['error'])[:60]}"
    text = (f"{rec['req_per_s']:10,.0f} req/s  mean {rec['latency'].get('mean_us', 0):7.0f} us"
            f"  busy {100 * (rec['cpu_busy'] or 0):3.0f}%")
    if rec.get("foreign_cpu"):
        text += f"  foreign {100 * rec['foreign_cpu']:.0f}%"
    if "mirror" in rec:
        text += "  mirrored ok" if rec["mirror"]["complete"] else "  MIRROR INCOMPLETE"
    return text


def _one_line(text: str) -> str:
    return " ".join(text.split())


def preflight() -> None:
    if os.geteuid() != 0:
        raise UsageError("run as root: the bench loads BPF programs and builds network "
                         "namespaces")
    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing:
        raise UsageError(f"missing {', '.join(missing)}; scripts/setup installs them")
    from mirror.bpfprog import check_environment
    check_environment()


def machine_info() -> dict:
    model = ""
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    top = Path(__file__).resolve().parent.parent
    git = subprocess.run(["git", "-C", str(top), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(top), "status", "--porcelain", "--", "bpf",
                            "mirror", "bench", ":!bench/results"],
                           capture_output=True, text=True).stdout.strip()
    h2 = subprocess.run(["h2load", "--version"], capture_output=True, text=True).stdout
    ngx = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr
    return {"cpus": os.cpu_count(), "usable_cpus": len(usable_cpus()), "cpu_model": model,
            "kernel": platform.release(),
            "git_commit": git + ("+uncommitted changes" if git and dirty else ""),
            "h2load": h2.strip().splitlines()[0] if h2.strip() else "",
            "nginx": ngx.strip(), "loadavg": open("/proc/loadavg").read().split()[:3]}


def run(args) -> dict:
    preflight()
    seed = args.seed if args.seed is not None else int(time.time())
    order = random.Random(seed)
    state_dir = tempfile.TemporaryDirectory(prefix="bench-state-")
    os.environ["MIRROR_STATE_DIR"] = state_dir.name    # the controller's records: private
    removed = cleanup_stale()
    if removed:
        Progress.note(f"removed leftovers of a dead run: {', '.join(removed)}")
    cpus = usable_cpus()
    points = [layout(k, cpus, args.layout, args.connections_per_cpu) for k in args.cpus]
    result = {"kind": "scale", "started": time.time(), "machine": machine_info(),
              "settings": {"cpus": args.cpus, "layout": args.layout, "seconds": args.seconds,
                           "rounds": args.rounds, "configs": args.configs,
                           "error_levels": args.errors, "settle": args.settle,
                           "connections_per_cpu": args.connections_per_cpu, "seed": seed,
                           "h2load_args": "--h1 -m 1 -c <connections> -t <threads> -D "
                                          "<seconds>"},
              "points": points, "runs": []}
    Progress.note(f"{os.cpu_count()} CPUs ({len(cpus)} usable), CPU counts "
                  f"{', '.join(map(str, args.cpus))}; compiling the classifiers")
    shared = Shared()
    configs = [CONFIGS[key](shared) for key in args.configs]
    result["configs"] = [{"key": c.key, "label": c.label} for c in configs]
    progress = Progress(len(points) * args.rounds * len(args.errors) * len(configs))
    try:
        for point in points:
            result["runs"] += run_point(point, configs, args, order, progress)
    finally:
        state_dir.cleanup()
    result["finished"] = time.time()
    result["summary"] = summarize(result)
    return result


def run_point(point: dict, configs, args, order: random.Random, progress) -> list[dict]:
    """Every round at one CPU count, on a lab built for it."""
    lab = Lab(workers=point["nginx_workers"], server_cpus=point["server_cpus"])
    runs = []
    try:
        lab.start()
        Progress.note(f"k={point['k']}: clients on CPUs {cpu_list(point['client_cpus'])} "
                      f"({point['h2load_threads']} h2load threads, {point['connections']} "
                      f"connections), nginx on {cpu_list(point['server_cpus'])} "
                      f"({point['nginx_workers']} workers)")
        for rnd in range(1, args.rounds + 1):
            for pct in args.errors:
                shuffled = order.sample(configs, len(configs))
                for pos, cfg in enumerate(shuffled):
                    try:
                        rec = run_one(cfg, lab, point, pct, args.seconds, args.settle)
                    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                        rec = {"k": point["k"], "config": cfg.key, "error_pct": pct,
                               "error": f"{type(exc).__name__}: {exc}"}
                    rec.update({"round": rnd, "position": pos})
                    runs.append(rec)
                    progress.step(f"k={point['k']:<3} round {rnd} {pct:3d}% errors "
                                  f"{cfg.key:<14} {describe(rec)}")
    finally:
        lab.stop()
    return runs


# --- summary and report ----------------------------------------------------------------
def _median(xs: list) -> float | None:
    return statistics.median(xs) if xs else None


def summarize(result: dict) -> list[dict]:
    """Per CPU count, error level and configuration: median req/s and mean request time
    over rounds, the paired ratio to untraced, and the speedup over the smallest k."""
    ok = [r for r in result["runs"] if "error" not in r]
    rows = []
    for point in result["points"]:
        for pct in result["settings"]["error_levels"]:
            cell = [r for r in ok if r["k"] == point["k"] and r["error_pct"] == pct]
            base = {r["round"]: r["req_per_s"] for r in cell if r["config"] == BASE}
            for c in result["configs"]:
                mine = [r for r in cell if r["config"] == c["key"]]
                ratios = [r["req_per_s"] / base[r["round"]] for r in mine
                          if base.get(r["round"])]
                rps = _median([r["req_per_s"] for r in mine])
                mean = _median([r["latency"]["mean_us"] for r in mine
                                if "mean_us" in r["latency"]])
                rows.append({
                    "k": point["k"], "error_pct": pct, "config": c["key"], "rounds": len(mine),
                    "req_per_s": rps, "mean_us": mean,
                    "cpu_busy": _median([r["cpu_busy"] for r in mine
                                         if r["cpu_busy"] is not None]),
                    "ratio": round(_median(ratios), 4) if ratios else None,
                    "ratios": [round(x, 4) for x in ratios],
                    "complete": all(r["mirror"]["complete"] for r in mine if "mirror" in r),
                    "max_foreign_cpu": max((r["foreign_cpu"] or 0 for r in mine), default=None),
                })
    first = {}
    for row in rows:            # points are in increasing k: the first seen is the smallest
        key = (row["error_pct"], row["config"])
        first.setdefault(key, row["req_per_s"])
        row["speedup"] = (round(row["req_per_s"] / first[key], 3)
                          if row["req_per_s"] and first[key] else None)
    return rows


def _cell(row: dict | None) -> str:
    if not row or row["req_per_s"] is None:
        return "failed"
    text = f"{row['req_per_s'] / 1000:,.1f}"
    if row["config"] != BASE and row["ratio"] is not None:
        text += f" ({100 * row['ratio']:.0f} %)"
    if row["speedup"] is not None:
        text += f", x{row['speedup']:.2f}"
    if row["mean_us"] is not None:
        text += f", {row['mean_us']:,.0f} us"
    if not row["complete"]:
        text += ", **mirror incomplete**"
    return text


def markdown(result: dict) -> str:
    """The scale section of a report: the machine's CPU count, the layout per k and one
    table per error level."""
    rows = result.get("summary") or summarize(result)
    m, st = result["machine"], result["settings"]
    labels = {c["key"]: c["label"] for c in result["configs"]}
    keys = [c["key"] for c in result["configs"]]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(result["started"]))
    out = [
        "## Scale: HTTP throughput by CPU count", "",
        f"Machine: **{m['cpus']} CPUs** ({m['usable_cpus']} usable by the bench), "
        f"{m['cpu_model'] or 'unknown model'}, Linux {m['kernel']}; {m['h2load']}, "
        f"{m['nginx']}. Run of {when} at commit {m['git_commit'] or 'unknown'}: "
        f"{st['rounds']} round(s) of {st['seconds']:g} s per configuration, error level and "
        f"CPU count, configurations in a random order in every round (seed {st['seed']}).",
        "",
        "The thesis's figure 5.8 (48-core server): untraced throughput grew linearly to 24 "
        "cores; the monitored one followed it to 12 cores and then stopped growing. Read "
        "the speedup (throughput over the smallest CPU count's) down each column: a "
        "monitor with a bottleneck shared by all CPUs stops growing while untraced goes on.",
        "",
        f"Layout ({st['layout']}): h2load `--h1 -m 1`, {st['connections_per_cpu']} "
        "connections per CPU, all asking `/ok` (0 % errors) or `/error` (100 %); nginx "
        "workers pinned one per server CPU.",
        "",
        "| k | clients: CPUs (h2load threads) | servers: CPUs (nginx workers) | connections |",
        "|---|---|---|---|",
    ]
    for p in result["points"]:
        out.append(f"| {p['k']} | {_span(p['client_cpus'])} ({p['h2load_threads']}) | "
                   f"{_span(p['server_cpus'])} ({p['nginx_workers']}) | {p['connections']} |")
    for pct in st["error_levels"]:
        out += ["", f"Thousands of requests/s at {pct} % errors (median over rounds; "
                "paired ratio to untraced; speedup over the smallest k; mean request time):",
                "", "| k | " + " | ".join(labels[k] for k in keys) + " |",
                "|---|" + "---|" * len(keys)]
        for p in result["points"]:
            by = {r["config"]: r for r in rows if r["k"] == p["k"] and r["error_pct"] == pct}
            out.append(f"| {p['k']} | " + " | ".join(_cell(by.get(k)) for k in keys) + " |")
    out += ["", *_notes(result, rows)]
    return "\n".join(out) + "\n"


def _span(cpus: list[int]) -> str:
    if len(cpus) > 2 and cpus == list(range(cpus[0], cpus[-1] + 1)):
        return f"{cpus[0]}-{cpus[-1]}"
    return ",".join(map(str, cpus))


def _notes(result: dict, rows: list[dict]) -> list[str]:
    notes = []
    failed = [r for r in result["runs"] if "error" in r]
    if failed:
        notes.append(f"- {len(failed)} run(s) failed: " + "; ".join(
            f"k={r['k']} {r['config']} {r['error_pct']} %: {_one_line(r['error'])[:80]}"
            for r in failed[:3]))
    foreign = max((r["max_foreign_cpu"] or 0 for r in rows), default=0)
    notes.append(f"- Foreign CPU (other processes' share of all CPUs during a run, "
                 f"bench/noise.py): at most {100 * foreign:.0f} %.")
    idle = sorted({(r["k"], r["error_pct"]) for r in rows
                   if r["cpu_busy"] is not None and r["cpu_busy"] < SATURATED})
    if idle:
        notes.append(f"- The k CPUs had idle time (less than {100 * SATURATED:.0f} % busy, "
                     "median over rounds) at " +
                     ", ".join(f"k={k} ({p} % errors)" for k, p in idle) +
                     ": there the throughput is not a saturation figure (more "
                     "--connections-per-cpu may help).")
    mirroring = [r for r in result["runs"] if "mirror" in r]
    if mirroring:
        bad = [r for r in mirroring if not r["mirror"]["complete"]]
        notes.append(f"- Mirroring checked by the debug interface's packet counter in "
                     f"{len(mirroring)} runs: {len(bad)} incomplete.")
    if result["machine"]["usable_cpus"] < 4:
        notes.append(f"- With {result['machine']['usable_cpus']} CPUs this only shows the "
                     "method; the thesis's bottleneck appeared past 12 cores.")
    return notes


# --- entry point -----------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        print(markdown(json.loads(args.report.read_text())), end="")
        return 0
    signal.signal(signal.SIGTERM, runner.raise_interrupt)
    try:
        result = run(args)
    except UsageError as exc:
        print(f"bench.scale: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench.scale: interrupted; namespaces, qdiscs, filters and debug interfaces "
              "removed", file=sys.stderr)
        return 130
    text = json.dumps(result, indent=1)
    md = markdown(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        args.out.with_suffix(".md").write_text(md)
        Progress.note(f"results in {args.out} and {args.out.with_suffix('.md')}")
    print(text if args.json else md, end="\n" if args.json else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
