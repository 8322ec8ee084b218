"""How much of the CPUs went to work other than the bench's during a run.

The bench saturates both CPUs, so another tenant's work shows up as CPU time the bench's
processes did not get. Measured directly: the CPU time, between two samples, of every
process that is neither in the bench's own process tree (itself, nginx, iperf3 -s,
tcpdump, and the h2load and iperf3 clients it reaps) nor a kernel thread (children of
kthreadd: ksoftirqd, kworkers and NAPI threads serve the bench's packets on an otherwise
idle machine), plus steal (time the hypervisor gave to other guests). A foreign process
that starts and ends between two samples is counted only if a living foreign parent
reaps it.

Not a residual any more: "all busy time minus the bench's, interrupts and kernel
threads" flagged iperf3 runs of the mirror at 14-18 % foreign on an idle machine (a
sampler of every process's CPU time saw nothing foreign in those runs). The likely
reason: on this kernel (no CONFIG_IRQ_TIME_ACCOUNTING) the softirq field of /proc/stat is
sampled by the tick, while idle is measured exactly, so softirq work on an otherwise idle
CPU is busy time that nothing is charged with. That residual is kept as `unattributed`.
An estimate: the report uses it to flag runs that shared the machine, never to correct
a number."""
from __future__ import annotations

import os

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_ticks() -> tuple[int, int, int, int]:
    """(all ticks, idle + iowait ticks, irq + softirq ticks, steal ticks) over every CPU."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields[:8]
    return sum(fields[:8]), idle + iowait, irq + softirq, steal


def _proc_stat(pid: int) -> tuple[int, int, int, int] | None:
    """(ppid, utime + stime, cutime + cstime, start time in ticks since boot) of a
    process, None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    rest = text[text.rfind(")") + 2:].split()
    return (int(rest[1]), int(rest[11]) + int(rest[12]), int(rest[13]) + int(rest[14]),
            int(rest[19]))


def _uptime_ticks() -> int:
    with open("/proc/uptime") as f:
        return int(float(f.read().split()[0]) * _CLK_TCK)


def _process_ticks(root: int) -> tuple[int, int, dict[int, tuple[int, int, int, int]]]:
    """(CPU ticks of `root` and all its descendants, reaped children included; CPU ticks
    of kernel threads; {pid: (ppid, own ticks, reaped children's ticks, start)} of every
    other process)."""
    stats = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            s = _proc_stat(int(d))
            if s:
                stats[int(d)] = s
    kids: dict[int, list[int]] = {}
    for pid, s in stats.items():
        kids.setdefault(s[0], []).append(pid)
    own, kernel = _tree(kids, root), _tree(kids, _KTHREADD)
    others = {pid: s for pid, s in stats.items()
              if pid not in own and pid not in kernel and pid != 1}
    # init: its own time only. It reaps every orphan, the bench's own among them (a
    # process whose parent exited first), so its children's time is nobody's in particular.
    if 1 in stats:
        others[1] = (0, stats[1][1], 0, stats[1][3])
    return (sum(stats[p][1] + stats[p][2] for p in own if p in stats),
            sum(stats[p][1] + stats[p][2] for p in kernel if p in stats), others)


_KTHREADD = 2       # the parent of every kernel thread


def _tree(kids, root: int) -> set[int]:
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo += kids.get(pid, [])
    return found


def _foreign_growth(before: dict[int, tuple[int, int, int, int]],
                    after: dict[int, tuple[int, int, int, int]], since: int) -> int:
    """CPU ticks other processes used between two samples ({pid: (ppid, own, reaped
    children's, start)} each; `since`: the first sample's time in ticks since boot).
    A process gone since the first sample and reaped by one still there had its whole
    life added to that parent's children's time: what it had used before the first
    sample is not the window's, and is taken off. A process not among the others at the
    first sample counts only if it started after it: one that started before was then in
    another tree (the bench's, whose child it was until its parent exited) or had another
    pid's slot, and its past is not the window's either."""
    grown = 0
    for pid, (_, own, kids, start) in after.items():
        prev = before.get(pid)
        if prev is None or prev[3] != start:
            if start >= since:
                grown += own + kids
            continue
        grown += max(0, own - prev[1]) + max(0, kids - prev[2])
    for pid, (ppid, own0, kids0, start0) in before.items():
        if pid not in after and ppid in after and ppid in before and \
                after[ppid][3] == before[ppid][3]:
            grown -= own0 + kids0
    return max(0, grown)


class Sample:
    def __init__(self):
        self.uptime = _uptime_ticks()
        self.all, self.idle, self.irq, self.steal = _cpu_ticks()
        self.own, self.kernel, self.others = _process_ticks(os.getpid())

    def _share(self, later: "Sample", ticks: float) -> float | None:
        span = later.all - self.all
        return round(max(0.0, ticks / span), 3) if span > 0 else None

    def _foreign_ticks(self, later: "Sample") -> int:
        return _foreign_growth(self.others, later.others, self.uptime) + later.steal - self.steal

    def foreign_share(self, later: "Sample") -> float | None:
        """Share of all CPU time between two samples that other processes and other
        guests (steal) took. At most 1: an orphan that another subreaper than its old
        parent reaps in the window brings its whole life into that reaper's children's
        time, which _foreign_growth cannot tell apart (it then reads as all foreign)."""
        share = self._share(later, self._foreign_ticks(later))
        return None if share is None else min(1.0, share)

    def kernel_share(self, later: "Sample") -> float | None:
        """Share of all CPU time between two samples that kernel threads took."""
        return self._share(later, later.kernel - self.kernel)

    def shares(self, later: "Sample") -> dict[str, float | None]:
        """The run record's three figures: foreign_cpu, kernel_cpu, unattributed_cpu."""
        return {"foreign_cpu": self.foreign_share(later),
                "kernel_cpu": self.kernel_share(later),
                "unattributed_cpu": self.unattributed_share(later)}

    def unattributed_share(self, later: "Sample") -> float | None:
        """Busy time charged to nothing: not the bench's processes, not a kernel thread,
        not a foreign process or guest, not an interrupt tick."""
        busy = (later.all - self.all) - (later.idle - self.idle)
        charged = (later.own - self.own) + (later.kernel - self.kernel) + \
            (later.irq - self.irq) + self._foreign_ticks(later)
        return self._share(later, busy - charged)


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
