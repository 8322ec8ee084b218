"""python -m bench: what the mirror costs, side by side with no monitor and with the
thesis monitor. See bench/__init__.py for what it measures and docs/bench.md for results."""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from . import plots, report, runner
from .configs import KEYS

RESULTS = Path(__file__).resolve().parent / "results"

EPILOG = """\
examples:
  python -m bench                  # full run (about 50 minutes): bench/results/
  python -m bench --quick          # a few minutes, one round: bench/results/quick/
  python -m bench --rounds 40      # narrower intervals on a quiet machine
  python -m bench --passes cost --configs mirror-clsact,thesis   # one question only
  python -m bench --report bench/results/latest.json   # redo table and plots from a JSON
  python -m bench --passes in_traffic --configs mirror-decide,thesis \
      --candidate ../wt/bpf       # a patched classifier against this one, paired by round
  python -m bench.attach --help    # the attach experiment alone
  python -m bench.containers --help   # the same with real podman containers
  python -m bench.scale --help     # every CPU of a bigger machine
"""
PASSES = runner.ALL_PASSES


def rounds(text: str) -> int:
    """A count of rounds: a whole number, at least 1 (0 or less would run nothing and
    report it as a result)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n}: at least 1 round")
    return n


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.split("\n\n")[0],
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="one round, about a second per run (CI uses it so the bench never rots)")
    p.add_argument("--rounds", type=rounds,
                   help=f"cost rounds (default: {runner.FULL.rounds} full, 1 quick)")
    p.add_argument("--in-traffic-rounds", type=rounds, metavar="N",
                   help=f"in-traffic rounds (default: {runner.FULL.stats_rounds} full, 1 quick; "
                   "more narrow a --candidate's intervals)")
    p.add_argument("--seconds", type=float,
                   help=f"seconds per cost run (default: {runner.FULL.seconds:g} full, 1 quick)")
    p.add_argument("--passes", default=",".join(PASSES),
                   help=f"comma-separated subset of: {', '.join(PASSES)} (default: all)")
    p.add_argument("--seed", type=int, help="seed of the run order (default: the start time)")
    p.add_argument("--max-foreign", type=float, metavar="SHARE",
                   help="run a workload's group of runs again when another tenant took more "
                   "than this share of the CPUs during one of them (default: 0.1 full, off quick)")
    p.add_argument("--retries", type=int,
                   help="at most this many such re-runs in the whole bench (default: 6 full)")
    p.add_argument("--configs", help="comma-separated subset of the configurations "
                   "(bench/configs.py; untraced is always included)")
    p.add_argument("--candidate", type=Path, metavar="DIR",
                   help="a directory of classifier sources (a patched copy of bpf/): every "
                   "mirror configuration of the run but mirror-noh2 also runs compiled from "
                   "DIR, in the same rounds of the cost, saturation and in-traffic passes, "
                   "and the report gives candidate / this checkout paired by round")
    p.add_argument("--out", type=Path,
                   help="results directory (default bench/results, quick: bench/results/quick)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--report", type=Path, metavar="JSON",
                   help="only rewrite the Markdown and plots of an earlier run's JSON")
    return p.parse_args(argv)


def settings_from(args) -> runner.Settings:
    st = runner.QUICK if args.quick else runner.FULL
    if args.rounds:
        st = replace(st, rounds=args.rounds)
    if args.in_traffic_rounds:
        st = replace(st, stats_rounds=args.in_traffic_rounds)
    if args.max_foreign is not None:
        st = replace(st, max_foreign=args.max_foreign,
                     retry_budget=st.retry_budget if st.retry_budget else 6)
    if args.retries is not None:
        st = replace(st, retry_budget=args.retries)
    if args.seconds:
        st = replace(st, seconds=args.seconds)
    if args.seed:
        st = replace(st, seed=args.seed)
    return st


def write_outputs(result: dict, outdir: Path, stem: str, make_plots: bool) -> Path:
    summary = report.summarize(result)
    result["summary"] = summary
    labels = {c["key"]: c["label"] for c in result["configs"]}
    pngs = {}
    if make_plots and plots.available():
        outdir.mkdir(parents=True, exist_ok=True)
        pngs = plots.make_all(summary, labels, outdir, stem)
    elif make_plots:
        print("bench: matplotlib missing (pip install '.[bench]'): no plots", file=sys.stderr)
    md = report.markdown(result, summary, pngs)
    return report.write(result, outdir / f"{stem}.json", md, latest=stem != "latest")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        result = json.loads(args.report.read_text())
        stem = args.report.stem
        if stem == "latest":
            stem = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(result["started"]))
        path = write_outputs(result, args.out or args.report.parent, stem, not args.no_plots)
        report.print_targets(result["summary"])
        print(f"bench: rewrote {path.with_suffix('.md')}")
        return 0
    st = settings_from(args)
    only = None
    if args.configs:
        only = {"untraced", *(c.strip() for c in args.configs.split(",") if c.strip())}
        unknown = sorted(only - set(KEYS))
        if unknown:
            print(f"bench: unknown configuration {', '.join(unknown)}; choose from "
                  f"{', '.join(KEYS)}", file=sys.stderr)
            return 2
    if args.candidate and not (args.candidate / "mirror.c").is_file():
        print(f"bench: no mirror.c in {args.candidate}: --candidate wants a directory of "
              "classifier sources, like bpf/", file=sys.stderr)
        return 2
    passes = [x.strip() for x in args.passes.split(",") if x.strip()]
    unknown = sorted(set(passes) - set(PASSES))
    if unknown:
        print(f"bench: unknown pass {', '.join(unknown)}; choose from {', '.join(PASSES)}",
              file=sys.stderr)
        return 2
    if args.candidate and not (set(passes) & set(runner.PLANS) and any(
            k.startswith("mirror-") and k != "mirror-noh2" for k in only or KEYS)):
        print("bench: --candidate compares mirror configurations (but mirror-noh2) in the "
              f"{', '.join(runner.PLANS)} passes: this run has none of them",
              file=sys.stderr)
        return 2
    result, status = runner.guarded("bench", runner.run, st, sorted(only) if only else None,
                                    passes, args.candidate and args.candidate.resolve())
    if result is None:
        return status
    outdir = args.out or (RESULTS / "quick" if st.mode == "quick" else RESULTS)
    stem = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(result["started"]))
    path = write_outputs(result, outdir, stem, not args.no_plots)
    report.print_targets(result["summary"])
    print(f"\nbench: results in {path} and {path.with_suffix('.md')} (also latest.*)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
