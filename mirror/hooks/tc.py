"""The tc hooks (mirror.hooks): qdiscs and cls_bpf filters through pyroute2 and
mirror.rtnl, with ownership: this module adds and removes only what the caller says it
owns, and recognises this tool's filters by handle, priority and name.

Hook layouts:
  clsact  one clsact qdisc, filters on its ingress and egress hooks (lockless; leaves the
          root qdisc alone);
  htb     the design card's layout: an `ingress` qdisc and an `htb` root qdisc (handle 1:,
          no classes, so every packet takes htb's unshaped direct queue), filters on ffff:
          and 1:.
"""
from __future__ import annotations

import errno
import socket
from dataclasses import dataclass, field

import time

from pyroute2.netlink.exceptions import NetlinkError

from .. import rtnl
from ..errors import UsageError
from ..rtnl import get_qdisc

TC_H_ROOT = 0xFFFFFFFF
TC_H_INGRESS = 0xFFFFFFF1       # parent of the ingress or clsact qdisc
INGRESS_HANDLE = 0xFFFF0000     # ffff:
CLSACT_INGRESS = 0xFFFFFFF2     # ffff:fff2
CLSACT_EGRESS = 0xFFFFFFF3      # ffff:fff3
HTB_HANDLE = 0x00010000         # 1:
HTB_DIRECT_QLEN = 1000          # packets htb's direct queue holds

FILTER_PRIO = 1                 # run before other tools' filters: ours always passes on
FILTER_HANDLE = 0x4D49          # "MI"
FILTER_NAME_PREFIX = "tc-mirror:"     # + direction: the classifier's filters
SINK_FILTER_NAME = "tc-mirror-sink"    # the debug veth's drop filter (not a hook)
ETH_P_ALL = 0x0003


def fmt_handle(h: int) -> str:
    major, minor = h >> 16, h & 0xFFFF
    return f"{major:x}:" if not minor else f"{major:x}:{minor:x}"


@dataclass
class Filter:
    parent: int
    prio: int
    handle: int
    kind: str
    name: str
    protocol: int = ETH_P_ALL

    @property
    def ours(self) -> bool:
        return (self.kind == "bpf" and self.handle == FILTER_HANDLE
                and self.name.startswith(FILTER_NAME_PREFIX))


@dataclass
class Plan:
    """Where the filters go on one interface and which qdiscs must be created first."""
    hook: str
    parents: dict[str, int]                      # direction -> parent handle
    create: list[str] = field(default_factory=list)   # qdisc kinds to add, in order


def ingress_qdisc(ipr, ifindex: int) -> str | None:
    # One request for this device, not a dump of the host's qdiscs (mirror.rtnl). The
    # socket is opened in this process's namespace, which is the one `ipr` talks to.
    found = get_qdisc(ifindex, TC_H_INGRESS)
    return found[0] if found else None


def root_qdisc(ipr, ifindex: int) -> tuple[str, int] | None:
    """(kind, handle) of the root qdisc, None when the kernel lists none (a down link)."""
    return get_qdisc(ifindex, TC_H_ROOT)


def list_filters(ipr, ifindex: int, parent: int) -> list[Filter]:
    out = []
    try:
        msgs = ipr.get_filters(index=ifindex, parent=parent)
    except NetlinkError as exc:
        if exc.code in (errno.EINVAL, errno.ENOENT, errno.EOPNOTSUPP):
            return []
        raise
    for f in msgs:
        if not f["handle"]:
            continue    # the per-priority chain header, not a filter
        opts = f.get_attr("TCA_OPTIONS")
        name = (opts.get_attr("TCA_BPF_NAME") if opts is not None and
                hasattr(opts, "get_attr") else None) or ""
        proto = socket.ntohs(f["info"] & 0xFFFF)
        out.append(Filter(f["parent"], f["info"] >> 16, f["handle"],
                          f.get_attr("TCA_KIND") or "", name, proto))
    return out


def parents_in_use(ipr, ifindex: int) -> list[int]:
    """Every filter parent of this tool's layouts that exists on the interface now."""
    parents = []
    ing = ingress_qdisc(ipr, ifindex)
    if ing == "clsact":
        parents += [CLSACT_INGRESS, CLSACT_EGRESS]
    elif ing == "ingress":
        parents.append(INGRESS_HANDLE)
    root = root_qdisc(ipr, ifindex)
    if root and root[0] == "htb":
        parents.append(root[1])
    return parents


def our_filters(ipr, ifindex: int) -> list[Filter]:
    return [f for p in parents_in_use(ipr, ifindex)
            for f in list_filters(ipr, ifindex, p) if f.ours]


def plan(ipr, ifindex: int, ifname: str, hook: str, adopt_htb: bool = False) -> Plan:
    """Decides where the filters go without changing anything; UsageError if the
    interface's existing qdiscs leave no place that is safe to use."""
    ing = ingress_qdisc(ipr, ifindex)
    p = _plan_qdiscs(ipr, ifindex, ifname, hook, ing, adopt_htb)
    for direction, parent in p.parents.items():
        if _created_by(p, parent):
            continue        # a qdisc still to be created holds no filter yet
        for f in list_filters(ipr, ifindex, parent):
            if f.prio == FILTER_PRIO and not f.ours and (f.kind != "bpf" or
                                                         f.protocol != ETH_P_ALL):
                raise UsageError(
                    f"{ifname}: priority {FILTER_PRIO} of the {direction} hook "
                    f"({fmt_handle(parent)}) holds another tool's {f.kind} filter for another "
                    f"protocol or of another kind, and tc allows one kind and protocol per "
                    f"priority; move that filter to another priority first")
    return p


_PARENT_OWNER = {CLSACT_INGRESS: "clsact", CLSACT_EGRESS: "clsact",
                 INGRESS_HANDLE: "ingress", HTB_HANDLE: "htb"}
_LAYOUT_QDISCS = {"clsact": ("clsact",), "htb": ("ingress", "htb")}


def holds(kind: str, parent: int) -> bool:
    """Whether a qdisc of `kind` (one this tool creates) provides the filter parent."""
    return _PARENT_OWNER.get(parent) == kind


def _created_by(p: Plan, parent: int) -> bool:
    """Whether `parent` belongs to a qdisc the plan creates."""
    return _PARENT_OWNER.get(parent) in p.create


def _plan_qdiscs(ipr, ifindex, ifname, hook, ing, adopt_htb) -> Plan:
    if hook == "clsact":
        if ing == "ingress":
            raise UsageError(
                f"{ifname} has an 'ingress' qdisc, which excludes clsact; use --hook htb, "
                f"or remove it (tc qdisc del dev {ifname} ingress) if nothing needs it")
        return Plan(hook, {"ingress": CLSACT_INGRESS, "egress": CLSACT_EGRESS},
                    [] if ing == "clsact" else ["clsact"])
    create = []
    if ing == "clsact":
        ingress_parent = CLSACT_INGRESS     # share the existing clsact's ingress hook
    else:
        ingress_parent = INGRESS_HANDLE
        if ing is None:
            create.append("ingress")
    root = root_qdisc(ipr, ifindex)
    if root is None or root[1] >> 16 == 0:
        create.append("htb")                # the kernel's default root qdisc: replaceable
    elif not (root[0] == "htb" and root[1] == HTB_HANDLE and adopt_htb):
        kind, handle = root
        raise UsageError(
            f"{ifname} already has a root qdisc ({kind} {fmt_handle(handle)}) that this tool "
            f"did not create; --hook htb would replace it. Use --hook clsact (leaves the root "
            f"qdisc alone), or remove it yourself (tc qdisc del dev {ifname} root)")
    return Plan(hook, {"ingress": ingress_parent, "egress": HTB_HANDLE}, create)


def add_qdisc(ipr, ifindex: int, kind: str) -> None:
    if kind == "clsact":
        # On a plain socket (mirror.rtnl): attaching to a new interface races its first
        # packet, and pyroute2 spends about a millisecond per request.
        rtnl.add_ingress_qdisc(ifindex, "clsact", INGRESS_HANDLE, TC_H_INGRESS)
    elif kind == "ingress":
        rtnl.add_ingress_qdisc(ifindex, "ingress", INGRESS_HANDLE, TC_H_INGRESS)
    elif kind == "htb":
        # No classes and default class 0: every packet takes the direct queue, unshaped.
        # Its length is given explicitly: taken from txqueuelen, it would be 0 (drop
        # everything) on a device with txqueuelen 0.
        init = {"debug": 0, "defcls": 0, "direct_pkts": 0, "rate2quantum": 10, "version": 3}
        ipr.tc("add", "htb", ifindex, HTB_HANDLE, default=0,
               options={"attrs": [["TCA_HTB_INIT", init],
                                  ["TCA_HTB_DIRECT_QLEN", HTB_DIRECT_QLEN]]})
    else:
        raise ValueError(kind)


def del_qdisc(ipr, ifindex: int, kind: str) -> bool:
    """Removes a qdisc this tool created; False when it is already gone."""
    try:
        if kind in ("clsact", "ingress"):
            ipr.tc("del", kind, ifindex, INGRESS_HANDLE if kind == "ingress" else 0)
        elif kind == "htb":
            ipr.tc("del", "htb", ifindex, HTB_HANDLE)
        return True
    except NetlinkError as exc:
        if exc.code in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
            return False
        raise


def created_as_recorded(ipr, ifindex: int, record: dict, layout: str) -> list[str]:
    """The qdiscs a record says this tool created that the kernel agrees it could have:
    of a kind `layout` creates, at the handle this tool gives it, holding this tool's
    filter now (the filter goes in right after the qdisc, before the record is written),
    and for htb without classes (this tool adds none). A record is only a file: a forged
    or damaged one must not get an administrator's qdisc deleted, so anything it claims
    beyond this is ignored (and the qdisc kept)."""
    ours = {f.parent for f in our_filters(ipr, ifindex)}
    found = []
    for kind in record.get("created", []):
        if kind in found or kind not in _LAYOUT_QDISCS.get(layout, ()):
            continue
        if kind in ("clsact", "ingress"):
            if ingress_qdisc(ipr, ifindex) != kind:
                continue
        elif root_qdisc(ipr, ifindex) != ("htb", HTB_HANDLE) or \
                list(ipr.get_classes(index=ifindex)):
            continue
        if ours & {p for p, owner in _PARENT_OWNER.items() if owner == kind}:
            found.append(kind)
    return found


def qdisc_has_foreign_filters(ipr, ifindex: int, kind: str) -> bool:
    parents = {"clsact": [CLSACT_INGRESS, CLSACT_EGRESS], "ingress": [INGRESS_HANDLE],
               "htb": [HTB_HANDLE]}[kind]
    return any(not f.ours for p in parents for f in list_filters(ipr, ifindex, p))


def replace_filter(ipr, ifindex: int, parent: int, fd: int, direction: str) -> None:
    """Adds this tool's filter at `parent`, replacing a stale one of ours in place."""
    rtnl.replace_bpf_filter(ifindex, parent, FILTER_PRIO, ETH_P_ALL, FILTER_HANDLE, fd,
                            f"{FILTER_NAME_PREFIX}{direction}")


def del_filter(ipr, ifindex: int, parent: int) -> bool:
    try:
        ipr.tc("del-filter", "bpf", ifindex, handle=FILTER_HANDLE, parent=parent,
               prio=FILTER_PRIO, protocol=ETH_P_ALL)
        return True
    except NetlinkError as exc:
        if exc.code in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
            return False
        raise


def snapshot(ipr, ifindex: int) -> list[tuple]:
    """qdiscs and filters of an interface, comparable before and after (tests, status)."""
    qd = sorted((q.get_attr("TCA_KIND"), q["handle"], q["parent"])
                for q in ipr.get_qdiscs(index=ifindex))
    fl = sorted((f.parent, f.prio, f.handle, f.kind, f.name)
                for p in parents_in_use(ipr, ifindex) for f in list_filters(ipr, ifindex, p))
    return qd + fl


# --- the face of mirror.hooks, for the two tc layouts ---------------------------------------

class _TcLayout:
    """clsact and htb: the same filters, on the parents their qdiscs provide."""

    name = ""

    def check_supported(self) -> None:
        """cls_bpf and these qdiscs are in every kernel this tool runs on."""

    def check(self, ipr, ifindex: int, ifname: str, stale: dict | None) -> None:
        plan(ipr, ifindex, ifname, self.name, adopt_htb=self._adoptable(ipr, ifindex, stale))

    def _adoptable(self, ipr, ifindex: int, stale: dict | None) -> bool:
        """Whether hooks found on the interface are this tool's to replace in place:
        this tool's filters are there (a killed controller's), and no record of another
        layout says otherwise. A record alone is not enough: a forged one would make an
        administrator's htb root qdisc ours to take over."""
        if stale and stale.get("hook") != self.name:
            return False
        return bool(our_filters(ipr, ifindex))

    def attach(self, ipr, att, prog_fds: dict[str, int], stale: dict | None) -> list[str]:
        done = []
        adopt = self._adoptable(ipr, att.ifindex, stale)
        if stale:
            att.created = created_as_recorded(ipr, att.ifindex, stale, self.name)
            done.append(f"replacing the hooks of a stopped controller (pid "
                        f"{stale.get('pid')}) in place")
        elif adopt:
            done.append("found this tool's filters with no record; replacing them")
        p = plan(ipr, att.ifindex, att.ifname, self.name, adopt_htb=adopt)
        att.parents = p.parents
        # Each hook as soon as its qdisc exists, ingress first: on a new interface the
        # first packets are often the container's own, arriving at the ingress hook. The
        # caller writes the record once both hooks are in place (a file write is slower
        # than a netlink request): a failure in between is rolled back from `att`, and a
        # SIGKILL in that sub-millisecond window leaves filters the next controller
        # recognises and replaces (only a qdisc it then cannot know it created).
        for direction, parent in p.parents.items():
            for kind in p.create:
                if kind not in att.created and holds(kind, parent):
                    add_qdisc(ipr, att.ifindex, kind)
                    att.created.append(kind)
            replace_filter(ipr, att.ifindex, parent, prog_fds[direction], direction)
            att.ingress_at = att.ingress_at or time.monotonic()
        for kind in p.create:         # none left for this tool's layouts; kept safe
            if kind not in att.created:
                add_qdisc(ipr, att.ifindex, kind)
                att.created.append(kind)
        done.append(", ".join(f"{d} at {fmt_handle(par)}" for d, par in p.parents.items()))
        return done

    def detach(self, ipr, att) -> list[str]:
        """What this controller added (it knows: `att` is its own memory, not a file)."""
        return self._remove(ipr, att.ifindex, att.parents, att.created)

    def remove_record(self, ipr, record: dict, ifindex: int) -> list[str]:
        """What a stopped controller's record says it added, as far as the kernel
        agrees: only this tool's filters, on the parents of this layout, and only the
        qdiscs created_as_recorded() finds."""
        parents = {d: p for d, p in record.get("parents", {}).items()
                   if isinstance(p, int) and _PARENT_OWNER.get(p) in
                   ("clsact", "ingress", "htb") and
                   any(f.ours for f in list_filters(ipr, ifindex, p))}
        created = created_as_recorded(ipr, ifindex, record, self.name)
        done = self._remove(ipr, ifindex, parents, created)
        for kind in set(map(str, record.get("created", []))) - set(created):
            present = (ingress_qdisc(ipr, ifindex) == kind if kind in ("clsact", "ingress")
                       else (root_qdisc(ipr, ifindex) or ("",))[0] == kind)
            if present:
                done.append(f"kept {kind} qdisc (recorded as this tool's, but nothing in the "
                            "kernel shows it: no filter of this tool on it)")
        return done

    def _remove(self, ipr, ifindex: int, parents: dict, created: list[str]) -> list[str]:
        """The filters at `parents`, then the qdiscs `created`, unless someone else's
        filters now use them."""
        done = []
        for direction, parent in parents.items():
            if del_filter(ipr, ifindex, parent):
                done.append(f"filter {direction}")
        for kind in reversed(created):
            if qdisc_has_foreign_filters(ipr, ifindex, kind):
                done.append(f"kept {kind} qdisc (other filters use it)")
            elif del_qdisc(ipr, ifindex, kind):
                done.append(f"qdisc {kind}")
        return done

    def remove_unrecorded(self, ipr, ifindex: int) -> list[str]:
        return remove_unrecorded(ipr, ifindex)

    def ours(self, ipr, ifindex: int) -> list[str]:
        """Handles of this tool's filters on the parents of this layout's qdiscs (an htb
        attachment that shares an existing clsact's ingress hook shows there)."""
        return [fmt_handle(f.parent) for f in our_filters(ipr, ifindex)
                if _PARENT_OWNER.get(f.parent) in self.qdiscs]


class Clsact(_TcLayout):
    name = "clsact"
    qdiscs = ("clsact",)


class Htb(_TcLayout):
    name = "htb"
    qdiscs = ("ingress", "htb")


def remove_unrecorded(ipr, ifindex: int) -> list[str]:
    """Removes this tool's filters that no record describes (qdiscs are left alone: with
    no record, nothing says this tool created them)."""
    done = []
    for f in our_filters(ipr, ifindex):
        if del_filter(ipr, ifindex, f.parent):
            done.append(f"filter at {fmt_handle(f.parent)}")
    return done
