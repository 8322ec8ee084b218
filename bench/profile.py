"""python -m bench.profile: where the classifier's time goes in real traffic, by source line.

BPF_PROG_TEST_RUN times a crafted frame in a warm loop; in traffic the same program runs
between the TCP stack, nginx and h2load, which take its cache lines and TLB entries away,
and costs two to three times as much per invocation (docs/bench.md). This profiles it
there: the bench's lab (bench/lab.py: nginx in a namespace behind the monitored veth,
h2load from the root namespace), one configuration at a time (bench/configs.py; by
default the mirror with clsact and the thesis monitor), h2load at --errors percent error
requests for --seconds, while `perf record -e cpu-clock -a -g` samples every CPU.

A sample whose call chain passes through one of the configuration's programs is the
program's: its own instructions when the program is the innermost frame, else the
kernel function it called (a helper: bpf_skb_load_bytes, the clock, ...). Either way the
sample is put on the source line of the program that was running or calling, from the
program's BTF line info and where the JIT put each line (mirror.bpfsys.jited_source_lines;
bcc names the main file main.c: bpf/mirror.c, or bench/bpf/thesis.c for the thesis). Shown per configuration: the share of all samples
under its programs, ns per invocation from the kernel's run-time statistics over the
same run (perf's own sampling inflates them: compare configurations within one profile,
never with the bench's in-traffic figures), and the source lines with the largest share
of the program's samples.

cpu-clock is a timer, not a hardware counter (this kind of guest exposes none): a sample
lands on the instruction that was executing when the timer fired, so a load that misses
the cache shows on itself or on the instruction after it. Needs perf (Debian: linux-perf).
Writes bench/results/profile-<timestamp>.md (or --out) and prints it."""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mirror.bpfsys import SourceLine, jited_source_lines

from . import workloads
from .configs import KEYS, Shared, all_configs
from .lab import Lab
from .progs import EnabledStats, run_stats

EPILOG = """examples:
  python -m bench.profile                          # mirror (clsact) and thesis, 0 % errors
  python -m bench.profile --errors 100 --top 30    # an error storm, more lines
  python -m bench.profile --configs mirror-clsact,mirror-nosnap --proto h2c
"""


@dataclass
class Program:
    """One loaded program of a configuration: its perf symbol and source lines."""
    symbol: str
    lines: list[SourceLine]
    offsets: list[int] = field(init=False)

    def __post_init__(self):
        self.offsets = [sl.offset for sl in self.lines]

    def where(self, offset: int) -> str:
        i = bisect_right(self.offsets, offset) - 1
        if i < 0:
            return "(before the first line)"
        sl = self.lines[i]
        return f"{sl.file.rsplit('/', 1)[-1]}:{sl.line}: {sl.text[:100]}"


def attribute(script: str, programs: list[Program]) -> tuple[int, int, Counter]:
    """From `perf script -F ip,sym,symoff` output: all samples, those under the programs,
    and their count by (source line, callee or None)."""
    by_symbol = {p.symbol: p for p in programs}
    total = under = 0
    where: Counter = Counter()
    for block in script.split("\n\n"):
        frames = [line.split() for line in block.strip().splitlines() if line.strip()]
        if not frames:
            continue
        total += 1
        for depth, frame in enumerate(frames):
            sym, _, off = (frame[1] if len(frame) > 1 else "").partition("+")
            prog = by_symbol.get(sym)
            if prog is None:
                continue
            under += 1
            callee = None
            if depth:
                callee = (frames[0][1] if len(frames[0]) > 1 else "?").partition("+")[0]
            where[(prog.where(int(off, 16) if off else 0), callee)] += 1
            break
    return total, under, where


def profile(cfg, lab: Lab, args) -> dict:
    """One configuration: set up, h2load under perf and run-time statistics, torn down."""
    cfg.setup(lab)
    try:
        fds = cfg.prog_fds()
        programs = [Program(*jited_source_lines(fd)) for fd in fds.values()]
        with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp, EnabledStats():
            data = f"{tmp}/perf.data"
            before = [run_stats(fd) for fd in fds.values()]
            perf = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock",
                                     "-F", str(args.frequency), "-a", "-g", "-o", data],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                time.sleep(0.5)             # perf is sampling before the first request
                out = workloads.h2load(lab, args.errors, args.seconds, proto=args.proto)
            finally:
                perf.send_signal(signal.SIGINT)
                _, err = perf.communicate(timeout=120)
            after = [run_stats(fd) for fd in fds.values()]
            if perf.returncode not in (0, -signal.SIGINT):
                raise RuntimeError(f"perf record failed: {err.decode().strip()[-300:]}")
            script = subprocess.run(["perf", "script", "-i", data, "-F", "ip,sym,symoff"],
                                    capture_output=True, text=True, check=True).stdout
    finally:
        cfg.teardown()
    runs = sum(a.run_cnt - b.run_cnt for a, b in zip(after, before))
    run_ns = sum(a.run_time_ns - b.run_time_ns for a, b in zip(after, before))
    total, under, where = attribute(script, programs)
    return {"label": cfg.label, "req_per_s": out["req_per_s"], "status": out["status"],
            "samples": total, "under": under, "ns_per_run": run_ns / runs if runs else None,
            "missing_lines": [p.symbol for p in programs if not p.lines],
            "where": where}


def markdown(results: dict, args, started: float) -> str:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started))
    L = [f"# Where the classifier's time goes in traffic ({when})", "",
         f"h2load {args.proto}, {args.errors} % error requests, {args.seconds:g} s per "
         f"configuration; perf cpu-clock at {args.frequency} Hz on every CPU, with call "
         "chains. Shares of the samples under each configuration's programs; ns per "
         "invocation with perf running (inflated by it: compare within this table).", "",
         "| configuration | req/s | samples under its programs | ns per invocation |",
         "|---|---|---|---|"]
    for r in results.values():
        share = 100 * r["under"] / r["samples"] if r["samples"] else 0
        ns = f"{r['ns_per_run']:.0f}" if r["ns_per_run"] else "-"
        L.append(f"| {r['label']} | {r['req_per_s']:,.0f} | {r['under']} of {r['samples']} "
                 f"({share:.2f} %) | {ns} |")
    for r in results.values():
        L += ["", f"## {r['label']}", ""]
        if r["missing_lines"]:
            L += [f"No BTF line info for {', '.join(r['missing_lines'])}.", ""]
        if not r["under"]:
            L.append("No sample under its programs.")
            continue
        own = sum(n for (_, callee), n in r["where"].items() if callee is None)
        L += [f"Own instructions {100 * own / r['under']:.1f} %, calls into the kernel "
              f"{100 * (r['under'] - own) / r['under']:.1f} %.", "",
              "| share | source line | in |", "|---|---|---|"]
        for (line, callee), n in r["where"].most_common(args.top):
            text = line.replace("|", "\\|")
            L.append(f"| {100 * n / r['under']:.1f} % | `{text}` | "
                     f"{callee or 'its own instructions'} |")
    return "\n".join(L) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.profile",
                                description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="mirror-clsact,thesis",
                   help="comma-separated configurations that run a BPF program "
                   "(bench/configs.py: mirror-*, thesis; default: mirror-clsact,thesis)")
    p.add_argument("--errors", type=int, default=0, choices=(0, 100),
                   help="percent of h2load's instances asking for errors (default 0)")
    p.add_argument("--proto", default="h1", choices=workloads.PROTOCOLS)
    p.add_argument("--seconds", type=float, default=5.0, help="per configuration")
    p.add_argument("--frequency", type=int, default=10000, help="perf samples/s per CPU")
    p.add_argument("--top", type=int, default=20, help="source lines shown per configuration")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("bench.profile: run as root (it loads BPF programs and runs perf -a)")
    if not shutil.which("perf"):
        sys.exit("bench.profile: perf not found; install it (Debian: apt-get install linux-perf)")
    keys = [k for k in args.configs.split(",") if k]
    bad = [k for k in keys if k not in KEYS]
    if bad:
        sys.exit(f"bench.profile: unknown configuration {', '.join(bad)} (see --help)")
    started = time.time()
    shared = Shared()
    configs = all_configs(shared)
    no_program = [k for k in keys if not configs[k].bpf]
    if no_program:
        sys.exit(f"bench.profile: {', '.join(no_program)} runs no BPF program: nothing to "
                 "profile (see --help)")
    lab = Lab().start()
    results = {}
    try:
        for key in keys:
            print(f"bench.profile: {key}: {args.seconds:g} s of h2load under perf",
                  file=sys.stderr)
            results[key] = profile(configs[key], lab, args)
    finally:
        lab.stop()
    md = markdown(results, args, started)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"profile-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(started))}.md"
    path.write_text(md)
    print(md)
    print(f"bench.profile: written to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
