"""Podman: the running containers of podman's API service, on its socket.

The libpod API (not the Docker-compatible one) is used because its list alone says all
that is needed, in one call: each container's first process (Pid), its pod (PodName) and
whether it is the pod's infra container (IsInfra), which holds the pod's namespaces as a
Kubernetes sandbox does. Podman's API service runs only where it is enabled
(podman.socket); rootful podman's socket is /run/podman/podman.sock."""
from __future__ import annotations

import threading

from . import unixapi
from .model import Container, RuntimeFailure, kubernetes_fields, netns_paths

DEFAULT_SOCKET = "/run/podman/podman.sock"
# The libpod API's path prefix: podman 4 and 5 both serve version 4.0.0 of it.
API = "/v4.0.0/libpod"
EVENTS = ("start", "died", "remove", "rename")


class Podman:
    name = "podman"
    default_socket = DEFAULT_SOCKET

    def __init__(self, socket_path: str = DEFAULT_SOCKET):
        self.socket_path = socket_path
        self._lock = threading.Lock()
        self._stream: unixapi.JsonStream | None = None
        self._interrupted = False

    def containers(self, deadline: float) -> list[Container]:
        listed = unixapi.get_json(self.socket_path, f"{API}/containers/json", deadline)
        if not isinstance(listed, list):
            raise RuntimeFailure("bad-answer", f"{API}/containers/json is not a list")
        out = []
        for entry in listed:
            cid = entry.get("Id") if isinstance(entry, dict) else None
            if not isinstance(cid, str) or not cid:
                raise RuntimeFailure("bad-answer", "a container without an Id")
            paths = netns_paths(None, entry.get("Pid") or None)
            k8s = kubernetes_fields(entry.get("Labels") or {})
            if k8s:
                out.append(Container(self.name, cid, netns_paths=paths, **k8s))
                continue
            names = entry.get("Names") or [cid[:12]]
            out.append(Container(self.name, cid, str(names[0]),
                                 pod=entry.get("PodName") or None,
                                 sandbox=bool(entry.get("IsInfra")), netns_paths=paths))
        return out

    def events(self, timeout: float, on_open):
        url = unixapi.query(f"{API}/events", {
            "stream": "true",
            "filters": {"type": ["container"], "event": list(EVENTS)}})
        stream = unixapi.JsonStream(self.socket_path, url, timeout, on_open)
        with self._lock:
            self._stream = stream
            if self._interrupted:
                stream.interrupt()
        try:
            yield from stream
        finally:
            self._stream = None

    def interrupt(self) -> None:
        """Ends the event stream for good (from any thread)."""
        with self._lock:
            self._interrupted = True
            stream = self._stream
        if stream is not None:
            stream.interrupt()

    def close(self) -> None:
        self.interrupt()
