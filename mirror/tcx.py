"""The tcx hook (Linux 6.6+): BPF links on a device's ingress and egress, no qdisc.

Why a third layout: adding or deleting a qdisc on a running device (clsact and ingress
included) makes the kernel deactivate the device's transmit queues for a moment
(qdisc_graft -> dev_deactivate), and a packet sent in that moment is dropped. A tcx link
is attached and released without touching any qdisc. Links belong to the file
descriptors this process holds: when the controller exits, however it exits, the kernel
detaches them, so a killed controller leaves nothing behind."""
from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import dataclass

from .errors import UsageError

BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_LINK_CREATE = 28
BPF_LINK_GET_FD_BY_ID = 30
BPF_LINK_GET_NEXT_ID = 31
BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47
BPF_LINK_TYPE_TCX = 11
ATTACH_TYPES = {"ingress": BPF_TCX_INGRESS, "egress": BPF_TCX_EGRESS}

_SYS_BPF = 321  # x86_64
_libc = ctypes.CDLL(None, use_errno=True)


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    ret = _libc.syscall(_SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


class _LinkCreate(ctypes.Structure):
    _fields_ = [("prog_fd", ctypes.c_uint32), ("target_ifindex", ctypes.c_uint32),
                ("attach_type", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("relative_fd", ctypes.c_uint32), ("_pad", ctypes.c_uint32),
                ("expected_revision", ctypes.c_uint64)]


class _IdAttr(ctypes.Structure):
    _fields_ = [("start_id", ctypes.c_uint32), ("next_id", ctypes.c_uint32),
                ("open_flags", ctypes.c_uint32)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32),
                ("info", ctypes.c_uint64)]


class _LinkInfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("prog_id", ctypes.c_uint32), ("_pad", ctypes.c_uint32),
                ("ifindex", ctypes.c_uint32), ("attach_type", ctypes.c_uint32),
                ("_rest", ctypes.c_uint8 * 32)]


class _ProgInfo(ctypes.Structure):
    _fields_ = [("_head", ctypes.c_uint8 * 64), ("name", ctypes.c_char * 16),
                ("_rest", ctypes.c_uint8 * 160)]


def check_supported() -> None:
    major, minor = (int(x) for x in platform.release().split(".")[:2])
    if (major, minor) < (6, 6):
        raise UsageError(f"--hook tcx needs Linux 6.6 or newer (this is {platform.release()}); "
                         "use --hook clsact")


BPF_F_BEFORE = 1 << 3


def attach(prog_fd: int, ifindex: int, direction: str, first: bool = True) -> int:
    """Attaches a sched_cls program as a tcx link; returns the link's fd (close = detach).
    The program goes first in the device's tcx chain (BPF_F_BEFORE with no anchor): a
    program ahead of it that returns a final verdict would hide packets from the mirror,
    while the mirror itself always says "next", so everyone behind it still runs."""
    attr = _LinkCreate(prog_fd=prog_fd, target_ifindex=ifindex,
                       attach_type=ATTACH_TYPES[direction],
                       flags=BPF_F_BEFORE if first else 0)
    return _bpf(BPF_LINK_CREATE, attr)


@dataclass
class Link:
    id: int
    ifindex: int
    direction: str
    prog_id: int
    prog_name: str


def _obj_info(fd: int, info: ctypes.Structure) -> None:
    _bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info),
                                           info=ctypes.addressof(info)))


def _prog_name(prog_id: int) -> str:
    try:
        fd = _bpf(BPF_PROG_GET_FD_BY_ID, _IdAttr(start_id=prog_id))
    except OSError:
        return ""
    try:
        info = _ProgInfo()
        _obj_info(fd, info)
        return info.name.decode(errors="replace")
    finally:
        os.close(fd)


def links(ifindex: int | None = None) -> list[Link]:
    """tcx links in the kernel (all network namespaces: filter by ifindex with care)."""
    out, next_id = [], 0
    directions = {v: k for k, v in ATTACH_TYPES.items()}
    while True:
        attr = _IdAttr(start_id=next_id)
        try:
            _bpf(BPF_LINK_GET_NEXT_ID, attr)
        except OSError:
            return out
        next_id = attr.next_id
        try:
            fd = _bpf(BPF_LINK_GET_FD_BY_ID, _IdAttr(start_id=next_id))
        except OSError:
            continue        # released meanwhile
        try:
            info = _LinkInfo()
            _obj_info(fd, info)
        finally:
            os.close(fd)
        if info.type != BPF_LINK_TYPE_TCX or (ifindex and info.ifindex != ifindex):
            continue
        out.append(Link(info.id, info.ifindex, directions.get(info.attach_type, "?"),
                        info.prog_id, _prog_name(info.prog_id)))
