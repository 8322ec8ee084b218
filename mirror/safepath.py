"""Paths the tools write as root: the events file, the state directory and the records
and locks in it. One policy for all of them, the one systemd-tmpfiles ("unsafe path
transition") and logrotate ("insecure permissions") apply, because a root process that
writes where another user has a say can be made to write anywhere:

- every directory from / down to the one written in is owned by root or by the running
  user, and is writable by nobody else unless it is sticky (as /tmp is: there others can
  add entries but not rename or delete ours);
- a symbolic link met on the way is owned by root or the running user (with
  fs.protected_symlinks off, one planted in /tmp would otherwise be followed);
- the file itself is opened without following a symbolic link (O_NOFOLLOW), and must be a
  regular file owned by root or the running user that nobody else may write, on a real
  file system: in /proc or /sys a write is a command to the kernel, not a log line;
- a file this module creates is new (O_EXCL: a temporary file, renamed over the old one
  when done), mode 0600;
- a file shared with a group (open_append's `group`: the events file, which the capture
  sidecar reads as another user) is mode 0640 and that group's, from the moment its name
  exists: it is made complete under a temporary name and linked into place, so that a
  reader never finds it unreadable, and nobody but its owner may write it.

What fails the policy raises UnsafePath, whose message says which path and why; the
caller adds what it was for (an option, an environment variable) and the fix."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import stat
import tempfile
from pathlib import Path

# Kernel pseudo file systems (statfs f_type, from linux/magic.h): a "file" there is an
# interface to the kernel, and writing an event line into one can change the machine.
PSEUDO_FS = {
    0x9FA0: "proc", 0x62656572: "sysfs", 0x1CD1: "devpts", 0x27E0EB: "cgroup",
    0x63677270: "cgroup2", 0x64626720: "debugfs", 0x74726163: "tracefs",
    0x73636673: "securityfs", 0xCAFE4A11: "bpf", 0x62656570: "configfs",
    0x6165676C: "pstore", 0xDE5E81E4: "efivarfs", 0x42494E4D: "binfmt_misc",
}
MAX_SYMLINKS = 40           # as the kernel's path walk


class UnsafePath(Exception):
    """A path the policy above refuses; the message names it and says why."""


def _trusted_uids() -> tuple[int, int]:
    return 0, os.geteuid()


def _owner(st: os.stat_result) -> str:
    return f"owned by uid {st.st_uid}"


def check_directory(path: str | os.PathLike) -> Path:
    """Checks every existing directory from / down to `path` (which may not exist yet: the
    missing part will be created by the caller, as its own). Returns `path` with its
    symbolic links resolved. UnsafePath when a step is not safe to write under as root."""
    return Path(_walk(os.path.abspath(os.fspath(path)), 0))


def _walk(path: str, links: int) -> str:
    real = "/"
    _check_dir("/", os.lstat("/"))
    parts = [p for p in path.split("/") if p]
    for i, name in enumerate(parts):
        if name == ".":
            continue
        if name == "..":
            real = os.path.dirname(real) or "/"
            continue
        step = os.path.join(real, name)
        try:
            st = os.lstat(step)
        except FileNotFoundError:
            return os.path.join(step, *parts[i + 1:]) if parts[i + 1:] else step
        if stat.S_ISLNK(st.st_mode):
            if st.st_uid not in _trusted_uids():
                raise UnsafePath(f"{step} is a symbolic link {_owner(st)}: it could point "
                                 "anywhere")
            if links >= MAX_SYMLINKS:
                raise UnsafePath(f"{path}: too many levels of symbolic links")
            target = os.path.join(real, os.readlink(step))
            real = _walk(os.path.normpath(target), links + 1)
            rest = parts[i + 1:]
            if not os.path.lexists(real):
                return os.path.join(real, *rest) if rest else real
            if not os.path.isdir(real):
                raise UnsafePath(f"{step} is not a directory")
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafePath(f"{step} is not a directory")
        _check_dir(step, st)
        real = step
    return real


def _check_dir(path: str, st: os.stat_result) -> None:
    if st.st_uid not in _trusted_uids():
        raise UnsafePath(f"{path} is {_owner(st)}, who could swap what is in it")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        raise UnsafePath(f"{path} is writable by {_who(st.st_mode)} and not sticky: "
                         "anyone who can write it could swap what is in it")


def _who(mode: int) -> str:
    return "everyone" if mode & stat.S_IWOTH else "its group"


def check_file(st: os.stat_result, path: str) -> None:
    """The rules for the file itself, on its lstat or fstat."""
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePath(f"{path} is a symbolic link")
    if stat.S_ISDIR(st.st_mode):
        raise UnsafePath(f"{path} is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePath(f"{path} is not a regular file ({_kind(st.st_mode)})")
    if st.st_uid not in _trusted_uids():
        raise UnsafePath(f"{path} is {_owner(st)}")
    if st.st_mode & stat.S_IWOTH:
        raise UnsafePath(f"{path} is writable by everyone")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a file"


def check_writable_file(path: str) -> None:
    """Everything open_append() will check, without creating anything: the directories
    above `path`, and the file if it exists. For checks before a start."""
    parent = check_directory(os.path.dirname(os.path.abspath(path)))
    if not parent.is_dir():
        raise UnsafePath(f"{parent} does not exist")
    fs = pseudo_fs(str(parent))
    if fs:
        raise UnsafePath(f"{parent} is in {fs}, a kernel file system, not a place for files")
    target = parent / os.path.basename(path)
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        if not os.access(parent, os.W_OK):
            raise UnsafePath(f"{parent} is not writable") from None
        return
    check_file(st, str(target))
    fs = pseudo_fs(str(target))
    if fs:
        raise UnsafePath(f"{target} is in {fs}, a kernel file system, not a file")


SHARED_MODE = 0o640         # a file shared with a group: it reads, only the owner writes


def open_append(path: str, mode: int = 0o600, group: int | None = None) -> int:
    """A descriptor to append to `path`, created with `mode` if missing, under the policy
    above. The file is looked at (lstat) before it is opened, so that a device or a pipe
    is never opened at all (opening some devices does something). With `group` (a gid),
    the file is shared with that group: created mode SHARED_MODE and that group's
    (_create_shared), and an existing one given both; changing the group needs the
    process to be a member of it, or CAP_CHOWN (EPERM otherwise)."""
    check_directory(os.path.dirname(os.path.abspath(path)))
    try:
        before = os.lstat(path)
    except FileNotFoundError:
        before = None
        if group is not None:
            _create_shared(path, group)
            before = os.lstat(path)
            check_file(before, path)
    else:
        check_file(before, path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW |
                 os.O_NONBLOCK | os.O_CLOEXEC, mode)
    try:
        st = os.fstat(fd)
        check_file(st, path)
        if before is not None and (before.st_dev, before.st_ino) != (st.st_dev, st.st_ino):
            raise UnsafePath(f"{path} was replaced while being opened")
        fs = pseudo_fs(fd)
        if fs:
            raise UnsafePath(f"{path} is in {fs}, a kernel file system, not a file")
        if group is not None:
            if st.st_gid != group:
                os.fchown(fd, -1, group)
            if stat.S_IMODE(st.st_mode) != SHARED_MODE:
                os.fchmod(fd, SHARED_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _create_shared(path: str, group: int) -> None:
    """Creates `path` empty, mode SHARED_MODE, owned by `group`, all at once: made under a
    new temporary name (O_EXCL|O_NOFOLLOW, as mkstemp makes it), given its group and mode,
    then hard-linked to `path`, which fails rather than replace a file created meanwhile
    (that one is then opened and checked as any existing file)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                               prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchown(fd, -1, group)
        os.fchmod(fd, SHARED_MODE)
        try:
            os.link(tmp, path, follow_symlinks=False)
        except FileExistsError:
            pass
    finally:
        os.close(fd)
        os.unlink(tmp)


def write_atomic(path: Path, data: bytes, mode: int = 0o600, durable: bool = False) -> None:
    """Writes `data` to a new temporary file beside `path` (O_EXCL|O_NOFOLLOW, as mkstemp
    makes it), then renames it over `path`: a reader never sees half a file, and nothing
    planted at a predictable temporary name is followed or overwritten. `durable`: the
    data and the rename are on disk before it returns (a file that must survive a power
    cut whole, not a tmpfs record)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if mode != 0o600:
                os.fchmod(f.fileno(), mode)
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dirfd)
            finally:
                os.close(dirfd)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# --- statfs ---------------------------------------------------------------------------

class _Statfs(ctypes.Structure):
    # f_type is the first field of struct statfs on every Linux ABI this tool runs on; the
    # rest is room (the struct is 120 bytes on 64-bit targets).
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 256)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def pseudo_fs(where: int | str) -> str | None:
    """The name of the kernel pseudo file system that `where` (a descriptor or a path)
    is on, or None (a disk, tmpfs, overlay...). None when statfs fails: the open or
    write that follows reports that better."""
    buf = _Statfs()
    if isinstance(where, int):
        rc = _libc.fstatfs(where, ctypes.byref(buf))
    else:
        rc = _libc.statfs(os.fsencode(where), ctypes.byref(buf))
    if rc != 0:
        return None
    return PSEUDO_FS.get(buf.f_type & 0xFFFFFFFF)
