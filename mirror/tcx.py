"""The tcx hook (Linux 6.6+): BPF links on a device's ingress and egress, no qdisc.

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
from dataclasses import dataclass

from . import bpfsys
from .bpfsys import IdAttr, LinkCreateAttr, ProgInfo, QueryAttr
from .errors import UsageError

BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47
BPF_F_BEFORE = 1 << 3
ATTACH_TYPES = {"ingress": BPF_TCX_INGRESS, "egress": BPF_TCX_EGRESS}


def supported() -> bool:
    """Whether this kernel has tcx (Linux 6.6 or newer), from its release string."""
    major, minor = (int(x) for x in platform.release().split(".")[:2])
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
