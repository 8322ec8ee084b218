"""The hooks the classifier is attached with: one module per kind of kernel hook, each
offering the same face (`HookKind`), so that the controller never branches on the kind
and a fourth kind is one new module and one line in KINDS.

  clsact  a clsact qdisc, cls_bpf filters on its ingress and egress hooks (hooks/tc.py)
  htb     the design card's layout: an ingress qdisc and an htb root qdisc (hooks/tc.py)
  tcx     BPF links on the device, no qdisc, released with the process (hooks/tcx.py)

What every kind shares lives here: the description of one interface's hooks
(`Attachment`, whose record() the ownership records keep), and the rules for what a
stopped controller left on an interface (`attach` below): hooks of the same kind are
adopted in place, hooks of another kind are removed first, each kind says what it does
with this tool's hooks found with no record at all."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import UsageError
from . import tc, tcx


@dataclass
class Attachment:
    """This controller's hooks on one interface."""
    ifname: str
    ifindex: int
    hook: str
    parents: dict[str, int] = field(default_factory=dict)   # tc: direction -> parent
    created: list[str] = field(default_factory=list)        # tc: qdisc kinds added
    links: dict[str, int] = field(default_factory=dict)     # tcx: direction -> link fd
    # time.monotonic() when the ingress hook, then both hooks, were in place, and when
    # the link event that announced the interface was read (0: attached at start)
    ingress_at: float = 0.0
    hooked_at: float = 0.0
    event_at: float = 0.0

    def record(self) -> dict:
        """What the ownership record of this interface says (mirror.ownership)."""
        return {"ifname": self.ifname, "ifindex": self.ifindex, "hook": self.hook,
                "parents": self.parents, "created": self.created, "pid": os.getpid(),
                "started": time.time()}


class HookKind(Protocol):
    """One kind of hook. `ipr` is a pyroute2 IPRoute of the namespace; `prog_fds` maps
    "ingress"/"egress" to the classifier's program fds. Each returns what it did as short
    phrases, for the log."""

    name: str

    def check_supported(self) -> None:
        """UsageError when this kernel lacks the hook."""

    def check(self, ipr, ifindex: int, ifname: str, stale: dict | None) -> None:
        """UsageError when attaching here would disturb something that is not ours;
        changes nothing."""

    def attach(self, ipr, att: Attachment, prog_fds: dict[str, int],
               stale: dict | None) -> list[str]:
        """Installs both hooks, ingress first, filling `att` as it goes, so that a
        failure half-way is undone by detach(att). `stale`: a stopped controller's
        record of this same kind, adopted in place."""

    def detach(self, ipr, att: Attachment) -> list[str]:
        """Removes what `att` says this controller added."""

    def remove_record(self, ipr, record: dict, ifindex: int) -> list[str]:
        """Removes what a stopped controller's record of this kind says it added."""

    def remove_unrecorded(self, ipr, ifindex: int) -> list[str]:
        """Removes this tool's hooks of this kind that no record describes (never a
        qdisc: with no record, nothing says this tool created it)."""

    def ours(self, ipr, ifindex: int) -> list[str]:
        """This tool's hooks of this kind on the interface, as `mirror status` names
        them (whoever added them)."""


KINDS: dict[str, HookKind] = {"clsact": tc.Clsact(), "htb": tc.Htb(), "tcx": tcx.Tcx()}
NAMES = tuple(KINDS)


def kind(name: str) -> HookKind:
    try:
        return KINDS[name]
    except KeyError:
        raise UsageError(f"unknown hook {name!r}: use {', '.join(NAMES)}") from None


def attach(ipr, att: Attachment, prog_fds: dict[str, int], stale: dict | None) -> list[str]:
    """Attaches att.hook's hooks. A stopped controller's record of another kind is
    removed first (its hooks would run the classifier twice); one of the same kind is
    handed to the kind, which adopts it in place."""
    done = []
    if stale and stale.get("hook") != att.hook:
        removed = remove_record(ipr, stale, att.ifindex)
        done.append(f"removed a stopped controller's {stale.get('hook')} hooks: "
                    f"{', '.join(removed) or 'nothing left'}")
        stale = None
    return done + KINDS[att.hook].attach(ipr, att, prog_fds, stale)


def remove_record(ipr, record: dict, ifindex: int) -> list[str]:
    """Removes what a stopped controller's record says it added, whatever its kind (a
    record of an unknown kind describes nothing this version can remove)."""
    found = KINDS.get(record.get("hook", ""))
    return found.remove_record(ipr, record, ifindex) if found else []


def remove_unrecorded(ipr, ifindex: int) -> list[str]:
    """This tool's hooks that no record describes, all kinds, removed."""
    return [d for k in KINDS.values() for d in k.remove_unrecorded(ipr, ifindex)]


def ours(ipr, ifindex: int) -> list[str]:
    """Every hook of this tool on the interface, all kinds."""
    return [h for k in KINDS.values() for h in k.ours(ipr, ifindex)]
