"""The Linux capabilities the controller needs, and a check that names the missing ones.

Found by trying (docs/deployment.md, "Least privilege"): on Linux 5.8 and newer the
controller needs exactly CAP_BPF (maps and programs), CAP_NET_ADMIN (BPF programs of
networking types; qdiscs, filters, tcx links, the debug interface) and CAP_PERFMON (the
verifier refuses the classifier's pointer arithmetic without it: "pointer arithmetic with
it prohibited for !root"). CAP_NET_RAW is optional: with it the controller writes the
request of each error response onto the debug interface (an AF_PACKET socket); without
it the request is still in the event line, not in the capture, and the controller says so
at start. Nothing else: no CAP_SYS_ADMIN, no CAP_SYS_RESOURCE (the
kernel charges BPF memory to the cgroup since 5.11, not to RLIMIT_MEMLOCK), no
CAP_DAC_OVERRIDE (bcc only reads the world-readable kernel headers). Older kernels have
neither CAP_BPF nor CAP_PERFMON and want CAP_SYS_ADMIN for all of BPF.

The effective set is read from /proc/self/status (CapEff), so the check sees what a
container runtime, setpriv or capsh left to this process, whatever its uid."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import UsageError

# Bit numbers from include/uapi/linux/capability.h (the ones this project names).
CAP_BITS = {
    "CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_FOWNER": 3,
    "CAP_FSETID": 4, "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SETPCAP": 8,
    "CAP_NET_BIND_SERVICE": 10, "CAP_NET_RAW": 13, "CAP_NET_ADMIN": 12, "CAP_IPC_LOCK": 14,
    "CAP_SYS_MODULE": 16, "CAP_SYS_CHROOT": 18, "CAP_SYS_PTRACE": 19, "CAP_SYS_ADMIN": 21,
    "CAP_SYS_RESOURCE": 24, "CAP_MKNOD": 27, "CAP_AUDIT_WRITE": 29, "CAP_SETFCAP": 31,
    "CAP_SYSLOG": 34, "CAP_PERFMON": 38, "CAP_BPF": 39, "CAP_CHECKPOINT_RESTORE": 40,
}
CAP_NAMES = {bit: name for name, bit in CAP_BITS.items()}

# CAP_BPF and CAP_PERFMON came with Linux 5.8; before, BPF needed CAP_SYS_ADMIN.
CONTROLLER_CAPS = ("CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON")
CONTROLLER_CAPS_BEFORE_5_8 = ("CAP_SYS_ADMIN", "CAP_NET_ADMIN")


def cap_name(bit: int) -> str:
    return CAP_NAMES.get(bit, f"cap_{bit}")


def effective_caps(status_path: str = "/proc/self/status") -> set[str]:
    """Names of the capabilities in this process's effective set."""
    for line in Path(status_path).read_text().splitlines():
        if line.startswith("CapEff:"):
            mask = int(line.split()[1], 16)
            return {cap_name(bit) for bit in range(64) if mask >> bit & 1}
    raise OSError(f"no CapEff line in {status_path}")


def can_give_group(gid: int) -> bool:
    """Whether this process may give a file it owns to group `gid` (`mirror run
    --events-group`): chown(2) lets an owner give its files to a group it is a member of,
    and CAP_CHOWN to any group."""
    return gid == os.getegid() or gid in os.getgroups() or "CAP_CHOWN" in effective_caps()


def kernel_has_cap_bpf(release: str | None = None) -> bool:
    """Whether the kernel (release string as in `uname -r`) knows CAP_BPF: 5.8 or newer."""
    release = release or os.uname().release
    numbers = []
    for part in release.split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit()) or "0"
        numbers.append(int(digits))
    return tuple(numbers) >= (5, 8)


def required_caps(release: str | None = None) -> tuple[str, ...]:
    return CONTROLLER_CAPS if kernel_has_cap_bpf(release) else CONTROLLER_CAPS_BEFORE_5_8


def missing_caps(needed=None, have: set[str] | None = None) -> list[str]:
    needed = needed or required_caps()
    have = effective_caps() if have is None else have
    if "CAP_SYS_ADMIN" in have:
        # The kernel still accepts CAP_SYS_ADMIN for both (bpf_capable, perfmon_capable).
        have = have | {"CAP_BPF", "CAP_PERFMON"}
    return [cap for cap in needed if cap not in have]


def bpf_syscall_refused() -> bool:
    """Whether bpf(2) fails with EPERM although the capabilities are there: a seccomp
    profile (or an LSM) in the way. Probes by creating a one-entry array map, closed at
    once."""
    import errno

    from . import bpfsys
    bpf_map_type_array = 2
    fd = bpfsys.call(bpfsys.BPF_MAP_CREATE, bpfsys.MapCreateAttr(bpf_map_type_array, 4, 4, 1))
    if fd >= 0:
        os.close(fd)
        return False
    return fd == -errno.EPERM


def can_write_frames() -> bool:
    """Whether this process may write frames on an interface (AF_PACKET: CAP_NET_RAW), as
    the controller does with the request of each error response."""
    return "CAP_NET_RAW" in effective_caps()


def seccomp_mode() -> str:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Seccomp:"):
            return {"0": "off", "1": "strict", "2": "filter"}.get(line.split()[1], "?")
    return "?"


def _short(caps) -> list[str]:
    return [c.removeprefix("CAP_") for c in caps]


def fix_hint(needed) -> str:
    names = _short(needed)
    return (f"in a container: --cap-add {','.join(names)} (Kubernetes: "
            f"securityContext.capabilities.add: [{', '.join(names)}])")


def require(what: str, needed=None) -> None:
    """Raises UsageError unless this process is root with every capability in `needed`
    (default: the controller's set for this kernel) in its effective set. The message
    names what is missing and the fix, for a non-root user and for a root whose
    capabilities were dropped (a container without --cap-add, setpriv, capsh)."""
    needed = tuple(needed or required_caps())
    uid = os.geteuid()
    if uid != 0:
        raise UsageError(f"must run as root: {what} needs {', '.join(needed)}, and uid {uid} "
                         f"is not root; run it with sudo, or as root {fix_hint(needed)}")
    missing = missing_caps(needed)
    if missing:
        raise UsageError(f"running as root without {', '.join(missing)}: {what} needs "
                         f"{', '.join(needed)}; grant them, {fix_hint(needed)}")
    if "CAP_BPF" in needed and bpf_syscall_refused():
        raise UsageError(f"bpf(2) is refused (EPERM) although {', '.join(needed)} are held: "
                         f"a seccomp profile (here: {seccomp_mode()}) allows it only with "
                         "CAP_SYS_ADMIN, as podman's and older Docker's defaults do. Run with "
                         "the profile container/seccomp-profile writes (--security-opt "
                         "seccomp=FILE), or a runtime whose default allows bpf to CAP_BPF")
