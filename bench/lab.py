"""The bench topology: one server namespace joined to the root namespace by a veth pair.

    root namespace (client)                      server namespace
    h2load, iperf3 -c      host_if <==veth==> eth0    nginx (1 worker), iperf3 -s
    pinned to CLIENT_CPU   ^ monitored             198.18.N.2  /ok   (200)
                                                   198.18.N.3  /error (500)
                                                   port 80 HTTP/1.1, port H2_PORT h2c

The host-side end of the veth is what every configuration hooks, as a container host
hooks a container's veth. Error requests go to a second server address so that error and
success connections can be told apart on the debug interface by address alone.

CPU pinning (2 CPUs): clients on CLIENT_CPU, servers on SERVER_CPU. A veth delivers to
its peer in the sender's context, so the client CPU also runs the server's receive path
and the server CPU the client's: the load is split about evenly, and both hooks of the
monitored veth run on both CPUs."""
from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from mirror.lab.netns import Host, stop_process
from mirror.lab.nginx import Nginx

CLIENT_CPU = 0
SERVER_CPU = 1
IPERF_PORT = 5201
H2_PORT = 8080          # nginx speaks h2c (prior knowledge) here, HTTP/1.1 on 80

# ethtool names of the segmentation and receive offloads switched off so that every
# MTU-sized packet, not a 64 KiB GSO super-packet, crosses the classifier.
OFFLOADS = ("tx-tcp-segmentation", "tx-tcp6-segmentation", "tx-tcp-ecn-segmentation",
            "tx-tcp-mangleid-segmentation", "tx-generic-segmentation", "rx-gro")

_SET_FEATURES = """
import sys
from pyroute2.ethtool import Ethtool
ifname, on = sys.argv[1], sys.argv[2] == "on"
names = sys.argv[3:]
e = Ethtool()
try:
    f = e.get_features(ifname)
    for n in names:
        if n in f.features:
            f.features[n].enable = on
    e.set_features(ifname, f)
    f = e.get_features(ifname)
    print(" ".join(f"{n}={int(f.features[n].enable)}" for n in names if n in f.features))
finally:
    e.close()
"""


def pin_tree(pid: int, cpu: int) -> list[int]:
    """Pins a process and its children (nginx master and workers) to one CPU."""
    pids = [pid]
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        kids = []
    pids += [int(k) for k in kids]
    for p in pids:
        os.sched_setaffinity(p, {cpu})
    return pids


def spread_tree(pid: int, cpus: list[int], workers: int, timeout: float = 10.0) -> None:
    """Pins nginx's master to all of `cpus` and its workers one per CPU, round robin,
    once the master has forked all `workers`."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    deadline = time.monotonic() + timeout
    while len(kids := path.read_text().split()) < workers:
        if time.monotonic() > deadline:
            raise RuntimeError(f"nginx forked {len(kids)} of {workers} workers")
        time.sleep(0.05)
    os.sched_setaffinity(pid, set(cpus))
    for i, kid in enumerate(sorted(int(k) for k in kids)):
        os.sched_setaffinity(kid, {cpus[i % len(cpus)]})


def taskset(cpu: int | str, *cmd: str) -> list[str]:
    return ["taskset", "-c", str(cpu), *cmd]


class Lab:
    def __init__(self, workers: int = 1, server_cpus: list[int] | None = None):
        # The defaults are the 2-CPU layout above; the scale mode passes more workers and
        # the CPUs to spread them over (one worker per CPU, round robin).
        self.workers, self.server_cpus = workers, server_cpus
        self.host: Host | None = None
        self.nginx: Nginx | None = None
        self.iperf: subprocess.Popen | None = None

    # --- lifecycle -----------------------------------------------------------------
    def start(self) -> "Lab":
        self.host = Host.create()
        self.host.exec("ip", "addr", "add", f"{self.error_v4}/24", "dev", "eth0")
        self.nginx = Nginx(self.host, workers=self.workers, h2_port=H2_PORT).start()
        if self.server_cpus is None:
            time.sleep(0.2)                 # let the master fork its worker
            pin_tree(self.nginx.proc.pid, SERVER_CPU)
            server = SERVER_CPU
        else:
            spread_tree(self.nginx.proc.pid, self.server_cpus, self.workers)
            server = ",".join(map(str, self.server_cpus))
        self.iperf = self.host.popen(*taskset(server, "iperf3", "-s", "-B",
                                              self.host.ns_v4, "-p", str(IPERF_PORT)),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.host.wait_listening(IPERF_PORT, self.iperf, "iperf3 -s")
        return self

    def stop(self) -> None:
        stop_process(self.iperf)
        if self.nginx:
            self.nginx.stop()
        if self.host:
            self.host.destroy()

    # --- addresses -----------------------------------------------------------------
    @property
    def host_if(self) -> str:
        return self.host.host_if

    @property
    def ok_v4(self) -> str:
        return self.host.ns_v4

    @property
    def error_v4(self) -> str:
        return f"198.18.{self.host.subnet}.3"

    @property
    def ok_url(self) -> str:
        return f"http://{self.ok_v4}/ok"

    @property
    def error_url(self) -> str:
        return f"http://{self.error_v4}/error"

    @property
    def ok_url_h2(self) -> str:
        return f"http://{self.ok_v4}:{H2_PORT}/ok"

    @property
    def error_url_h2(self) -> str:
        return f"http://{self.error_v4}:{H2_PORT}/error"

    # --- knobs and counters ----------------------------------------------------------
    def set_offloads(self, on: bool) -> str:
        """Switches segmentation and GRO offloads on both ends of the veth."""
        import sys
        state = "on" if on else "off"
        out = subprocess.run([sys.executable, "-c", _SET_FEATURES, self.host_if, state,
                              *OFFLOADS], check=True, capture_output=True, text=True).stdout
        self.host.popen(sys.executable, "-c", _SET_FEATURES, "eth0", state, *OFFLOADS,
                        stdout=subprocess.DEVNULL).wait()
        return out.strip()

    def passive_opens(self) -> int:
        """TCP connections accepted in the server namespace since it was made."""
        lines = self.host.exec("cat", "/proc/net/snmp").stdout.splitlines()
        tcp = [line.split() for line in lines if line.startswith("Tcp:")]
        return int(tcp[1][tcp[0].index("PassiveOpens")])

    def reachable(self) -> bool:
        try:
            socket.create_connection((self.ok_v4, 80), timeout=1).close()
            return True
        except OSError:
            return False


def link_stats(ifname: str) -> dict[str, int]:
    base = Path(f"/sys/class/net/{ifname}/statistics")
    return {k: int((base / k).read_text()) for k in ("rx_packets", "tx_packets", "rx_bytes",
                                                      "tx_bytes", "tx_dropped", "rx_dropped")}
