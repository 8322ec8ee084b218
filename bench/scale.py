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
controller thread does run in this process during its runs, as in production.

This module is the mode's entry point (its options); the runs, the summary and the
report are the bench's own pipeline: bench/runner.py (run_scale), bench/report.py
(scale_summary, scale_markdown, write)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import report, runner
from .machine import usable_cpus

CONFIGS = ("untraced", "qdiscs", "mirror-htb", "mirror-clsact", "mirror-nobudget", "thesis")
DEFAULT_CONFIGS = ("untraced", "mirror-clsact", "thesis")
ERROR_LEVELS = (0, 100)
CONNECTIONS_PER_CPU = 8     # 16 on the main bench's 2-CPU lab, as there

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
    base = report.BASE
    return [base] + [k for k in CONFIGS if k in keys and k != base]   # untraced first


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


# --- entry point -----------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        print(report.scale_markdown(json.loads(args.report.read_text())), end="")
        return 0
    result, status = runner.guarded("bench.scale", runner.run_scale, args)
    if result is None:
        return status
    result["summary"] = report.scale_summary(result)
    md = report.scale_markdown(result)
    if args.out:
        report.write(result, args.out, md)
        print(f"bench.scale: results in {args.out} and {args.out.with_suffix('.md')}",
              file=sys.stderr, flush=True)
    print(report.to_json(result) if args.json else md, end="\n" if args.json else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
