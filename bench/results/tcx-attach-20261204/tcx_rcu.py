"""Does a tcx attach wait for an RCU grace period? Times, on 40 fresh veths: BPF_LINK_CREATE
for tcx ingress (the mirror's own call), the netlink add of a cls_bpf filter on a fresh
clsact, and membarrier(MEMBARRIER_CMD_GLOBAL), which returns after one synchronize_rcu().
The empty program of the bench (bench/bpf/empty.c) is attached.

    ip netns add tcxr && ip netns exec tcxr .venv/bin/python \\
        bench/results/tcx-attach-20261204/tcx_rcu.py; ip netns del tcxr
Run inside a namespace of its own: every veth it makes is deleted, and the namespace's
deletion takes whatever a failure left."""
import ctypes
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from pyroute2 import IPRoute  # noqa: E402

from bench.progs import EmptyProgram  # noqa: E402
from mirror.hooks import tc, tcx  # noqa: E402

SYS_MEMBARRIER = 324            # x86_64
MEMBARRIER_CMD_GLOBAL = 1       # waits for one RCU grace period
ROUNDS = 40

libc = ctypes.CDLL(None, use_errno=True)
prog = EmptyProgram()
ipr = IPRoute()
ms = {"membarrier(GLOBAL)": [], "tcx BPF_LINK_CREATE": [], "clsact filter add": []}
for i in range(ROUNDS):
    t = time.perf_counter()
    if libc.syscall(SYS_MEMBARRIER, MEMBARRIER_CMD_GLOBAL, 0, 0) != 0:
        sys.exit(f"membarrier: {os.strerror(ctypes.get_errno())}")
    ms["membarrier(GLOBAL)"].append(time.perf_counter() - t)
    name = f"tcxr{i}"
    ipr.link("add", ifname=name, kind="veth", peer=name + "p")
    ifindex = ipr.link_lookup(ifname=name)[0]
    try:
        t = time.perf_counter()
        fd = tcx.attach(prog.fd, ifindex, "ingress")
        ms["tcx BPF_LINK_CREATE"].append(time.perf_counter() - t)
        os.close(fd)
        tc.add_qdisc(ipr, ifindex, "clsact")
        t = time.perf_counter()
        tc.replace_filter(ipr, ifindex, tc.CLSACT_INGRESS, prog.fd, "ingress")
        ms["clsact filter add"].append(time.perf_counter() - t)
    finally:
        ipr.link("del", ifname=name)
for what, secs in ms.items():
    v = sorted(x * 1e3 for x in secs)
    print(f"{what:22s} n={len(v)}  p50 {statistics.median(v):.2f} ms  "
          f"min {v[0]:.2f}  max {v[-1]:.2f}")
