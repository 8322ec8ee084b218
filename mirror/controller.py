"""Lifecycle of one mirror: compile, attach, keep fed (sweep idle flows, watch
interfaces), reload, detach. The only module that changes kernel state; everything it
adds is recorded (mirror.ownership) before or as it is added, so it can be rolled back."""
from __future__ import annotations

import errno
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from . import control, debugif, ownership, tc, tcx
from .config import read_config
from .discovery import (ATTACH_BUCKETS, DEFAULT_MAX_IFACES, MAX_IFACES_LIMIT, Discovery,
                        Histogram, Selector)
from .errors import UsageError
from .ownership import detach_record, detach_unrecorded
from .trigger import describe, parse_trigger

log = logging.getLogger("mirror")

HOOKS = ("clsact", "htb", "tcx")
# The run loop's stages, as counted in mirror_controller_errors_total{stage}.
STAGES = ("reload", "sweep", "watch", "events")
RETRY_FIRST_SECONDS = 0.5
RETRY_MAX_SECONDS = 30.0


@dataclass
class Options:
    ifaces: list[str]
    debug_iface: str = "mirror0"
    trigger: str = "5xx"
    hook: str = "clsact"
    idle_timeout: float = 30.0
    max_flows: int = 65536
    metrics_addr: str | None = None
    config: str | None = None
    request_bytes: int = 512
    events_file: str | None = None
    events_file_bytes: int = 16 << 20
    exclude: list[str] = field(default_factory=list)
    max_ifaces: int = DEFAULT_MAX_IFACES
    # Budgets (0: unlimited); the defaults and why: README, "Budgets".
    max_packets_per_flow: int = 1000
    max_bytes_per_flow: int = 1 << 20
    max_clones_per_second: int = 10000

    def budget(self) -> dict[str, int]:
        return {"max_packets_per_flow": self.max_packets_per_flow,
                "max_bytes_per_flow": self.max_bytes_per_flow,
                "max_clones_per_second": self.max_clones_per_second}


@dataclass
class Attached:
    ifname: str
    ifindex: int
    hook: str
    parents: dict[str, int]
    created: list[str] = field(default_factory=list)
    lock: ownership.Lock | None = None
    links: dict[str, int] = field(default_factory=dict)     # tcx: direction -> link fd
    # time.monotonic() when the ingress hook, then both hooks, were in place
    ingress_at: float = 0.0
    hooked_at: float = 0.0

    @property
    def key(self) -> str:
        return ownership.iface_key(self.ifindex)

    def record(self) -> dict:
        return {"ifname": self.ifname, "ifindex": self.ifindex, "hook": self.hook,
                "parents": self.parents, "created": self.created, "pid": os.getpid(),
                "started": time.time()}


class Controller:
    def __init__(self, opts: Options, classifier_factory=None, sink_factory=None):
        self.opts = opts
        self.codes = parse_trigger(opts.trigger)
        self.idle_timeout = opts.idle_timeout
        self.ipr = IPRoute()
        self.attached: dict[str, Attached] = {}
        self.debug: debugif.DebugIface | None = None
        self.classifier = None
        self._classifier_factory = classifier_factory
        self._sink_factory = sink_factory
        self._sink = None
        self.stop_event = threading.Event()
        self.reload_event = threading.Event()
        self.expired_total = 0
        self.stage_errors: dict[str, int] = dict.fromkeys(STAGES, 0)
        self._failures: dict[str, int] = {}
        self._retry_at: dict[str, float] = {}
        self.debug_recreated_total = 0
        self.sweep_seconds = 0.0
        self._server = None
        self.events = None
        self._debug_missing_logged = False
        self._debug_lock = None
        self._ctl_lock = None
        # Names this process's record, lock and socket: pids repeat across containers.
        self.id = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.selector = Selector.parse(opts.ifaces, opts.exclude)
        self.discovery: Discovery | None = None
        # Held while changing what is attached: link events are handled in discovery's
        # thread, the run loop and shutdown in the main one (and they share self.ipr).
        self.lock = threading.RLock()
        self.attach_latency = Histogram(ATTACH_BUCKETS)
        self.attach_failures_total = 0
        self.attached_at: dict[int, float] = {}     # ifindex -> monotonic time, for the bench
        self.ingress_at: dict[int, float] = {}      # the same, ingress hook alone
        self.event_at: dict[int, float] = {}        # the same, its link event read

    # --- start ---------------------------------------------------------------------
    def preflight(self) -> dict[str, int]:
        """Checks everything that can be checked without touching the kernel."""
        from .privileges import require
        require("`mirror run` (loading BPF programs, changing qdiscs)")
        if self.opts.hook not in HOOKS:
            raise UsageError(f"unknown hook {self.opts.hook!r}: use {', '.join(HOOKS)}")
        if self.opts.hook == "tcx":
            tcx.check_supported()
        if not self.opts.ifaces:
            raise UsageError("no interface to monitor: give --iface IF or a pattern such as "
                             "--iface 'veth*' (or MIRROR_IFACE)")
        if not 1 <= self.opts.max_ifaces <= MAX_IFACES_LIMIT:
            raise UsageError(f"--max-ifaces must be between 1 and {MAX_IFACES_LIMIT}")
        if len(self.selector.names) > self.opts.max_ifaces:
            raise UsageError(f"{len(self.selector.names)} interfaces named but --max-ifaces "
                             f"is {self.opts.max_ifaces}; raise --max-ifaces")
        debugif.check_name(self.opts.debug_iface)
        if self.opts.debug_iface in self.selector.names:
            raise UsageError(f"debug interface {self.opts.debug_iface} is also monitored: "
                             "mirroring onto a monitored interface would loop; pick another "
                             "--debug-iface")
        if self.opts.idle_timeout <= 0:
            raise UsageError("--idle-timeout must be a positive number of seconds")
        if not 16 <= self.opts.max_flows <= 1 << 24:
            raise UsageError("--max-flows must be between 16 and 16777216")
        from .bpfprog import MAX_REQUEST_BYTES
        if not 0 <= self.opts.request_bytes <= MAX_REQUEST_BYTES:
            raise UsageError(f"--request-bytes must be between 0 (off) and {MAX_REQUEST_BYTES}")
        for name, value in self.opts.budget().items():
            limit = (1 << 64) - 1 if name == "max_bytes_per_flow" else (1 << 32) - 1
            if not 0 <= value <= limit:
                raise UsageError(f"--{name.replace('_', '-')} must be between 0 (unlimited) "
                                 f"and {limit}")
        if self.opts.events_file and self.opts.events_file != "-":
            parent = os.path.dirname(os.path.abspath(self.opts.events_file))
            if not os.access(parent, os.W_OK):
                raise UsageError(f"cannot write the events file {self.opts.events_file}: "
                                 f"{parent} is not a writable directory")
        indexes = {}
        for name in self.selector.names:
            idx = debugif.lookup(self.ipr, name)
            if idx is None:
                raise UsageError(f"unknown interface {name!r}: see `ip link` for the names "
                                 "in this network namespace")
            indexes[name] = idx
        dbg = debugif.lookup(self.ipr, self.opts.debug_iface)
        if dbg is not None and dbg in indexes.values():
            raise UsageError(f"debug interface {self.opts.debug_iface} is a monitored "
                             "interface; pick another --debug-iface")
        if dbg is not None:
            rec = ownership.read("debug", self.opts.debug_iface)
            debugif.check_existing(self.ipr, self.opts.debug_iface, dbg,
                                   recorded=bool(rec and rec.get("ifindex") == dbg))
        for name, idx in indexes.items():
            if debugif.has_sink(self.ipr, idx):
                raise UsageError(f"{name} is the drop end of a mirror debug interface: "
                                 "monitoring it would loop clones; pick another interface")
            if debugif.is_sink_peer_of(self.ipr, idx):
                raise UsageError(f"{name} is a mirror debug interface: monitoring it would "
                                 "clone clones; pick another interface")
            if ownership.is_held(ownership.iface_lock_name(idx)):
                rec = ownership.read("iface", ownership.iface_key(idx)) or {}
                raise UsageError(f"{name} is already monitored by another mirror controller "
                                 f"(pid {rec.get('pid', '?')}); stop it first")
            stale = self._stale_record(idx)
            if self.opts.hook == "tcx":
                continue
            tc.plan(self.ipr, idx, name, self.opts.hook,
                    adopt_htb=self._adoptable(stale, idx))
        if self.opts.config:
            read_config(self.opts.config)
        if self.opts.metrics_addr:
            from .cliutil import parse_metrics_addr
            parse_metrics_addr(self.opts.metrics_addr)
        from .bpfprog import check_environment
        check_environment()
        return indexes

    def start(self, indexes: dict[str, int] | None = None) -> None:
        """Loads and attaches; `indexes` from preflight(), which runs here if not given."""
        if indexes is None:
            indexes = self.preflight()
        t0 = time.monotonic()
        self.classifier = (self._classifier_factory or self._default_classifier)()
        from .bpfprog import EVENT_HEAD_SIZE, FLOW_KEY_SIZE, FLOW_VALUE_SIZE
        from .bpfsys import possible_cpus
        # LRU maps are preallocated: the memory is taken now, whatever the traffic.
        mib = self.opts.max_flows * (FLOW_KEY_SIZE + FLOW_VALUE_SIZE * possible_cpus()) / 2**20
        clf = self.classifier
        req_mib = clf.max_requests * (FLOW_KEY_SIZE + EVENT_HEAD_SIZE + clf.request_capacity) \
            / 2**20
        log.info("classifier compiled and loaded in %.1f s (flow map: %d flows, about "
                 "%.0f MiB locked for %d possible CPUs; request snapshot: %s)",
                 time.monotonic() - t0, self.opts.max_flows, mib, possible_cpus(),
                 f"{self.opts.request_bytes} bytes of each request, {clf.max_requests} "
                 f"flows, about {req_mib:.0f} MiB" if self.opts.request_bytes else "off")
        self.classifier.set_trigger(self.codes)
        self.classifier.set_budgets(self.opts.max_packets_per_flow,
                                    self.opts.max_bytes_per_flow,
                                    self.opts.max_clones_per_second)
        self._warn_shared_stats_slots(indexes)
        self._ctl_lock = ownership.Lock(f"controller-{self.id}")
        self._ctl_lock.acquire()
        self._prune_records()
        try:
            self._setup_debug()
            for name, idx in indexes.items():
                self._attach(name, idx)
            self.discovery = Discovery(self.selector, self, set(indexes.values()),
                                       self.opts.max_ifaces)
            self.discovery.start()
            self._write_controller_record()
            self._start_events()
            self._start_control_socket()
        except BaseException:
            log.error("start failed: rolling back what was added")
            self.shutdown()
            raise
        log.info("mirroring HTTP %s responses on %s (%s hook) to %s",
                 describe(self.codes), ", ".join(self.attached) or "no interface yet",
                 self.opts.hook, self.debug.name)
        if self.selector.patterns:
            log.info("watching for interfaces matching %s%s", " ".join(self.selector.patterns),
                     "".join(f" except {e}" for e in self.selector.exclude))

    @staticmethod
    def _warn_shared_stats_slots(indexes: dict[str, int]) -> None:
        from .bpfprog import IFACE_SLOTS
        slots: dict[int, list[str]] = {}
        for name, idx in indexes.items():
            slots.setdefault(idx % IFACE_SLOTS, []).append(name)
        for names in slots.values():
            if len(names) > 1:
                log.warning("%s share a per-interface statistics slot (ifindex modulo %d): "
                            "on each CPU only the first to answer gets per-interface counts; "
                            "mirroring is not affected", " and ".join(names), IFACE_SLOTS)

    def _prune_records(self) -> None:
        """Drops what stopped controllers left in the state directory that no longer
        describes anything: records of interfaces that are gone, records of dead
        controllers, and unheld lock files of those (so /run does not fill up)."""
        for rec in ownership.records("iface"):
            if (self._ifname_of(rec["ifindex"]) is None and
                    not ownership.is_held(ownership.iface_lock_name(rec["ifindex"]))):
                ownership.remove("iface", ownership.iface_key(rec["ifindex"]))
        for rec in ownership.records("debug"):
            if self._ifname_of(rec["ifindex"]) is None and not ownership.is_held(
                    f"debug-{rec['name']}"):
                ownership.remove("debug", rec["name"])
        for rec in ownership.records("controller"):
            if rec.get("id") != self.id and not ownership.is_held(f"controller-{rec.get('id')}"):
                ownership.remove("controller", str(rec.get("id")))
        for path in ownership.netns_dir().glob("*.lock"):
            name = path.name[:-len(".lock")]
            if name.startswith("iface-if"):
                gone = self._ifname_of(int(name[len("iface-if"):])) is None
            elif name.startswith("debug-"):
                gone = debugif.lookup(self.ipr, name[len("debug-"):]) is None
            else:
                gone = name.startswith("controller-") and name != f"controller-{self.id}"
            if gone:
                ownership.remove_if_free(name)

    def _default_classifier(self):
        from .bpfprog import Classifier
        return Classifier(max_flows=self.opts.max_flows, request_bytes=self.opts.request_bytes)

    def _start_events(self) -> None:
        from .events import EventsFile, EventStream
        from .privileges import can_write_frames
        if self.opts.request_bytes and not can_write_frames():
            log.warning("no CAP_NET_RAW: the request of each error response is kept and "
                        "named in its event, but not written to %s, so the capture starts at "
                        "the response; grant NET_RAW to have it (or --request-bytes 0)",
                        self.opts.debug_iface)
        out = None
        if self.opts.events_file:
            out = EventsFile(self.opts.events_file, self.opts.events_file_bytes)
        self.events = EventStream(self.classifier, self._attached_name,
                                  lambda: self.debug.ifindex if self.debug else 0,
                                  out, self.opts.budget()).start()

    def _attached_name(self, ifindex: int) -> str | None:
        for att in list(self.attached.values()):
            if att.ifindex == ifindex:
                return att.ifname
        return None

    def _sink_fd(self) -> int:
        if self._sink is None:
            from .bpfprog import Sink
            self._sink = (self._sink_factory or Sink)()
        return self._sink.fd

    def _setup_debug(self) -> None:
        """Finds or creates the debug interface. Controllers may share one: each holds a
        shared lock on it, and only the record written by the creator says this tool
        made it; the last user out removes it (shutdown)."""
        name = self.opts.debug_iface
        # Only a controller holding the lock exclusively may create the interface: two
        # controllers starting together would otherwise both try, and one fail on
        # EEXIST. The creator shares the lock once the interface is complete; a
        # controller that finds it shared uses what is there.
        self._debug_lock = ownership.Lock(f"debug-{name}")
        creator = self._debug_lock.acquire(wait=0.5)
        if not creator and not self._debug_lock.acquire(shared=True, wait=30):
            raise UsageError(f"debug interface {name} is being set up by another controller "
                             "that has not finished; try again")
        self.debug = debugif.ensure(self.ipr, name, self._sink_fd)
        if self.debug.created:
            self._write_debug_record()
        else:
            rec = ownership.read("debug", name)
            debugif.check_existing(self.ipr, name, self.debug.ifindex,
                                   recorded=bool(rec and rec.get("ifindex") == self.debug.ifindex))
        if creator:
            self._debug_lock.share()
        self.classifier.set_debug_ifindex(self.debug.ifindex)
        log.info("debug interface %s (ifindex %d, %s%s)", name, self.debug.ifindex,
                 self.debug.kind, ", created" if self.debug.created else "")

    def _write_debug_record(self) -> None:
        d = self.debug
        ownership.write("debug", d.name, {"name": d.name, "ifindex": d.ifindex, "kind": d.kind,
                                      "peer": d.peer, "created": True, "pid": os.getpid()})

    def _attach(self, name: str, ifindex: int) -> None:
        lock = ownership.Lock(ownership.iface_lock_name(ifindex))
        if not lock.acquire():
            raise UsageError(f"{name} is already monitored by another mirror controller")
        att = Attached(name, ifindex, self.opts.hook, {}, lock=lock)
        self.attached[name] = att
        stale = self._stale_record(ifindex)
        if self.opts.hook == "tcx":
            return self._attach_tcx(att, stale)
        adopt = self._adoptable(stale, ifindex)
        if stale and stale.get("hook") == self.opts.hook:
            att.created = list(stale.get("created", []))
            log.info("%s: replacing the hooks of a stopped controller (pid %s) in place",
                     name, stale.get("pid"))
        elif stale:
            log.info("%s: removing a stopped controller's %s hooks: %s", name,
                     stale.get("hook"), ", ".join(detach_record(self.ipr, stale, ifindex)))
            ownership.remove("iface", att.key)
        elif adopt:
            # Our filters without a record (the state directory was lost): take them over.
            log.info("%s: found this tool's filters with no record; replacing them", name)
        plan = tc.plan(self.ipr, ifindex, name, self.opts.hook, adopt_htb=adopt)
        att.parents = plan.parents
        # Each hook as soon as its qdisc exists, ingress first: on a new interface the
        # first packets are often the container's own, arriving at the ingress hook. The
        # record is written once both hooks are in place (a file write is slower than a
        # netlink request): a failure in between is rolled back from `att`, and a SIGKILL
        # in that sub-millisecond window leaves filters the next controller recognises
        # and replaces (only a clsact/ingress/htb qdisc it then cannot know it created).
        for direction, parent in plan.parents.items():
            for kind in plan.create:
                if kind not in att.created and tc.holds(kind, parent):
                    tc.add_qdisc(self.ipr, ifindex, kind)
                    att.created.append(kind)
            tc.replace_filter(self.ipr, ifindex, parent, self.classifier.fd(direction),
                              direction)
            att.ingress_at = att.ingress_at or time.monotonic()
        att.hooked_at = time.monotonic()
        for kind in plan.create:         # none left for this tool's layouts; kept safe
            if kind not in att.created:
                tc.add_qdisc(self.ipr, ifindex, kind)
                att.created.append(kind)
        ownership.write("iface", att.key, att.record())
        self.classifier.set_monitored(ifindex, True)
        log.info("%s: attached (%s: %s)", name, self.opts.hook,
                 ", ".join(f"{d} at {tc.fmt_handle(p)}" for d, p in plan.parents.items()))

    def _attach_tcx(self, att: Attached, stale: dict | None) -> None:
        if stale and stale.get("hook") != "tcx":
            log.info("%s: removing a stopped controller's %s hooks: %s", att.ifname,
                     stale.get("hook"), ", ".join(detach_record(self.ipr, stale, att.ifindex)))
        elif tc.our_filters(self.ipr, att.ifindex):
            log.info("%s: removing this tool's tc filters found with no record: %s", att.ifname,
                     ", ".join(detach_unrecorded(self.ipr, att.ifindex)))
        # Links first, record after: a link belongs to this process's descriptor, so a
        # controller killed before the record is written leaves nothing in the kernel.
        for direction in ("ingress", "egress"):
            att.links[direction] = tcx.attach(self.classifier.fd(direction), att.ifindex,
                                              direction)
            att.ingress_at = att.ingress_at or time.monotonic()
        att.hooked_at = time.monotonic()
        ownership.write("iface", att.key, att.record())
        self.classifier.set_monitored(att.ifindex, True)
        log.info("%s: attached (tcx links: ingress, egress)", att.ifname)

    # --- interfaces that come and go (mirror.discovery calls these) -------------------
    def attached_indexes(self) -> dict[int, str]:
        with self.lock:
            return {att.ifindex: att.ifname for att in self.attached.values()}

    def attach_matched(self, name: str, ifindex: int, since: float) -> bool:
        """Attaches to an interface a pattern selected; `since` is when its link event
        arrived. A failure is logged and counted, what was added is removed, and the
        controller keeps running."""
        with self.lock:
            try:
                self._attach(name, ifindex)
            except Exception as exc:
                self._rollback(name)
                if self._ifname_of(ifindex) is None:
                    log.info("%s: gone while being attached", name)
                else:
                    self.attach_failures_total += 1
                    log.warning("%s: not attached: %s", name, exc)
                return False
            hooked = self.attached[name].hooked_at
            self.attached_at[ifindex] = hooked
            self.ingress_at[ifindex] = self.attached[name].ingress_at
            self.event_at[ifindex] = since
            self.attach_latency.observe(hooked - since)
            self._write_controller_record()
            return True

    def _rollback(self, name: str) -> None:
        att = self.attached.pop(name, None)
        if att is None:
            return
        self.classifier.set_monitored(att.ifindex, False)
        try:
            self._detach(att)
        except Exception as exc:
            log.error("%s: removing a partial attach failed: %s", name, exc)
        ownership.remove("iface", att.key)
        att.lock.release()

    def detach_iface(self, ifindex: int, why: str) -> None:
        """Stops monitoring an interface: it is gone, or was renamed out of the patterns."""
        with self.lock:
            att = next((a for a in self.attached.values() if a.ifindex == ifindex), None)
            if att is None:
                return
            log.info("%s: %s; no longer monitored", att.ifname, why)
            self.classifier.set_monitored(ifindex, False)
            if self._ifname_of(ifindex) is not None:
                try:
                    self._detach(att)
                except Exception as exc:
                    log.error("%s: detach failed: %s; run `mirror detach --iface %s`",
                              att.ifname, exc, att.ifname)
            self.attached_at.pop(ifindex, None)
            self.ingress_at.pop(ifindex, None)
            self.event_at.pop(ifindex, None)
            self._forget(att)

    def follow_rename(self, ifindex: int, name: str) -> None:
        with self.lock:
            att = next((a for a in self.attached.values() if a.ifindex == ifindex), None)
            if att is None or att.ifname == name:
                return
            log.info("%s: renamed to %s; still monitored", att.ifname, name)
            del self.attached[att.ifname]
            att.ifname = name
            self.attached[name] = att
            ownership.write("iface", att.key, att.record())
            self._write_controller_record()

    def never_monitor(self, ifindex: int, name: str, event=None) -> bool:
        """Debug interfaces (ours or another controller's) and their sink ends are never
        monitored, whatever the patterns: mirroring clones would loop. `event`, the link
        event that announced the interface (mirror.discovery.LinkEvent), may settle it."""
        if name in (self.opts.debug_iface, debugif.sink_name(self.opts.debug_iface)) or (
                self.debug and ifindex == self.debug.ifindex):
            return True
        if event is not None and event.link_kind == "veth" and event.peer_elsewhere:
            # A container's host end: its peer is in another namespace, and a debug veth
            # keeps both ends in one. Deciding from the event spares a link request and
            # the records' reads, about 2 ms before the first hook (bench/attach.py).
            return False
        names = set()
        for rec in ownership.records("debug"):
            names |= {rec.get("name"), rec.get("peer")}
        if name in names:
            return True
        with self.lock:
            try:
                # A sink sits on a clsact qdisc: without one (a new interface), no filter
                # dump is needed, and the attach starts a few milliseconds sooner.
                if (tc.ingress_qdisc(self.ipr, ifindex) == "clsact" and
                        debugif.has_sink(self.ipr, ifindex)):
                    return True         # a sink end
                return debugif.is_sink_peer_of(self.ipr, ifindex)   # another's debug end
            except NetlinkError:
                return True     # gone already

    def _stale_record(self, ifindex: int) -> dict | None:
        """The record a stopped controller left for this interface, if any."""
        return ownership.read("iface", ownership.iface_key(ifindex))

    def _adoptable(self, stale: dict | None, ifindex: int) -> bool:
        """Whether hooks found on the interface are this tool's to replace in place."""
        if stale:
            return stale.get("hook") == self.opts.hook
        return bool(tc.our_filters(self.ipr, ifindex))

    # --- run -----------------------------------------------------------------------
    def run(self) -> None:
        """Until stopped: reloads on SIGHUP, sweeps idle flows, follows the interfaces.
        A stage that fails with an error from the kernel or the system (NetlinkError,
        OSError) is logged, counted and retried with backoff; the hooks stay in place
        meanwhile. Anything else is a bug and stops the controller (which detaches)."""
        while not self.stop_event.is_set():
            if self.reload_event.is_set():
                self.reload_event.clear()
                self._run_stage("reload", self.reload)
            self._run_stage("sweep", self.sweep)
            self._run_stage("watch", self.watch_interfaces)
            # Sweep often enough for the idle timeout, but spend at most ~5 % of a CPU on
            # it when the flow map is large.
            interval = max(0.2, min(1.0, self.idle_timeout / 4), 20 * self.sweep_seconds)
            self.stop_event.wait(interval)

    def _run_stage(self, stage: str, step) -> None:
        now = time.monotonic()
        if now < self._retry_at.get(stage, 0.0):
            return
        try:
            step()
        except (NetlinkError, OSError) as exc:
            failures = self._failures.get(stage, 0) + 1
            self._failures[stage] = failures
            self.stage_errors[stage] += 1
            delay = min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2 ** (failures - 1))
            self._retry_at[stage] = now + delay
            log.warning("%s failed (%s), %d time(s) in a row: retrying in %.1f s; the hooks "
                        "stay in place", stage, exc, failures, delay)
            return
        if self._failures.get(stage):
            log.info("%s works again after %d failure(s)", stage, self._failures[stage])
        self._failures[stage] = 0

    def sweep(self) -> int:
        """Deletes flows idle for longer than the idle timeout; returns how many."""
        t0 = time.monotonic()
        expired = self.classifier.expire_idle(time.monotonic_ns(), int(self.idle_timeout * 1e9))
        self.expired_total += expired
        self.classifier.note_if_empty()
        self.sweep_seconds = time.monotonic() - t0
        return expired

    def watch_interfaces(self) -> None:
        with self.lock:
            self._watch_interfaces()

    def _watch_interfaces(self) -> None:
        if self.discovery is not None:
            # Link events (mirror.discovery) follow the monitored interfaces; polling
            # them here too would race with its decisions on renames.
            if self._ifname_of(self.debug.ifindex) != self.debug.name:
                self._replace_debug()
            return
        for name, att in list(self.attached.items()):
            current = self._ifname_of(att.ifindex)
            if current is None:
                log.warning("%s: interface is gone; forgetting it (the kernel removed its "
                            "hooks with it)", name)
                self._forget(att)
            elif current != name:
                log.info("%s: renamed to %s; still monitored", name, current)
                del self.attached[name]
                att.ifname = current
                self.attached[current] = att
                ownership.write("iface", att.key, att.record())
                self._write_controller_record()
        if self._ifname_of(self.debug.ifindex) != self.debug.name:
            self._replace_debug()

    def _ifname_of(self, ifindex: int) -> str | None:
        try:
            return self.ipr.get_links(ifindex)[0].get_attr("IFLA_IFNAME")
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return None
            raise

    def _forget(self, att: Attached) -> None:
        self.classifier.set_monitored(att.ifindex, False)
        self.classifier.forget_iface(att.ifindex)
        for fd in att.links.values():
            os.close(fd)
        ownership.remove("iface", att.key)
        att.lock.release()
        del self.attached[att.ifname]
        self._write_controller_record()

    def _replace_debug(self) -> None:
        """The debug interface was deleted (or renamed away): recreate it, or take the
        one someone else recreated, and point the classifier at it."""
        name = self.debug.name
        if not self._debug_missing_logged:
            log.warning("debug interface %s disappeared; recreating it", name)
            self._debug_missing_logged = True
        rec = ownership.read("debug", name)
        if self.debug.created and rec and rec.get("ifindex") == self.debug.ifindex:
            ownership.remove("debug", name)     # ours, and gone: not someone's new one
        try:
            if (idx := debugif.lookup(self.ipr, name)) is not None:
                debugif.check_existing(self.ipr, name, idx, recorded=False)
            found = debugif.ensure(self.ipr, name, self._sink_fd)
        except (NetlinkError, OSError, UsageError) as exc:
            log.warning("cannot recreate %s yet: %s", name, exc)
            return
        self.debug = found
        if found.created:
            self._write_debug_record()
        self.classifier.set_debug_ifindex(found.ifindex)
        self.debug_recreated_total += 1
        self._debug_missing_logged = False
        log.info("debug interface %s %s (ifindex %d)", name,
                 "recreated" if found.created else "found again", found.ifindex)

    def reload(self) -> None:
        """SIGHUP: re-reads the trigger spec (and idle timeout) from --config; a bad
        config is reported and the running settings are kept."""
        if not self.opts.config:
            log.info("SIGHUP: no --config file; trigger set unchanged (%s)",
                     describe(self.codes))
            return
        try:
            cfg = read_config(self.opts.config)
        except UsageError as exc:
            log.error("SIGHUP: config rejected, keeping trigger %s: %s",
                      describe(self.codes), exc)
            return
        if "trigger" in cfg:
            self.codes = parse_trigger(cfg["trigger"])
            self.classifier.set_trigger(self.codes)
        if "idle_timeout" in cfg:
            self.idle_timeout = cfg["idle_timeout"]
        self._write_controller_record()
        log.info("SIGHUP: trigger set is now %s, idle timeout %g s", describe(self.codes),
                 self.idle_timeout)

    # --- stop ----------------------------------------------------------------------
    def shutdown(self) -> None:
        """Removes everything this controller added; safe to call more than once. Each
        step is attempted even when an earlier one fails."""
        if self._server:
            self._server.close()
            self._server = None
        if self.discovery is not None:
            self.discovery.stop()       # no attach may start after this point
        if self.events:
            self.events.close()
            self.events = None
        with self.lock:
            self._shutdown()

    def _shutdown(self) -> None:
        for name, att in list(self.attached.items()):
            if self.classifier is not None:
                self.classifier.set_monitored(att.ifindex, False)
            try:
                self._detach(att)
            except Exception as exc:       # keep going: the rest must still be removed
                log.error("%s: detach failed: %s; run `mirror detach --iface %s`", name, exc,
                          name)
            ownership.remove("iface", att.key)
            att.lock.release()
            del self.attached[name]
        if self.debug:
            try:
                self._release_debug()
            except Exception as exc:
                log.error("removing debug interface %s failed: %s", self.debug.name, exc)
            self.debug = None
        ownership.remove("controller", self.id)
        if self._ctl_lock:
            self._ctl_lock.path.unlink(missing_ok=True)     # unique to this process
            self._ctl_lock.release()
            self._ctl_lock = None

    def close(self) -> None:
        """shutdown(), then releases the netlink socket; the controller is done."""
        self.shutdown()
        if self.ipr is not None:
            self.ipr.close()
            self.ipr = None

    def _detach(self, att: Attached) -> None:
        for fd in att.links.values():
            os.close(fd)                # releases the tcx link: detached
        if att.links:
            att.links.clear()
            log.info("%s: detached (tcx links released)", att.ifname)
        elif self._ifname_of(att.ifindex) is not None:
            done = detach_record(self.ipr, att.record(), att.ifindex)
            log.info("%s: detached (%s)", att.ifname, ", ".join(done) or "nothing left")

    def _release_debug(self) -> None:
        """Removes the debug interface if this tool created it and no other controller
        still uses it (the shared lock becomes exclusive only for the last user)."""
        name = self.debug.name
        if self._debug_lock.try_exclusive():
            rec = ownership.read("debug", name)
            if rec and rec.get("created") and rec.get("ifindex") == self.debug.ifindex:
                if debugif.remove(self.ipr, name):
                    log.info("removed debug interface %s", name)
                ownership.remove("debug", name)
        else:
            log.info("debug interface %s is still used by another controller; leaving it",
                     name)
        self._debug_lock.release()

    # --- introspection -------------------------------------------------------------
    def _write_controller_record(self) -> None:
        ownership.write("controller", self.id, {
            "id": self.id, "pid": os.getpid(), "ifaces": list(self.attached),
            "hook": self.opts.hook,
            "debug_iface": self.debug.name if self.debug else None,
            "trigger": describe(self.codes), "idle_timeout": self.idle_timeout,
            "max_flows": self.opts.max_flows, "metrics_addr": self.opts.metrics_addr,
            "socket": self.socket_name, **self.opts.budget(),
            "patterns": self.selector.patterns, "exclude": self.selector.exclude,
            "max_ifaces": self.opts.max_ifaces,
            "matched": self.discovery.matched() if self.discovery else {},
        })

    def flows_json(self) -> list[dict]:
        now = time.monotonic_ns()
        out = []
        for key, v in sorted(self.classifier.flows().items()):
            out.append({"family": key.family, "a": key.addr_lo, "a_port": key.port_lo,
                        "b": key.addr_hi, "b_port": key.port_hi, "status": v["status"],
                        "packets": v["packets"], "bytes": v["bytes"],
                        "age_s": round((now - v["first_ns"]) / 1e9, 3) if v["first_ns"] else None,
                        "idle_s": round((now - v["last_ns"]) / 1e9, 3) if v["last_ns"] else None,
                        "cpus": v["cpus"], "cpu_packets": v["cpu_packets"],
                        "cut": v["cut"]})
        return out

    def counters(self) -> dict[str, int]:
        """The classifier's counters, the request frames written from user space and the
        events read so far (the classifier's `events` minus this: still in the ring)."""
        written = self.events.writer.written if self.events else 0
        read = self.events.seq + self.events.errors if self.events else 0
        return {**self.classifier.counters(), "request_frames_written": written,
                "events_read": read}

    @property
    def socket_name(self) -> str:
        return control.socket_name(self.id)

    def _start_control_socket(self) -> None:
        """`flows` and `counters` for `mirror flows` and the tests (mirror.control)."""
        self._server = control.ControlServer(self.socket_name, {
            "flows": lambda arg: self.flows_json(),
            "counters": lambda arg: self.counters(),
            "events": lambda arg: self.events.since(int(arg or 0)) if self.events else [],
            "attach": lambda arg: self.attach_json(),
        }).start()

    def attach_json(self) -> dict:
        """When each interface got its hooks (CLOCK_MONOTONIC, comparable across processes)
        and the latencies observed, for bench/attach.py."""
        with self.lock:
            return {"attached_at": {str(i): t for i, t in self.attached_at.items()},
                    "ingress_at": {str(i): t for i, t in self.ingress_at.items()},
                    "event_at": {str(i): t for i, t in self.event_at.items()},
                    "latency_s": list(self.attach_latency.values),
                    "attached": sorted(a.ifindex for a in self.attached.values())}
