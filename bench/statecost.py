"""python -m bench.statecost: what one per-connection state costs the classifier per
packet, by kind of map (bench/bpf/statecost.c), kernel-timed with BPF_PROG_TEST_RUN on one
pinned CPU.

For each kind: "hit", a packet of a connection whose state is there (HOT connections
taking turns), and "new", a packet that starts a connection (a key never seen, as at
connection rate; the map fills up and, for the kinds that can, evicts). Each figure is
the median over rounds of the mean ns per repetition, minus the same program without a
map ("base": the key and the sequence number). Rounds interleave the kinds."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

from mirror.bpfsys import test_run

from .frames import to_server
from .progs import BENCH_BPF_DIR

KINDS = ("lru", "lrupc", "hash", "way1", "way4")


def load(slots: int, hot: int):
    from bcc import BPF
    bpf = BPF(src_file=str(BENCH_BPF_DIR / "statecost.c").encode(),
              cflags=[f"-DSLOTS={slots}", f"-DHOT={hot}", "-Wno-unused-function"])
    progs = {"base": bpf.load_func(b"base_only", BPF.SCHED_CLS).fd}
    for kind in KINDS:
        for what in ("fill", "hit", "new"):
            progs[f"{kind}_{what}"] = bpf.load_func(f"{kind}_{what}".encode(),
                                                    BPF.SCHED_CLS).fd
    seed = bpf.get_table(b"seed")
    seed[seed.Key(0)] = seed.Leaf(int.from_bytes(os.urandom(4), "little"))
    return bpf, progs


def reset_seq(bpf) -> None:
    seq = bpf.get_table(b"seq")
    zero = seq.Key(0)
    values = seq[zero]
    for i in range(len(values)):
        values[i] = 0
    seq[zero] = values


def measure(args) -> dict:
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    bpf, progs = load(args.slots, args.hot)
    frame = to_server(4, b"")
    ns: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for kind in KINDS:
            for name in ("lru", "lrupc", "hash", "way1", "way4"):
                bpf.get_table(name.encode()).clear()
            reset_seq(bpf)
            test_run(progs[f"{kind}_fill"], frame, args.hot)
            base = test_run(progs["base"], frame, args.repeat).duration_ns
            hit = test_run(progs[f"{kind}_hit"], frame, args.repeat).duration_ns
            reset_seq(bpf)
            # A new connection into a map as full as it gets: fill it first, then time.
            if kind != "hash":
                test_run(progs[f"{kind}_new"], frame, args.slots)
            else:
                bpf.get_table(b"hash").clear()
                test_run(progs["hash_fill"], frame, args.hot)
            new = test_run(progs[f"{kind}_new"], frame, args.repeat).duration_ns
            ns.setdefault("base", []).append(base)
            ns.setdefault(f"{kind}_hit", []).append(hit - base)
            ns.setdefault(f"{kind}_new", []).append(new - base)
    return {"cpu": cpu, "slots": args.slots, "hot": args.hot, "repeat": args.repeat,
            "rounds": args.rounds,
            "median_ns": {k: statistics.median(v) for k, v in ns.items()},
            "per_round_ns": ns}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.statecost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slots", type=int, default=65536)
    p.add_argument("--hot", type=int, default=1024)
    p.add_argument("--repeat", type=int, default=200_000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    result = measure(args)
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        print()
        return 0
    print(f"ns per packet above the base ({result['median_ns']['base']:.1f} ns), median of "
          f"{args.rounds} rounds, {args.slots} slots, {args.hot} hot connections:")
    for kind in KINDS:
        print(f"  {kind:6} hit {result['median_ns'][kind + '_hit']:7.1f}   "
              f"new {result['median_ns'][kind + '_new']:7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
