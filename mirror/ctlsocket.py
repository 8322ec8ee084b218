"""The control socket: how `mirror flows` (and any other reader) asks a running controller
for what only its process holds, such as the contents of its BPF maps.

Each controller serves an abstract unix socket named `@tc-mirror-ID` (scoped to the
network namespace, gone with the process, no path to clean up), recorded in its
controller record (mirror.ownership). A client sends one request line (a word, and an
argument after a space for some) and reads one JSON document until the server closes.
Only root and the controller's own user may ask (SO_PEERCRED)."""
from __future__ import annotations

import json
import os
import socket
import socketserver
import struct
import threading
from typing import Callable


def socket_name(controller_id: str) -> str:
    return f"@tc-mirror-{controller_id}"


def _address(name: str) -> str:
    return "\0" + name[1:] if name.startswith("@") else name


class ControlServer:
    """Answers requests by name: `handlers[word](argument)` returns what is sent back as
    JSON (argument: the rest of the line, "" when none)."""

    def __init__(self, name: str, handlers: dict[str, Callable[[str], object]]):
        self.name = name
        self.handlers = handlers
        self._server: socketserver.ThreadingUnixStreamServer | None = None

    def start(self) -> "ControlServer":
        handlers = self.handlers

        class Handler(socketserver.StreamRequestHandler):
            timeout = 5         # a client that connects and says nothing is dropped

            def handle(self):
                creds = self.request.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                struct.calcsize("3i"))
                uid = struct.unpack("3i", creds)[1]
                if uid not in (0, os.geteuid()):
                    return
                what, _, arg = self.rfile.readline().decode().strip().partition(" ")
                handler = handlers.get(what)
                try:
                    body = handler(arg) if handler else {"error": f"unknown request {what!r}"}
                except ValueError as exc:
                    body = {"error": f"bad request {what} {arg!r}: {exc}"}
                self.wfile.write(json.dumps(body).encode())

        self._server = socketserver.ThreadingUnixStreamServer(_address(self.name), Handler)
        self._server.daemon_threads = True      # never hold up shutdown for a client
        self._server.block_on_close = False
        threading.Thread(target=self._server.serve_forever, name="control",
                         daemon=True).start()
        return self

    def close(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def ask(name: str, what: str, timeout: float = 5.0):
    """Sends one request to a controller's control socket ("@name": abstract) and returns
    the JSON answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(_address(name))
        s.sendall(what.encode() + b"\n")
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return json.loads(b"".join(chunks))
