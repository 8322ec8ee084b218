"""`mirror capture`: the capture sidecar. Records the debug interface with tcpdump into a
bounded ring of pcap files and indexes the error flows it recorded.

- Ring: tcpdump -C SIZE -W FILES, so at most FILES files of about SIZE million bytes each
  (a file may pass SIZE by one packet) per tcpdump run; files of earlier runs (tcpdump is
  restarted when the debug interface is recreated) are pruned oldest first, so the
  directory never holds more than FILES pcaps. Files are 0600, the directory 0700.
- Waits for the debug interface to exist and be up instead of failing when it starts
  before the mirror controller that creates it.
- Index: the files are read back with dpkt as tcpdump writes them (every 0.2 s, from
  where the last read stopped; -U makes tcpdump write whole records), and one JSON line
  per error flow is appended to index.jsonl once the flow is over (mirror.pcapindex).
  `mirror capture --list` prints the index as a table. Read positions are kept in
  .cursors.json, so a restarted sidecar indexes what a killed one left unread.
- Health: tcpdump's own counters (packets captured, received by the filter, dropped by
  the kernel), asked for with SIGUSR1, go to status.json, the log and the metrics, with
  the indexer's (flows indexed, ring files overwritten before they were read).
- SIGTERM/SIGINT: stops tcpdump with SIGINT (it writes out its buffer), reads the files
  to their end, writes every flow still open to the index, and exits 0.

Privileges: only what tcpdump needs, CAP_NET_RAW (and CAP_NET_ADMIN). The container image
runs this as a non-root user with a tcpdump carrying those two file capabilities; as root
it passes `-Z root` so that the files stay owned by the user that indexes them."""
from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .cli import positive_seconds
from .errors import UsageError

log = logging.getLogger("mirror")

INDEX_NAME = "index.jsonl"
STATUS_NAME = "status.json"
STATE_NAME = ".cursors.json"
FILE_RE = re.compile(r"^mirror-\d{8}T\d{6}Z-r(\d+)\.pcap(\d+)$")

EPILOG = """\
examples:
  mirror capture --iface mirror0 --dir /var/lib/mirror/captures
  mirror capture --file-size 10 --files 20 --metrics-addr 0.0.0.0:9465
  mirror capture --list --dir /var/lib/mirror/captures     # the index as a table
  tcpdump -nr /var/lib/mirror/captures/mirror-20250101T120000Z-r1.pcap03

environment (for containers; flags win): MIRROR_CAPTURE_IFACE (else MIRROR_DEBUG_IFACE),
MIRROR_CAPTURE_DIR, MIRROR_CAPTURE_FILE_SIZE, MIRROR_CAPTURE_FILES,
MIRROR_CAPTURE_BUFFER_KIB, MIRROR_CAPTURE_FLOW_IDLE, MIRROR_CAPTURE_METRICS_ADDR.

disk: at most FILES x (FILE_SIZE million bytes + one packet), plus the index.
overhead: tcpdump copies each mirrored packet to user space once; nothing else is
captured, because only mirrored packets reach the debug interface.
"""


def _env(name: str, default=None):
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") \
                from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}")
        return value
    return parse


def add_parser(sub) -> None:
    p = sub.add_parser("capture", help="record the debug interface into a ring of pcaps "
                       "and index the error flows (the capture sidecar)",
                       description=__doc__.split("\n\n")[0].replace("\n", " ")
                       .replace("`mirror capture`: the", "The"),
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iface", metavar="IF",
                   default=_env("MIRROR_CAPTURE_IFACE", _env("MIRROR_DEBUG_IFACE", "mirror0")),
                   help="the debug interface to record (default %(default)s)")
    p.add_argument("--dir", metavar="DIR",
                   default=_env("MIRROR_CAPTURE_DIR", "/var/lib/mirror/captures"),
                   help="where the pcaps, index.jsonl and status.json go (default %(default)s)")
    p.add_argument("--file-size", type=_count(1), metavar="MB",
                   default=_env("MIRROR_CAPTURE_FILE_SIZE", "50"),
                   help="rotate after this many million bytes (tcpdump -C; default "
                   "%(default)s)")
    p.add_argument("--files", type=_count(2), metavar="N",
                   default=_env("MIRROR_CAPTURE_FILES", "10"),
                   help="keep at most N pcap files, overwriting the oldest (tcpdump -W; "
                   "default %(default)s)")
    p.add_argument("--buffer-kib", type=_count(64), metavar="KIB",
                   default=_env("MIRROR_CAPTURE_BUFFER_KIB", "4096"),
                   help="kernel capture buffer (tcpdump -B); a larger one rides out "
                   "bursts without drops (default %(default)s)")
    p.add_argument("--flow-idle", type=positive_seconds, metavar="SECONDS",
                   default=_env("MIRROR_CAPTURE_FLOW_IDLE", "60"),
                   help="index a flow not closed by FIN or RST once nothing new of it has "
                   "been read for this long (default %(default)s)")
    p.add_argument("--metrics-addr", metavar="HOST:PORT",
                   default=_env("MIRROR_CAPTURE_METRICS_ADDR"),
                   help="serve Prometheus metrics here (default: off)")
    p.add_argument("--list", action="store_true",
                   help="print the index of --dir as a table and exit")
    p.add_argument("--json", action="store_true", help="with --list: JSON lines")
    p.set_defaults(func=cmd_capture)


def cmd_capture(args) -> int:
    if args.list:
        return list_index(Path(args.dir), as_json=args.json)
    opts = Options(iface=args.iface, dir=Path(args.dir), file_size=int(args.file_size),
                   files=int(args.files), flow_idle=float(args.flow_idle),
                   buffer_kib=int(args.buffer_kib),
                   metrics_addr=args.metrics_addr)
    sidecar = CaptureSidecar(opts)
    sidecar.preflight()
    server = None
    if opts.metrics_addr:
        server = serve_metrics(sidecar, opts.metrics_addr)

    def on_stop(signum, frame):
        log.info("capture: %s received, stopping", signal.Signals(signum).name)
        sidecar.stop_event.set()
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    try:
        sidecar.run()
    finally:
        if server:
            server[0].shutdown()
    return 0


# --- the debug interface ---------------------------------------------------------------

SIOCGIFFLAGS = 0x8913
IFF_UP = 0x1


def iface_up(name: str) -> bool:
    """True when `name` exists in this network namespace and is administratively up."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            raw = fcntl.ioctl(s.fileno(), SIOCGIFFLAGS,
                              struct.pack("16sh14x", name.encode()[:15], 0))
    except OSError:
        return False
    return bool(struct.unpack("16sh14x", raw)[1] & IFF_UP)


# --- tcpdump ---------------------------------------------------------------------------

_STAT_RE = re.compile(r"^(\d+) packets? (captured|received by filter|dropped by kernel)$")
_STAT_KEYS = {"captured": "captured", "received by filter": "received",
              "dropped by kernel": "dropped"}


class RingTcpdump:
    """tcpdump writing a ring of files. Its stderr is read by a thread, which keeps the
    latest statistics it printed (on SIGUSR1 and at exit)."""

    def __init__(self, iface: str, prefix: Path, file_size: int, files: int,
                 buffer_kib: int = 4096):
        from .pcap import Tcpdump
        self.dump = Tcpdump(iface, str(prefix))
        self.dump.cmd += ["-C", str(file_size), "-W", str(files), "-B", str(buffer_kib)]
        if os.geteuid() == 0:
            # Keep root instead of tcpdump's default drop to user "tcpdump", which could
            # not write into a 0700 directory, and whose files the indexer could not read.
            self.dump.cmd += ["-Z", "root"]
        self.stats = {"captured": 0, "received": 0, "dropped": 0}
        self.lines: list[str] = []
        self._reader: threading.Thread | None = None

    @property
    def proc(self) -> subprocess.Popen | None:
        return self.dump.proc

    def start(self) -> "RingTcpdump":
        self.dump.start()
        self.lines = self.dump.stderr.splitlines()
        self._reader = threading.Thread(target=self._read, name="tcpdump-stderr",
                                        daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").strip()
            m = _STAT_RE.match(line)
            if m:
                self.stats[_STAT_KEYS[m.group(2)]] = int(m.group(1))
            elif line:
                self.lines.append(line)
                del self.lines[:-20]

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def request_stats(self) -> None:
        """SIGUSR1: tcpdump prints its counters to stderr (read by the thread)."""
        if self.running():
            self.proc.send_signal(signal.SIGUSR1)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGINT (tcpdump flushes and prints its counters) and wait."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("capture: tcpdump did not stop on SIGINT; killing it")
                self.proc.kill()
                self.proc.wait()
        if self._reader:
            self._reader.join(5)
        return self.proc.returncode


# --- the ring of files -----------------------------------------------------------------

@dataclass(frozen=True)
class PcapFile:
    path: Path
    run: int
    number: int
    signature: tuple        # (inode, size, mtime_ns): changes when tcpdump rewrites it

    @property
    def name(self) -> str:
        return self.path.name


def list_pcaps(directory: Path) -> list[PcapFile]:
    out = []
    for p in directory.iterdir():
        m = FILE_RE.match(p.name)
        if not m:
            continue
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        out.append(PcapFile(p, int(m.group(1)), int(m.group(2)),
                            (st.st_ino, st.st_size, st.st_mtime_ns)))
    out.sort(key=lambda f: (f.signature[2], f.run, f.number))
    return out


def current_file(files: list[PcapFile], run: int, ring: int) -> PcapFile | None:
    """The file tcpdump run `run` is writing: the most recently modified of that run. On a
    tie (both within one clock tick) the later one in ring order."""
    mine = [f for f in files if f.run == run]
    if not mine:
        return None
    newest = max(f.signature[2] for f in mine)
    tied = sorted(f.number for f in mine if f.signature[2] == newest)
    if len(tied) > 1 and tied[0] == 0 and tied[-1] == ring - 1:
        number = 0                      # wrapped around: ring-1 was closed, 0 reopened
    else:
        number = tied[-1]
    return next(f for f in mine if f.number == number)


# --- the sidecar -----------------------------------------------------------------------

@dataclass
class Options:
    iface: str = "mirror0"
    dir: Path = Path("/var/lib/mirror/captures")
    file_size: int = 50
    files: int = 10
    flow_idle: float = 60.0
    buffer_kib: int = 4096
    metrics_addr: str | None = None
    poll_interval: float = 0.2
    stats_interval: float = 5.0


@dataclass
class Totals:
    """tcpdump's counters over all runs: finished runs plus the running one."""
    done: dict = field(default_factory=lambda: {"captured": 0, "received": 0, "dropped": 0})

    def current(self, dump: RingTcpdump | None) -> dict:
        live = dump.stats if dump else {}
        return {k: v + live.get(k, 0) for k, v in self.done.items()}


class CaptureSidecar:
    def __init__(self, opts: Options):
        from .pcapindex import Indexer
        self.opts = opts
        self.dir = Path(opts.dir)
        self.indexer = Indexer(self.dir / INDEX_NAME, idle_seconds=opts.flow_idle)
        self.stop_event = threading.Event()
        self.dump: RingTcpdump | None = None
        self.run_number = 0
        self.totals = Totals()
        self.state = "starting"
        self.tcpdump_restarts = 0
        self.files_pruned = 0
        self.packets_read = 0           # from the files of this process's tcpdump runs
        self.first_run = None
        self.cursors: dict[str, dict] = {}
        self.disk_files = 0
        self.disk_bytes = 0
        self._last_stats = 0.0
        self._lock = threading.Lock()

    # --- start -------------------------------------------------------------------------
    def preflight(self) -> None:
        from .debugif import check_name
        check_name(self.opts.iface)
        if os.geteuid() == 0 and not _has_caps(6, 7):
            raise UsageError("running as root without CAP_SETUID and CAP_SETGID: tcpdump "
                             "could not keep (or drop) its user. Run as a non-root user with "
                             "a tcpdump that has the cap_net_raw,cap_net_admin file "
                             "capabilities (the container image does: --user 10001), or "
                             "grant SETUID and SETGID")
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            if self.dir.stat().st_uid == os.geteuid():
                self.dir.chmod(0o700)
            probe = self.dir / ".write-test"
            probe.touch()
            probe.unlink()
        except OSError as exc:
            raise UsageError(f"capture directory {self.dir} is not writable: "
                             f"{exc.strerror}") from None
        if self.opts.metrics_addr:
            from .metrics import parse_addr
            parse_addr(self.opts.metrics_addr)

    def run(self) -> None:
        os.umask(0o077)
        self._load_state()
        self._index_leftovers()
        log.info("capture: recording %s into %s (ring of %d files of %d MB)",
                 self.opts.iface, self.dir, self.opts.files, self.opts.file_size)
        try:
            while not self.stop_event.is_set():
                if not self._wait_for_iface():
                    break
                if not self._start_tcpdump():
                    continue
                self._capture_loop()
                self._finish_run()
        finally:
            self._shutdown()

    def _wait_for_iface(self) -> bool:
        if iface_up(self.opts.iface):
            return True
        self.state = "waiting"
        self._write_status()
        log.info("capture: waiting for interface %s to appear", self.opts.iface)
        while not self.stop_event.is_set():
            if iface_up(self.opts.iface):
                log.info("capture: interface %s is up", self.opts.iface)
                return True
            self._housekeeping()
            self.stop_event.wait(self.opts.poll_interval)
        return False

    def _start_tcpdump(self) -> bool:
        self.run_number = self._next_run()
        if self.first_run is None:
            self.first_run = self.run_number
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        prefix = self.dir / f"mirror-{stamp}-r{self.run_number}.pcap"
        dump = RingTcpdump(self.opts.iface, prefix, self.opts.file_size, self.opts.files,
                           self.opts.buffer_kib)
        try:
            self.dump = dump.start()
        except RuntimeError as exc:
            message = str(exc)
            if "permission" in message.lower() or "not permitted" in message.lower():
                raise UsageError(f"{message}: tcpdump needs CAP_NET_RAW (and CAP_NET_ADMIN)")\
                    from None
            log.warning("capture: %s; waiting for the interface again", message)
            self.stop_event.wait(self.opts.poll_interval)
            return False
        self.state = "capturing"
        self._last_stats = time.monotonic()
        log.info("capture: tcpdump pid %d writing %s*", self.dump.proc.pid, prefix.name)
        self._write_status()
        return True

    def _next_run(self) -> int:
        runs = [f.run for f in list_pcaps(self.dir)]
        return max(runs + [self.run_number]) + 1

    # --- run ---------------------------------------------------------------------------
    def _capture_loop(self) -> None:
        while not self.stop_event.is_set():
            if not self.dump.running():
                code = self.dump.proc.returncode
                why = self.dump.lines[-1] if self.dump.lines else "no message"
                log.warning("capture: tcpdump exited (status %s: %s)", code, why)
                self.tcpdump_restarts += 1
                return
            self._housekeeping()
            if time.monotonic() - self._last_stats >= self.opts.stats_interval:
                self._last_stats = time.monotonic()
                self.dump.request_stats()
                self._write_status()
            self.stop_event.wait(self.opts.poll_interval)

    def _housekeeping(self) -> None:
        """Reads what tcpdump appended since the last look (the file being written
        included), prunes the ring, writes finished flows to the index."""
        files = list_pcaps(self.dir)
        live = None
        if self.dump and self.dump.running():
            live = current_file(files, self.run_number, self.opts.files)
        changed = False
        for f in files:
            changed |= self._read(f, f == live)
        self._prune(files, live)
        if changed:
            self._save_state()
            self._write_status()
        if self.indexer.flush():
            log.info("capture: %d flows in the index", self.indexer.flows_written)

    def _read(self, f: PcapFile, live: bool) -> bool:
        """Reads the new records of one file; False if it had not changed."""
        from .pcapindex import Cursor
        entry = self.cursors.get(f.name)
        if entry and entry["sig"] == list(f.signature):
            entry["live"] = live            # closed without a write since the last read
            return False
        cursor = Cursor.from_json(entry) if entry else Cursor()
        try:
            stats = self.indexer.read(f.path, cursor)
        except FileNotFoundError:
            return False
        except (OSError, ValueError) as exc:
            log.warning("capture: cannot read %s: %s", f.name, exc)
            return False
        if self.first_run is not None and f.run >= self.first_run:
            self.packets_read += stats.packets
        self.cursors[f.name] = {**cursor.to_json(), "sig": list(f.signature), "live": live}
        return True

    def _prune(self, files: list[PcapFile], live: PcapFile | None) -> None:
        """Deletes the oldest files beyond --files (files of earlier tcpdump runs: a run's
        own ring never exceeds the count). A file is read to its end before it goes."""
        excess = len(files) - self.opts.files
        files = list(files)
        for f in files[:]:                  # oldest first
            if excess <= 0:
                break
            if f == live:
                continue
            self._read(f, False)
            try:
                f.path.unlink()
            except FileNotFoundError:
                pass
            self.cursors.pop(f.name, None)
            files.remove(f)
            self.files_pruned += 1
            excess -= 1
        for name in set(self.cursors) - {f.name for f in files}:
            del self.cursors[name]          # removed by someone else
        self.disk_files = len(files)
        self.disk_bytes = sum(f.signature[1] for f in files)

    def _finish_run(self) -> None:
        """After a tcpdump run ended (stopped or exited): count its packets and index
        everything it wrote."""
        if self.dump is None:
            return
        self.dump.stop()
        with self._lock:        # so that a scrape never sees a run counted twice or not at all
            dump, self.dump = self.dump, None
            stats = dump.stats
            for k in self.totals.done:
                self.totals.done[k] += stats[k]
        log.info("capture: tcpdump run %d: %d packets captured, %d received by filter, "
                 "%d dropped by kernel", self.run_number, stats["captured"],
                 stats["received"], stats["dropped"])
        self._housekeeping()

    def _shutdown(self) -> None:
        self.state = "stopping"
        self._finish_run()
        self._housekeeping()
        written = self.indexer.flush(final=True)
        self.state = "stopped"
        self._write_status()
        totals = self.totals.current(None)
        log.info("capture: stopped; %d flows in the index (%d written at stop), %d packets "
                 "captured, %d dropped by kernel", self.indexer.flows_written, written,
                 totals["captured"], totals["dropped"])

    def _index_leftovers(self) -> None:
        """Reads what an earlier sidecar left unread (it was killed), and writes its open
        flows to the index: no tcpdump run of that sidecar will add to them."""
        before = self.indexer.packets_indexed
        for f in list_pcaps(self.dir):
            self._read(f, False)
        if self.indexer.packets_indexed > before:
            log.info("capture: read %d packets left unread by an earlier run",
                     self.indexer.packets_indexed - before)
        self.indexer.flush(final=True)
        self._prune(list_pcaps(self.dir), None)
        self._save_state()

    # --- state and status --------------------------------------------------------------
    def _load_state(self) -> None:
        try:
            self.cursors = json.loads((self.dir / STATE_NAME).read_text())
        except (FileNotFoundError, ValueError):
            self.cursors = {}

    def _save_state(self) -> None:
        _write_json(self.dir / STATE_NAME, self.cursors)

    def status(self) -> dict:
        with self._lock:
            totals = self.totals.current(self.dump)
        return {
            "iface": self.opts.iface, "state": self.state, "pid": os.getpid(),
            "updated": round(time.time(), 3),
            "packets_captured": totals["captured"], "packets_received": totals["received"],
            "packets_dropped_kernel": totals["dropped"],
            "tcpdump_runs": self.run_number, "tcpdump_restarts": self.tcpdump_restarts,
            "files": self.disk_files, "bytes": self.disk_bytes,
            "files_pruned": self.files_pruned, "file_size_mb": self.opts.file_size,
            # Written by tcpdump, overwritten by the ring before the indexer read them
            # (exact once stopped; while running, tcpdump's count is up to 5 s old).
            "packets_unindexed": max(0, totals["captured"] - self.packets_read),
            "max_files": self.opts.files, "packets_indexed": self.indexer.packets_indexed,
            "flows_indexed": self.indexer.flows_written,
            "flows_open": len(self.indexer.flows),
        }

    def _write_status(self) -> None:
        _write_json(self.dir / STATUS_NAME, self.status())


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(path)


def _has_caps(*bits: int) -> bool:
    """Whether this process has all the given capabilities in its effective set."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                eff = int(line.split()[1], 16)
                return all(eff >> b & 1 for b in bits)
    except OSError:
        pass
    return True


# --- metrics ---------------------------------------------------------------------------

def serve_metrics(sidecar: CaptureSidecar, addr: str):
    from prometheus_client import CollectorRegistry, start_http_server
    from .metrics import parse_addr
    host, port = parse_addr(addr)
    registry = CollectorRegistry()
    registry.register(_Collector(sidecar))
    try:
        return start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise UsageError(f"cannot serve metrics on {addr}: {exc}") from None


class _Collector:
    def __init__(self, sidecar: CaptureSidecar):
        self.sidecar = sidecar

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        s = self.sidecar.status()
        counters = [
            ("packets_captured", "mirror_capture_packets_captured",
             "Packets tcpdump wrote (its own count)"),
            ("packets_received", "mirror_capture_packets_received",
             "Packets the capture filter received"),
            ("packets_dropped_kernel", "mirror_capture_packets_dropped",
             "Packets the kernel dropped because tcpdump's buffer was full"),
            ("packets_indexed", "mirror_capture_packets_indexed",
             "Packets read back from the pcaps by the indexer"),
            ("flows_indexed", "mirror_capture_flows_indexed",
             "Error flows written to the index"),
            ("files_pruned", "mirror_capture_files_pruned",
             "Pcap files deleted to keep the ring bounded"),
            ("packets_unindexed", "mirror_capture_packets_unindexed",
             "Packets tcpdump wrote that the ring overwrote before the indexer read them"),
            ("tcpdump_restarts", "mirror_capture_tcpdump_restarts",
             "Times tcpdump exited by itself (debug interface gone) and was restarted"),
        ]
        for key, name, doc in counters:
            yield CounterMetricFamily(name, doc, value=s[key])
        yield GaugeMetricFamily("mirror_capture_files", "Pcap files on disk", value=s["files"])
        yield GaugeMetricFamily("mirror_capture_bytes", "Bytes of pcap files on disk",
                                value=s["bytes"])
        yield GaugeMetricFamily("mirror_capture_flows_open",
                                "Flows read but not yet written to the index",
                                value=s["flows_open"])
        yield GaugeMetricFamily("mirror_capture_up", "1 while tcpdump is recording",
                                value=1 if s["state"] == "capturing" else 0)


# --- --list ----------------------------------------------------------------------------

def list_index(directory: Path, as_json: bool = False) -> int:
    from .pcapindex import read_index
    records = read_index(directory / INDEX_NAME)
    if as_json:
        for r in records:
            print(json.dumps(r, sort_keys=True))
        return 0
    try:
        status = json.loads((directory / STATUS_NAME).read_text())
    except (FileNotFoundError, ValueError):
        status = None
    print(render_index(records, status, directory))
    return 0


def _endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def render_index(records: list[dict], status: dict | None, directory: Path) -> str:
    if not records:
        lines = [f"no flows indexed in {directory / INDEX_NAME}"]
    else:
        lines = [f"{'first packet (UTC)':26} {'client':24} {'server':24} {'statuses':10} "
                 f"{'pkts':>5} {'bytes':>8}  {'files':8} requests after the trigger"]
        for r in records:
            files = r.get("files", [])
            present = sum((directory / f).exists() for f in files)
            file_note = f"{present}/{len(files)}" if present < len(files) else str(len(files))
            requests = "; ".join(r.get("requests", [])) or "-"
            lines.append(
                f"{r['first_utc'][:26]:26} {_endpoint(r['client'], r['client_port']):24} "
                f"{_endpoint(r['server'], r['server_port']):24} "
                f"{','.join(map(str, r.get('statuses', []))) or '-':10} {r['packets']:>5} "
                f"{r['bytes']:>8}  {file_note:8} {requests[:60]}")
        lines.append(f"{len(records)} flows; 'files' counts the pcaps holding a flow "
                     "(present/listed when the ring has overwritten some)")
    if status:
        lines.append(f"capture of {status['iface']}: {status['state']}; "
                     f"{status['packets_captured']} packets captured, "
                     f"{status['packets_dropped_kernel']} dropped by kernel; "
                     f"{status['files']} files, {status['bytes']} bytes on disk "
                     f"(at most {status['max_files']} x {status['file_size_mb']} MB)")
    return "\n".join(lines)
