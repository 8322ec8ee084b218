"""The control socket: how `mirror flows`, `mirror events` (and the bench and the tests)
ask a running controller for what only its process holds, such as the contents of its
BPF maps.

Each controller serves a unix socket at a path in its network namespace's directory of
the state directory (mirror.ownership.socket_path): mode 0600 in a directory of mode
0700 that root owns, so only a process that can reach that directory can ask, which is
root (or the controller's own user) in the same mount namespace. In the DaemonSet that
keeps out every pod that merely shares the node's network (hostNetwork), which an
abstract socket, scoped to the network namespace, let in. A client sends one request
line (a word, and an argument after a space for some) and reads one JSON document until
the server closes. SO_PEERCRED is checked as well: only root and the controller's own
user get an answer."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import socketserver
import struct
import threading
from pathlib import Path
from typing import Callable

# sun_path holds 108 bytes with the terminating NUL.
MAX_SUN_PATH = 107


@contextlib.contextmanager
def address(path: Path):
    """`path` as a unix socket address. A path too long for sun_path (a deep
    MIRROR_STATE_DIR) goes through a descriptor of its directory, /proc/self/fd/N/NAME,
    which the kernel resolves to the same place."""
    if len(os.fsencode(str(path))) <= MAX_SUN_PATH:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True       # never hold up shutdown for a client
    block_on_close = False

    def __init__(self, path: Path, handler):
        self.path = path
        super().__init__(str(path), handler, bind_and_activate=False)

    def server_bind(self):
        with address(self.path) as where:
            self.socket.bind(where)
        # The directory (0700) already keeps others out; the socket's mode says it too.
        os.chmod(self.path, 0o600)
        self.server_address = str(self.path)


class ControlServer:
    """Answers requests by name: `handlers[word](argument)` returns what is sent back as
    JSON (argument: the rest of the line, "" when none)."""

    def __init__(self, path: Path, handlers: dict[str, Callable[[str], object]]):
        self.path = Path(path)
        self.handlers = handlers
        self._server: _Server | None = None

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
                what, _, arg = self.rfile.readline().decode(errors="replace").strip() \
                    .partition(" ")
                handler = handlers.get(what)
                try:
                    body = handler(arg) if handler else {"error": f"unknown request {what!r}"}
                except ValueError as exc:
                    body = {"error": f"bad request {what} {arg!r}: {exc}"}
                self.wfile.write(json.dumps(body).encode())

        self.path.unlink(missing_ok=True)       # a killed controller's, of this same id
        server = _Server(self.path, Handler)
        try:
            server.server_bind()
            server.server_activate()
        except BaseException:
            server.server_close()
            raise
        self._server = server
        threading.Thread(target=server.serve_forever, name="control", daemon=True).start()
        return self

    def close(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
            self.path.unlink(missing_ok=True)


def ask(path: str | os.PathLike, what: str, timeout: float = 5.0):
    """Sends one request to a controller's control socket and returns the JSON answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        with address(Path(path)) as where:
            s.connect(where)
        s.sendall(what.encode() + b"\n")
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except ValueError:
        raise OSError(f"no answer from {path} (the controller closed the connection)") \
            from None
