"""The runtimes' unix sockets: connecting with the failure named (absent, refused,
denied, timeout), and HTTP/1.1 over them for the Docker Engine API and podman's API.

A runtime that is gone, hung or answering garbage must cost a bounded delay and a
counted reason, never a stuck thread: every request has a deadline, and each read waits
at most what is left of it. http.client does the HTTP (chunked bodies, headers); only its
connection is ours, to reach a unix socket."""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from urllib.parse import quote

from .model import RuntimeFailure

MAX_BODY = 64 << 20         # a list of thousands of containers is a few MiB


def connect(path: str, timeout: float) -> socket.socket:
    """A connected stream socket to `path`; RuntimeFailure naming why not."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(max(timeout, 0.001))
    try:
        sock.connect(path)
        return sock
    except BaseException as exc:
        sock.close()
        if isinstance(exc, OSError):
            raise failure_of(exc, path) from None
        raise


def failure_of(exc: OSError, path: str) -> RuntimeFailure:
    if isinstance(exc, FileNotFoundError):
        return RuntimeFailure("absent", f"no socket at {path}")
    if isinstance(exc, ConnectionRefusedError):
        return RuntimeFailure("refused", f"nothing listens on {path}")
    if isinstance(exc, PermissionError):
        return RuntimeFailure("denied", f"no permission to connect to {path}")
    if isinstance(exc, (TimeoutError, socket.timeout)):     # distinct before Python 3.10
        return RuntimeFailure("timeout", f"no answer on {path} in time")
    if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
        return RuntimeFailure("bad-answer", f"{path} closed the connection: {exc}")
    return RuntimeFailure("error", f"{path}: {exc}")


def query(path: str, params: dict) -> str:
    """`path?k=v&...` with the values URL-encoded (dicts and lists as JSON, as the Docker
    API wants its filters)."""
    parts = [f"{k}={quote(v if isinstance(v, str) else json.dumps(v), safe='')}"
             for k, v in params.items()]
    return path + ("?" + "&".join(parts) if parts else "")


class _Connection(http.client.HTTPConnection):
    def __init__(self, socket_path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        self.sock = connect(self.socket_path, self.timeout)


def _left(deadline: float, socket_path: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise RuntimeFailure("timeout", f"no complete answer on {socket_path} in time")
    return left


def get_json(socket_path: str, url: str, deadline: float):
    """GET `url` on the socket and decode its JSON body, by `deadline` (time.monotonic())."""
    conn = _Connection(socket_path, _left(deadline, socket_path))
    try:
        conn.request("GET", url, headers={"Accept": "application/json"})
        conn.sock.settimeout(_left(deadline, socket_path))
        resp = conn.getresponse()
        body = bytearray()
        while True:
            conn.sock.settimeout(_left(deadline, socket_path))
            chunk = resp.read1(1 << 16)
            if not chunk:
                break
            body += chunk
            if len(body) > MAX_BODY:
                raise RuntimeFailure("bad-answer", f"{url}: more than {MAX_BODY} bytes")
        if resp.status != 200:
            raise RuntimeFailure("bad-answer", f"{url}: HTTP {resp.status} "
                                 f"{bytes(body[:200]).decode(errors='replace')!r}")
        return json.loads(body)
    except RuntimeFailure:
        raise
    except (http.client.HTTPException, ValueError) as exc:
        raise RuntimeFailure("bad-answer", f"{url}: {exc!r}") from None
    except OSError as exc:
        raise failure_of(exc, socket_path) from None
    finally:
        conn.close()


class JsonStream:
    """A streamed GET whose body is JSON documents one per line (the Docker API's and
    podman's /events). The headers must come within `timeout`; after that the stream may
    stay quiet for as long as the runtime has nothing to say, and interrupt() (from any
    thread) ends it. `on_open` is called once the runtime has accepted the request: from
    then on no event is missed."""

    def __init__(self, socket_path: str, url: str, timeout: float, on_open=None):
        self.socket_path = socket_path
        self.url = url
        self.timeout = timeout
        self.on_open = on_open
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._interrupted = False

    def __iter__(self):
        if self._interrupted:
            return
        sock = connect(self.socket_path, self.timeout)
        with self._lock:
            # Registered before anything can block on it, so that interrupt() always
            # has a socket to shut down.
            if self._interrupted:
                sock.close()
                return
            self._sock = sock
        conn = _Connection(self.socket_path, self.timeout)
        conn.sock = sock
        try:
            conn.request("GET", self.url, headers={"Accept": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise RuntimeFailure("bad-answer", f"{self.url}: HTTP {resp.status}")
            sock.settimeout(None)
            if self.on_open:
                self.on_open()
            while True:
                line = resp.readline(MAX_BODY)
                if not line:
                    if self._interrupted:
                        return
                    raise RuntimeFailure("error", f"{self.url}: the stream ended")
                if line.strip():
                    yield json.loads(line)
        except RuntimeFailure:
            raise
        except (http.client.HTTPException, ValueError) as exc:
            if self._interrupted:
                return
            raise RuntimeFailure("bad-answer", f"{self.url}: {exc!r}") from None
        except OSError as exc:
            if self._interrupted:
                return
            raise failure_of(exc, self.socket_path) from None
        finally:
            with self._lock:
                self._sock = None
            conn.close()

    def interrupt(self) -> None:
        with self._lock:
            self._interrupted = True
            sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
