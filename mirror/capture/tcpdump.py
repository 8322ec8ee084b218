"""tcpdump as a child process: the one wrapper used by the capture sidecar (a ring of
files), the demo, the bench and the tests (one file each).

Started with -U (a packet is written as it arrives): start() returns once tcpdump says it
is listening, stop() sends SIGINT and waits, so that no packet is lost at either end. A
thread reads tcpdump's stderr and keeps its own counters (printed on SIGUSR1 and at
exit: packets captured, received by the filter, dropped by the kernel)."""
from __future__ import annotations

import logging
import os
import re
import select
import signal
import subprocess
import threading
import time

from .pcap import MAX_SNAPLEN

log = logging.getLogger("mirror")

# At exit tcpdump prints one counter a line; on SIGUSR1 all three on one line, after
# "tcpdump: ".
_STAT_RE = re.compile(r"(\d+) packets? (captured|received by filter|dropped by kernel)")
_STAT_KEYS = {"captured": "captured", "received by filter": "received",
              "dropped by kernel": "dropped"}


class Tcpdump:
    """Records one interface into `path` (or, with `ring=(file_size_mb, files)`, into a
    ring of files named `path` + number; "-": a pipe, read from proc.stdout)."""

    def __init__(self, iface: str, path: str, netns: str | None = None, snaplen: int = 0,
                 buffer_kib: int = 131072, ring: tuple[int, int] | None = None):
        self.iface, self.path = iface, str(path)
        prefix = ["ip", "netns", "exec", netns] if netns else []
        # A large kernel buffer (-B). In immediate mode libpcap uses TPACKET_V2, whose ring
        # has fixed-size slots, each as large as the largest packet the interface can
        # carry: 64 KiB on a veth with offloads on, so a packet of any size takes 64 KiB
        # (measured: 32768 KiB held 512 packets, 131072 KiB 2048, while tcpdump was
        # stopped). The backlog tcpdump can ride out while it waits for a CPU is then
        # buffer_kib / 64 packets.
        self.cmd = prefix + ["tcpdump", "-n", "-U", "--immediate-mode", "-B", str(buffer_kib),
                             "-s", str(snaplen or MAX_SNAPLEN), "-i", iface, "-w", self.path]
        if ring:
            self.cmd += ["-C", str(ring[0]), "-W", str(ring[1])]
        if os.geteuid() == 0:
            # Keep root instead of tcpdump's default drop to user "tcpdump" after opening
            # the interface: that user could not write into a 0700 directory, and the
            # files it wrote could not be read by the indexer.
            self.cmd += ["-Z", "root"]
        self.proc: subprocess.Popen | None = None
        self.stats = {"captured": 0, "received": 0, "dropped": 0}
        self.stats_reports = 0              # how many times tcpdump printed them
        self.lines: list[str] = []          # the last lines that are not counters
        self.stderr = ""                    # everything tcpdump said
        self._reader: threading.Thread | None = None

    def start(self, timeout: float = 10.0) -> "Tcpdump":
        """Returns once tcpdump listens; RuntimeError with its message if it does not."""
        # path "-": the pcap comes on a pipe (proc.stdout), for the recording.
        out = subprocess.PIPE if self.path == "-" else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        buf = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stderr], [], [], 0.1)
            if ready:
                chunk = self.proc.stderr.read1(4096)
                if not chunk:
                    break
                buf += chunk
                if b"listening on" in buf:
                    for line in buf.decode(errors="replace").splitlines():
                        self._take(line)
                    self._reader = threading.Thread(target=self._read, name="tcpdump-stderr",
                                                    daemon=True)
                    self._reader.start()
                    return self
            elif self.proc.poll() is not None:
                break
        self.proc.kill()
        self.proc.wait()
        raise RuntimeError(f"tcpdump did not start on {self.iface}: "
                           f"{buf.decode(errors='replace').strip()}")

    def _read(self) -> None:
        for raw in self.proc.stderr:
            self._take(raw.decode(errors="replace"))

    def _take(self, line: str) -> None:
        self.stderr += line if line.endswith("\n") else line + "\n"
        line = line.strip()
        found = _STAT_RE.findall(line)
        for number, what in found:
            self.stats[_STAT_KEYS[what]] = int(number)
        if len(found) == 3 or (found and found[0][1] == "dropped by kernel"):
            self.stats_reports += 1         # a whole report: the SIGUSR1 line, or the last
                                            # line of the exit summary
        if line and not found:
            self.lines.append(line)
            del self.lines[:-20]

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def request_stats(self) -> None:
        """SIGUSR1: tcpdump prints its counters to stderr (read into `stats`)."""
        if self.running():
            self.proc.send_signal(signal.SIGUSR1)

    def stop(self, timeout: float = 120.0) -> str:
        """SIGINT (tcpdump writes out its buffer and prints its counters), waits, and
        returns everything tcpdump said. The default wait is generous: after a stall it
        may have a full buffer left to write out."""
        if self.proc is None:
            return self.stderr
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("tcpdump on %s did not stop on SIGINT; killing it", self.iface)
                self.proc.kill()
                self.proc.wait()
        if self._reader:
            self._reader.join(5)
        return self.stderr
