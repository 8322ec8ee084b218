"""The BPF programs the bench loads besides the mirror itself (the thesis reproduction and
the empty classifier, C in bench/bpf/), and kernel run-time statistics of any program.

Run-time statistics: the kernel counts run_time_ns and run_cnt per program only while
statistics are enabled, the switch that `sysctl kernel.bpf_stats_enabled=1` flips. The
bench flips it with BPF_ENABLE_STATS instead: the kernel keeps it on while the returned fd
is open and turns it off when the fd closes, even if the bench is killed, so the machine
is always left as it was."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mirror import bpfsys

BENCH_BPF_DIR = Path(__file__).resolve().parent / "bpf"


class ThesisProgram:
    """bench/bpf/thesis.c: the thesis monitor, IPv4 and status 500 only, one global LRU hash
    looked up in both key orders, classic cls_bpf (its match runs an act_mirred action)."""

    def __init__(self, max_connections: int = 65536):
        from bcc import BPF
        self.bpf = BPF(src_file=str(BENCH_BPF_DIR / "thesis.c").encode(),
                       cflags=[f"-DMAX_CONNECTIONS={max_connections}"])
        self.max_connections = max_connections
        self.prog = self.bpf.load_func(b"thesis_mirror", BPF.SCHED_CLS)
        self.connections = self.bpf.get_table(b"connections")

    @property
    def fd(self) -> int:
        return self.prog.fd

    def clear(self) -> None:
        self.connections.clear()

    def connection_count(self) -> int:
        return sum(1 for _ in self.connections.keys())


class EmptyProgram:
    """bench/bpf/empty.c: returns at once; the floor any tc program costs."""

    def __init__(self):
        from bcc import BPF
        self.bpf = BPF(src_file=str(BENCH_BPF_DIR / "empty.c").encode())
        self.prog = self.bpf.load_func(b"empty_classifier", BPF.SCHED_CLS)

    @property
    def fd(self) -> int:
        return self.prog.fd


@dataclass
class RunStats:
    run_time_ns: int
    run_cnt: int

    def __sub__(self, other: "RunStats") -> "RunStats":
        return RunStats(self.run_time_ns - other.run_time_ns, self.run_cnt - other.run_cnt)

    def __add__(self, other: "RunStats") -> "RunStats":
        return RunStats(self.run_time_ns + other.run_time_ns, self.run_cnt + other.run_cnt)

    @property
    def ns_per_run(self) -> float | None:
        return self.run_time_ns / self.run_cnt if self.run_cnt else None


def run_stats(prog_fd: int) -> RunStats:
    """run_time_ns and run_cnt of a loaded program, from /proc/self/fdinfo."""
    fields = {}
    with open(f"/proc/self/fdinfo/{prog_fd}") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    return RunStats(int(fields.get("run_time_ns", 0)), int(fields.get("run_cnt", 0)))


class EnabledStats:
    """Context manager: program run-time statistics on while inside."""

    def __init__(self):
        self.fd = -1

    def __enter__(self) -> "EnabledStats":
        self.fd = bpfsys.enable_stats()
        return self

    def __exit__(self, *exc) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
