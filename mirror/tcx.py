"""The tcx hook (Linux 6.6+): BPF links on a device's ingress and egress, no qdisc.

Why a third layout: adding or deleting a qdisc on a running device (clsact and ingress
included) makes the kernel deactivate the device's transmit queues for a moment
(qdisc_graft -> dev_deactivate), and a packet sent in that moment is dropped. A tcx link
is attached and released without touching any qdisc. Links belong to the file
descriptors this process holds: when the controller exits, however it exits, the kernel
detaches them, so a killed controller leaves nothing behind."""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass

from . import bpfsys
from .bpfsys import IdAttr, LinkCreateAttr, LinkInfo, ProgInfo
from .errors import UsageError

BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47
BPF_LINK_TYPE_TCX = 11
BPF_F_BEFORE = 1 << 3
ATTACH_TYPES = {"ingress": BPF_TCX_INGRESS, "egress": BPF_TCX_EGRESS}


def check_supported() -> None:
    major, minor = (int(x) for x in platform.release().split(".")[:2])
    if (major, minor) < (6, 6):
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


def links(ifindex: int | None = None) -> list[Link]:
    """tcx links in the kernel (all network namespaces: filter by ifindex with care)."""
    out, next_id = [], 0
    directions = {v: k for k, v in ATTACH_TYPES.items()}
    while True:
        attr = IdAttr(start_id=next_id)
        try:
            bpfsys.check(bpfsys.BPF_LINK_GET_NEXT_ID, attr)
        except OSError:
            return out
        next_id = attr.next_id
        try:
            fd = bpfsys.check(bpfsys.BPF_LINK_GET_FD_BY_ID, IdAttr(start_id=next_id))
        except OSError:
            continue        # released meanwhile
        try:
            info = LinkInfo()
            bpfsys.obj_info(fd, info)
        finally:
            os.close(fd)
        if info.type != BPF_LINK_TYPE_TCX or (ifindex and info.ifindex != ifindex):
            continue
        out.append(Link(info.id, info.ifindex, directions.get(info.attach_type, "?"),
                        info.prog_id, _prog_name(info.prog_id)))
