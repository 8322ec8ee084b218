"""The capture sidecar: records the debug interface with tcpdump into a
bounded ring of pcap files and indexes the error flows it recorded.

- Disk: FILES slots of FILE_SIZE million bytes. FILES - 1 are the ring: tcpdump -C
  FILE_SIZE -W FILES-1, so at most FILES - 1 pcaps of FILE_SIZE million bytes and one
  packet each (tcpdump closes a file once a packet took it past the size) per tcpdump
  run; files of earlier runs (tcpdump is restarted when the debug interface is
  recreated) are pruned oldest first, so the directory never holds more than FILES - 1
  pcaps (between a new run's rotation and the next poll, 0.2 s, one more). The last
  slot is the index's: index.jsonl and index.jsonl.1, each at most FILE_SIZE / 2 million
  bytes (mirror.capture.index). So the sidecar's files hold at most FILES x FILE_SIZE
  million bytes plus (FILES - 1) x 262,160 bytes (a packet and its record header per
  pcap), plus status.json and .cursors.json (a few KB), plus, for the moments a closed
  pcap is rewritten (mirror.capture.reorder), one copy of it.
- Memory: the indexer's open flows are bounded in number and size (mirror.capture.index),
  a file is read from its cursor to its end, and the reorder holds one closed file: about
  FILE_SIZE MB (--file-size is capped for that reason) plus the flows' bound.
- The directory: created 0700, or if it exists it must be this user's and writable by
  no one else (nor a symbolic link of another user): the sidecar writes there as root
  or as the capture user, and another user's directory would let that user replace
  what it writes (its temporary files are created O_EXCL|O_NOFOLLOW besides).
- Waits for the debug interface to exist and be up instead of failing when it starts
  before the mirror controller that creates it, and records only a mirror debug
  interface: a dummy, or a veth whose peer drops with the mirror's sink filter. Anything
  else under that name (a typo, or a real interface renamed to it) is refused: tcpdump
  would record traffic the mirror never selected.
- Index: the files are read back as tcpdump writes them (every 0.2 s, from where the
  last read stopped; -U makes tcpdump write whole records), and one JSON line
  per error flow is appended to index.jsonl once the flow is over (mirror.capture.index).
  `mirror capture --list` prints the index as a table. Read positions are kept in
  .cursors.json, so a restarted sidecar indexes what a killed one left unread.
- Request order: the controller writes an error response's request onto the debug
  interface after the response, so tcpdump records it after. Once tcpdump has closed a
  file (it moved on to the next ring file, or stopped), the sidecar reads it to its end,
  then rewrites it with each such request just before its response
  (mirror.capture.reorder), so that tshark and Wireshark pair them, and points the
  file's cursor at the rewritten file: the indexer never reads a file twice
  (mirror.capture.index). A request whose response went into the previous ring file
  stays where it is. The file tcpdump is writing is never rewritten; it is told by
  modification time (mirror.capture.ring), which the rewrite keeps. Nor is the file a
  killed sidecar's tcpdump was writing (that tcpdump may outlive it): a sidecar stopped
  with SIGTERM reorders all its files before it exits.
- Health: tcpdump's own counters (packets captured, received by the filter, dropped by
  the kernel), asked for with SIGUSR1, go to status.json, the log and the metrics, with
  the indexer's (flows indexed, ring files overwritten before they were read).
- SIGTERM/SIGINT: stops tcpdump with SIGINT (it writes out its buffer), reads the files
  to their end, writes every flow still open to the index, and exits 0.

Privileges: only what tcpdump needs, CAP_NET_RAW (and CAP_NET_ADMIN). The container image
runs this as a non-root user with a tcpdump carrying those two file capabilities; as root
it passes `-Z root` so that the files stay owned by the user that indexes them."""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import stat
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .. import debugif, jsonfile
from ..errors import UsageError
from ..privileges import effective_caps
from .eventjoin import EventJoin
from .index import Indexer, rotated
from .pcap import Cursor
from .reorder import Changed, reorder_file, temporary_files
from .ring import PcapFile, current_file, list_pcaps
from .tcpdump import Tcpdump

log = logging.getLogger("mirror")

INDEX_NAME = "index.jsonl"
STATUS_NAME = "status.json"
STATE_NAME = ".cursors.json"


SIOCGIFFLAGS = 0x8913
IFF_UP = 0x1


def debug_ifindex(name: str) -> int | None:
    """The ifindex of `name` when it is a mirror debug interface (a dummy, or a veth whose
    peer, in this namespace, drops with the mirror's sink filter), None when there is no
    such interface; UsageError when it is another kind of interface."""
    try:
        with IPRoute() as ipr:
            idx = debugif.lookup(ipr, name)
            if idx is None:
                return None
            why = debugif.sink_problem(ipr, idx)
            if why is None:
                return idx
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return None             # gone between two requests
        raise
    raise UsageError(f"{name} is not a mirror debug interface ({why}): the sidecar records "
                     "only a dummy, or a veth whose peer drops with the mirror's sink "
                     "(what `mirror run --debug-iface` creates); check --iface")


def prepare_directory(path: Path) -> None:
    """Creates the capture directory (0700), or checks the one there: a directory, this
    user's, writable by no one else, and not reached through another user's symbolic
    link; then makes it 0700 and checks that it is writable. UsageError otherwise (and
    nothing created but the directory and its missing parents)."""
    uid = os.geteuid()
    try:
        link = os.lstat(path)
    except FileNotFoundError:
        link = None
    except OSError as exc:
        raise UsageError(f"capture directory {path} is not writable: {exc.strerror}") \
            from None
    if link is not None and stat.S_ISLNK(link.st_mode) and link.st_uid not in (uid, 0):
        raise UsageError(f"capture directory {path} is a symbolic link of uid {link.st_uid}: "
                         "that user chooses where the captures go; give the real path")
    try:
        if link is None:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = os.stat(path)
    except OSError as exc:
        raise UsageError(f"capture directory {path} is not writable: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"capture directory {path} is not a directory")
    if st.st_uid != uid:
        raise UsageError(f"capture directory {path} belongs to uid {st.st_uid}, not to this "
                         f"user (uid {uid}): that user could replace what the sidecar writes "
                         "there; give the sidecar a directory of its own (chown it)")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UsageError(f"capture directory {path} is writable by others (mode "
                         f"{stat.S_IMODE(st.st_mode):04o}): they could replace what the "
                         "sidecar writes there; chmod 700 it")
    try:
        os.chmod(path, 0o700)
        probe = path / ".write-test"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        probe.unlink()
    except FileExistsError:
        probe.unlink()              # a killed sidecar's probe
    except OSError as exc:
        raise UsageError(f"capture directory {path} is not writable: {exc.strerror}") \
            from None


def iface_up(name: str) -> bool:
    """True when `name` exists in this network namespace and is administratively up."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            raw = fcntl.ioctl(s.fileno(), SIOCGIFFLAGS,
                              struct.pack("16sh14x", name.encode()[:15], 0))
    except OSError:
        return False
    return bool(struct.unpack("16sh14x", raw)[1] & IFF_UP)


@dataclass
class Options:
    iface: str = "mirror0"
    dir: Path = Path("/var/lib/mirror/captures")
    file_size: int = 50
    files: int = 10
    flow_idle: float = 60.0
    buffer_kib: int = 32768
    metrics_addr: str | None = None
    events_file: str | None = None      # the controller's, to join (eventjoin)
    poll_interval: float = 0.2
    stats_interval: float = 5.0

    @property
    def ring_files(self) -> int:
        """The pcaps of the ring: all the slots but the index's."""
        return self.files - 1

    @property
    def index_bytes(self) -> int:
        """The most one generation of the index holds: half a slot."""
        return self.file_size * 1_000_000 // 2


@dataclass
class Totals:
    """tcpdump's counters over all runs: finished runs plus the running one."""
    done: dict = field(default_factory=lambda: {"captured": 0, "received": 0, "dropped": 0})

    def current(self, dump: Tcpdump | None) -> dict:
        live = dump.stats if dump else {}
        return {k: v + live.get(k, 0) for k, v in self.done.items()}


class CaptureSidecar:
    def __init__(self, opts: Options):
        self.opts = opts
        self.dir = Path(opts.dir)
        self.indexer = Indexer(self.dir / INDEX_NAME, idle_seconds=opts.flow_idle,
                               max_bytes=opts.index_bytes, enrich=self._enrich)
        self.joined: EventJoin | None = None   # the controller's events (--events-file)
        self._join_failing = False
        self.stop_event = threading.Event()
        self.dump: Tcpdump | None = None
        self.run_number = 0
        self.totals = Totals()
        self.state = "starting"
        self.tcpdump_restarts = 0
        self.files_pruned = 0
        self.files_reordered = 0        # rewritten with requests moved before responses
        self.requests_moved = 0
        self.packets_read = 0           # from the files of this process's tcpdump runs
        self.first_run = None
        self.cursors: dict[str, dict] = {}
        self.disk_files = 0
        self.disk_bytes = 0
        self.ifindex: int | None = None     # of the interface tcpdump records
        self._last_stats = 0.0
        self._lock = threading.Lock()

    # --- start -------------------------------------------------------------------------
    def preflight(self) -> None:
        """Everything that can be refused is checked before the directory is made."""
        debugif.check_name(self.opts.iface)
        if os.geteuid() == 0 and {"CAP_SETUID", "CAP_SETGID"} - effective_caps():
            raise UsageError("running as root without CAP_SETUID and CAP_SETGID: tcpdump "
                             "could not keep (or drop) its user. Run as a non-root user with "
                             "a tcpdump that has the cap_net_raw,cap_net_admin file "
                             "capabilities (the container image does: --user 10001), or "
                             "grant SETUID and SETGID")
        if self.opts.metrics_addr:
            from ..cliutil import parse_metrics_addr
            parse_metrics_addr(self.opts.metrics_addr)
        debug_ifindex(self.opts.iface)      # refuses another kind of interface now
        if self.opts.events_file:
            try:
                self.joined = EventJoin(self.opts.events_file)
            except OSError as exc:
                raise UsageError(f"--events-file {self.opts.events_file}: {exc.strerror}; "
                                 "the sidecar joins the controller's events only from a "
                                 "file it can read") from None
        prepare_directory(self.dir)

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
        """Waits until the debug interface is there and up; UsageError when what has the
        name is not a debug interface."""
        if self._debug_iface_up():
            return True
        self.state = "waiting"
        self._write_status()
        log.info("capture: waiting for interface %s to appear", self.opts.iface)
        while not self.stop_event.is_set():
            if self._debug_iface_up():
                log.info("capture: interface %s is up", self.opts.iface)
                return True
            self._housekeeping()
            self.stop_event.wait(self.opts.poll_interval)
        return False

    def _debug_iface_up(self) -> bool:
        if not iface_up(self.opts.iface):
            return False
        self.ifindex = debug_ifindex(self.opts.iface)
        return self.ifindex is not None

    def _same_iface(self) -> bool:
        """Whether the name still belongs to the interface checked before tcpdump opened
        it by name (a rename in between would have it record another interface)."""
        try:
            return socket.if_nametoindex(self.opts.iface) == self.ifindex
        except OSError:
            return False

    def _start_tcpdump(self) -> bool:
        self.run_number = self._next_run()
        if self.first_run is None:
            self.first_run = self.run_number
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        prefix = self.dir / f"mirror-{stamp}-r{self.run_number}.pcap"
        dump = Tcpdump(self.opts.iface, str(prefix), buffer_kib=self.opts.buffer_kib,
                       ring=(self.opts.file_size, self.opts.ring_files))
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
        if not self._same_iface():
            log.warning("capture: %s changed while tcpdump opened it; starting again",
                        self.opts.iface)
            self.dump.stop(timeout=10)
            self.dump = None
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
        files, live = self._scan()
        changed = False
        for f in files:
            changed |= self._read(f, f == live)
        if self._reorder(files, live):
            changed = True
            files, live = self._scan()      # the rewritten files have new signatures
        self._prune(files, live)
        if changed:
            self._save_state()
            self._write_status()
        self._refresh_events()
        if self.indexer.flush():
            log.info("capture: %d flows in the index", self.indexer.flows_written)

    def _refresh_events(self) -> None:
        """The controller's events appended since the last look, for the index rows'
        interface and workload. A file that cannot be read costs a warning (once while
        it lasts) and those fields, never the capture."""
        if self.joined is None:
            return
        try:
            self.joined.refresh()
        except OSError as exc:
            if not self._join_failing:
                log.warning("capture: cannot read the events file %s (%s): index rows name "
                            "no interface or workload meanwhile", self.opts.events_file, exc)
            self._join_failing = True
            return
        if self._join_failing:
            log.info("capture: the events file %s is read again", self.opts.events_file)
        self._join_failing = False

    def _enrich(self, record: dict) -> dict:
        return self.joined.enrich(record) if self.joined is not None else record

    def _scan(self) -> tuple[list[PcapFile], PcapFile | None]:
        """The ring's files, and the one tcpdump is writing (None when it is not running)."""
        files = list_pcaps(self.dir)
        live = None
        if self.dump and self.dump.running():
            live = current_file(files, self.run_number, self.opts.ring_files)
        return files, live

    def _maybe_written(self, files: list[PcapFile], live: PcapFile | None) -> set[Path]:
        """The files a tcpdump may still be writing: ours, and the newest of each run of
        an earlier sidecar (one that was killed leaves its tcpdump running until that
        notices; one that stopped cleanly reordered all its files itself)."""
        paths = {live.path} if live is not None else set()
        mine = self.first_run if self.first_run is not None else float("inf")
        for run in {f.run for f in files if f.run < mine}:
            newest = current_file(files, run, self.opts.ring_files)
            if newest is not None:
                paths.add(newest.path)
        return paths

    def _reorder(self, files: list[PcapFile], live: PcapFile | None) -> bool:
        """Rewrites each closed file read to its end and not yet reordered with its
        requests before their responses; True if a cursor changed."""
        changed = False
        busy = self._maybe_written(files, live)
        for f in files:
            entry = self.cursors.get(f.name)
            if f.path in busy or not entry or entry["sig"] != list(f.signature) \
                    or entry.get("reordered"):
                continue
            try:
                result = reorder_file(f.path, expect=f.signature)
            except (Changed, FileNotFoundError):
                continue                    # read again, then reordered, next time round
            except (OSError, ValueError) as exc:
                log.warning("capture: cannot reorder %s: %s", f.name, exc)
                result = None
            entry["reordered"] = True
            changed = True
            if result is not None:
                # Nothing new to read in the rewritten file: same records, same size.
                entry.update(first=result.first, sig=list(result.signature))
                self.files_reordered += 1
                self.requests_moved += result.moved
                log.info("capture: %s: %d requests moved before their responses",
                         f.name, result.moved)
        return changed

    def _read(self, f: PcapFile, live: bool) -> bool:
        """Reads the new records of one file; False if it had not changed."""
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
        """Deletes the oldest files beyond the ring's count (files of earlier tcpdump runs:
        a run's own ring never exceeds it). A file is read to its end before it goes."""
        excess = len(files) - self.opts.ring_files
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
        self.dump.stop(timeout=10)
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
        for tmp in temporary_files(self.dir):
            tmp.unlink(missing_ok=True)
        files = list_pcaps(self.dir)
        for f in files:
            self._read(f, False)
        self._reorder(files, None)
        if self.indexer.packets_indexed > before:
            log.info("capture: read %d packets left unread by an earlier run",
                     self.indexer.packets_indexed - before)
        self._refresh_events()
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
        jsonfile.write(self.dir / STATE_NAME, self.cursors)

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
            "files_reordered": self.files_reordered, "requests_moved": self.requests_moved,
            # Written by tcpdump, overwritten by the ring before the indexer read them
            # (exact once stopped; while running, tcpdump's count is up to 5 s old).
            "packets_unindexed": max(0, totals["captured"] - self.packets_read),
            "max_files": self.opts.files, "packets_indexed": self.indexer.packets_indexed,
            "flows_indexed": self.indexer.flows_written,
            "flows_open": len(self.indexer.flows),
            # The bounds (mirror.capture.index) and what they cost.
            "ring_files": self.opts.ring_files, "index_max_bytes": self.opts.index_bytes,
            "index_bytes": self.index_bytes(), "index_rotations": self.indexer.rotations,
            "flows_open_max": self.indexer.max_open,
            "flows_evicted": self.indexer.flows_evicted,
            "payload_bytes_kept": self.indexer.payload_kept,
            "payload_bytes_max": self.indexer.max_open * self.indexer.limits.payload_bytes,
            "segments_dropped": self.indexer.segments_dropped,
            "segments_cut": self.indexer.segments_cut,
            "requests_dropped": self.indexer.requests_dropped,
        }

    def index_bytes(self) -> int:
        """Bytes of the index's two generations on disk."""
        total = 0
        for p in (self.dir / INDEX_NAME, rotated(self.dir / INDEX_NAME)):
            try:
                total += p.stat().st_size
            except FileNotFoundError:
                pass
        return total

    def _write_status(self) -> None:
        jsonfile.write(self.dir / STATUS_NAME, self.status())
