"""What `mirror run` is asked to do: the options (flags, environment, --config), checked
before anything touches the kernel, and the one rule for which source wins."""
from __future__ import annotations

import grp
from dataclasses import dataclass, field, replace

from . import debugif, hooks
from .abi import (DEFAULT_MAX_EVENTS_PER_CONN, DEFAULT_MAX_FLOWS, DEFAULT_REQUEST_BYTES,
                  MAX_CONN_SLOTS, MAX_REQUEST_BYTES)
from .cliutil import parse_metrics_addr
from .config import MAX_SECONDS, read_config
from .discovery import DEFAULT_MAX_IFACES, MAX_IFACES_LIMIT, Selector
from .errors import UsageError
from .privileges import can_give_group
from .safepath import UnsafePath, check_writable_file
from .trigger import parse_trigger


# Events per CPU and second by default (docs/connection-state.md, "Bounded in the kernel"):
# the reader keeps up with it on one core with room to spare (bench/eventcost.py measures
# the cost per event).
DEFAULT_MAX_EVENTS_PER_SECOND = 1000


@dataclass
class Options:
    ifaces: list[str]
    debug_iface: str = "mirror0"
    trigger: str = "5xx"
    hook: str = "clsact"
    idle_timeout: float = 30.0
    max_flows: int = DEFAULT_MAX_FLOWS
    metrics_addr: str | None = None
    config: str | None = None
    request_bytes: int = DEFAULT_REQUEST_BYTES
    events_file: str | None = None
    events_file_bytes: int = 16 << 20
    # A group name or gid: the events file is shared with it, mode 0640 (the capture
    # sidecar, another user, reads it to name the workload and h2c/gRPC statuses).
    events_group: str | None = None
    exclude: list[str] = field(default_factory=list)
    max_ifaces: int = DEFAULT_MAX_IFACES
    # Budgets (0: unlimited); the defaults and why: README, "Budgets".
    max_packets_per_flow: int = 1000
    max_bytes_per_flow: int = 1 << 20
    max_clones_per_second: int = 10000
    # Events (0: unlimited): per CPU and second, and per connection; what they hold back
    # is counted, and every error response is counted in the metrics whatever they do.
    max_events_per_second: int = DEFAULT_MAX_EVENTS_PER_SECOND
    max_events_per_connection: int = DEFAULT_MAX_EVENTS_PER_CONN
    # The trigger, parsed (resolve() fills it in).
    codes: frozenset[int] = frozenset()

    @property
    def events_gid(self) -> int | None:
        """The gid of --events-group (None when not given); UsageError for a name that
        is no group here."""
        return None if self.events_group is None else group_id(self.events_group)

    def budget(self) -> dict[str, int]:
        return {"max_packets_per_flow": self.max_packets_per_flow,
                "max_bytes_per_flow": self.max_bytes_per_flow,
                "max_clones_per_second": self.max_clones_per_second}

    def limits(self) -> dict[str, int]:
        """The budgets and the event bounds (0: unlimited each)."""
        return {**self.budget(), "max_events_per_second": self.max_events_per_second,
                "max_events_per_connection": self.max_events_per_connection}

    def validate(self) -> Selector:
        """Checks everything that can be checked without the kernel; UsageError naming
        the option and the fix. Returns the interface selector the options make."""
        hooks.kind(self.hook)
        if not self.ifaces:
            raise UsageError("no interface to monitor: give --iface IF or a pattern such as "
                             "--iface 'veth*' (or MIRROR_IFACE)")
        selector = Selector.parse(self.ifaces, self.exclude)
        if not 1 <= self.max_ifaces <= MAX_IFACES_LIMIT:
            raise UsageError(f"--max-ifaces must be between 1 and {MAX_IFACES_LIMIT}")
        if len(selector.names) > self.max_ifaces:
            raise UsageError(f"{len(selector.names)} interfaces named but --max-ifaces "
                             f"is {self.max_ifaces}; raise --max-ifaces")
        debugif.check_name(self.debug_iface)
        if self.debug_iface in selector.names:
            raise UsageError(f"debug interface {self.debug_iface} is also monitored: "
                             "mirroring onto a monitored interface would loop; pick another "
                             "--debug-iface")
        if not 0 < self.idle_timeout <= MAX_SECONDS:
            raise UsageError(f"--idle-timeout must be a positive number of seconds, at most "
                             f"{MAX_SECONDS}")
        if not 16 <= self.max_flows <= MAX_CONN_SLOTS:
            raise UsageError(f"--max-flows must be between 16 and {MAX_CONN_SLOTS}")
        if not 0 <= self.request_bytes <= MAX_REQUEST_BYTES:
            raise UsageError(f"--request-bytes must be between 0 (off) and {MAX_REQUEST_BYTES}")
        for name, value in self.limits().items():
            limit = (1 << 64) - 1 if name == "max_bytes_per_flow" else (1 << 32) - 1
            if not 0 <= value <= limit:
                raise UsageError(f"--{name.replace('_', '-')} must be between 0 (unlimited) "
                                 f"and {limit}")
        if self.events_file and self.events_file != "-":
            try:
                check_writable_file(self.events_file)
            except (UnsafePath, OSError) as exc:
                raise UsageError(f"cannot use {self.events_file} as the events file: "
                                 f"{getattr(exc, 'strerror', None) or exc}; give a new or "
                                 "regular file of root's in a directory only root can "
                                 "change") from None
        if self.events_group is not None:
            self._check_events_group()
        if self.metrics_addr:
            parse_metrics_addr(self.metrics_addr)
        return selector

    def _check_events_group(self) -> None:
        if not self.events_file or self.events_file == "-":
            raise UsageError("--events-group shares the events file with a group: give "
                             "--events-file PATH too")
        gid = self.events_gid
        if not can_give_group(gid):
            raise UsageError(f"--events-group {self.events_group}: the controller can give "
                             f"its events file to group {gid} only as a member of it or with "
                             "CAP_CHOWN; run it with that group as a supplementary one "
                             "(Kubernetes: the pod's securityContext.supplementalGroups; "
                             "Docker: --group-add / group_add) or grant CHOWN")


def group_id(text: str) -> int:
    """A group's gid from its name or number (as chgrp takes it); UsageError otherwise."""
    name = text.strip()
    if name.isdigit():
        gid = int(name)
        if gid >= (1 << 32) - 1:        # (gid_t)-1 means "no change" to chown(2)
            raise UsageError(f"--events-group {text!r}: a gid is below {(1 << 32) - 1}")
        return gid
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise UsageError(f"--events-group {text!r}: no such group here (give its name or "
                         "its number, e.g. 10001)") from None


def resolve(flags: Options) -> Options:
    """The settings in force: the flags (and environment), with what --config says over
    them. The one place that says which source wins, applied at start and again on
    SIGHUP, so that a line removed from the file gives the flag's value back. Reads and
    parses the file once; UsageError when it is bad."""
    if not flags.config:
        return replace(flags, codes=parse_trigger(flags.trigger))
    file = read_config(flags.config)
    if file.trigger is None:
        return replace(flags, codes=parse_trigger(flags.trigger),
                       idle_timeout=file.idle_timeout or flags.idle_timeout)
    return replace(flags, trigger=file.trigger, codes=file.codes,
                   idle_timeout=file.idle_timeout or flags.idle_timeout)
