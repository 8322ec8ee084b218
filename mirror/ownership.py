"""Ownership of kernel state: records and locks, so that a controller removes exactly what
it added and a restarted one finds what a killed one left behind (what a record describes
is removed by the kind of hook it names: mirror.hooks).

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

from typing import Callable

from . import jsonfile
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


def live_controllers() -> list[dict]:
    """The records of the controllers of this namespace that are running (their lock is
    held)."""
    return [rec for rec in records("controller")
            if "id" in rec and is_held(f"controller-{rec['id']}")]


def prune(own_id: str, iface_exists: Callable[[int], bool],
          debug_exists: Callable[[str], bool]) -> None:
    """Drops what stopped controllers left in the state directory that no longer describes
    anything: records of interfaces that are gone, records of dead controllers, and
    unheld lock files of those (so /run does not fill up). `own_id`: the calling
    controller's id, whose record and lock are kept."""
    for rec in records("iface"):
        if not iface_exists(rec["ifindex"]) and not is_held(iface_lock_name(rec["ifindex"])):
            remove("iface", iface_key(rec["ifindex"]))
    for rec in records("debug"):
        if not debug_exists(rec["name"]) and not is_held(f"debug-{rec['name']}"):
            remove("debug", rec["name"])
    for rec in records("controller"):
        if rec.get("id") != own_id and not is_held(f"controller-{rec.get('id')}"):
            remove("controller", str(rec.get("id")))
    for path in netns_dir().glob("*.lock"):
        name = path.name[:-len(".lock")]
        if name.startswith("iface-if"):
            gone = not iface_exists(int(name[len("iface-if"):]))
        elif name.startswith("debug-"):
            gone = not debug_exists(name[len("debug-"):])
        else:
            gone = name.startswith("controller-") and name != f"controller-{own_id}"
        if gone:
            remove_if_free(name)
