"""`mirror detach`: removes this tool's hooks from interfaces no running controller
owns (a controller killed with SIGKILL leaves its tc hooks mirroring)."""
from __future__ import annotations

from pyroute2 import IPRoute

from . import hooks, ownership
from .errors import UsageError


def detach(ifaces: list[str]) -> int:
    """Removes this tool's hooks from each interface, holding the interface's lock while
    it does, so that a controller starting meanwhile cannot attach under it (and one that
    holds it makes the command refuse)."""
    ipr = IPRoute()
    locks = []
    try:
        indexes = {}
        for name in ifaces:
            found = ipr.link_lookup(ifname=name)
            if not found:
                raise UsageError(f"unknown interface {name!r}: see `ip link`")
            lock = ownership.Lock(ownership.iface_lock_name(found[0]))
            if not lock.acquire():
                rec = ownership.read("iface", ownership.iface_key(found[0])) or {}
                raise UsageError(f"{name} is owned by a running controller (pid "
                                 f"{rec.get('pid', '?')}); stop it with SIGTERM instead")
            locks.append(lock)
            indexes[name] = found[0]
        for name, idx in indexes.items():
            rec = ownership.read("iface", ownership.iface_key(idx))
            done = hooks.remove_record(ipr, rec, idx) if rec else []
            done += hooks.remove_unrecorded(ipr, idx)
            ownership.remove("iface", ownership.iface_key(idx))
            print(f"{name}: " + (", ".join(f"removed {d}" if not d.startswith("kept") else d
                                            for d in done) or "no mirror hooks found"))
        return 0
    finally:
        for lock in locks:
            lock.release(remove=True)
        ipr.close()
