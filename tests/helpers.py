"""Running `mirror run` as a real process, and comparing captures."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from mirror.capture.pcap import Packet
from mirror.http1 import status_line

ROOT = Path(__file__).resolve().parent.parent


def mirror_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mirror", *args]


def run_cli(*args: str, env=None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(mirror_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


class MirrorProcess:
    """`mirror run ...` in the background; start() returns when it prints its ready line.
    A thread collects its output (stdout and stderr merged) line by line. With `netns`, it
    runs inside that network namespace (ip netns exec)."""

    def __init__(self, *args: str, env=None, netns: str | None = None):
        self.args = args
        self.env = env
        self.netns = netns
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []
        self._reader: threading.Thread | None = None

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def _read(self) -> None:
        for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace"))

    def start(self, timeout: float = 60) -> "MirrorProcess":
        cmd = mirror_cmd("run", *self.args)
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self.wait_for("mirror: ready", timeout):
            self.kill()
            raise RuntimeError(f"mirror run did not become ready:\n{self.output}")
        return self

    def wait_for(self, text: str, timeout: float = 10) -> bool:
        """Waits until `text` appears in the output (or the process ends)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output:
                return True
            if self.proc.poll() is not None and not self._reader.is_alive():
                return text in self.output
            time.sleep(0.05)
        return False

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout)
        self._reader.join(5)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self._reader:
            self._reader.join(5)


def signature(p: Packet) -> tuple:
    return (p.src, p.sport, p.dst, p.dport, p.seq, p.ack, p.flags, len(p.payload))


def from_first_status(packets: list[Packet], code: int) -> list[Packet]:
    """The packets from the first response carrying `code` on (capture order)."""
    for i, p in enumerate(packets):
        if status_line(p.payload) and int(p.payload[9:12]) == code:
            return packets[i:]
    raise AssertionError(f"no {code} response in the reference capture")


def same_packets(a: list[Packet], b: list[Packet]) -> bool:
    return Counter(map(signature, a)) == Counter(map(signature, b))


def env_with(**kw) -> dict:
    env = dict(os.environ)
    env.update({k: str(v) for k, v in kw.items()})
    return env


def controller_ask(state_dir, what: str = "counters"):
    """Asks the one controller recorded in `state_dir` over its control socket."""
    from mirror import ownership
    from mirror.control import ask
    old = os.environ.get("MIRROR_STATE_DIR")
    os.environ["MIRROR_STATE_DIR"] = str(state_dir)
    try:
        return ask(ownership.records("controller")[0]["socket"], what)
    finally:
        if old is None:
            del os.environ["MIRROR_STATE_DIR"]
        else:
            os.environ["MIRROR_STATE_DIR"] = old


def drop_link(name: str) -> None:
    """Deletes a link a test may have left (a killed controller's debug interface)."""
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        if ipr.link_lookup(ifname=name):
            ipr.link("del", ifname=name)


def links_of_this_run() -> set[str]:
    """The host's interface names, less those of other test processes running at the same
    time (mirror.lab.netns.unique_name: "m" + another pid): what this run could have
    created or left behind."""
    import re
    mine = f"m{os.getpid():06x}"
    return {name for name in os.listdir("/sys/class/net")
            if not re.match(r"m[0-9a-f]{6}[0-9a-f]{2}[a-z]", name) or name.startswith(mine)}
