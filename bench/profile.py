"""python -m bench.profile: where the mirror's per-packet time goes.

Two views of the classifier on crafted IPv4 frames, both through BPF_PROG_TEST_RUN on
one pinned CPU, next to the thesis reproduction:

  ablation  copies of bpf/mirror.c compiled with one piece of work taken out (counters,
            clock reads, per-interface stats) by macros placed before the parse; the
            difference from the unchanged program is what that piece costs. A variant
            whose anchor text is no longer in the source is reported as skipped.
  perf      (when `perf` is installed) kernel symbols sampled while one frame class runs
            in a loop, grouped: the program's own instructions, key hashing, the rest of
            the hash lookup, clock reads, payload copies, the clone, the test harness.

Writes bench/results/profile-<timestamp>.md (or --out) and prints it."""
from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mirror.abi import bpf_dir

from . import frames as fr

ANCHOR = "#include \"parse.h\""      # before the parse and the decision
VARIANTS = {
    "as built": "",
    "no counters": "#define count(idx, n) ((void)0)\n",
    "no clock reads": "#define bpf_ktime_get_coarse_ns() 0ULL\n",
    "no per-interface stats": "#define stats_of(ifindex, dir) ((struct iface_stats *)0)\n",
}
VARIANTS["none of these"] = "".join(v for k, v in VARIANTS.items() if k != "as built")

FRAMES = ("ipv4 TCP data (request), no flow marked",
          "ipv4 TCP data (request), other flows marked",
          "ipv4 HTTP 200 response, other flows marked", "ipv4 HTTP 500 response, flow marked",
          "ipv4 packet of a marked flow (request)")

PERF_CASES = (
    ("mirror", "ipv4 TCP data (request), other flows marked"),
    ("thesis", "ipv4 TCP data (request), other flows marked"),
    ("mirror", "ipv4 HTTP 500 response, flow marked"),
    ("thesis", "ipv4 HTTP 500 response, flow marked"),
    ("mirror+clone", "ipv4 HTTP 500 response, flow marked"),
)

GROUPS = (
    ("key hashing", ("htab_map_hash", "jhash")),
    ("rest of the hash lookup", ("lookup_nulls_elem_raw", "memcmp", "htab_lru", "__htab_map",
                                 "htab_percpu", "bpf_lru")),
    ("clock reads", ("read_tsc", "ktime_get", "kvm_clock", "pvclock")),
    ("payload copy", ("bpf_skb_load_bytes", "memcpy", "skb_copy_bits")),
    ("clone, transmit and sink", ("skb_clone", "clone_redirect", "dev_queue_xmit", "veth",
                                  "netif_rx", "kmem_cache", "skb_release", "__bpf_redirect",
                                  "dev_hard_start_xmit", "validate_xmit", "skb_free",
                                  "kfree_skb", "napi", "net_rx_action", "__netif_receive",
                                  "process_backlog", "tcx", "tc_run", "sch_handle",
                                  "enqueue_to_backlog", "netdev_core_pick", "eth_type_trans",
                                  "__dev_forward_skb", "skb_scrub", "consume_skb",
                                  "slab", "__alloc_skb", "skb_clone_tx", "bpf_prog_run",
                                  "tcf_classify", "dev_xmit", "__copy_skb_header",
                                  "sock_wfree", "__build_skb", "ip_rcv", "nf_hook",
                                  "_raw_spin", "softirq", "pskb_expand_head",
                                  "skb_ensure_writable", "kfree", "kmalloc", "memcg",
                                  "skb_defer", "cls_bpf", "_find_next_bit",
                                  "netif_skb_features", "skb_release")),
    ("test harness", ("bpf_test_run", "bpf_test_timer", "local_bh_enable", "copy_to_user",
                      "bpf_prog_test_run", "migrate")),
)


class Variant:
    """A copy of the classifier compiled with `extra` inserted before the parse, with the
    little of mirror.bpfprog.Classifier the measurements need."""

    def __init__(self, extra: str):
        from bcc import BPF
        src = (bpf_dir() / "mirror.c").read_text()
        with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
            for f in bpf_dir().glob("*.h"):
                shutil.copy(f, tmp)
            path = Path(tmp) / "mirror.c"
            path.write_text(src.replace(ANCHOR, extra + ANCHOR, 1))
            self.bpf = BPF(src_file=str(path).encode(),
                           cflags=[f"-I{tmp}", "-Wno-unused-function", "-Wno-macro-redefined"])
        self.progs = {d: self.bpf.load_func(f"mirror_{d}".encode(), BPF.SCHED_CLS)
                      for d in ("ingress", "egress")}
        self.flows = self.bpf.get_table(b"flows")
        trigger = self.bpf.get_table(b"trigger")
        for code in range(500, 600):
            trigger[trigger.Key(code)] = ctypes.c_uint8(1)
        try:
            self.marks = self.bpf.get_table(b"marks")      # the empty-map pre-filter
        except KeyError:
            self.marks = None

    def fd(self, direction: str) -> int:
        return self.progs[direction].fd

    def clear(self) -> None:
        """Empties the flow map and, if the classifier has the empty-map pre-filter,
        publishes that it is empty (as Classifier.note_if_empty does)."""
        self.flows.clear()
        if self.marks is not None:
            self.marks[self.marks.Key(1)] = self.marks[self.marks.Key(0)]

    def delete_flow(self, key) -> None:
        try:
            del self.flows[self.flows.Key.from_buffer_copy(key.to_bytes())]
        except KeyError:
            pass


def ablation(rounds: int, repeat: int) -> tuple[dict, list[str]]:
    from . import microbench as mb
    from .progs import EmptyProgram, ThesisProgram
    classes = [fc for fc in fr.frame_classes() if fc.key in FRAMES]
    src = (bpf_dir() / "mirror.c").read_text()
    subjects, skipped, keep = [], [], []
    for name, extra in VARIANTS.items():
        if extra and ANCHOR not in src:
            skipped.append(name)
            continue
        v = Variant(extra)
        keep.append(v)
        subjects.append(mb.Subject(name, v.fd, lambda fc: True,
                                   lambda fc, v=v: v.delete_flow(mb._flow_key(fc)), v.clear))
    thesis, empty = ThesisProgram(), EmptyProgram()
    subjects += mb.baseline_subjects(thesis, empty)
    ns = {s.name: {fc.key: [] for fc in classes} for s in subjects}
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {0})
    try:
        for _ in range(rounds):
            for fc in classes:
                for s in subjects:
                    ns[s.name][fc.key].append(mb._measure(s, fc, repeat, 200))
    finally:
        os.sched_setaffinity(0, old)
    return {s: {k: statistics.median(v) for k, v in per.items()} for s, per in ns.items()}, \
        skipped


LOOP = """
import os, sys, time
sys.path.insert(0, {root!r})
from mirror.bpfprog import Classifier
from mirror.bpfsys import test_run
from bench import frames as fr
from bench.progs import ThesisProgram
which, key, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
fc = [f for f in fr.frame_classes() if f.key == key][0]
os.sched_setaffinity(0, {{0}})
dbg = None
if which.startswith("mirror"):
    clf = Classifier()
    clf.set_trigger(frozenset(range(500, 600)))
    fd, mark = clf.fd(fc.direction), clf.fd("ingress")
    if which == "mirror+clone":
        from pyroute2 import IPRoute
        from mirror import debugif
        from mirror.bpfprog import Sink
        from mirror.lab.netns import unique_name
        sink, ipr = Sink(), IPRoute()
        dbg = debugif.ensure(ipr, unique_name("d"), lambda: sink.fd)
        clf.set_debug_ifindex(dbg.ifindex)
else:
    t = ThesisProgram()
    fd = mark = t.fd
try:
    if fc.others_marked:
        test_run(mark, fr.other_marking_frame(fc.family), 1)
    if fc.marked:
        test_run(mark, fr.marking_frame(fc.family), 1)
    print("ready", flush=True)
    end = time.time() + seconds
    while time.time() < end:
        test_run(fd, fc.frame, 20000)
finally:
    if dbg:
        debugif.remove(ipr, dbg.name)
"""


def perf_breakdown(which: str, key: str, seconds: float) -> dict | None:
    """Kernel samples on CPU 0 while `which` runs frame class `key` in a loop there."""
    if not shutil.which("perf"):
        return None
    root = str(Path(__file__).resolve().parent.parent)
    loop = subprocess.Popen([sys.executable, "-c", LOOP.format(root=root), which, key,
                             str(seconds + 1)], stdout=subprocess.PIPE, text=True)
    try:
        loop.stdout.readline()
        with tempfile.TemporaryDirectory(prefix="bench-perf-") as tmp:
            data = f"{tmp}/perf.data"
            subprocess.run(["perf", "record", "-q", "-C", "0", "-o", data, "--", "sleep",
                            str(seconds)], capture_output=True, check=True)
            rep = subprocess.run(["perf", "report", "-i", data, "--sort", "sym", "--stdio",
                                  "--percent-limit", "0.05"], capture_output=True,
                                 text=True).stdout
    finally:
        try:
            loop.wait(30)       # it removes its debug interface on the way out
        except subprocess.TimeoutExpired:
            loop.kill()
            loop.wait()
    shares = {}
    for line in rep.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].endswith("%") and parts[1] == "[k]":
            shares[parts[2]] = shares.get(parts[2], 0.0) + float(parts[0][:-1])
    total = sum(shares.values())
    if not total:
        return None
    groups = {"program's own instructions": 0.0}
    for sym, pct in shares.items():
        if sym.startswith("bpf_prog_"):
            groups["program's own instructions"] += pct
            continue
        for name, needles in GROUPS:
            if any(n in sym for n in needles):
                groups[name] = groups.get(name, 0.0) + pct
                break
        else:
            groups["other kernel"] = groups.get("other kernel", 0.0) + pct
    top = sorted(shares.items(), key=lambda kv: -kv[1])[:8]
    return {"groups": {k: round(100 * v / total, 1) for k, v in groups.items()},
            "top": [(s, round(100 * p / total, 1)) for s, p in top]}


def markdown(abl: dict, skipped: list[str], perf: dict, started: float) -> str:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started))
    L = [f"# Where the classifier's per-packet time goes ({when})", "",
         "BPF_PROG_TEST_RUN, ns per packet on CPU 0, median of rounds; each variant is "
         "bpf/mirror.c as checked out, with one piece of work compiled out.", ""]
    subjects = list(abl)
    L += ["| frame | " + " | ".join(subjects) + " |", "|---" * (len(subjects) + 1) + "|"]
    for key in FRAMES:
        L.append(f"| {key} | " + " | ".join(f"{abl[s][key]:.0f}" for s in subjects) + " |")
    if skipped:
        L += ["", f"Skipped (anchor not found in bpf/mirror.c): {', '.join(skipped)}."]
    if perf:
        L += ["", "## perf: share of kernel samples", ""]
        for (which, key), res in perf.items():
            if not res:
                continue
            L.append(f"**{which}, {key}**: " + ", ".join(
                f"{k} {v:.0f} %" for k, v in sorted(res["groups"].items(),
                                                    key=lambda kv: -kv[1]) if v >= 0.5))
            L.append("")
            L.append("top symbols: " + ", ".join(f"`{s}` {p:.0f} %" for s, p in res["top"]))
            L.append("")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeat", type=int, default=300000)
    p.add_argument("--perf-seconds", type=float, default=3.0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("bench.profile: run as root (it loads BPF programs)")
    started = time.time()
    print("bench.profile: compiling variants and timing them", file=sys.stderr)
    abl, skipped = ablation(args.rounds, args.repeat)
    perf = {}
    if shutil.which("perf"):
        for which, key in PERF_CASES:
            print(f"bench.profile: perf, {which}, {key}", file=sys.stderr)
            perf[(which, key)] = perf_breakdown(which, key, args.perf_seconds)
    md = markdown(abl, skipped, perf, started)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"profile-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(started))}.md"
    path.write_text(md)
    print(md)
    print(f"bench.profile: written to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
