"""Ownership of kernel state: records and locks, so that a controller removes exactly what
it added and a restarted one finds what a killed one left behind, and the removal of what
a record (or, for this tool's recognisable filters, no record) describes.

Records live under $MIRROR_STATE_DIR (default /run/tc-mirror, a tmpfs that lives as long
as the kernel state it describes), one directory per network namespace, named by the
namespace's cookie (never reused within a boot, unlike its inode number). Interfaces are
recorded by ifindex, so a renamed interface is still recognised. A controller holds an
flock on `iface-ifN.lock` for every interface it monitors and on `controller-ID.lock`
for its own life: the kernel drops a lock when the process dies, however it dies, so a
record whose lock is free is stale. Users of a debug interface share `debug-NAME.lock`;
the last one out removes the interface if this tool created it."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import struct
import time
from pathlib import Path

from . import jsonfile, tc
from .errors import UsageError


def state_root() -> Path:
    return Path(os.environ.get("MIRROR_STATE_DIR", "/run/tc-mirror"))


SO_NETNS_COOKIE = 71


def netns_id() -> str:
    """The network namespace's cookie (Linux 5.14+), or its inode number before that."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            raw = s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
        return f"cookie-{struct.unpack('=Q', raw)[0]}"
    except OSError:
        return f"inode-{os.stat('/proc/self/ns/net').st_ino}"


def netns_dir() -> Path:
    d = state_root() / f"netns-{netns_id()}"
    try:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise UsageError(f"cannot use the state directory {d}: {exc.strerror}; set "
                         "MIRROR_STATE_DIR to a writable directory (a tmpfs such as /run)") \
            from None
    return d


def iface_key(ifindex: int) -> str:
    return f"if{ifindex}"


def _path(kind: str, name: str) -> Path:
    return netns_dir() / f"{kind}-{name}.json"


def read(kind: str, name: str) -> dict | None:
    try:
        return json.loads(_path(kind, name).read_text())
    except (FileNotFoundError, ValueError):
        return None


def write(kind: str, name: str, record: dict) -> None:
    jsonfile.write(_path(kind, name), record)


def remove(kind: str, name: str) -> None:
    try:
        _path(kind, name).unlink()
    except FileNotFoundError:
        pass


def records(kind: str) -> list[dict]:
    out = []
    for p in sorted(netns_dir().glob(f"{kind}-*.json")):
        try:
            out.append(json.loads(p.read_text()))
        except ValueError:
            continue
    return out


class Lock:
    """A non-blocking flock on one name (exclusive, or shared); released on close or
    process death."""

    def __init__(self, name: str):
        self.path = netns_dir() / f"{name}.lock"
        self.fd: int | None = None

    def acquire(self, shared: bool = False, wait: float = 0.0) -> bool:
        """Takes the lock; False if someone else holds it (after trying for `wait`
        seconds)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return False
                time.sleep(0.02)
        self.fd = fd
        return True

    def share(self) -> None:
        """Turns a held exclusive lock into a shared one."""
        fcntl.flock(self.fd, fcntl.LOCK_SH)

    def try_exclusive(self) -> bool:
        """Converts a held shared lock to exclusive if nobody else holds it."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def is_held(name: str) -> bool:
    """True when a live process holds the lock (probes by trying to take it; never
    creates the lock file)."""
    try:
        fd = os.open(netns_dir() / f"{name}.lock", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def remove_if_free(name: str) -> bool:
    """Deletes a lock file nobody holds (so /run does not fill with the names of
    interfaces long gone); True if it was removed."""
    lock = Lock(name)
    if not lock.path.exists() or not lock.acquire():
        return False
    try:
        lock.path.unlink()
        return True
    finally:
        lock.release()


def iface_lock_name(ifindex: int) -> str:
    return f"iface-{iface_key(ifindex)}"


# --- detaching what a record (or nothing) describes ---------------------------------------

def detach_record(ipr, record: dict, ifindex: int) -> list[str]:
    """Removes what a (possibly dead) controller's record says it added to one interface:
    its filters, and the qdiscs it created unless someone else's filters now use them.
    Returns what was done, for the log."""
    done = []
    for direction, parent in record.get("parents", {}).items():
        if tc.del_filter(ipr, ifindex, parent):
            done.append(f"filter {direction}")
    for kind in reversed(record.get("created", [])):
        if tc.qdisc_has_foreign_filters(ipr, ifindex, kind):
            done.append(f"kept {kind} qdisc (other filters use it)")
        elif tc.del_qdisc(ipr, ifindex, kind):
            done.append(f"qdisc {kind}")
    return done


def detach_unrecorded(ipr, ifindex: int) -> list[str]:
    """Removes filters of this tool that no record describes (qdiscs are left alone: with
    no record, nothing says this tool created them)."""
    done = []
    for f in tc.our_filters(ipr, ifindex):
        if tc.del_filter(ipr, ifindex, f.parent):
            done.append(f"filter at {tc.fmt_handle(f.parent)}")
    return done
