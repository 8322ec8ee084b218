"""The machine every mode of the bench runs on: what it must have before anything is
touched (preflight), what a result records about it (machine_info), and how a run on it
stops (SIGTERM unwinds like Ctrl-C).

One preflight for every mode, so that a machine the bench cannot use fails the same way
whichever mode finds out: a UsageError, which the entry points print as one line and
exit status 2, as the mirror's own CLI does (mirror/errors.py). Its own module because
bench/runner.py and the experiments it runs as child processes (bench/containers.py)
both need the SIGTERM handler, and neither should import the other for it."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

from mirror.bpfprog import check_environment
from mirror.errors import UsageError

# What the lab (bench/lab.py: nginx, iperf3 -s, ip, ss, taskset) and its clients run.
LAB_TOOLS = ("h2load", "iperf3", "nginx", "taskset", "ip", "ss")
# The main bench also watches every run with tcpdump (bench/completeness.py).
TOOLS = LAB_TOOLS + ("tcpdump",)

ROOT = Path(__file__).resolve().parent.parent


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity), in order."""
    return sorted(os.sched_getaffinity(0))


def preflight(tools: tuple[str, ...] = TOOLS, min_cpus: int = 1) -> None:
    """Raises UsageError, naming the fix, unless the bench can run here: root, the tools
    it starts, enough CPUs for its pinning, and bcc with kernel headers."""
    if os.geteuid() != 0:
        raise UsageError("run as root: the bench loads BPF programs and builds network "
                         "namespaces")
    missing = [t for t in tools if not shutil.which(t)]
    if missing:
        raise UsageError(f"missing {', '.join(missing)}; scripts/setup installs them")
    if (os.cpu_count() or 1) < min_cpus:
        raise UsageError(f"needs {min_cpus} CPUs (clients and servers are pinned to CPUs of "
                         f"their own); this machine has {os.cpu_count()}")
    check_environment()


def _first_line(cmd: list[str], stderr: bool = False) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError:
        return ""
    return ((proc.stderr if stderr else proc.stdout).strip().splitlines() or [""])[0]


def tree_commit(path, *pathspec: str) -> str:
    """The commit checked out where `path` lies, marked when the files of `pathspec`
    (default: `path`'s own) differ from it; "" outside a git checkout."""
    commit = _first_line(["git", "-C", str(path), "rev-parse", "--short", "HEAD"])
    dirty = _first_line(["git", "-C", str(path), "status", "--porcelain", "--",
                         *(pathspec or ["."])])
    return commit + ("+uncommitted changes" if commit and dirty else "")


def machine_info() -> dict:
    """What a result needs to be read against: the CPUs, the kernel, the commit (marked
    when the code measured differs from it) and the tools' versions, and the load
    average when the run began."""
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/loadavg") as f:
        loadavg = f.read().split()[:3]
    return {"kernel": platform.release(), "cpus": os.cpu_count(),
            "usable_cpus": len(usable_cpus()), "cpu_model": model,
            "git_commit": tree_commit(ROOT, "bpf", "mirror", "bench", ":!bench/results"),
            "loadavg": loadavg,
            "h2load": _first_line(["h2load", "--version"]),
            "iperf3": _first_line(["iperf3", "--version"]),
            "nginx": _first_line(["nginx", "-v"], stderr=True)}


def raise_interrupt(signum, frame):
    """A SIGTERM handler: the run unwinds like Ctrl-C, through every cleanup."""
    raise KeyboardInterrupt
