"""What the workload rooms hand each other: a container as a runtime describes it, the
workload behind an interface as the resolver answers it, and the failure of a runtime.

The three outputs of a workload use three existing conventions (the package docstring,
mirror.workload, says why): as_dict() the plain fields, attributes() OpenTelemetry's
attribute names, labels() the Prometheus labels of cAdvisor and kube-state-metrics."""
from __future__ import annotations

from dataclasses import dataclass

RUNTIMES = ("containerd", "docker", "podman")
# What answers a lookup besides a runtime: the peer's network namespace and nothing more
# (no runtime knows it), the host itself (the interface has no peer in another network
# namespace: a NIC, a bridge, a veth whose both ends are here), not known yet.
NETNS, HOST, PENDING_RUNTIME = "netns", "host", "pending"
# This tool's own attribute names, where OpenTelemetry has none.
NETNS_ATTRIBUTE = "mirror.netns"
STATE_ATTRIBUTE = "mirror.workload.state"

# Labels the kubelet sets on the containers it creates, through CRI (containerd) or the
# old dockershim and cri-dockerd (Docker).
K8S_POD_NAME = "io.kubernetes.pod.name"
K8S_POD_NAMESPACE = "io.kubernetes.pod.namespace"
K8S_POD_UID = "io.kubernetes.pod.uid"
K8S_CONTAINER_NAME = "io.kubernetes.container.name"
# The pod's sandbox (pause) container: containerd's CRI marks it with a label, dockershim
# with another, and both name its container "POD".
CRI_KIND = "io.cri-containerd.kind"
DOCKERSHIM_TYPE = "io.kubernetes.docker.type"
SANDBOX_CONTAINER_NAME = "POD"

# Why a runtime gave no answer: what its failures are counted under, by runtime
# (Workloads.stats.failures, for the metrics to export).
REASONS = ("absent",        # no socket: the runtime does not run here
           "refused",       # a socket nobody listens on (a stopped runtime's leftover)
           "denied",        # the socket's permissions keep us out
           "timeout",       # connected, no (complete) answer within the call's timeout
           "bad-answer",    # an answer that is not what the API returns
           "error")         # anything else the system reported


class RuntimeFailure(Exception):
    """A runtime call that failed, with the reason it is counted under."""

    def __init__(self, reason: str, detail: str):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Container:
    """One container as its runtime describes it, with where its network namespace can be
    opened (tried in order: a bind-mounted namespace path, then /proc/PID/ns/net)."""
    runtime: str
    id: str
    name: str | None
    namespace: str | None = None        # Kubernetes namespace
    pod: str | None = None              # Kubernetes pod, or podman pod
    pod_uid: str | None = None
    sandbox: bool = False               # holds the pod's namespaces, runs no workload
    netns_paths: tuple[str, ...] = ()


def kubernetes_fields(labels: dict[str, str]) -> dict:
    """namespace, pod, pod_uid, name and sandbox from the kubelet's labels ({} when the
    container was not made by a kubelet)."""
    pod = labels.get(K8S_POD_NAME)
    if not pod:
        return {}
    name = labels.get(K8S_CONTAINER_NAME)
    sandbox = (labels.get(CRI_KIND) == "sandbox" or labels.get(DOCKERSHIM_TYPE) == "podsandbox"
               or name == SANDBOX_CONTAINER_NAME)
    return {"namespace": labels.get(K8S_POD_NAMESPACE), "pod": pod,
            "pod_uid": labels.get(K8S_POD_UID), "name": None if sandbox else name,
            "sandbox": sandbox}


def netns_paths(path: str | None, pid: int | None) -> tuple[str, ...]:
    """Where to open a container's network namespace: its bind mount first (opening it
    needs no access to the process), then its first process's."""
    out = []
    if path:
        out.append(path)
    if pid:
        out.append(f"/proc/{pid}/ns/net")
    return tuple(out)


@dataclass(frozen=True)
class Workload:
    """The workload behind one interface. `runtime` is containerd, docker or podman when a
    runtime knows the peer's network namespace; else netns (the namespace is all there is
    to name), host (no peer namespace) or pending (not answered yet)."""
    runtime: str
    namespace: str | None = None
    pod: str | None = None
    pod_uid: str | None = None
    container: str | None = None
    container_id: str | None = None
    netns: str | None = None

    @property
    def pending(self) -> bool:
        return self.runtime == PENDING_RUNTIME

    @property
    def kubernetes(self) -> bool:
        return self.namespace is not None

    @classmethod
    def of_containers(cls, runtime: str, containers: list[Container],
                      netns: str | None) -> "Workload":
        """The workload of the containers of one runtime that share a network namespace:
        a pod (the sandbox's or any container's pod fields), the names of the containers
        that run in it (not the sandbox), and the id of the one that holds the namespace
        (the sandbox; with none, the containers' ids)."""
        ordered = sorted(containers, key=lambda c: (not c.sandbox, c.name or "", c.id))
        first = ordered[0]
        names = sorted({c.name for c in ordered if not c.sandbox and c.name})
        sandbox = next((c for c in ordered if c.sandbox), None)
        ids = sandbox.id if sandbox else ",".join(sorted(c.id for c in ordered))
        return cls(runtime, namespace=first.namespace, pod=first.pod, pod_uid=first.pod_uid,
                   container=",".join(names) or None, container_id=ids, netns=netns)

    def as_dict(self) -> dict:
        return {"runtime": self.runtime, "namespace": self.namespace, "pod": self.pod,
                "pod_uid": self.pod_uid, "container": self.container,
                "container_id": self.container_id, "netns": self.netns}

    def attributes(self) -> dict[str, str]:
        """OpenTelemetry's attribute names (for events and JSON), those with a value only:
        a host interface has none, a namespace alone has mirror.netns, a pending answer
        has mirror.workload.state, a podman pod (not a Kubernetes one) mirror.pod.name."""
        if self.pending:
            return {STATE_ATTRIBUTE: "pending"}
        out: dict[str, str] = {}
        if self.runtime in RUNTIMES:
            out["container.runtime.name"] = self.runtime
        k8s = self.kubernetes
        pairs = (("k8s.namespace.name", self.namespace),
                 ("k8s.pod.name" if k8s else "mirror.pod.name", self.pod),
                 ("k8s.pod.uid", self.pod_uid),
                 ("k8s.container.name" if k8s else "container.name", self.container),
                 ("container.id", self.container_id), (NETNS_ATTRIBUTE, self.netns))
        out.update((k, v) for k, v in pairs if v)
        return out

    @classmethod
    def from_attributes(cls, attrs: dict[str, str] | None) -> "Workload | None":
        """attributes() read back (None stays None: no answer)."""
        if attrs is None:
            return None
        if attrs.get(STATE_ATTRIBUTE) == "pending":
            return PENDING
        runtime = attrs.get("container.runtime.name") or (
            NETNS if NETNS_ATTRIBUTE in attrs else HOST)
        return cls(runtime, namespace=attrs.get("k8s.namespace.name"),
                   pod=attrs.get("k8s.pod.name") or attrs.get("mirror.pod.name"),
                   pod_uid=attrs.get("k8s.pod.uid"),
                   container=attrs.get("k8s.container.name") or attrs.get("container.name"),
                   container_id=attrs.get("container.id"), netns=attrs.get(NETNS_ATTRIBUTE))

    def labels(self) -> dict[str, str]:
        """The Prometheus labels namespace, pod and container as cAdvisor and
        kube-state-metrics write them ("" when not known)."""
        return {"namespace": self.namespace or "", "pod": self.pod or "",
                "container": self.container or ""}

    def describe(self) -> str:
        """One short phrase for text output: ns/pod (containers), runtime:container,
        netns:NAME, host, pending."""
        if self.pending or self.runtime == HOST:
            return self.runtime
        if self.runtime == NETNS:
            return f"netns:{self.netns}"
        if self.kubernetes:
            return f"{self.namespace}/{self.pod}" + (f" ({self.container})"
                                                     if self.container else "")
        who = self.container or (self.container_id or "?")[:12]
        return f"{self.runtime}:" + (f"{self.pod}/{who}" if self.pod else who)


PENDING = Workload(PENDING_RUNTIME)
HOST_WORKLOAD = Workload(HOST)
