"""Ownership records and locks, so that a controller removes exactly what it added and a
restarted one finds what a killed one left behind.

Records live under $MIRROR_STATE_DIR (default /run/tc-mirror, a tmpfs that lives as long
as the kernel state it describes), one directory per network namespace. A controller
holds an flock on `iface-NAME.lock` for every interface it monitors: the kernel drops the
lock when the process dies, however it dies, so a record whose lock is free is stale."""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path


def state_root() -> Path:
    return Path(os.environ.get("MIRROR_STATE_DIR", "/run/tc-mirror"))


def netns_dir() -> Path:
    ino = os.stat("/proc/self/ns/net").st_ino
    d = state_root() / f"netns-{ino}"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d


def _path(kind: str, name: str) -> Path:
    return netns_dir() / f"{kind}-{name}.json"


def read(kind: str, name: str) -> dict | None:
    try:
        return json.loads(_path(kind, name).read_text())
    except (FileNotFoundError, ValueError):
        return None


def write(kind: str, name: str, record: dict) -> None:
    p = _path(kind, name)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    tmp.replace(p)


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
    """An exclusive, non-blocking flock on one name; released on close or process death."""

    def __init__(self, name: str):
        self.path = netns_dir() / f"{name}.lock"
        self.fd: int | None = None

    def acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def is_held(name: str) -> bool:
    """True when a live process holds the lock (probes by trying to take it)."""
    lock = Lock(name)
    if lock.acquire():
        lock.release()
        return False
    return True


def iface_lock_name(ifname: str) -> str:
    return f"iface-{ifname}"
