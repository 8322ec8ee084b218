"""Docker: the running containers of a Docker Engine, from its HTTP API on its socket.

The list (/containers/json) names the containers; where each one's network namespace is
takes an inspect per container (/containers/ID/json: NetworkSettings.SandboxKey, the
namespace's bind mount, and State.Pid). Inspects are kept per container id until the
engine reports a container event, so a resolver pass costs one list call once the
containers are known. Containers made by a kubelet through cri-dockerd carry the
kubelet's labels and are named as pods."""
from __future__ import annotations

import threading

from . import unixapi
from .model import Container, RuntimeFailure, kubernetes_fields, netns_paths

DEFAULT_SOCKET = "/run/docker.sock"
# The events that change which container holds which network namespace.
EVENTS = ("start", "die", "destroy", "rename")


class Docker:
    name = "docker"
    default_socket = DEFAULT_SOCKET
    api_prefix = ""             # the engine's own API version

    def __init__(self, socket_path: str = DEFAULT_SOCKET):
        self.socket_path = socket_path
        self._inspected: dict[str, dict] = {}
        self._generation = 0        # moves on at every event: older inspects are not kept
        self._lock = threading.Lock()
        self._stream: unixapi.JsonStream | None = None
        self._interrupted = False
        # Kept inspects are only trusted while the event stream runs: without it a
        # restarted container (same id, new process) would go unnoticed.
        self.following = False

    def containers(self, deadline: float) -> list[Container]:
        listed = unixapi.get_json(self.socket_path, f"{self.api_prefix}/containers/json",
                                  deadline)
        if not isinstance(listed, list):
            raise RuntimeFailure("bad-answer", "/containers/json is not a list")
        with self._lock:
            kept = dict(self._inspected) if self.following else {}
            generation = self._generation
        out, seen = [], {}
        for entry in listed:
            cid = entry.get("Id") if isinstance(entry, dict) else None
            if not isinstance(cid, str) or not cid:
                raise RuntimeFailure("bad-answer", "a container without an Id")
            info = kept.get(cid)
            if info is None:
                info = unixapi.get_json(self.socket_path,
                                        f"{self.api_prefix}/containers/{cid}/json", deadline)
                if not isinstance(info, dict):
                    raise RuntimeFailure("bad-answer", f"inspect of {cid} is not an object")
            seen[cid] = info
            out.append(self.container(cid, entry, info))
        with self._lock:
            if generation == self._generation:
                self._inspected = seen
        return out

    def container(self, cid: str, entry: dict, info: dict) -> Container:
        labels = (info.get("Config") or {}).get("Labels") or entry.get("Labels") or {}
        names = entry.get("Names") or [info.get("Name") or ""]
        name = str(names[0]).lstrip("/") or None
        state = info.get("State") or {}
        settings = info.get("NetworkSettings") or {}
        paths = netns_paths(settings.get("SandboxKey") or None, state.get("Pid") or None)
        k8s = kubernetes_fields(labels)
        if k8s:
            return Container(self.name, cid, netns_paths=paths, **k8s)
        return Container(self.name, cid, name, netns_paths=paths)

    def events(self, timeout: float, on_open):
        """Yields one item per container event that may move a network namespace;
        `on_open()` once the engine follows them for us."""
        url = unixapi.query(f"{self.api_prefix}/events",
                            {"filters": {"type": ["container"], "event": list(EVENTS)}})

        def opened():
            self._forget_inspects()
            self.following = True
            on_open()
        stream = unixapi.JsonStream(self.socket_path, url, timeout, opened)
        with self._lock:
            self._stream = stream
            if self._interrupted:
                stream.interrupt()
        try:
            for event in stream:
                self._forget_inspects()
                yield event
        finally:
            self._stream = None
            self.following = False
            self._forget_inspects()

    def _forget_inspects(self) -> None:
        with self._lock:
            self._inspected = {}
            self._generation += 1

    def interrupt(self) -> None:
        """Ends the event stream for good (from any thread)."""
        with self._lock:
            self._interrupted = True
            stream = self._stream
        if stream is not None:
            stream.interrupt()

    def close(self) -> None:
        self.interrupt()
