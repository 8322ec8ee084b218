"""The request frame of an error response, written onto the debug interface so that the
capture holds it: the classifier kept it (the request went by before its response marked
the connection), and only user space can put it on the wire. It reaches the capture after
the response's clone; the capture sidecar restores the order in its files.

Frames are queued as the events of one ring-buffer poll are handled and written together
with one sendmmsg(2), each addressed to the debug interface by its ifindex (a sockaddr_ll
per message, the socket bound to nothing): no name is looked up between deciding where a
frame goes and sending it, so a rename in between cannot send it to another interface."""
from __future__ import annotations

import ctypes
import logging
import os
import socket

log = logging.getLogger("mirror")

ETH_P_ALL = 0x0003
BATCH = 256             # frames per sendmmsg call


class _SockaddrLL(ctypes.Structure):
    _fields_ = [("sll_family", ctypes.c_ushort), ("sll_protocol", ctypes.c_ushort),
                ("sll_ifindex", ctypes.c_int), ("sll_hatype", ctypes.c_ushort),
                ("sll_pkttype", ctypes.c_ubyte), ("sll_halen", ctypes.c_ubyte),
                ("sll_addr", ctypes.c_ubyte * 8)]


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.POINTER(_Iovec)), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.sendmmsg.argtypes = [ctypes.c_int, ctypes.POINTER(_Mmsghdr), ctypes.c_uint,
                           ctypes.c_int]
_libc.sendmmsg.restype = ctypes.c_int


class RequestWriter:
    """Writes request frames onto the debug interface (AF_PACKET, needs CAP_NET_RAW), where
    the sink drops them like clones after the capture has seen them."""

    def __init__(self):
        self._sock: socket.socket | None = None
        self._queue: list[tuple[bytes, int]] = []
        self.written = 0
        self.failed = 0
        self.calls = 0          # sendmmsg calls made

    def write(self, frame: bytes, ifindex: int) -> None:
        """Queues a frame for the interface `ifindex`; flush() sends what is queued."""
        self._queue.append((frame, ifindex))
        if len(self._queue) >= BATCH:
            self.flush()

    def flush(self) -> None:
        queued, self._queue = self._queue, []
        for start in range(0, len(queued), BATCH):
            self._send(queued[start:start + BATCH])

    def _send(self, batch: list[tuple[bytes, int]]) -> None:
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        except OSError as exc:
            self._failed(len(batch), exc)
            return
        n = len(batch)
        msgs = (_Mmsghdr * n)()
        addrs = (_SockaddrLL * n)()
        iovs = (_Iovec * n)()
        bufs = []
        for i, (frame, ifindex) in enumerate(batch):
            buf = ctypes.create_string_buffer(frame, len(frame))
            bufs.append(buf)
            iovs[i].iov_base, iovs[i].iov_len = ctypes.addressof(buf), len(frame)
            addrs[i].sll_family = socket.AF_PACKET
            addrs[i].sll_protocol = socket.htons(ETH_P_ALL)
            addrs[i].sll_ifindex = ifindex
            hdr = msgs[i].msg_hdr
            hdr.msg_name = ctypes.addressof(addrs[i])
            hdr.msg_namelen = ctypes.sizeof(_SockaddrLL)
            hdr.msg_iov = ctypes.pointer(iovs[i])
            hdr.msg_iovlen = 1
        sent = 0
        while sent < n:
            self.calls += 1
            first = ctypes.cast(ctypes.addressof(msgs) + sent * ctypes.sizeof(_Mmsghdr),
                                ctypes.POINTER(_Mmsghdr))
            ret = _libc.sendmmsg(self._sock.fileno(), first, n - sent, 0)
            if ret < 0:
                err = ctypes.get_errno()
                # The first message failed: count it and go on with the rest.
                self._failed(1, OSError(err, os.strerror(err)))
                sent += 1
                continue
            self.written += ret
            sent += ret

    def _failed(self, n: int, exc: OSError) -> None:
        before = self.failed
        self.failed += n
        if before == 0 or before // 1000 != self.failed // 1000:
            log.warning("cannot write a request frame to the debug interface (%d so "
                        "far): %s", self.failed, exc)

    def close(self) -> None:
        self.flush()
        if self._sock:
            self._sock.close()
            self._sock = None
