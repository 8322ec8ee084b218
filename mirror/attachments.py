"""The interfaces one controller has hooks on: each attached under its lock and recorded
(mirror.ownership), detached and forgotten when it goes away, followed through renames.

This is the `Target` that interface discovery calls from its own thread
(mirror.discovery), and what the controller attaches the named interfaces with at start
and detaches at shutdown; `lock` serialises them (they share one netlink socket)."""
from __future__ import annotations

import errno
import logging
import os
import threading
import time

from pyroute2.netlink.exceptions import NetlinkError

from . import debugif, hooks, ownership
from .errors import UsageError
from .histogram import ATTACH_BUCKETS, Histogram
from .hooks import Attachment

log = logging.getLogger("mirror")


class Attachments:
    def __init__(self, ipr, hook: str, classifier, debug_name: str,
                 on_change=lambda: None, workloads=None):
        """`classifier`: the loaded program (mirror.bpfprog.Classifier), told which
        interfaces it runs on; `debug_name`: the debug interface, never monitored;
        `on_change()`: called after the set changed (the controller rewrites its record);
        `workloads`: mirror.workload.Workloads, told which interfaces to name."""
        self.workloads = workloads
        self.ipr = ipr
        self.hook = hook
        self.kind = hooks.kind(hook)
        self.classifier = classifier
        self.debug_name = debug_name
        self.debug_ifindex = 0          # set once the debug interface exists
        self.on_change = on_change
        self.by_name: dict[str, Attachment] = {}
        self._locks: dict[int, ownership.Lock] = {}
        self.lock = threading.RLock()
        self.latency = Histogram(ATTACH_BUCKETS, keep=100_000)
        self.failures_total = 0

    def ifname_of(self, ifindex: int) -> str | None:
        """The interface's name now, None when it is gone."""
        try:
            return self.ipr.get_links(ifindex)[0].get_attr("IFLA_IFNAME")
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return None
            raise

    def name_of(self, ifindex: int) -> str | None:
        """The name it is attached under (the events reader names interfaces so)."""
        for att in list(self.by_name.values()):
            if att.ifindex == ifindex:
                return att.ifname
        return None

    def _find(self, ifindex: int) -> Attachment | None:
        return next((a for a in self.by_name.values() if a.ifindex == ifindex), None)

    # --- attach ----------------------------------------------------------------------
    def attach(self, name: str, ifindex: int, event_at: float = 0.0) -> Attachment:
        """Attaches the hooks to one interface under its lock and records them; a failure
        half-way leaves what was added in by_name for rollback()."""
        with self.lock:
            lock = ownership.Lock(ownership.iface_lock_name(ifindex))
            if not lock.acquire():
                raise UsageError(f"{name} is already monitored by another mirror controller")
            self._locks[ifindex] = lock
            att = Attachment(name, ifindex, self.hook, event_at=event_at)
            self.by_name[name] = att
            stale = ownership.read("iface", ownership.iface_key(ifindex))
            done = hooks.attach(self.ipr, att, {d: self.classifier.fd(d)
                                                for d in ("ingress", "egress")}, stale)
            att.hooked_at = time.monotonic()
            ownership.write("iface", ownership.iface_key(ifindex), att.record())
            self.classifier.set_monitored(ifindex, True)
            if self.workloads is not None:
                self.workloads.refresh(ifindex)
            log.info("%s: attached (%s: %s)", name, self.hook, "; ".join(done))
            return att

    def rollback(self, name: str) -> None:
        """Removes what a failed attach() added."""
        with self.lock:
            att = self.by_name.get(name)
            if att is not None:
                self._detach(att)
                self._release(att)

    def detach_all(self) -> None:
        with self.lock:
            for att in list(self.by_name.values()):
                self._detach(att)
                self._release(att)

    def _detach(self, att: Attachment) -> None:
        """Removes the interface's hooks; an interface that is gone took them with it.
        Errors are logged with the command that finishes the job: the rest of a shutdown
        must still happen."""
        self.classifier.set_monitored(att.ifindex, False)
        try:
            if att.links or self.ifname_of(att.ifindex) is not None:
                done = self.kind.detach(self.ipr, att)
                log.info("%s: detached (%s)", att.ifname, ", ".join(done) or "nothing left")
        except Exception as exc:
            log.error("%s: detach failed: %s; run `mirror detach --iface %s`", att.ifname,
                      exc, att.ifname)

    def _release(self, att: Attachment) -> None:
        """Drops the record and the lock of a detached interface."""
        self.by_name.pop(att.ifname, None)
        ownership.remove("iface", ownership.iface_key(att.ifindex))
        lock = self._locks.pop(att.ifindex, None)
        if lock:
            lock.release(remove=True)       # held exclusively: nobody else uses the file

    def forget(self, att: Attachment) -> None:
        """An interface no longer monitored (its hooks are gone): its state in the
        classifier, its record, its lock."""
        self.classifier.set_monitored(att.ifindex, False)
        self.classifier.forget_iface(att.ifindex)
        if self.workloads is not None:
            self.workloads.forget(att.ifindex)
        for fd in att.links.values():
            os.close(fd)
        att.links.clear()
        self._release(att)
        self.on_change()

    def poll(self) -> None:
        """Without link events: forgets interfaces that are gone, follows renames."""
        with self.lock:
            for name, att in list(self.by_name.items()):
                current = self.ifname_of(att.ifindex)
                if current is None:
                    log.warning("%s: interface is gone; forgetting it (the kernel removed "
                                "its hooks with it)", name)
                    self.forget(att)
                elif current != name:
                    self.follow_rename(att.ifindex, current)

    # --- mirror.discovery.Target -----------------------------------------------------
    def attached_indexes(self) -> dict[int, str]:
        with self.lock:
            return {att.ifindex: att.ifname for att in self.by_name.values()}

    def attach_matched(self, name: str, ifindex: int, since: float) -> bool:
        """Attaches to an interface a pattern selected; `since` is when its link event
        arrived. A failure is logged and counted, what was added is removed, and the
        controller keeps running."""
        with self.lock:
            try:
                att = self.attach(name, ifindex, event_at=since)
            except Exception as exc:
                self.rollback(name)
                if self.ifname_of(ifindex) is None:
                    log.info("%s: gone while being attached", name)
                else:
                    self.failures_total += 1
                    log.warning("%s: not attached: %s", name, exc)
                return False
            self.latency.observe(att.hooked_at - since)
            self.on_change()
            return True

    def detach_iface(self, ifindex: int, why: str) -> None:
        """Stops monitoring an interface: it is gone, or was renamed out of the patterns."""
        with self.lock:
            att = self._find(ifindex)
            if att is None:
                return
            log.info("%s: %s; no longer monitored", att.ifname, why)
            self._detach(att)
            self.forget(att)

    def follow_rename(self, ifindex: int, name: str) -> None:
        with self.lock:
            att = self._find(ifindex)
            if att is None or att.ifname == name:
                return
            log.info("%s: renamed to %s; still monitored", att.ifname, name)
            del self.by_name[att.ifname]
            att.ifname = name
            self.by_name[name] = att
            ownership.write("iface", ownership.iface_key(ifindex), att.record())
            self.on_change()

    def never_monitor(self, ifindex: int, name: str, event=None) -> bool:
        """Debug interfaces (ours or another controller's) and their sink ends are never
        monitored, whatever the patterns: mirroring clones would loop."""
        if name in (self.debug_name, debugif.sink_name(self.debug_name)) or (
                self.debug_ifindex and ifindex == self.debug_ifindex):
            return True
        with self.lock:
            return debugif.is_mirror_iface(self.ipr, ifindex, name, event)

    def attach_times(self) -> dict:
        """When each interface a pattern selected got its hooks (CLOCK_MONOTONIC,
        comparable across processes) and the latencies observed, for bench/attach.py."""
        with self.lock:
            matched = [a for a in self.by_name.values() if a.event_at]
            return {"attached_at": {str(a.ifindex): a.hooked_at for a in matched},
                    "ingress_at": {str(a.ifindex): a.ingress_at for a in matched},
                    "event_at": {str(a.ifindex): a.event_at for a in matched},
                    "latency_s": list(self.latency.values),
                    "attached": sorted(a.ifindex for a in self.by_name.values())}
