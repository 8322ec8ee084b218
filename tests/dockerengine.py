"""A private Docker engine for one test, that leaves the host as it found it.

dockerd runs inside the test's own network namespace (nsenter --net), so the bridges,
veths and published ports it makes live and die with that namespace; with --iptables=false
--ip6tables=false --ip-forward=false it does not touch any firewall or forwarding sysctl,
not even the namespace's. Its data root, exec root, pidfile and socket are in a temporary
directory, containers go under a cgroup parent of their own (removed at stop), and its
networks come from 198.19.N.0/24 (N: the test host's subnet number). stop() ends dockerd
and everything it started (containerd, shims, docker-proxy) and removes what is left."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

DOCKERD = "/usr/sbin/dockerd"
DOCKER = "/usr/bin/docker"          # Debian's client, not another one earlier in PATH
COMPOSE = "/usr/bin/docker-compose"


def available() -> str | None:
    """None when the engine can run here, else why not."""
    for tool in (DOCKERD, DOCKER, COMPOSE):
        if not os.access(tool, os.X_OK):
            return f"{tool} missing: run scripts/setup (Debian's docker.io and docker-compose)"
    return None


class DockerEngine:
    def __init__(self, netns: str, pool_octet: int):
        self.netns = netns
        self.dir = Path(tempfile.mkdtemp(prefix="mdock-", dir="/var/tmp"))
        self.sock = self.dir / "docker.sock"
        self.cgroup_parent = f"mirror-test-{os.getpid()}-{self.dir.name[-6:]}"
        self.pool = f"198.19.{pool_octet}.0/24"
        self.proc: subprocess.Popen | None = None
        self.log = self.dir / "dockerd.log"

    @property
    def env(self) -> dict:
        return dict(os.environ, DOCKER_HOST=f"unix://{self.sock}")

    def start(self, timeout: float = 90) -> "DockerEngine":
        cmd = ["nsenter", f"--net=/run/netns/{self.netns}", DOCKERD,
               "--host", f"unix://{self.sock}", "--data-root", str(self.dir / "data"),
               "--exec-root", str(self.dir / "exec"), "--pidfile", str(self.dir / "dockerd.pid"),
               "--iptables=false", "--ip6tables=false", "--ip-forward=false",
               "--ip-masq=false", "--bridge=none", "--cgroup-parent", self.cgroup_parent,
               "--default-address-pool", f"base={self.pool},size=28", "--log-level=warn"]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited ({self.proc.returncode}):\n"
                                   f"{self.log.read_text()[-3000:]}")
            if self.sock.exists() and self.docker("version", check=False).returncode == 0:
                return self
            time.sleep(0.2)
        raise RuntimeError(f"dockerd did not answer within {timeout} s:\n"
                           f"{self.log.read_text()[-3000:]}")

    def docker(self, *args: str, check: bool = True, timeout: float = 300,
               **kw) -> subprocess.CompletedProcess:
        r = subprocess.run([DOCKER, *args], capture_output=True, text=True, env=self.env,
                           timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)}: {r.returncode}\n{r.stdout}{r.stderr}")
        return r

    def compose(self, *args: str, env: dict | None = None, check: bool = True,
                timeout: float = 300) -> subprocess.CompletedProcess:
        r = subprocess.run([COMPOSE, *args], capture_output=True, text=True,
                           env=dict(self.env, **(env or {})), timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"docker-compose {' '.join(args)}: {r.returncode}\n"
                                 f"{r.stdout}{r.stderr}")
        return r

    def knows_capability(self, name: str, image: str) -> bool:
        """Whether this engine accepts `--cap-add NAME` (Docker 20.10 does not know BPF)."""
        r = self.docker("create", "--cap-drop", "ALL", "--cap-add", name, image, check=False)
        if r.returncode == 0:
            self.docker("rm", r.stdout.strip())
            return True
        assert "unknown capability" in r.stderr, r.stderr
        return False

    def load_from_podman(self, *images: str) -> None:
        """Copies images from podman's storage (`podman save -m | docker load`)."""
        save = subprocess.Popen(["podman", "save", "-m", *images], stdout=subprocess.PIPE)
        try:
            self.docker("load", stdin=save.stdout, timeout=600)
        finally:
            save.stdout.close()
            assert save.wait(600) == 0, "podman save failed"

    def volume_dir(self, name: str) -> Path:
        return self.dir / "data" / "volumes" / name / "_data"

    def leftovers(self) -> list[str]:
        """What of this engine is still in the system (processes, mounts, cgroups)."""
        out = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if str(self.dir).encode() in cmdline:
                out.append(f"process {pid}: {cmdline.decode(errors='replace')[:120]}")
        for line in Path("/proc/self/mounts").read_text().splitlines():
            if str(self.dir) in line:
                out.append(f"mount {line.split()[1]}")
        out += [f"cgroup {d}" for d in self._cgroup_dirs()]
        return out

    def _cgroup_dirs(self) -> list[Path]:
        root = Path("/sys/fs/cgroup")
        return [d for d in root.glob(f"*/{self.cgroup_parent}") if d.is_dir()] + \
               ([root / self.cgroup_parent] if (root / self.cgroup_parent).is_dir() else [])

    def stop(self, timeout: float = 60) -> list[str]:
        """SIGTERM to dockerd (it stops its containers, containerd and proxies), SIGKILL to
        whatever of ours outlives it, then the cgroups, mounts and files are removed.
        Returns the processes and mounts dockerd left behind by itself (cgroup directories
        it always leaves: those are not counted)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        left = [item for item in self.leftovers() if not item.startswith("cgroup ")]
        for item in left:
            if item.startswith("process "):
                try:
                    os.kill(int(item.split()[1].rstrip(":")), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for line in Path("/proc/self/mounts").read_text().splitlines():
            if str(self.dir) in line:
                subprocess.run(["umount", "-l", line.split()[1]], capture_output=True)
        for d in self._cgroup_dirs():
            for sub in sorted((p for p in d.rglob("*") if p.is_dir()), reverse=True):
                sub.rmdir()
            d.rmdir()
        shutil.rmtree(self.dir, ignore_errors=True)
        return left
