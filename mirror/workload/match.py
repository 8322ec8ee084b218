"""One resolver pass: the runtimes' containers matched with interfaces by network
namespace identity (mirror.workload.netns).

For each interface, the nsid of its peer's namespace; for each container, the nsid of
its own, asked afresh every pass with a descriptor of it (a stopped container's
namespace no longer opens, so an old list never names a new namespace; nsids are reused
once a namespace is gone, so none is kept between passes). The containers of one runtime
that share a namespace are one workload (a pod: its sandbox and its containers); the
first runtime in `runtimes` order that knows a namespace names it; a namespace no
runtime knows is named by its bind mount under /run/netns, else its inode, else its
nsid."""
from __future__ import annotations

from .model import HOST_WORKLOAD, NETNS, Container, Workload
from .netns import NETNS_DIR, InterfaceGone, NsidSocket


def match(ifindexes, inventories: dict[str, list[Container]], order: list[str],
          netns_dir: str = NETNS_DIR) -> dict[int, Workload | None]:
    """ifindex -> its workload, None for an interface that is gone. `inventories`: each
    runtime's containers by runtime name; `order`: which runtime names a namespace first."""
    out: dict[int, Workload | None] = {}
    with NsidSocket() as nl:
        peers: dict[int, int] = {}
        for ifindex in ifindexes:
            try:
                nsid = nl.peer_nsid(ifindex)
            except InterfaceGone:
                out[ifindex] = None
                continue
            if nsid is None:
                out[ifindex] = HOST_WORKLOAD
            else:
                peers[ifindex] = nsid
        if not peers:
            return out
        wanted = set(peers.values())
        found: dict[int, tuple[str, list[Container]]] = {}
        inodes: dict[int, int] = {}
        for runtime in order:
            groups: dict[int, list[Container]] = {}
            for container in inventories.get(runtime, []):
                if not container.netns_paths:
                    continue
                nsid, inode = nl.identify(container.netns_paths)
                if nsid in wanted and nsid not in found:
                    groups.setdefault(nsid, []).append(container)
                    inodes[nsid] = inode
            for nsid, members in groups.items():
                found[nsid] = (runtime, members)
        names = nl.named(netns_dir)
    for ifindex, nsid in peers.items():
        if nsid in found:
            runtime, members = found[nsid]
            label = names.get(nsid) or f"net:[{inodes[nsid]}]"
            out[ifindex] = Workload.of_containers(runtime, members, label)
        else:
            out[ifindex] = Workload(NETNS, netns=names.get(nsid) or f"nsid:{nsid}")
    return out
