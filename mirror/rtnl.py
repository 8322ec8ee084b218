"""Single-object rtnetlink requests on a plain socket, where pyroute2 would dump every
object of the namespace and filter in Python: asking a device for its root or ingress
qdisc takes tens of microseconds this way, against milliseconds for a dump of all the
host's qdiscs (which grows with the number of interfaces). Attaching to a new interface
before it carries a packet depends on that difference."""
from __future__ import annotations

import errno
import socket
import struct

from pyroute2.netlink.exceptions import NetlinkError

RTM_GETQDISC = 38
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_ECHO = 0x1, 0x4, 0x8
TCA_KIND = 1
_NLMSGHDR = struct.Struct("=IHHII")
_TCMSG = struct.Struct("=BxxxiIII")
_RTATTR = struct.Struct("=HH")


def get_qdisc(ifindex: int, parent: int) -> tuple[str, int] | None:
    """(kind, handle) of the qdisc at `parent` (TC_H_ROOT or TC_H_INGRESS) of a device,
    None when there is none the kernel would list (a down device's noop root, no ingress
    qdisc). The reply to a non-dump RTM_GETQDISC goes to the TC multicast group unless
    NLM_F_ECHO asks for it; NLM_F_ACK ends the exchange either way."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       socket.NETLINK_ROUTE) as s:
        s.bind((0, 0))
        body = _TCMSG.pack(socket.AF_UNSPEC, ifindex, 0, parent, 0)
        s.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_GETQDISC,
                              NLM_F_REQUEST | NLM_F_ACK | NLM_F_ECHO, 1, 0) + body)
        found = None
        while True:
            data = s.recv(1 << 16)
            off = 0
            while off + _NLMSGHDR.size <= len(data):
                length, mtype = _NLMSGHDR.unpack_from(data, off)[:2]
                if length < _NLMSGHDR.size:
                    return found
                if mtype == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", data, off + _NLMSGHDR.size)[0]
                    if code in (0, errno.ENOENT):
                        return found
                    # As pyroute2 reports it, so callers catch one exception type.
                    raise NetlinkError(code)
                if mtype != RTM_GETQDISC:
                    _family, _idx, handle, _parent, _info = _TCMSG.unpack_from(
                        data, off + _NLMSGHDR.size)
                    kind = attr_string(data, off + _NLMSGHDR.size + _TCMSG.size, off + length,
                                       TCA_KIND)
                    if found is None and kind:
                        found = (kind, handle)
                off += (length + 3) & ~3


def attr_string(data: bytes, off: int, end: int, attr_type: int) -> str | None:
    """The NUL-terminated string attribute `attr_type` among the rtattrs in data[off:end]
    (a link's IFLA_IFNAME, a qdisc's TCA_KIND), or None."""
    while off + _RTATTR.size <= end:
        rta_len, rta_type = _RTATTR.unpack_from(data, off)
        if rta_len < _RTATTR.size:
            return None
        if rta_type == attr_type:
            return data[off + _RTATTR.size:off + rta_len].split(b"\0")[0].decode()
        off += (rta_len + 3) & ~3
    return None


# --- adding hooks: the same requests tc(8) sends, built here --------------------------
RTM_NEWQDISC, RTM_NEWTFILTER = 36, 44
NLM_F_EXCL, NLM_F_CREATE = 0x200, 0x400
TCA_OPTIONS = 2
TCA_BPF_FD, TCA_BPF_NAME, TCA_BPF_FLAGS = 6, 7, 8
TCA_BPF_FLAG_ACT_DIRECT = 1


def _attr(kind: int, payload: bytes) -> bytes:
    length = _RTATTR.size + len(payload)
    return _RTATTR.pack(length, kind) + payload + bytes(-length % 4)


def _request(mtype: int, flags: int, body: bytes) -> None:
    """Sends one request and waits for its acknowledgement; NetlinkError on refusal."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       socket.NETLINK_ROUTE) as s:
        s.bind((0, 0))
        s.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), mtype,
                              NLM_F_REQUEST | NLM_F_ACK | flags, 1, 0) + body)
        while True:
            data = s.recv(1 << 16)
            off = 0
            while off + _NLMSGHDR.size <= len(data):
                length, msg_type = _NLMSGHDR.unpack_from(data, off)[:2]
                if msg_type == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", data, off + _NLMSGHDR.size)[0]
                    if code:
                        raise NetlinkError(code)
                    return
                if length < _NLMSGHDR.size:
                    break
                off += (length + 3) & ~3


def add_ingress_qdisc(ifindex: int, kind: str, handle: int, parent: int) -> None:
    """`tc qdisc add dev IF clsact` (or `ingress`): qdiscs without options."""
    _request(RTM_NEWQDISC, NLM_F_CREATE | NLM_F_EXCL,
             _TCMSG.pack(socket.AF_UNSPEC, ifindex, handle, parent, 0) +
             _attr(TCA_KIND, kind.encode() + b"\0"))


def replace_bpf_filter(ifindex: int, parent: int, prio: int, protocol: int, handle: int,
                       fd: int, name: str) -> None:
    """`tc filter replace dev IF parent P prio N handle H bpf fd FD name NAME da`:
    creates the filter, or swaps the program of ours with that handle in place."""
    options = (_attr(TCA_BPF_FD, struct.pack("=I", fd)) +
               _attr(TCA_BPF_NAME, name.encode() + b"\0") +
               _attr(TCA_BPF_FLAGS, struct.pack("=I", TCA_BPF_FLAG_ACT_DIRECT)))
    info = (prio << 16) | socket.htons(protocol)
    _request(RTM_NEWTFILTER, NLM_F_CREATE,
             _TCMSG.pack(socket.AF_UNSPEC, ifindex, handle, parent, info) +
             _attr(TCA_KIND, b"bpf\0") + _attr(TCA_OPTIONS, options))
