"""Test hosts in network namespaces: a namespace joined to the root namespace by a veth
pair, addressed from the benchmarking ranges 198.18.0.0/15 and 2001:db8::/32 only.

Names carry the creating process's pid, so concurrent runs never collide and the
leftovers of a crashed run are removed by the next one (cleanup_stale)."""
from __future__ import annotations

import itertools
import os
import re
import subprocess
import time
from dataclasses import dataclass

PREFIX = "mlab"
_seq = itertools.count(1)


def sh(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, **kw)


def stop_process(proc: subprocess.Popen | None, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout`; always reaped."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def cleanup_stale() -> list[str]:
    """Deletes namespaces and links made by test-host processes that no longer run."""
    removed = []
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.match(rf"{PREFIX}-(\d+)-\d+$", name)
        if m and not _alive(int(m.group(1))):
            sh("ip", "netns", "del", name, check=False)
            removed.append(name)
    for line in sh("ip", "-o", "link", "show", check=False).stdout.splitlines():
        m = re.match(rf"\d+: ({PREFIX[:1]}([0-9a-f]{{6}})[0-9a-f]{{2}}[a-z])[@:]", line)
        if m and not _alive(int(m.group(2), 16)):
            sh("ip", "link", "del", m.group(1), check=False)
            removed.append(m.group(1))
    return removed


def _link_exists(name: str) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")


def _free_name(tag: str) -> tuple[int, str]:
    """The next sequence number whose name (m + pid (6 hex) + sequence (2 hex) + a
    one-letter tag) no link holds, and that name. The sequence wraps after 256 names (the
    name must leave room for a "-sink" peer within 15 characters), so a name whose link
    still exists is skipped: a long test session once got its session-wide debug
    interface's name again, and the test that got it deleted it."""
    assert len(tag) == 1 and tag.isalpha() and tag.islower()
    for _ in range(256):
        n = next(_seq)
        name = f"m{os.getpid():06x}{n % 256:02x}{tag}"
        if not _link_exists(name):
            return n, name
    raise RuntimeError(f"no free interface name with tag {tag!r}: 256 links of this "
                       "process exist; delete some")


def unique_name(tag: str) -> str:
    """An interface name unique to this process and call, that cleanup_stale() removes
    once this process is gone (_free_name says its form)."""
    return _free_name(tag)[1]


def _free_subnet(start: int) -> int:
    """The first N in 1..250, from start + 1 on, whose 198.18.N.1 no root-namespace link
    holds."""
    out = sh("ip", "-o", "-4", "addr", "show", check=False).stdout
    used = {int(m) for m in re.findall(r"inet 198\.18\.(\d+)\.1/", out)}
    for i in range(250):
        n = (start + i) % 250 + 1
        if n not in used:
            return n
    return start % 250 + 1


@dataclass
class Host:
    """One namespace with `eth0` inside and `host_if` (its peer) in the root namespace."""
    ns: str
    host_if: str
    subnet: int           # third octet of 198.18.N.0/24 and the N of 2001:db8:N::/64

    @property
    def host_v4(self) -> str:
        return f"198.18.{self.subnet}.1"

    @property
    def ns_v4(self) -> str:
        return f"198.18.{self.subnet}.2"

    @property
    def host_v6(self) -> str:
        return f"2001:db8:{self.subnet:x}::1"

    @property
    def ns_v6(self) -> str:
        return f"2001:db8:{self.subnet:x}::2"

    @classmethod
    def create(cls) -> "Host":
        """A new host. Its subnet is derived from the pid and a sequence, then moved past
        any 198.18.N.0/24 already on a link of the root namespace: two test runs on one
        machine would otherwise route each other's traffic now and then."""
        pid = os.getpid()
        n, host_if = _free_name("h")
        ns = f"{PREFIX}-{pid}-{n}"
        subnet = _free_subnet((pid * 7 + n) % 250)
        host = cls(ns, host_if, subnet)
        try:
            host._build()
        except BaseException:
            host.destroy()
            raise
        return host

    def _build(self) -> None:
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", "eth0",
           "netns", self.ns)
        sh("ip", "addr", "add", f"{self.host_v4}/24", "dev", self.host_if)
        sh("ip", "-6", "addr", "add", f"{self.host_v6}/64", "dev", self.host_if, "nodad")
        sh("ip", "link", "set", self.host_if, "up")
        self.exec("ip", "addr", "add", f"{self.ns_v4}/24", "dev", "eth0")
        self.exec("ip", "-6", "addr", "add", f"{self.ns_v6}/64", "dev", "eth0", "nodad")
        self.exec("ip", "link", "set", "eth0", "up")
        self.exec("ip", "link", "set", "lo", "up")

    def exec(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", self.ns, *cmd, check=check)

    def wait_listening(self, port: int, proc: subprocess.Popen | None = None,
                       what: str = "server", timeout: float = 10.0) -> None:
        """Waits until a TCP listener on `port` exists in the namespace, without connecting
        (iperf3 -s would take a probe for a test's control connection); RuntimeError when
        `proc` exits first (with what it wrote to stderr, if piped) or on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise RuntimeError(f"{what} exited: {err.strip()}")
            if self.exec("ss", "-Hltn", f"sport = :{port}", check=False).stdout.strip():
                return
            time.sleep(0.05)
        raise RuntimeError(f"{what}: nothing listens on port {port} in {self.ns}")

    def popen(self, *cmd: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.ns, *cmd], **kw)

    def destroy(self) -> None:
        sh("ip", "netns", "del", self.ns, check=False)      # takes eth0 and its peer along
        sh("ip", "link", "del", self.host_if, check=False)  # in case the netns never got it
