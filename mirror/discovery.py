"""Which interfaces should be monitored, as they come and go: the --iface patterns, and the
link events of this network namespace that tell when an interface appears, is renamed or
goes away.

The controller attaches and detaches; this module only decides. It reads RTM_NEWLINK and
RTM_DELLINK from a netlink socket bound to the link multicast group and calls the
controller back (a `Target`) from its own thread, so that a new interface is attached as
soon as its RTM_NEWLINK arrives: a new veth has no carrier yet, and the hooks are in
place before it can carry its first packet.

No event is lost: the socket's receive buffer is large (SO_RCVBUFFORCE), so a burst of
new interfaces queues while the thread attaches; if the kernel still drops events
(ENOBUFS), the whole link table is dumped again and compared with what is attached.
A plain socket is used rather than pyroute2's IPRoute because the overflow error must be
seen when it happens, not folded into a later request."""
from __future__ import annotations

import errno
import fnmatch
import json
import logging
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from .abi import MAX_MONITORED
from .errors import UsageError
from .rtnl import attr_string

log = logging.getLogger("mirror")

IFNAMSIZ = 15
GLOB_CHARS = frozenset("*?[")

# Why 256: Kubernetes' default is at most 110 pods per node (the usual raised setting,
# 250, still fits), one host-side veth each; every monitored interface holds one lock
# file descriptor (plus two link descriptors with --hook tcx), so 256 stays under the
# common soft limit of 1024 open files, and under the 1024 per-interface statistics slots.
DEFAULT_MAX_IFACES = 256
# What became of each interface a CNI plugin asked about (mirror_cni_requests_total).
CNI_OUTCOMES = ("attached", "already", "ignored", "refused", "gone", "detached")
MAX_IFACES_LIMIT = MAX_MONITORED     # size of the classifier's `monitored` map

# Netlink constants (linux/netlink.h, linux/rtnetlink.h, linux/if_link.h).
RTMGRP_LINK = 1
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
IFLA_IFNAME, IFLA_LINK, IFLA_LINKINFO, IFLA_LINK_NETNSID = 3, 5, 18, 37
IFLA_INFO_KIND = 1
SO_RCVBUFFORCE = 33
RCVBUF = 16 << 20       # 16 MiB: thousands of link messages of a couple of KiB each
_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")


def cni_request(arg: str) -> dict:
    """The JSON a CNI plugin sends after cni-add or cni-del (cni/tc-mirror): an object
    whose `names` are interface names. ValueError, answered to the plugin, otherwise."""
    req = json.loads(arg)
    names = req.get("names") if isinstance(req, dict) else None
    if not isinstance(names, list) or not 0 < len(names) <= 16 or not all(
            isinstance(n, str) and 0 < len(n.encode()) <= IFNAMSIZ and "/" not in n
            and "\0" not in n for n in names):
        raise ValueError("expected {\"names\": [1 to 16 interface names]}")
    return req


def is_pattern(spec: str) -> bool:
    return bool(GLOB_CHARS & set(spec))


@dataclass
class Selector:
    """What --iface and --exclude ask for. Plain names keep their old meaning (they must
    exist at start, and follow renames); patterns match any name, now or later, unless an
    --exclude pattern matches it too."""
    names: list[str] = field(default_factory=list)
    patterns: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, specs: list[str], exclude: list[str] | None = None) -> "Selector":
        sel = cls(exclude=list(exclude or []))
        for spec in specs:
            spec = spec.strip()
            if not spec or "/" in spec or any(c.isspace() for c in spec):
                raise UsageError(f"bad --iface {spec!r}: give an interface name or a shell "
                                 "pattern such as 'veth*', without spaces or '/'")
            target = sel.patterns if is_pattern(spec) else sel.names
            if spec not in target:
                target.append(spec)
        for name in sel.names:
            if len(name) > IFNAMSIZ:
                raise UsageError(f"bad --iface {name!r}: interface names have at most "
                                 f"{IFNAMSIZ} characters")
        for pat in sel.exclude:
            if not pat.strip():
                raise UsageError("empty --exclude pattern: give a shell pattern, e.g. 'veth0*'")
        for name in sel.names:
            excluded = next((ex for ex in sel.exclude if fnmatch.fnmatchcase(name, ex)), None)
            if excluded is not None:
                # A name is a request for that interface; an exclusion that cancels it
                # is a mistake in one of the two, not something to settle silently.
                raise UsageError(f"{name} is named by --iface and excluded by --exclude "
                                 f"{excluded!r}: drop one of the two")
        return sel

    def pattern_of(self, name: str) -> str | None:
        """The first pattern that selects `name`, or None (no match, or excluded)."""
        if any(fnmatch.fnmatchcase(name, ex) for ex in self.exclude):
            return None
        return next((p for p in self.patterns if fnmatch.fnmatchcase(name, p)), None)

    def wants(self, name: str) -> bool:
        return self.pattern_of(name) is not None


@dataclass
class LinkEvent:
    kind: str           # "new" or "del"
    ifindex: int
    ifname: str | None
    received: float     # time.monotonic() when the message was read
    # What the message says about the link itself, so that deciding needs no request:
    link_kind: str | None = None    # IFLA_INFO_KIND: "veth", "dummy"... (None: not said)
    peer_elsewhere: bool = False    # IFLA_LINK_NETNSID present: its peer (a veth's other
    #                                 end) lives in another network namespace


def _attr_spans(data: bytes, off: int, end: int) -> dict[int, tuple[int, int]]:
    """type -> (payload start, payload end) of the rtattrs in data[off:end]."""
    spans, hdr = {}, struct.Struct("=HH")
    while off + hdr.size <= end:
        rta_len, rta_type = hdr.unpack_from(data, off)
        if rta_len < hdr.size:
            break
        spans[rta_type & 0x3FFF] = (off + hdr.size, min(off + rta_len, end))
        off += (rta_len + 3) & ~3
    return spans


def parse_link_messages(data: bytes, received: float) -> list[LinkEvent]:
    """RTM_NEWLINK/RTM_DELLINK messages in one netlink datagram, as LinkEvents. Raises
    OSError for an NLMSG_ERROR carrying an error code (a failed dump)."""
    out, off = [], 0
    while off + _NLMSGHDR.size <= len(data):
        length, mtype, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, off)
        if length < _NLMSGHDR.size:
            break
        body = off + _NLMSGHDR.size
        if mtype == NLMSG_ERROR:
            code = struct.unpack_from("=i", data, body)[0]
            if code:
                raise OSError(-code, "netlink error")
        elif mtype in (RTM_NEWLINK, RTM_DELLINK):
            _family, _type, ifindex, _flags, _change = _IFINFOMSG.unpack_from(data, body)
            attrs = body + _IFINFOMSG.size
            spans = _attr_spans(data, attrs, off + length)
            name = attr_string(data, attrs, off + length, IFLA_IFNAME)
            kind = None
            if IFLA_LINKINFO in spans:
                kind = attr_string(data, *spans[IFLA_LINKINFO], IFLA_INFO_KIND)
            out.append(LinkEvent("new" if mtype == RTM_NEWLINK else "del", ifindex, name,
                                 received, kind, IFLA_LINK_NETNSID in spans))
        off += (length + 3) & ~3
    return out


class LinkSocket:
    """The netlink socket subscribed to link events, plus dumps of the link table."""

    def __init__(self, rcvbuf: int = RCVBUF):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                  socket.NETLINK_ROUTE)
        try:
            # FORCE lets root go beyond net.core.rmem_max; fall back without the privilege.
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except PermissionError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.bind((0, RTMGRP_LINK))
        self._seq = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> list[LinkEvent]:
        """The events of one datagram; OSError(ENOBUFS) when the kernel dropped some."""
        data = self.sock.recv(1 << 16)
        return parse_link_messages(data, time.monotonic())

    def dump(self) -> dict[int, str]:
        """ifindex -> name of every link now, from a dump on a socket of its own (so that
        events and the dump's replies never mix)."""
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                           socket.NETLINK_ROUTE) as s:
            s.bind((0, 0))
            self._seq += 1
            body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
            s.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_GETLINK,
                                  NLM_F_REQUEST | NLM_F_DUMP, self._seq, 0) + body)
            links: dict[int, str] = {}
            while True:
                data = s.recv(1 << 16)
                for ev in parse_link_messages(data, 0.0):
                    links[ev.ifindex] = ev.ifname
                if _has_done(data):
                    return links

    def close(self) -> None:
        self.sock.close()


def _has_done(data: bytes) -> bool:
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        length, mtype = _NLMSGHDR.unpack_from(data, off)[:2]
        if mtype == NLMSG_DONE:
            return True
        if length < _NLMSGHDR.size:
            return False
        off += (length + 3) & ~3
    return False


class Target(Protocol):
    """What discovery asks of the controller's attached interfaces
    (mirror.attachments.Attachments)."""

    def attached_indexes(self) -> dict[int, str]: ...
    def attach_matched(self, name: str, ifindex: int, since: float) -> bool: ...
    def detach_iface(self, ifindex: int, why: str) -> None: ...
    def follow_rename(self, ifindex: int, name: str) -> None: ...
    def never_monitor(self, ifindex: int, name: str,
                      event: "LinkEvent | None" = None) -> bool: ...


class Discovery:
    """Decides, for every link event, whether the controller attaches, detaches, follows a
    rename or does nothing, and runs the thread that reads the events."""

    def __init__(self, selector: Selector, target: Target, pinned: set[int],
                 max_ifaces: int = DEFAULT_MAX_IFACES, rcvbuf: int = RCVBUF):
        self.rcvbuf = rcvbuf
        self.selector = selector
        self.target = target
        self.pinned = set(pinned)       # attached by plain name: kept whatever their name
        self.max_ifaces = max_ifaces
        self.links: dict[int, str] = {}
        self.failed: dict[int, str] = {}        # ifindex -> name it failed under
        self.skipped: dict[int, str] = {}       # not attached: --max-ifaces reached
        self.skipped_total = 0
        self.resyncs = 0
        self.released: dict[int, str] = {}      # ifindex -> name a CNI DEL let go of
        self.cni_requests: dict[str, int] = dict.fromkeys(CNI_OUTCOMES, 0)
        self.sock: LinkSocket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        # The link-event thread and the control socket's (a CNI plugin's request) both
        # decide; one at a time, so an interface is never attached twice.
        self._lock = threading.RLock()

    # --- decisions -----------------------------------------------------------------
    def handle(self, ev: LinkEvent) -> None:
        with self._lock:
            if ev.kind == "del":
                self._gone(ev.ifindex)
            elif ev.ifname:
                self._seen(ev.ifindex, ev.ifname, ev.received, ev)

    def cni_add(self, names: list[str]) -> dict:
        """A chained CNI plugin's ADD (cni/tc-mirror): the host-side interfaces of a
        container that does not run yet. Each is decided now, in the caller, as its link
        event would decide it (the --iface patterns, --exclude, never a debug interface,
        --max-ifaces, the ownership lock): the plugin returns to the runtime only after
        this answer, so what it attaches is hooked before the container's first packet.
        What the patterns do not select is left alone (`ignored`)."""
        out: dict = {"attached": [], "ignored": {}, "skipped": {}}
        with self._lock:
            for name in names:
                outcome, why = self._cni_add_one(name)
                self.cni_requests[outcome] += 1
                if outcome in ("attached", "already"):
                    out["attached"].append(name)
                elif outcome == "ignored":
                    out["ignored"][name] = why
                else:
                    out["skipped"][name] = why
        return out

    def _cni_add_one(self, name: str) -> tuple[str, str]:
        try:
            ifindex = socket.if_nametoindex(name)
        except OSError:
            ifindex = None
        if not self.selector.wants(name) and ifindex not in self.pinned:
            return "ignored", "no --iface pattern selects it"
        if ifindex is None:
            return "gone", "no such interface here (gone before the attach, or in " \
                "another network namespace than this controller's)"
        if self.target.attached_indexes().get(ifindex) == name:
            return "already", ""
        self.released.pop(ifindex, None)
        self.failed.pop(ifindex, None)      # asked again: try again
        self._seen(ifindex, name, time.monotonic())
        if self.target.attached_indexes().get(ifindex) == name:
            return "attached", ""
        if ifindex in self.skipped:
            return "refused", f"--max-ifaces {self.max_ifaces} is reached"
        if ifindex in self.failed:
            return "refused", "attaching failed (the controller's log says why)"
        return "refused", "never monitored (a debug interface or its sink end)"

    def cni_del(self, names: list[str], why: str) -> dict:
        """A chained CNI plugin's DEL: the container is going; its interfaces are detached
        and not attached again under that name (the network plugin deletes them next)."""
        detached = []
        with self._lock:
            for name in names:
                try:
                    ifindex = socket.if_nametoindex(name)
                except OSError:
                    continue            # already gone: the kernel took the hooks with it
                if self.target.attached_indexes().get(ifindex) == name:
                    self.target.detach_iface(ifindex, why)
                    detached.append(name)
                    self.released[ifindex] = name
                    self.cni_requests["detached"] += 1
        return {"detached": detached}

    def _seen(self, ifindex: int, name: str, since: float,
              event: LinkEvent | None = None) -> None:
        self.links[ifindex] = name
        attached = self.target.attached_indexes()
        if ifindex in attached:
            if attached[ifindex] == name:
                return          # a state change (up, carrier...) of an attached interface
            if ifindex in self.pinned or self.selector.wants(name):
                self.target.follow_rename(ifindex, name)
            else:
                self.target.detach_iface(ifindex, f"renamed to {name}, which no --iface "
                                         "pattern selects")
            return
        if self.failed.get(ifindex) == name or self.released.get(ifindex) == name or \
                not self.selector.wants(name):
            return
        if self.target.never_monitor(ifindex, name, event):
            return
        if len(attached) >= self.max_ifaces:
            if ifindex not in self.skipped:
                self.skipped[ifindex] = name
                self.skipped_total += 1
                log.warning("%s matches %s but --max-ifaces %d is reached: not monitored "
                            "(raise --max-ifaces, or narrow the patterns)", name,
                            self.selector.pattern_of(name), self.max_ifaces)
            return
        self.skipped.pop(ifindex, None)
        self.failed.pop(ifindex, None)
        if not self.target.attach_matched(name, ifindex, since):
            self.failed[ifindex] = name

    def _gone(self, ifindex: int) -> None:
        self.links.pop(ifindex, None)
        self.failed.pop(ifindex, None)
        self.released.pop(ifindex, None)
        self.skipped.pop(ifindex, None)
        self.pinned.discard(ifindex)
        if ifindex in self.target.attached_indexes():
            self.target.detach_iface(ifindex, "interface is gone (the kernel removed its "
                                     "hooks with it)")
            self._retry_skipped()

    def _retry_skipped(self) -> None:
        """A place freed under --max-ifaces: the interfaces that waited for one get it."""
        for ifindex, name in sorted(self.skipped.items()):
            if len(self.target.attached_indexes()) >= self.max_ifaces:
                return
            del self.skipped[ifindex]
            self._seen(ifindex, name, time.monotonic())

    def resync(self, links: dict[int, str]) -> None:
        """Brings what is attached in line with a full dump of the link table."""
        with self._lock:
            self._resync(links)

    def _resync(self, links: dict[int, str]) -> None:
        for ifindex in list(self.target.attached_indexes()):
            if ifindex not in links:
                self._gone(ifindex)
        now = time.monotonic()
        for ifindex, name in sorted(links.items()):
            if name:
                self._seen(ifindex, name, now)

    def matched(self) -> dict[str, list[str]]:
        """pattern -> names of the attached interfaces it selects (for `mirror status`)."""
        out: dict[str, list[str]] = {p: [] for p in self.selector.patterns}
        for ifindex, name in sorted(self.target.attached_indexes().items()):
            if ifindex in self.pinned:
                continue
            pat = self.selector.pattern_of(name)
            if pat:
                out[pat].append(name)
        return {pat: sorted(names) for pat, names in out.items()}

    # --- the thread ----------------------------------------------------------------
    def start(self) -> None:
        """Subscribes, then dumps: an interface created between the two is seen twice
        (harmless), never missed. The first pass runs in the caller, so every interface
        matching at start is attached before start() returns."""
        self.sock = LinkSocket(self.rcvbuf)
        self.resync(self.sock.dump())
        self._thread = threading.Thread(target=self._loop, name="mirror-discovery",
                                        daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.sock], [], [], 0.2)
            if not ready:
                continue
            try:
                events = self.sock.read()
            except OSError as exc:
                self._recover(exc)
                continue
            for ev in events:
                try:
                    self.handle(ev)
                except Exception:       # one bad event must not stop discovery
                    log.exception("handling the link event of ifindex %d failed", ev.ifindex)

    def _recover(self, exc: OSError) -> None:
        """Events were lost (ENOBUFS: the buffer overflowed) or the read failed: the link
        table read in full says what they would have. Retried each second until it works,
        so that discovery never stops silently."""
        self.resyncs += 1
        if exc.errno == errno.ENOBUFS:
            log.warning("link events were lost (the netlink buffer overflowed): "
                        "re-reading the link table")
        else:
            log.error("reading link events failed (%s): re-reading the link table", exc)
        while not self._stop.is_set():
            try:
                self.resync(self.sock.dump())
                return
            except OSError as again:
                log.error("re-reading the link table failed (%s); retrying", again)
                self._stop.wait(1)

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(10)
            self._thread = None
        if self.sock:
            self.sock.close()
            self.sock = None
