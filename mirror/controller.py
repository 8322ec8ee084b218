"""Lifecycle of one mirror: checks before start, start (compile, attach, serve), the run
loop (sweep idle flows, follow interfaces, reload on SIGHUP), shutdown.

The only module that changes kernel state, through the rooms that know how: the
classifier (mirror.bpfprog), the hooks (mirror.hooks, one module per kind), the debug
interface (mirror.debugif). Everything it adds is recorded (mirror.ownership) before or as
it is added, so that it can be rolled back and a restarted controller finds it."""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from . import ctlsocket, debugif, hooks, ownership
from .abi import CONN, IFACE_SLOTS, KEPT_REQUEST_HEAD
from .attachments import Attachments
from .bpfprog import Classifier, Sink, check_environment
from .discovery import Discovery, cni_request
from .errors import UsageError
from .events.file import EventsFile
from .events.stream import EventStream
from .flows import flows_json
from .options import Options, resolve
from .privileges import can_write_frames, require
from .trigger import describe
from .workload import Workloads

log = logging.getLogger("mirror")

# The run loop's stages, as counted in mirror_controller_errors_total{stage}.
STAGES = ("reload", "sweep", "watch", "events")
RETRY_FIRST_SECONDS = 0.5
RETRY_MAX_SECONDS = 30.0

__all__ = ["Controller", "Options"]


class Controller:
    def __init__(self, flags: Options, classifier_factory=None, sink_factory=None):
        """`flags`: what the command line and the environment say (--config is read
        over them at preflight and on SIGHUP). The factories let the bench and tests hand
        in a classifier and a sink program loaded once."""
        self.flags = flags
        self.opts = flags
        self.ipr = IPRoute()
        self.attachments: Attachments | None = None
        self.debug: debugif.DebugLink | None = None
        self.classifier: Classifier | None = None
        self._classifier_factory = classifier_factory or self._default_classifier
        self._sink_factory = sink_factory or Sink
        self._sink = None
        self.stop_event = threading.Event()
        self.reload_event = threading.Event()
        self.expired_total = 0
        self.stage_errors: dict[str, int] = dict.fromkeys(STAGES, 0)
        self._failures: dict[str, int] = {}
        self._retry_at: dict[str, float] = {}
        self.sweep_seconds = 0.0
        self._server: ctlsocket.ControlServer | None = None
        self.events: EventStream | None = None
        self._ctl_lock: ownership.Lock | None = None
        # Names this process's record, lock and socket: pids repeat across containers.
        self.id = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.selector = None
        self.hook = None
        self.discovery: Discovery | None = None
        self.workloads: Workloads | None = None

    @property
    def codes(self) -> frozenset[int]:
        return self.opts.codes

    @property
    def idle_timeout(self) -> float:
        return self.opts.idle_timeout

    @property
    def debug_recreated_total(self) -> int:
        return self.debug.recreated_total if self.debug else 0

    @property
    def attached(self) -> dict:
        """name -> mirror.hooks.Attachment of every interface with hooks now."""
        return self.attachments.by_name if self.attachments else {}

    # --- start ---------------------------------------------------------------------
    def preflight(self) -> dict[str, int]:
        """Checks everything that can be checked without changing the kernel; returns
        the named interfaces' indexes. UsageError names the problem and the fix."""
        require("`mirror run` (loading BPF programs, changing qdiscs)")
        ownership.check_state_dir(creatable=True)
        self.opts = resolve(self.flags)
        self.selector = self.opts.validate()
        self.hook = hooks.kind(self.opts.hook)
        self.hook.check_supported()
        indexes = {}
        for name in self.selector.names:
            idx = debugif.lookup(self.ipr, name)
            if idx is None:
                raise UsageError(f"unknown interface {name!r}: see `ip link` for the names "
                                 "in this network namespace")
            indexes[name] = idx
        self._check_debug_name(indexes)
        for name, idx in indexes.items():
            self._check_iface(name, idx)
        check_environment()
        return indexes

    def _check_debug_name(self, indexes: dict[str, int]) -> None:
        name = self.opts.debug_iface
        dbg = debugif.lookup(self.ipr, name)
        if dbg is None:
            return
        if dbg in indexes.values():
            raise UsageError(f"debug interface {name} is a monitored interface; pick "
                             "another --debug-iface")
        debugif.check_existing(self.ipr, name, dbg)

    def _check_iface(self, name: str, idx: int) -> None:
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
        self.hook.check(self.ipr, idx, name, self._stale_record(idx))

    def start(self, indexes: dict[str, int] | None = None) -> None:
        """Loads and attaches; `indexes` from preflight(), which runs here if not given.
        A failure rolls back whatever was added and raises."""
        if indexes is None:
            indexes = self.preflight()
        t0 = time.monotonic()
        self.classifier = self._classifier_factory()
        self._log_loaded(time.monotonic() - t0)
        self.classifier.set_trigger(self.codes)
        self.classifier.set_budgets(self.opts.max_packets_per_flow,
                                    self.opts.max_bytes_per_flow,
                                    self.opts.max_clones_per_second)
        self.classifier.set_event_limits(self.opts.max_events_per_second,
                                         self.opts.max_events_per_connection)
        self.classifier.set_idle_timeout(self.idle_timeout)
        self._warn_shared_stats_slots(indexes)
        self._ctl_lock = ownership.Lock(f"controller-{self.id}")
        self._ctl_lock.acquire()
        # The pods and containers behind the interfaces: asked of the container runtimes
        # in a thread of its own, never on the way of an attach or an event.
        self.workloads = Workloads().start()
        self.attachments = Attachments(self.ipr, self.opts.hook, self.classifier,
                                       self.opts.debug_iface, self._write_controller_record,
                                       self.workloads)
        ownership.prune(self.id, lambda i: self.attachments.ifname_of(i) is not None,
                        lambda n: debugif.lookup(self.ipr, n) is not None)
        try:
            self.debug = debugif.DebugLink(self.ipr, self.opts.debug_iface, self._sink_fd)
            self.debug.setup()
            self.classifier.set_debug_ifindex(self.debug.ifindex)
            self.attachments.debug_ifindex = self.debug.ifindex
            for name, idx in indexes.items():
                self.attachments.attach(name, idx)
            self.discovery = Discovery(self.selector, self.attachments, set(indexes.values()),
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

    def _default_classifier(self) -> Classifier:
        return Classifier(max_flows=self.opts.max_flows, request_bytes=self.opts.request_bytes)

    def _log_loaded(self, seconds: float) -> None:
        clf = self.classifier
        # Arrays are preallocated: the memory is taken now, whatever the traffic.
        mib = clf.conn_slots * CONN.size / 2**20
        req_mib = clf.max_requests * (KEPT_REQUEST_HEAD.size + clf.request_capacity) / 2**20
        log.info("classifier compiled and loaded in %.1f s (connection states: %d slots, "
                 "%.0f MiB; kept requests: %s)", seconds, clf.conn_slots, mib,
                 f"{self.opts.request_bytes} bytes of each, {clf.max_requests} slots, "
                 f"{req_mib:.0f} MiB" if self.opts.request_bytes else "off")

    @staticmethod
    def _warn_shared_stats_slots(indexes: dict[str, int]) -> None:
        slots: dict[int, list[str]] = {}
        for name, idx in indexes.items():
            slots.setdefault(idx % IFACE_SLOTS, []).append(name)
        for names in slots.values():
            if len(names) > 1:
                log.warning("%s share a per-interface statistics slot (ifindex modulo %d): "
                            "on each CPU only the first to answer gets per-interface counts; "
                            "mirroring is not affected", " and ".join(names), IFACE_SLOTS)

    def _sink_fd(self) -> int:
        if self._sink is None:
            self._sink = self._sink_factory()
        return self._sink.fd

    def _start_events(self) -> None:
        if self.opts.request_bytes and not can_write_frames():
            log.warning("no CAP_NET_RAW: the request of each error response is kept and "
                        "named in its event, but not written to %s, so the capture starts at "
                        "the response; grant NET_RAW to have it (or --request-bytes 0)",
                        self.opts.debug_iface)
        out = None
        if self.opts.events_file:
            out = EventsFile(self.opts.events_file, self.opts.events_file_bytes,
                             on_error=lambda: self._count_error("events"),
                             group=self.opts.events_gid)
        self.events = EventStream(self.classifier, self.attachments.name_of,
                                  lambda: self.debug.target_ifindex if self.debug else 0,
                                  out, self.opts.budget(), self.workload_of).start()

    def workload_of(self, ifindex: int) -> dict:
        """The workload behind an interface, as event and JSON attributes ({} before
        start)."""
        return self.workloads.lookup(ifindex).attributes() if self.workloads else {}

    def _stale_record(self, ifindex: int) -> dict | None:
        """The record a stopped controller left for this interface, if any."""
        return ownership.read("iface", ownership.iface_key(ifindex))

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

    def _count_error(self, stage: str) -> None:
        self.stage_errors[stage] += 1

    def sweep(self) -> int:
        """Deletes flows idle for longer than the idle timeout; returns how many."""
        t0 = time.monotonic()
        expired = self.classifier.expire_idle(time.monotonic_ns(), int(self.idle_timeout * 1e9))
        self.expired_total += expired
        self.classifier.note_if_empty()
        self.sweep_seconds = time.monotonic() - t0
        return expired

    def watch_interfaces(self) -> None:
        """The debug interface (recreated when it disappears, not mirrored to while its
        far end could pass clones on: DebugLink.recheck) and, when no link events
        are followed, the monitored interfaces (gone, renamed)."""
        with self.attachments.lock:
            if self.discovery is None:
                self.attachments.poll()
            # With link events (mirror.discovery) following the monitored interfaces,
            # polling them here too would race with its decisions on renames.
            if (self.attachments.ifname_of(self.debug.ifindex) != self.debug.name and
                    self.debug.replace()) or self.debug.recheck():
                self.classifier.set_debug_ifindex(self.debug.target_ifindex)
                self.attachments.debug_ifindex = self.debug.ifindex

    def reload(self) -> None:
        """SIGHUP: the settings again (mirror.options.resolve: --config over the flags);
        a bad file is reported and the running settings are kept."""
        if not self.flags.config:
            log.info("SIGHUP: no --config file; trigger set unchanged (%s)",
                     describe(self.codes))
            return
        try:
            new = resolve(self.flags)
        except UsageError as exc:
            log.error("SIGHUP: config rejected, keeping trigger %s: %s",
                      describe(self.codes), exc)
            return
        if new.codes != self.codes:
            self.classifier.set_trigger(new.codes)
        self.opts.trigger, self.opts.codes = new.trigger, new.codes
        self.opts.idle_timeout = new.idle_timeout
        self.classifier.set_idle_timeout(new.idle_timeout)
        self._write_controller_record()
        log.info("SIGHUP: trigger set is now %s, idle timeout %g s", describe(self.codes),
                 self.idle_timeout)

    # --- stop ----------------------------------------------------------------------
    def shutdown(self) -> None:
        """Removes everything this controller added; safe to call more than once. Each
        step is attempted even when an earlier one fails."""
        if self.discovery is not None:
            self.discovery.stop()       # no attach may start after this point
        if self.events:
            # Its last events are numbered now; the control socket stays up until the
            # followers (`mirror events --follow`) have them, bounded (farewell).
            self.events.close()
            if self._server:
                owed = self.events.farewell()
                if owed:
                    log.warning("%d `mirror events --follow` did not ask for the last "
                                "events in time", owed)
            self.events = None
        if self._server:
            self._server.close()
            self._server = None
        if self.workloads:
            self.workloads.stop()
        if self.attachments:
            self.attachments.detach_all()
        if self.debug:
            try:
                self.debug.release()
            except Exception as exc:
                log.error("removing debug interface %s failed: %s", self.debug.name, exc)
            self.debug = None
        if self._ctl_lock:         # taken at start: before it, nothing was recorded
            ownership.remove("controller", self.id)
            self._ctl_lock.path.unlink(missing_ok=True)     # unique to this process
            self._ctl_lock.release()
            self._ctl_lock = None

    def close(self) -> None:
        """shutdown(), then releases the netlink socket; the controller is done."""
        self.shutdown()
        if self.ipr is not None:
            self.ipr.close()
            self.ipr = None

    # --- introspection -------------------------------------------------------------
    def _write_controller_record(self) -> None:
        ownership.write("controller", self.id, {
            "id": self.id, "pid": os.getpid(), "ifaces": list(self.attached),
            "hook": self.opts.hook,
            "debug_iface": self.debug.name if self.debug else None,
            "trigger": describe(self.codes), "idle_timeout": self.idle_timeout,
            "max_flows": self.opts.max_flows, "metrics_addr": self.opts.metrics_addr,
            "socket": self.socket_name, **self.opts.limits(),
            "patterns": self.selector.patterns, "exclude": self.selector.exclude,
            "max_ifaces": self.opts.max_ifaces,
            "matched": self.discovery.matched() if self.discovery else {},
        })

    def counters(self) -> dict[str, int]:
        """The classifier's counters, the request frames written from user space and the
        events read so far (the classifier's `events` minus this: still in the ring)."""
        written = self.events.writer.written if self.events else 0
        read = self.events.seq + self.events.errors if self.events else 0
        cni = self.discovery.cni_requests if self.discovery else {}
        return {**self.classifier.counters(), "request_frames_written": written,
                "events_read": read, **{f"cni_{k}": v for k, v in cni.items()}}

    def event_window(self, arg: str) -> dict:
        """`mirror events --follow`'s question, "SEQ FOLLOWER": the events after SEQ and
        where the kept ones start (EventStream.window), with the kernel's counts of error
        responses that never became events (its ring buffer full: lost; its bounds: held
        back), so that a follower can say what it did not see and why."""
        seq, _, follower = arg.partition(" ")
        window = (self.events.window(int(seq or 0), follower.strip()) if self.events else
                  {"events": [], "first": 1, "last": 0, "kept": 0, "stopping": True})
        counters = self.classifier.counters()
        return {**window, "id": self.id, "pid": os.getpid(),
                "kernel_lost": counters["events_lost"],
                "kernel_held": counters["events_rate_limited"] + counters["events_conn_limited"]}

    @property
    def socket_name(self) -> str:
        return str(ownership.socket_path(self.id))

    def _start_control_socket(self) -> None:
        """What only this process holds, for `mirror flows`, `mirror events`, the bench
        and the tests (mirror.ctlsocket)."""
        self._server = ctlsocket.ControlServer(self.socket_name, {
            "flows": lambda arg: flows_json(self.classifier.flows(),
                                            self.attachments.name_of, self.workload_of),
            "counters": lambda arg: self.counters(),
            "events": lambda arg: self.events.since(int(arg or 0)) if self.events else [],
            "window": self.event_window,
            "attach": lambda arg: self.attachments.attach_times(),
            "cni-add": lambda arg: self.discovery.cni_add(cni_request(arg)["names"]),
            "cni-del": lambda arg: self._cni_del(cni_request(arg)),
        }).start()

    def _cni_del(self, req: dict) -> dict:
        # The id only names the container in the log: kept to what an id is made of.
        container = "".join(c for c in str(req.get("container_id") or "")[:64]
                            if c.isascii() and (c.isalnum() or c in "._-")) or "unknown"
        return self.discovery.cni_del(req["names"], f"its container ({container}) is "
                                      "going (CNI DEL)")
