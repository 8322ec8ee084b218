"""Network namespace identity as this namespace sees it.

A veth's host-side end carries IFLA_LINK_NETNSID: the id (nsid) under which this
namespace knows the namespace of its peer. The same id comes back from RTM_GETNSID asked
with a file descriptor of that namespace (a bind mount such as /run/netns/NAME, or
/proc/PID/ns/net), so comparing the two matches an interface with the container whose
namespace its peer lives in, without entering any namespace and without a capability.
Plain rtnetlink on a socket of its own, as mirror.rtnl does: one request per question."""
from __future__ import annotations

import errno
import os
import socket
import struct

RTM_NEWLINK, RTM_GETLINK = 16, 18
RTM_NEWNSID, RTM_GETNSID = 88, 90
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
IFLA_LINK_NETNSID = 37
NETNSA_NSID, NETNSA_FD = 1, 3
NETNSA_NSID_NOT_ASSIGNED = -1
NETNS_DIR = "/run/netns"        # where `ip netns add` (and CNI, podman) bind-mount them

_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")
_RTGENMSG = struct.Struct("=Bxxx")
_RTATTR = struct.Struct("=HH")


class InterfaceGone(LookupError):
    """The interface asked about does not exist (any more)."""


def _attrs(data: bytes, off: int, end: int) -> dict[int, bytes]:
    out = {}
    while off + _RTATTR.size <= end:
        length, kind = _RTATTR.unpack_from(data, off)
        if length < _RTATTR.size:
            break
        out[kind & 0x3FFF] = data[off + _RTATTR.size:off + length]
        off += (length + 3) & ~3
    return out


class NsidSocket:
    """One rtnetlink socket for a round of questions (a resolver pass)."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                  socket.NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self.sock.settimeout(5)     # the kernel answers at once; this only bounds a bug
        self._seq = 0

    def __enter__(self) -> "NsidSocket":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def _ask(self, mtype: int, body: bytes, want: int) -> tuple[bytes, int, int]:
        """Sends one request; (reply, start of its body, its end). OSError(errno) when
        the kernel answers with an error."""
        self._seq += 1
        self.sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), mtype, NLM_F_REQUEST,
                                      self._seq, 0) + body)
        while True:
            data = self.sock.recv(1 << 16)
            off = 0
            while off + _NLMSGHDR.size <= len(data):
                length, rtype, _flags, seq, _pid = _NLMSGHDR.unpack_from(data, off)
                if length < _NLMSGHDR.size:
                    break
                if seq == self._seq:
                    if rtype == NLMSG_ERROR:
                        code = -struct.unpack_from("=i", data, off + _NLMSGHDR.size)[0]
                        raise OSError(code, os.strerror(code))
                    if rtype == want:
                        return data, off + _NLMSGHDR.size, off + length
                off += (length + 3) & ~3

    def peer_nsid(self, ifindex: int) -> int | None:
        """The nsid of the namespace the interface's peer lives in, None when it has no
        peer in another namespace. InterfaceGone when there is no such interface."""
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, ifindex, 0, 0)
        try:
            data, start, end = self._ask(RTM_GETLINK, body, RTM_NEWLINK)
        except OSError as exc:
            if exc.errno in (errno.ENODEV, errno.ENOENT):
                raise InterfaceGone(ifindex) from None
            raise
        raw = _attrs(data, start + _IFINFOMSG.size, end).get(IFLA_LINK_NETNSID)
        if raw is None or len(raw) < 4:
            return None
        nsid = struct.unpack("=i", raw[:4])[0]
        return nsid if nsid >= 0 else None

    def nsid_of_fd(self, fd: int) -> int | None:
        """The nsid this namespace knows the namespace of `fd` by; None when it knows it
        by none (no interface here has a peer there). OSError(EINVAL) when `fd` is not a
        network namespace."""
        body = _RTGENMSG.pack(socket.AF_UNSPEC) + _RTATTR.pack(8, NETNSA_FD) + \
            struct.pack("=I", fd)
        data, start, end = self._ask(RTM_GETNSID, body, RTM_NEWNSID)
        raw = _attrs(data, start + _RTGENMSG.size, end).get(NETNSA_NSID)
        if raw is None or len(raw) < 4:
            return None
        nsid = struct.unpack("=i", raw[:4])[0]
        return None if nsid == NETNSA_NSID_NOT_ASSIGNED else nsid

    def identify(self, paths: tuple[str, ...]) -> tuple[int | None, int | None]:
        """(nsid, inode) of the network namespace at the first of `paths` that opens as
        one; (None, None) when none does (the container stopped, its process is not
        visible from here, the path is not mounted here)."""
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                return self.nsid_of_fd(fd), os.fstat(fd).st_ino
            except OSError:
                continue        # not a network namespace (a stale, unmounted file)
            finally:
                os.close(fd)
        return None, None

    def named(self, directory: str = NETNS_DIR) -> dict[int, str]:
        """nsid -> name of the namespaces bind-mounted in `directory` that this namespace
        has an id for (read afresh each time: names come and go with `ip netns`)."""
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            return {}
        out: dict[int, str] = {}
        for name in names:
            nsid, _ino = self.identify((os.path.join(directory, name),))
            if nsid is not None:
                out.setdefault(nsid, name)
        return out
