"""The debug interface that mirrored clones are sent to.

`dummy` where the kernel has it. Otherwise a veth pair: clones leave through the near end
(where tcpdump records them) and the far end drops each one at its tc ingress with a
direct-action program returning TC_ACT_SHOT, so no clone ever enters a network stack.
The far end stays up: without carrier the clone would be dropped before packet taps run.
IPv6 is disabled on both ends so their own router solicitations and MLD reports never
show up in the capture.

`DebugLink` is the interface's life for one controller: found or created at start (with
the shared lock and record of mirror.ownership, so that controllers can share one and
the last one out removes it only if this tool made it), found again or recreated when it
disappears, released at shutdown. `is_mirror_iface` says whether an interface is a debug
interface or a sink end, which is never monitored."""
from __future__ import annotations

import errno
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

from pyroute2.netlink.exceptions import NetlinkError

from . import ownership
from .errors import UsageError
from .hooks import tc

log = logging.getLogger("mirror")

# The kernel's IFNAMSIZ is 16 bytes with the terminating NUL: names hold 15 characters.
MAX_IFNAME_LEN = 15
SINK_SUFFIX = "-sink"


@dataclass
class DebugIface:
    name: str
    ifindex: int
    kind: str           # dummy, veth or existing
    peer: str | None    # the sink end of a veth pair
    created: bool


def sink_name(name: str) -> str:
    """The far end's name: NAME-sink when that fits, else a prefix of NAME and a hash of
    the whole name, so that two long names sharing a prefix never get the same sink."""
    if len(name) + len(SINK_SUFFIX) <= MAX_IFNAME_LEN:
        return name + SINK_SUFFIX
    digest = f"{zlib.crc32(name.encode()) & 0xFFFF:04x}"
    keep = MAX_IFNAME_LEN - len(SINK_SUFFIX) - len(digest)
    return f"{name[:keep]}{digest}{SINK_SUFFIX}"


def check_name(name: str) -> None:
    if not name or len(name) > MAX_IFNAME_LEN or "/" in name or \
            any(c.isspace() for c in name):
        raise UsageError(f"bad debug interface name {name!r}: use 1-{MAX_IFNAME_LEN} "
                         "characters without spaces or '/'")


def _disable_ipv6(ipr, name: str) -> None:
    p = Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6")
    if not p.exists():
        return
    try:
        p.write_text("1")
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        # A container's /proc/sys is read-only. Netlink can still keep the interface
        # without IPv6 addresses: no link-local address, so no DAD and no router
        # solicitation in the capture (IN6_ADDR_GEN_MODE_NONE = 1).
        ipr.link("set", index=lookup(ipr, name), IFLA_AF_SPEC={"attrs": [
            ("AF_INET6", {"attrs": [("IFLA_INET6_ADDR_GEN_MODE", 1)]})]})


def lookup(ipr, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def has_sink(ipr, ifindex: int) -> bool:
    """True when this interface drops at its ingress with this tool's sink program."""
    return any(f.name == tc.SINK_FILTER_NAME
               for f in tc.list_filters(ipr, ifindex, tc.CLSACT_INGRESS))


def is_sink_peer_of(ipr, ifindex: int) -> bool:
    """True when this interface is the near end of a debug veth pair (any controller's):
    its peer, in this namespace, drops with this tool's sink program."""
    link = ipr.get_links(ifindex)[0]
    info = link.get_attr("IFLA_LINKINFO")
    if info is None or info.get_attr("IFLA_INFO_KIND") != "veth":
        return False
    peer = link.get_attr("IFLA_LINK")
    if not peer or link.get_attr("IFLA_LINK_NETNSID") is not None:
        return False        # a container's veth: its peer lives in another namespace
    return tc.ingress_qdisc(ipr, peer) == "clsact" and has_sink(ipr, peer)


def sink_problem(ipr, ifindex: int) -> str | None:
    """Why clones sent to this interface could reach a network stack, or None when they
    cannot: a dummy, or a veth whose far end is in this namespace and drops everything
    with this tool's sink. Asked of the kernel every time: a record saying this tool made
    the interface proves nothing about what it is now."""
    link = ipr.get_links(ifindex)[0]
    info = link.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
    if kind == "dummy":
        return None
    if kind != "veth":
        return f"it is a {kind or 'device of unknown kind'}, not a dummy or a veth pair"
    if link.get_attr("IFLA_LINK_NETNSID") is not None:
        return "its far end is in another network namespace"
    peer = link.get_attr("IFLA_LINK")
    try:
        if peer and has_sink(ipr, peer):
            return None
    except NetlinkError:
        pass
    return "its far end does not drop what it receives (no sink filter)"


def check_existing(ipr, name: str, ifindex: int) -> None:
    """Refuses an existing interface as debug interface unless clones sent there can
    reach no network (sink_problem). A typo must never send clones out of a NIC, and a
    record in the state directory is no reason to believe otherwise."""
    why = sink_problem(ipr, ifindex)
    if why:
        raise UsageError(
            f"{name} exists and is not a mirror debug interface ({why}): clones sent there "
            f"could leave the host. Pick a name that does not exist (it will be created), or "
            f"a dummy interface")


def ensure(ipr, name: str, sink_fd_factory) -> DebugIface:
    """Returns the debug interface, creating it when missing. `sink_fd_factory()` yields
    the fd of the drop program, loaded only when a veth pair is needed."""
    check_name(name)
    idx = lookup(ipr, name)
    if idx is not None:
        return DebugIface(name, idx, "existing", None, created=False)
    try:
        ipr.link("add", ifname=name, kind="dummy")
        kind, peer = "dummy", None
    except NetlinkError as exc:
        if exc.code not in (errno.EOPNOTSUPP, errno.ENOENT, errno.EINVAL):
            raise
        peer = sink_name(name)
        ipr.link("add", ifname=name, kind="veth", peer=peer)
        kind = "veth"
    idx = lookup(ipr, name)
    try:
        for n in filter(None, (name, peer)):
            _disable_ipv6(ipr, n)
        if peer:
            peer_idx = lookup(ipr, peer)
            tc.add_qdisc(ipr, peer_idx, "clsact")
            ipr.tc("add-filter", "bpf", peer_idx, handle=tc.FILTER_HANDLE,
                   fd=sink_fd_factory(), name=tc.SINK_FILTER_NAME,
                   parent=tc.CLSACT_INGRESS, prio=tc.FILTER_PRIO, protocol=tc.ETH_P_ALL,
                   direct_action=True)
            ipr.link("set", index=peer_idx, state="up")
        # Large MTU: a GSO super-packet clone is forwarded whole.
        ipr.link("set", index=idx, state="up", mtu=65535)
    except Exception:
        ipr.link("del", index=idx)
        raise
    return DebugIface(name, idx, kind, peer, created=True)


def remove(ipr, name: str, ifindex: int | None = None) -> bool:
    """Deletes the debug interface (a veth's peer goes with it); False if already gone.
    With `ifindex`, only that interface, and only while it still has this name: an
    interface that took the name since is someone else's."""
    idx = lookup(ipr, name)
    if idx is None or (ifindex is not None and idx != ifindex):
        return False
    try:
        ipr.link("del", index=idx)
    except NetlinkError as exc:
        if exc.code != errno.ENODEV:
            raise
        return False
    return True


def is_mirror_iface(ipr, ifindex: int, name: str, event=None) -> bool:
    """Whether an interface is a debug interface or the sink end of one (any controller's,
    by record or by its sink filter): never monitored, mirroring clones would loop.
    `event`, the link event that announced it (mirror.discovery.LinkEvent), may settle
    it without a request."""
    if event is not None and event.link_kind == "veth" and event.peer_elsewhere:
        # A container's host end: its peer is in another namespace, and a debug veth
        # keeps both ends in one. Deciding from the event spares a link request and the
        # records' reads, about 2 ms before the first hook (bench/attach.py).
        return False
    names = set()
    for rec in ownership.records("debug"):
        names |= {rec.get("name"), rec.get("peer")}
    if name in names:
        return True
    try:
        # A sink sits on a clsact qdisc: without one (a new interface), no filter dump is
        # needed, and the attach starts a few milliseconds sooner.
        if tc.ingress_qdisc(ipr, ifindex) == "clsact" and has_sink(ipr, ifindex):
            return True         # a sink end
        return is_sink_peer_of(ipr, ifindex)   # another controller's debug end
    except NetlinkError:
        return True     # gone already


class DebugLink:
    """The debug interface of one controller, from start to shutdown. Controllers may
    share one: each holds a shared lock on it, only the record written by the creator
    says this tool made it, and the last user out removes it."""

    def __init__(self, ipr, name: str, sink_fd_factory):
        """`sink_fd_factory()` gives the drop program's fd, loaded only if a veth pair
        is created."""
        self.ipr = ipr
        self.name = name
        self._sink_fd = sink_fd_factory
        self.iface: DebugIface | None = None
        self.recreated_total = 0
        self._lock: ownership.Lock | None = None
        self._missing_logged = False
        self.unsafe: str | None = None      # why clones must not go there now (recheck)

    @property
    def ifindex(self) -> int:
        return self.iface.ifindex if self.iface else 0

    @property
    def target_ifindex(self) -> int:
        """Where clones and request frames may go now: the interface, or 0 (nowhere:
        the classifier counts them in no_debug_iface) while it is not safe."""
        return 0 if self.unsafe else self.ifindex

    def recheck(self) -> bool:
        """Asks the kernel again whether clones sent to the interface reach no network
        (sink_problem): its far end may have been moved into another namespace, or its
        sink filter removed, while running. True when that changed, so the classifier
        must be pointed at target_ifindex; says so either way. A missing interface is
        replace()'s business, not this."""
        try:
            why = sink_problem(self.ipr, self.iface.ifindex)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return False
            raise
        if why == self.unsafe:
            return False
        if why:
            log.error("debug interface %s is no longer safe to mirror to: %s; no clone or "
                      "request frame goes there until it is repaired or removed (then "
                      "recreated)", self.name, why)
        else:
            log.info("debug interface %s is safe again; mirroring to it resumes", self.name)
        self.unsafe = why
        return True

    def setup(self) -> DebugIface:
        """Finds or creates the interface. Only a controller holding the lock exclusively
        may create it: two controllers starting together would otherwise both try, and
        one fail on EEXIST. The creator shares the lock once the interface is complete; a
        controller that finds it shared uses what is there."""
        self._lock = ownership.Lock(f"debug-{self.name}")
        creator = self._lock.acquire(wait=0.5)
        if not creator and not self._lock.acquire(shared=True, wait=30):
            raise UsageError(f"debug interface {self.name} is being set up by another "
                             "controller that has not finished; try again")
        self.iface = ensure(self.ipr, self.name, self._sink_fd)
        if self.iface.created:
            self._write_record()
        else:
            check_existing(self.ipr, self.name, self.iface.ifindex)
        if creator:
            self._lock.share()
        log.info("debug interface %s (ifindex %d, %s%s)", self.name, self.iface.ifindex,
                 self.iface.kind, ", created" if self.iface.created else "")
        return self.iface

    def _recorded(self, ifindex: int) -> bool:
        rec = ownership.read("debug", self.name)
        return bool(rec and rec.get("ifindex") == ifindex)

    def _as_recorded(self, rec: dict) -> bool:
        """Whether the interface is still what the record says this tool made: of the
        recorded kind and, for a veth pair, with the recorded far end, which drops with
        the sink. A record that claims more (forged, or describing an interface that was
        replaced by another of the same ifindex) removes nothing."""
        try:
            link = self.ipr.get_links(self.iface.ifindex)[0]
            info = link.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
            if kind != rec.get("kind") or kind not in ("dummy", "veth"):
                return False
            if kind == "dummy":
                return True
            peer_index = link.get_attr("IFLA_LINK")
            if not peer_index:
                return False
            peer = self.ipr.get_links(peer_index)[0]
            return (peer.get_attr("IFLA_IFNAME") == rec.get("peer") and
                    sink_problem(self.ipr, self.iface.ifindex) is None)
        except (NetlinkError, TypeError):
            return False

    def _write_record(self) -> None:
        d = self.iface
        ownership.write("debug", d.name, {"name": d.name, "ifindex": d.ifindex,
                                          "kind": d.kind, "peer": d.peer, "created": True,
                                          "pid": os.getpid()})

    def present(self) -> bool:
        """Whether the interface is still there under its name."""
        try:
            return self.ipr.get_links(self.iface.ifindex)[0].get_attr("IFLA_IFNAME") == \
                self.name
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return False
            raise

    def replace(self) -> bool:
        """The interface was deleted (or renamed away): recreates it, or takes the one
        someone else recreated. True when there is one again (the classifier must then
        be pointed at the new ifindex)."""
        if not self._missing_logged:
            log.warning("debug interface %s disappeared; recreating it", self.name)
            self._missing_logged = True
        if self.iface.created and self._recorded(self.iface.ifindex):
            ownership.remove("debug", self.name)    # ours, and gone: not someone's new one
        try:
            if (idx := lookup(self.ipr, self.name)) is not None:
                check_existing(self.ipr, self.name, idx)
            found = ensure(self.ipr, self.name, self._sink_fd)
        except (NetlinkError, OSError, UsageError) as exc:
            log.warning("cannot recreate %s yet: %s", self.name, exc)
            return False
        self.iface = found
        self.unsafe = None          # made here, or found and checked just above
        if found.created:
            self._write_record()
        self.recreated_total += 1
        self._missing_logged = False
        log.info("debug interface %s %s (ifindex %d)", self.name,
                 "recreated" if found.created else "found again", found.ifindex)
        return True

    def release(self) -> None:
        """Removes the interface if this tool created it and no other controller still
        uses it (the shared lock becomes exclusive only for the last user)."""
        if self._lock is None:
            return
        last = self._lock.try_exclusive()
        if last:
            rec = ownership.read("debug", self.name)
            if self.iface and rec and rec.get("created") is True and \
                    rec.get("ifindex") == self.iface.ifindex and self._as_recorded(rec):
                if remove(self.ipr, self.name, self.iface.ifindex):
                    log.info("removed debug interface %s", self.name)
                ownership.remove("debug", self.name)
            else:
                # Not provably the one this tool made (no record, another ifindex, or
                # no longer the recorded veth pair with its sink): someone else's now.
                log.info("debug interface %s left in place: not the one recorded as made "
                         "by this tool (record %s)", self.name,
                         "missing" if not rec else f"for ifindex {rec.get('ifindex')}")
        else:
            log.info("debug interface %s is still used by another controller; leaving it",
                     self.name)
        self._lock.release(remove=last)
        self._lock = None
        self.iface = None
