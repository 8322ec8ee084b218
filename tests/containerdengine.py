"""A private containerd for one test, that leaves the host as it found it.

containerd runs with its root, state, socket and config in a temporary directory, without
its CRI plugin (no kubelet here: the tests play the kubelet with `ctr` and its labels),
and every container it runs goes into a cgroup parent of the test's own (`ctr run
--cgroup /PARENT/ID`), removed at stop, with its I/O FIFOs and runc's state in that
directory too (`--fifo-dir`, `--runc-root`; only the shims' sockets go where containerd
puts them, /run/containerd/s, and each shim removes its own when its task is deleted). stop() deletes every task and container (so each
shim exits and removes its socket), ends containerd, kills whatever of it outlives that
and removes the mounts, cgroups and files."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

CONTAINERD = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"
SHIM = "/usr/bin/containerd-shim-runc-v2"
K8S_NAMESPACE = "k8s.io"

CONFIG = """version = 2
root = "{dir}/root"
state = "{dir}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{dir}/containerd.sock"
[ttrpc]
  address = "{dir}/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
"""


def available() -> str | None:
    """None when containerd can run here, else why not."""
    for tool in (CONTAINERD, CTR, SHIM):
        if not os.access(tool, os.X_OK):
            return f"{tool} missing: run scripts/setup (Debian's containerd)"
    return None


class ContainerdEngine:
    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="mctrd-", dir="/var/tmp"))
        self.sock = self.dir / "containerd.sock"
        self.cgroup_parent = f"mirror-test-{os.getpid()}-{self.dir.name[-6:]}"
        self.proc: subprocess.Popen | None = None
        self.log = self.dir / "containerd.log"

    def start(self, timeout: float = 60) -> "ContainerdEngine":
        config = self.dir / "config.toml"
        config.write_text(CONFIG.format(dir=self.dir))
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([CONTAINERD, "--config", str(config)], stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited ({self.proc.returncode}):\n"
                                   f"{self.log.read_text()[-3000:]}")
            if self.sock.exists() and self.ctr("version", check=False).returncode == 0:
                return self
            time.sleep(0.1)
        raise RuntimeError(f"containerd did not answer within {timeout} s:\n"
                           f"{self.log.read_text()[-3000:]}")

    def ctr(self, *args: str, namespace: str = K8S_NAMESPACE, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess:
        r = subprocess.run([CTR, "--address", str(self.sock), "--namespace", namespace,
                            *args], capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)}: {r.returncode}\n{r.stdout}{r.stderr}")
        return r

    def import_from_podman(self, image: str, namespace: str = K8S_NAMESPACE) -> None:
        """Copies an image from podman's storage (`podman save` an OCI archive, `ctr
        images import` it)."""
        archive = self.dir / "image.tar"
        r = subprocess.run(["podman", "save", "--format", "oci-archive", "-o", str(archive),
                            image], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"podman save {image}: {r.stderr}"
        self.ctr("images", "import", "--base-name", image.rsplit(":", 1)[0], str(archive),
                 namespace=namespace)
        archive.unlink()

    def run(self, cid: str, image: str, *, labels: dict[str, str] | None = None,
            netns: str | None = None, namespace: str = K8S_NAMESPACE) -> int:
        """`ctr run -d` in the test's cgroup parent; `netns`: join /run/netns/NETNS (else
        the container gets a network namespace of its own). Returns the task's pid."""
        args = ["run", "--detach", "--cgroup", f"/{self.cgroup_parent}/{cid}",
                "--fifo-dir", str(self.dir / "fifo"), "--runc-root", str(self.dir / "runc")]
        if netns:
            args += ["--with-ns", f"network:/run/netns/{netns}"]
        for key, value in (labels or {}).items():
            args += ["--label", f"{key}={value}"]
        self.ctr(*args, image, cid, namespace=namespace)
        return self.pid(cid, namespace)

    def pid(self, cid: str, namespace: str = K8S_NAMESPACE) -> int:
        for line in self.ctr("tasks", "list", namespace=namespace).stdout.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == cid:
                return int(fields[1])
        raise AssertionError(f"no task {cid}")

    def remove(self, cid: str, namespace: str = K8S_NAMESPACE) -> None:
        """Kills and deletes the container's task (its shim exits), then the container."""
        self.ctr("tasks", "delete", "--force", cid, namespace=namespace, check=False)
        self.ctr("containers", "delete", cid, namespace=namespace)

    def namespaces(self) -> list[str]:
        out = self.ctr("namespaces", "list", "--quiet", check=False).stdout
        return out.split()

    def leftovers(self) -> list[str]:
        """What of this containerd is still in the system (processes, mounts, cgroups)."""
        out = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if str(self.dir).encode() in cmdline:
                out.append(f"process {pid}: {cmdline.decode(errors='replace')[:120]}")
        for line in Path("/proc/self/mounts").read_text().splitlines():
            if str(self.dir) in line.split()[1]:
                out.append(f"mount {line.split()[1]}")
        out += [f"cgroup {d}" for d in self._cgroup_dirs()]
        return out

    def _cgroup_dirs(self) -> list[Path]:
        root = Path("/sys/fs/cgroup")
        return [d for d in root.glob(f"*/{self.cgroup_parent}") if d.is_dir()] + \
               ([root / self.cgroup_parent] if (root / self.cgroup_parent).is_dir() else [])

    def stop(self, timeout: float = 30) -> list[str]:
        """Deletes every container (their shims exit), SIGTERM to containerd, SIGKILL to
        whatever of ours outlives it, then the mounts, cgroups and files are removed.
        Returns the processes and mounts left behind after the orderly part."""
        if self.proc and self.proc.poll() is None:
            for space in self.namespaces():
                listed = self.ctr("containers", "list", "--quiet", namespace=space,
                                  check=False).stdout.split()
                for cid in listed:
                    self.remove(cid, namespace=space)
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
        for line in reversed(Path("/proc/self/mounts").read_text().splitlines()):
            if str(self.dir) in line.split()[1]:
                subprocess.run(["umount", "-l", line.split()[1]], capture_output=True)
        for d in self._cgroup_dirs():
            for sub in sorted((p for p in d.rglob("*") if p.is_dir()), reverse=True):
                sub.rmdir()
            d.rmdir()
        shutil.rmtree(self.dir, ignore_errors=True)
        return left
