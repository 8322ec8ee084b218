"""The request frame of an error response, written onto the debug interface so that the
capture holds it: the classifier kept it (the request went by before its response marked
the connection), and only user space can put it on the wire. It reaches the capture after
the response's clone; the capture sidecar restores the order in its files."""
from __future__ import annotations

import logging
import socket

log = logging.getLogger("mirror")


class RequestWriter:
    """Writes request frames onto the debug interface (AF_PACKET, needs CAP_NET_RAW), where
    the sink drops them like clones after the capture has seen them."""

    def __init__(self):
        self._sock: socket.socket | None = None
        self._ifindex = 0
        self.written = 0
        self.failed = 0

    def write(self, frame: bytes, ifindex: int) -> None:
        try:
            if self._sock is None or ifindex != self._ifindex:
                self.close()
                self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
                self._sock.bind((socket.if_indextoname(ifindex), 0))
                self._ifindex = ifindex
            self._sock.send(frame)
            self.written += 1
        except OSError as exc:
            self.failed += 1
            self.close()
            if self.failed == 1 or self.failed % 1000 == 0:
                log.warning("cannot write a request frame to the debug interface (%d so "
                            "far): %s", self.failed, exc)

    def close(self) -> None:
        if self._sock:
            self._sock.close()
            self._sock = None
