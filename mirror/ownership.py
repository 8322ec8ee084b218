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
the last one out removes the interface if this tool created it. Each controller's control
socket (mirror.ctlsocket) is `controller-ID.sock` beside its record.

The directory decides what a controller removes from the kernel, so it is trusted only
when nobody but root (or the running user) can write it (check_state_dir), and a record
is believed only when it says what its file name says (_describes); what a record claims
to have created is checked against the kernel before anything is removed (mirror.hooks).
A clean exit leaves nothing behind: records, locks and sockets are removed."""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import socket
import stat
import struct
import time
from pathlib import Path

from typing import Callable

from . import jsonfile
from .errors import UsageError
from .safepath import UnsafePath, check_directory, pseudo_fs

log = logging.getLogger("mirror")

DEFAULT_STATE_DIR = "/run/tc-mirror"
# What a controller's id looks like (mirror.controller: pid and a random suffix). A record
# is believed only when what it says it is matches its file name (see _describes).
CONTROLLER_ID = re.compile(r"[0-9]{1,10}-[0-9a-f]{8}")


def state_root() -> Path:
    return Path(os.environ.get("MIRROR_STATE_DIR") or DEFAULT_STATE_DIR)


SO_NETNS_COOKIE = 71


def netns_id() -> str:
    """The network namespace's cookie (Linux 5.14+), or its inode number before that."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            raw = s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
        return f"cookie-{struct.unpack('=Q', raw)[0]}"
    except OSError:
        return f"inode-{os.stat('/proc/self/ns/net').st_ino}"


_checked: set[str] = set()      # state directories found safe by this process


def _source() -> str:
    return "MIRROR_STATE_DIR" if os.environ.get("MIRROR_STATE_DIR") else "the state directory"


def _refuse(root: Path, why: str) -> UsageError:
    return UsageError(f"{_source()} {root} is not safe to keep root's records in: {why}; use a "
                      "directory owned by root and writable by root only (the default "
                      f"{DEFAULT_STATE_DIR} is created so)")


def check_state_dir(create: bool = False, creatable: bool = False) -> Path | None:
    """The state directory, checked (mirror.safepath: every directory above it safe to
    write under as root; itself owned by root or the running user and writable by nobody
    else, sticky or not: its records decide which qdiscs are removed and where the control
    sockets are). Created (mode 0700) when missing and `create`; None when missing
    otherwise, after checking that it could be made when `creatable` (a start finds out
    before it touches the kernel). UsageError naming MIRROR_STATE_DIR when it is not
    safe."""
    root = state_root()
    try:
        check_directory(root)
        st = os.stat(root)
    except UnsafePath as exc:
        raise _refuse(root, str(exc)) from None
    except FileNotFoundError:
        if not create:
            if creatable:
                _check_creatable(root)
            return None
        try:
            root.mkdir(parents=True, exist_ok=True, mode=0o700)
            check_directory(root)
            st = os.stat(root)
        except UnsafePath as exc:
            raise _refuse(root, str(exc)) from None
        except OSError as exc:
            raise UsageError(f"cannot create {_source()} {root}: {exc.strerror}; set "
                             "MIRROR_STATE_DIR to a writable directory (a tmpfs such as "
                             "/run)") from None
    except OSError as exc:
        raise _refuse(root, exc.strerror) from None
    if str(root) not in _checked:
        if not stat.S_ISDIR(st.st_mode):
            raise _refuse(root, "it is not a directory")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            who = "everyone" if st.st_mode & stat.S_IWOTH else "its group"
            raise _refuse(root, f"it is writable by {who} (mode "
                          f"{stat.S_IMODE(st.st_mode):04o})")
        _checked.add(str(root))
    return root


def _check_creatable(root: Path) -> None:
    """UsageError unless the missing state directory could be made (its nearest existing
    ancestor is a writable directory outside the kernel's file systems)."""
    real = check_directory(root)
    existing = next(p for p in (real, *real.parents) if os.path.lexists(p))
    why = (None if existing.is_dir() and os.access(existing, os.W_OK) and
           not pseudo_fs(str(existing)) else f"{existing} is not a directory it can be made in")
    if why:
        raise UsageError(f"cannot create {_source()} {root}: {why}; set MIRROR_STATE_DIR to a "
                         "writable directory (a tmpfs such as /run)")


def netns_dir(create: bool = True) -> Path | None:
    """This network namespace's directory of the state directory, created (mode 0700)
    when missing and `create`; None when missing otherwise (readers create nothing)."""
    root = check_state_dir(create)
    if root is None:
        return None
    d = root / f"netns-{netns_id()}"
    try:
        st = os.lstat(d)
    except FileNotFoundError:
        if not create:
            return None
        try:
            d.mkdir(mode=0o700, exist_ok=True)
            st = os.lstat(d)
        except OSError as exc:
            raise UsageError(f"cannot use {_source()} {root}: {d}: {exc.strerror}; set "
                             "MIRROR_STATE_DIR to a writable directory (a tmpfs such as /run)") \
                from None
    if str(d) not in _checked:
        try:
            check_directory(d)
        except UnsafePath as exc:
            raise _refuse(root, str(exc)) from None
        if not stat.S_ISDIR(st.st_mode) or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise _refuse(root, f"{d} is not a directory writable by its owner only")
        _checked.add(str(d))
    return d


def iface_key(ifindex: int) -> str:
    return f"if{ifindex}"


def _path(kind: str, name: str) -> Path:
    return netns_dir() / f"{kind}-{name}.json"


def _describes(kind: str, name: str, rec) -> bool:
    """Whether a record says it is what its file name says: an interface record names
    the ifindex of its file, a controller record the id of its file (a well-formed one),
    a debug record the interface of its file. Anything else (a forged or damaged record)
    describes nothing: it must not decide which lock is probed, which socket is asked or
    which kernel state is removed."""
    if not isinstance(rec, dict):
        return False
    if kind == "iface":
        idx = rec.get("ifindex")
        return (type(idx) is int and idx > 0 and iface_key(idx) == name
                and isinstance(rec.get("ifname"), str) and isinstance(rec.get("hook"), str)
                and isinstance(rec.get("parents"), dict)
                and isinstance(rec.get("created"), list))
    if kind == "controller":
        return (rec.get("id") == name and CONTROLLER_ID.fullmatch(name) is not None
                and type(rec.get("pid")) is int)
    if kind == "debug":
        return rec.get("name") == name and type(rec.get("ifindex")) is int
    return False


_ignored: set[str] = set()


def _load(kind: str, name: str, path: Path) -> dict | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            # Only root (or this user) writes records; anything else was put there.
            mine = stat.S_ISREG(st.st_mode) and st.st_uid in (0, os.geteuid())
            rec = json.loads(f.read(1 << 20)) if mine else None
    except (FileNotFoundError, ValueError):
        return None
    except OSError as exc:          # ELOOP: a symbolic link where a record should be
        rec = exc
    if not _describes(kind, name, rec):
        if str(path) not in _ignored:
            _ignored.add(str(path))
            log.warning("ignoring %s: not a valid %s record for %s", path, kind, name)
        return None
    return rec


def read(kind: str, name: str) -> dict | None:
    d = netns_dir(create=False)
    return _load(kind, name, d / f"{kind}-{name}.json") if d else None


def write(kind: str, name: str, record: dict) -> None:
    jsonfile.write(_path(kind, name), record)


def remove(kind: str, name: str) -> None:
    d = netns_dir(create=False)
    if d is not None:
        (d / f"{kind}-{name}.json").unlink(missing_ok=True)


def records(kind: str) -> list[dict]:
    d = netns_dir(create=False)
    if d is None:
        return []
    out = []
    for p in sorted(d.glob(f"{kind}-*.json")):
        rec = _load(kind, p.name[len(kind) + 1:-len(".json")], p)
        if rec is not None:
            out.append(rec)
    return out


CNI_UNANSWERED = "cni-unanswered"


def cni_unanswered() -> int:
    """How many CNI ADDs found no controller to answer them: the chained plugin
    (cni/tc-mirror) counts them in this namespace's directory, a decimal number in a
    file of its own, because no controller runs to count them. 0 when there is none."""
    d = netns_dir(create=False)
    if d is None:
        return 0
    try:
        fd = os.open(d / CNI_UNANSWERED, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return 0
    with os.fdopen(fd, "rb") as f:
        text = f.read(32).strip()
    return int(text) if text.isdigit() else 0


def socket_path(controller_id: str) -> Path:
    """Where a controller's control socket is (mirror.ctlsocket): beside its record, in a
    directory only root (or its own user) can enter. Derived from the id, never read
    from a record."""
    return netns_dir() / f"controller-{controller_id}.sock"


class Lock:
    """A non-blocking flock on one name (exclusive, or shared); released on close or
    process death. The last holder may remove the lock file (release(remove=True)):
    whoever opened the old file meanwhile sees, once it has the flock, that the name now
    leads elsewhere, and tries again on the new file."""

    def __init__(self, name: str):
        self.path = netns_dir() / f"{name}.lock"
        self.fd: int | None = None

    def acquire(self, shared: bool = False, wait: float = 0.0) -> bool:
        """Takes the lock; False if someone else holds it (after trying for `wait`
        seconds)."""
        deadline = time.monotonic() + wait
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                         0o600)
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.02)
                continue
            if self._is_current(fd):
                self.fd = fd
                return True
            os.close(fd)        # removed by its last holder while we waited: again

    def _is_current(self, fd: int) -> bool:
        """Whether the locked file is still the one the name leads to."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return False
        held = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)

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

    def release(self, remove: bool = False) -> None:
        """Drops the lock; with `remove` (only while holding it exclusively), its file
        too, so that a clean exit leaves no lock file behind."""
        if self.fd is None:
            return
        if remove and self._is_current(self.fd):
            self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None


def is_held(name: str) -> bool:
    """True when a live process holds the lock (probes by trying to take it; never
    creates the lock file)."""
    d = netns_dir(create=False)
    if d is None:
        return False
    try:
        fd = os.open(d / f"{name}.lock", os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
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
    lock.release(remove=True)
    return True


def iface_lock_name(ifindex: int) -> str:
    return f"iface-{iface_key(ifindex)}"


def live_controllers() -> list[dict]:
    """The records of the controllers of this namespace that are running (their lock is
    held)."""
    return [rec for rec in records("controller") if is_held(f"controller-{rec['id']}")]


def stopped_controllers() -> list[dict]:
    """The records of controllers of this namespace that died without cleaning up (a
    SIGKILL, a crash): their lock is free, their record and possibly their hooks are
    still there."""
    return [rec for rec in records("controller") if not is_held(f"controller-{rec['id']}")]


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
        if rec["id"] != own_id and not is_held(f"controller-{rec['id']}"):
            remove("controller", rec["id"])
    for path in netns_dir().glob("controller-*.sock"):
        owner = path.name[len("controller-"):-len(".sock")]
        if owner != own_id and not is_held(f"controller-{owner}"):
            path.unlink(missing_ok=True)        # a killed controller's control socket
    for path in netns_dir().glob("*.lock"):
        name = path.name[:-len(".lock")]
        if name.startswith("iface-if"):
            number = name[len("iface-if"):]
            gone = not number.isdigit() or not iface_exists(int(number))
        elif name.startswith("debug-"):
            gone = not debug_exists(name[len("debug-"):])
        else:
            gone = name.startswith("controller-") and name != f"controller-{own_id}"
        if gone:
            remove_if_free(name)
