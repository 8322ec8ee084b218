"""containerd: the containers of every containerd namespace (Kubernetes' is `k8s.io`)
but Docker's own (`moby`: the Docker API names those), from containerd's gRPC API on its
socket.

Why gRPC here and not the `ctr` CLI: grpcio is a Python client of the API itself, a
call has a deadline of its own, the event stream is one long call instead of a child
process to watch, and the image needs no containerd binaries. containerd ships its API as
.proto files only; the few fields read are decoded by mirror.workload.protowire, named
here with their numbers (containerd/api/services/*/v1/*.proto, stable since 1.0):

  Namespaces/List  -> namespaces (1): name (1)
  Containers/List  -> containers (1): id (1), labels (2), spec (5: Any, value (2) = the
                      OCI runtime spec as JSON)
  Tasks/List       -> tasks (1): container_id (1) or id (2), pid (3)
  Events/Subscribe <- filters (1); -> envelope: topic (3)

A container's network namespace is the `network` entry of its spec's
linux.namespaces: a path (Kubernetes' sandboxes: /var/run/netns/cni-..., and the
containers of a pod: the sandbox's), or no path (a namespace of its own: its task's
/proc/PID/ns/net), or no entry (the host's network: nothing behind a veth)."""
from __future__ import annotations

import json
import threading
import time

import grpc

from . import protowire as pw
from . import unixapi
from .model import Container, RuntimeFailure, kubernetes_fields, netns_paths

DEFAULT_SOCKET = "/run/containerd/containerd.sock"
SKIP_NAMESPACES = ("moby",)
NAMESPACE_HEADER = "containerd-namespace"
NAMESPACES_LIST = "/containerd.services.namespaces.v1.Namespaces/List"
CONTAINERS_LIST = "/containerd.services.containers.v1.Containers/List"
TASKS_LIST = "/containerd.services.tasks.v1.Tasks/List"
EVENTS_SUBSCRIBE = "/containerd.services.events.v1.Events/Subscribe"
# The events that change which container holds which network namespace.
EVENT_TOPICS = ("/containers/create", "/containers/update", "/containers/delete",
                "/tasks/start", "/tasks/delete")
NERDCTL_NAME = "nerdctl/name"
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),  # every container's spec in one reply
    ("grpc.enable_http_proxy", 0),                   # a unix socket: never via a proxy
    # Reconnect soon after containerd restarts (gRPC's default waits up to two minutes).
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5000),
]
TIMEOUT_CODES = (grpc.StatusCode.DEADLINE_EXCEEDED,)
# What a socket that does not speak containerd's gRPC (garbage, a closed stream, a
# truncated reply) comes out as.
GARBAGE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL,
                 grpc.StatusCode.UNKNOWN, grpc.StatusCode.RESOURCE_EXHAUSTED,
                 grpc.StatusCode.UNIMPLEMENTED)


def _failure(exc: grpc.RpcError, method: str) -> RuntimeFailure:
    # A call's errors have code() and details(); gRPC's other errors only a message.
    code = exc.code() if hasattr(exc, "code") else None
    said = exc.details() if hasattr(exc, "details") else str(exc)
    detail = f"{method.lstrip('/')}: {code.name if code else '?'} {said}"
    # A peer that accepts and never answers may also come out as UNAVAILABLE, when gRPC's
    # own connection attempt gives up before the call's deadline.
    if code in TIMEOUT_CODES or (code == grpc.StatusCode.UNAVAILABLE and
                                 "timed out" in detail):
        return RuntimeFailure("timeout", detail)
    if code in GARBAGE_CODES:
        return RuntimeFailure("bad-answer", detail)
    return RuntimeFailure("error", detail)


class Containerd:
    name = "containerd"
    default_socket = DEFAULT_SOCKET

    def __init__(self, socket_path: str = DEFAULT_SOCKET):
        self.socket_path = socket_path
        self._channel: grpc.Channel | None = None
        self._lock = threading.Lock()
        self._call = None           # the event stream's call, to cancel it
        self._interrupted = False

    def _open(self, deadline: float) -> grpc.Channel:
        """The channel, after checking that something listens on the socket: gRPC would
        report a missing socket, a refused connection and a hung peer alike."""
        unixapi.connect(self.socket_path, max(0.001, deadline - time.monotonic())).close()
        with self._lock:
            if self._channel is None:
                self._channel = grpc.insecure_channel(f"unix:{self.socket_path}",
                                                      options=CHANNEL_OPTIONS)
            return self._channel

    def _unary(self, channel: grpc.Channel, method: str, request: bytes,
               namespace: str | None, deadline: float) -> dict[int, list]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeFailure("timeout", f"{method}: no time left")
        metadata = [(NAMESPACE_HEADER, namespace)] if namespace else None
        try:
            reply = channel.unary_unary(method)(request, timeout=left, metadata=metadata)
            return pw.fields(reply)
        except grpc.RpcError as exc:
            raise _failure(exc, method) from None
        except pw.WireError as exc:
            raise RuntimeFailure("bad-answer", f"{method}: {exc}") from None

    def containers(self, deadline: float) -> list[Container]:
        channel = self._open(deadline)
        try:
            spaces = [pw.text(ns, 1) for ns in pw.messages(
                self._unary(channel, NAMESPACES_LIST, b"", None, deadline), 1)]
            out = []
            for space in spaces:
                if space in SKIP_NAMESPACES:
                    continue
                listed = self._unary(channel, CONTAINERS_LIST, b"", space, deadline)
                tasks = self._unary(channel, TASKS_LIST, b"", space, deadline)
                pids = {pw.text(t, 1) or pw.text(t, 2): pw.number(t, 3)
                        for t in pw.messages(tasks, 1)}
                for entry in pw.messages(listed, 1):
                    out.append(self.container(entry, pids))
            return out
        except pw.WireError as exc:
            raise RuntimeFailure("bad-answer", str(exc)) from None

    def container(self, entry: dict[int, list], pids: dict[str, int]) -> Container:
        cid = pw.text(entry, 1)
        if not cid:
            raise RuntimeFailure("bad-answer", "a container without an id")
        labels = pw.string_map(entry, 2)
        paths = self._netns_paths(entry, pids.get(cid))
        k8s = kubernetes_fields(labels)
        if k8s:
            return Container(self.name, cid, netns_paths=paths, **k8s)
        return Container(self.name, cid, labels.get(NERDCTL_NAME) or cid, netns_paths=paths)

    @staticmethod
    def _netns_paths(entry: dict[int, list], pid: int | None) -> tuple[str, ...]:
        specs = pw.messages(entry, 5)
        if not specs:
            return netns_paths(None, pid)
        value = (specs[-1].get(2) or [b""])[-1]
        try:
            spec = json.loads(value or b"{}")
        except (TypeError, ValueError):
            return netns_paths(None, pid)      # a spec of another kind: try the process
        namespaces = ((spec.get("linux") or {}).get("namespaces") or []) \
            if isinstance(spec, dict) else []
        network = next((ns for ns in namespaces
                        if isinstance(ns, dict) and ns.get("type") == "network"), None)
        if network is None:
            return ()           # the host's network namespace
        return netns_paths(network.get("path") or None, pid)

    def events(self, timeout: float, on_open):
        """Yields one item per event that may move a network namespace, from one stream
        over every containerd namespace; `on_open()` once the call is made (gRPC gives no
        earlier sign that containerd has it: a server sends its headers with the first
        event)."""
        channel = self._open(time.monotonic() + timeout)
        request = b"".join(pw.string_field(1, f'topic=="{t}"') for t in EVENT_TOPICS)
        call = channel.unary_stream(EVENTS_SUBSCRIBE)(request)
        with self._lock:
            self._call = call
            if self._interrupted:
                call.cancel()
        try:
            on_open()
            for envelope in call:
                yield pw.text(pw.fields(envelope), 3)
            raise RuntimeFailure("error", "the event stream ended")
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:
                return
            raise _failure(exc, EVENTS_SUBSCRIBE) from None
        except pw.WireError as exc:
            raise RuntimeFailure("bad-answer", f"event: {exc}") from None
        finally:
            with self._lock:
                self._call = None

    def interrupt(self) -> None:
        """Ends the event stream for good (from any thread)."""
        with self._lock:
            self._interrupted = True
            call = self._call
        if call is not None:
            call.cancel()

    def close(self) -> None:
        self.interrupt()
        with self._lock:
            channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()
