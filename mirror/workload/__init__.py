"""Workload identity: the pod, container or network namespace behind a monitored
interface, so that the operator reads `shop/checkout-7d9f (app)` instead of `vethab12cd`.

How it is matched: a host-side veth names its peer's network namespace by an id (its
IFLA_LINK_NETNSID); each container runtime says where each container's network namespace
is (a bind mount, or its process's /proc/PID/ns/net), and asking the kernel for the id of
that namespace (RTM_GETNSID with a descriptor of it) gives the same id
(mirror.workload.netns, mirror.workload.match). One module per runtime: containerd
(its gRPC API; Kubernetes' pods through the kubelet's labels in namespace k8s.io), Docker
(the Engine API), podman (its libpod API). What no runtime knows is named by its network
namespace (its name under /run/netns, else its inode, else its id); an interface with no
peer namespace is the host's.

Use: the controller makes one Workloads (mirror.workload.resolver), start()s it, calls
refresh(ifindex) on each link event of a monitored interface and forget(ifindex) when it
goes, and lookup(ifindex) wherever it needs the answer (events, flows, metrics): lookup
never blocks and answers PENDING until the resolver thread has the answer, which
on_change(ifindex, workload) then hands over. `mirror status` answers once with
resolve(). Workloads.stats holds the counters (lookups, pending answers, failures by
runtime and reason, latency).

Names, from two existing conventions, each where it is the native one:

- JSON (events, `mirror status --json`, later the index): OpenTelemetry's semantic
  conventions, the names log and trace pipelines join on: k8s.namespace.name,
  k8s.pod.name, k8s.pod.uid, k8s.container.name (a container of a pod spec) or
  container.name (a Docker or podman container), container.id, container.runtime.name.
  OpenTelemetry has no attribute for a network namespace: mirror.netns, in this tool's
  own prefix as the conventions ask (mirror.workload.state says "pending").
- Prometheus labels (metrics): namespace, pod, container, as cAdvisor and
  kube-state-metrics write them, so that a mirror series joins kube_pod_info or
  container_* series with `on (namespace, pod)` and no label_replace. OpenTelemetry's
  dotted names are not valid Prometheus label names, and its collector maps them to
  k8s_pod_name & co., which join nothing already in a Kubernetes Prometheus.

A pod's `container` is the names of its containers (not the sandbox), comma-separated
in name order: every container of a pod shares its network namespace, so a packet of
the pod's veth cannot be told to belong to one of them."""
from .model import PENDING, Container, RuntimeFailure, Workload
from .resolver import Workloads, default_runtimes, resolve

__all__ = ["PENDING", "Container", "RuntimeFailure", "Workload", "Workloads",
           "default_runtimes", "resolve"]
