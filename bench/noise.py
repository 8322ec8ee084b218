"""How much of the CPUs went to work other than the bench's during a run.

The bench saturates both CPUs, so another tenant's work shows up as CPU time the bench's
processes did not get. Estimated from /proc/stat (all CPU time, by tick) minus the CPU
time of the bench's own process tree (itself, nginx, iperf3 -s, tcpdump, and the h2load
and iperf3 clients it reaps), minus interrupt and softirq time (the packets are the
bench's), minus the CPU time of kernel threads (children of kthreadd: ksoftirqd takes
over the bench's softirq work under load, kworkers and NAPI threads serve its packets; on
an otherwise idle machine they are the bench's too, and counting them as foreign flagged
most iperf3 runs of an idle machine). Their share is kept apart (`kernel_share`). An
estimate, good to a few per cent: the report uses it to flag runs that shared the
machine, never to correct a number."""
from __future__ import annotations

import os

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_ticks() -> tuple[int, int, int]:
    """(all ticks, idle + iowait ticks, irq + softirq ticks) over every CPU."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields[:8]
    return sum(fields[:8]), idle + iowait, irq + softirq


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(ppid, utime + stime + cutime + cstime) of a process, None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    rest = text[text.rfind(")") + 2:].split()
    return int(rest[1]), sum(int(x) for x in rest[11:15])


def _own_ticks(root: int) -> tuple[int, int]:
    """(CPU ticks of `root` and all its descendants, reaped children included; CPU ticks
    of kernel threads)."""
    stats = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            s = _proc_stat(int(d))
            if s:
                stats[int(d)] = s
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        kids.setdefault(ppid, []).append(pid)
    return _tree_ticks(stats, kids, root), _tree_ticks(stats, kids, _KTHREADD)


_KTHREADD = 2       # the parent of every kernel thread


def _tree_ticks(stats, kids, root: int) -> int:
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid][1]
        todo += kids.get(pid, [])
    return total


class Sample:
    def __init__(self):
        self.all, self.idle, self.irq = _cpu_ticks()
        self.own, self.kernel = _own_ticks(os.getpid())

    def foreign_share(self, later: "Sample") -> float | None:
        """Share of all CPU time between two samples that went to foreign work."""
        span = later.all - self.all
        if span <= 0:
            return None
        busy = span - (later.idle - self.idle)
        foreign = (busy - (later.own - self.own) - (later.irq - self.irq)
                   - (later.kernel - self.kernel))
        return round(max(0.0, foreign / span), 3)

    def kernel_share(self, later: "Sample") -> float | None:
        """Share of all CPU time between two samples that kernel threads took."""
        span = later.all - self.all
        return round((later.kernel - self.kernel) / span, 3) if span > 0 else None


class CpuMeter:
    """CPU time spent on all CPUs between two points, softirq and interrupts included,
    whoever ran it: wall time x online CPUs, minus idle, iowait and steal.

    Idle time is the precise figure here: with NO_HZ the kernel measures idle periods with
    its clock rather than sampling ticks (user, system and softirq are tick samples), so
    `busy = wall x CPUs - idle` is good to /proc/stat's 10 ms unit per CPU. The softirq
    share is reported beside it, from the sampled ticks."""

    def __init__(self):
        import time
        self._clock = time.monotonic
        self.t, self.fields = self._clock(), _stat_fields()

    def stop(self) -> dict:
        t, fields = self._clock(), _stat_fields()
        d = [b - a for a, b in zip(self.fields, fields)]
        user, nice, system, idle, iowait, irq, softirq, steal = d[:8]
        wall = t - self.t
        cpus = os.sysconf("SC_NPROCESSORS_ONLN")
        busy = max(0.0, wall * cpus - (idle + iowait + steal) / _CLK_TCK)
        sampled = user + nice + system + irq + softirq
        return {"cpu_s": round(busy, 4), "wall_s": round(wall, 4),
                "softirq_share": round((irq + softirq) / sampled, 4) if sampled else None}


def _stat_fields() -> list[int]:
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]
