"""The tcx hooks (mirror.hooks; Linux 6.6+): BPF links on a device's ingress and egress, no
qdisc.

Why a third layout: adding or deleting a qdisc on a running device (clsact and ingress
included) makes the kernel deactivate the device's transmit queues for a moment
(qdisc_graft -> dev_deactivate), and a packet sent in that moment is dropped. A tcx link
is attached and released without touching any qdisc. Links belong to the file
descriptors this process holds: when the controller exits, however it exits, the kernel
detaches them, so a killed controller leaves nothing behind."""
from __future__ import annotations

import ctypes
import errno
import os
import platform
import time
from dataclasses import dataclass

from .. import bpfsys
from ..bpfsys import IdAttr, LinkCreateAttr, ProgInfo, QueryAttr
from ..errors import UsageError
from . import tc

BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47
BPF_F_BEFORE = 1 << 3
ATTACH_TYPES = {"ingress": BPF_TCX_INGRESS, "egress": BPF_TCX_EGRESS}


# The classifier's program names (bcc names a program after its function): how a tcx link
# is recognised as this tool's.
PROG_NAMES = ("mirror_ingress", "mirror_egress")


def supported(release: str | None = None) -> bool:
    """Whether the kernel (`release`, default this one's) has tcx: Linux 6.6 and newer."""
    major, minor = (int(x) for x in
                    (release or platform.release()).split("-")[0].split(".")[:2])
    return (major, minor) >= (6, 6)


def check_supported() -> None:
    if not supported():
        raise UsageError(f"--hook tcx needs Linux 6.6 or newer (this is {platform.release()}); "
                         "use --hook clsact")


def attach(prog_fd: int, ifindex: int, direction: str, first: bool = True) -> int:
    """Attaches a sched_cls program as a tcx link; returns the link's fd (close = detach).
    The program goes first in the device's tcx chain (BPF_F_BEFORE with no anchor): a
    program ahead of it that returns a final verdict would hide packets from the mirror,
    while the mirror itself always says "next", so everyone behind it still runs."""
    attr = LinkCreateAttr(prog_fd=prog_fd, target_ifindex=ifindex,
                       attach_type=ATTACH_TYPES[direction],
                       flags=BPF_F_BEFORE if first else 0)
    return bpfsys.check(bpfsys.BPF_LINK_CREATE, attr, "BPF_LINK_CREATE")


@dataclass
class Link:
    id: int
    ifindex: int
    direction: str
    prog_id: int
    prog_name: str


def _prog_name(prog_id: int) -> str:
    try:
        fd = bpfsys.check(bpfsys.BPF_PROG_GET_FD_BY_ID, IdAttr(start_id=prog_id))
    except OSError:
        return ""
    try:
        info = ProgInfo()
        bpfsys.obj_info(fd, info)
        return info.name.decode(errors="replace")
    finally:
        os.close(fd)


def links(ifindex: int) -> list[Link]:
    """The tcx links on this network namespace's interface `ifindex` (BPF_PROG_QUERY on the
    device: another namespace's interface with the same index is not looked at)."""
    out = []
    for direction, attach_type in ATTACH_TYPES.items():
        prog_ids = (ctypes.c_uint32 * 64)()
        link_ids = (ctypes.c_uint32 * 64)()
        attr = QueryAttr(target_ifindex=ifindex, attach_type=attach_type, count=64,
                         prog_ids=ctypes.addressof(prog_ids),
                         link_ids=ctypes.addressof(link_ids))
        try:
            bpfsys.check(bpfsys.BPF_PROG_QUERY, attr, "BPF_PROG_QUERY")
        except OSError as exc:
            if exc.errno in (errno.ENODEV, errno.EINVAL, errno.ENOENT):
                continue        # no such device here, or no tcx on this kernel
            raise
        for i in range(min(attr.count, 64)):
            if link_ids[i]:     # 0: a program attached without a link (not ours)
                out.append(Link(link_ids[i], ifindex, direction, prog_ids[i],
                                _prog_name(prog_ids[i])))
    return out


class Tcx:
    """The face of mirror.hooks for tcx links. Links belong to this process's
    descriptors: nothing of a stopped controller is left to adopt or remove, so its
    record describes nothing in the kernel."""

    name = "tcx"

    def check_supported(self) -> None:
        check_supported()

    def check(self, ipr, ifindex: int, ifname: str, stale: dict | None) -> None:
        """tcx links never disturb anyone's qdiscs or filters."""

    def attach(self, ipr, att, prog_fds: dict[str, int], stale: dict | None) -> list[str]:
        done = []
        if not stale:
            # The classifier twice on one device would clone every packet twice.
            removed = tc.remove_unrecorded(ipr, att.ifindex)
            if removed:
                done.append(f"removed this tool's tc filters found with no record: "
                            f"{', '.join(removed)}")
        # Links first, record after (the caller writes it): a link belongs to this
        # process's descriptor, so a controller killed before the record is written
        # leaves nothing in the kernel.
        for direction in ("ingress", "egress"):
            att.links[direction] = attach(prog_fds[direction], att.ifindex, direction)
            att.ingress_at = att.ingress_at or time.monotonic()
        return done + ["tcx links: ingress, egress"]

    def detach(self, ipr, att) -> list[str]:
        for fd in att.links.values():
            os.close(fd)                # releases the link: detached
        done = ["tcx links released"] if att.links else []
        att.links.clear()
        return done

    def remove_record(self, ipr, record: dict, ifindex: int) -> list[str]:
        return []

    def remove_unrecorded(self, ipr, ifindex: int) -> list[str]:
        return []

    def ours(self, ipr, ifindex: int) -> list[str]:
        return [f"tcx:{link.direction}" for link in links(ifindex)
                if link.prog_name in PROG_NAMES]
