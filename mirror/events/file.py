"""The events file: one JSON line per error response, for a log pipeline or `jq`."""
from __future__ import annotations

import collections
import logging
import os
import sys
import threading
import time
from typing import Callable

from ..safepath import UnsafePath, open_append

log = logging.getLogger("mirror")

# Lines kept in memory while the file cannot be written (a full disk, a file removed
# from under a read-only remount...): about 6 MB of event lines. Past it the oldest are
# dropped, and counted.
MAX_PENDING = 10_000
RETRY_FIRST_SECONDS = 0.5
RETRY_MAX_SECONDS = 30.0


class EventsFile:
    """JSON lines appended to PATH (mode 0600, opened under mirror.safepath's rules: no
    symbolic link, a regular file of root's in directories nobody else can change),
    moved to PATH.1 once PATH passes `max_bytes` (one rotated file: at most about twice
    max_bytes on disk); "-" writes to standard output instead. With `group` (a gid:
    `mirror run --events-group`), PATH is mode 0640 and that group's, from its creation
    on (safepath.open_append), so that the capture sidecar, another user in that group,
    can read it and join it (mirror.capture.eventjoin); PATH.1 keeps both.

    A write that fails never loses the line silently and never raises (the events
    reader must go on): the line is kept, with the ones after it, in memory (up to
    MAX_PENDING; past that the oldest are dropped and counted in `lost`), the failure is
    logged when it starts and when it ends and counted (`failures`, and `on_error()`:
    the controller's mirror_controller_errors_total{stage="events"}), and the file is
    opened and written again after a delay that doubles from 0.5 to 30 s (by a timer,
    so that no new event is needed), and once more at close."""

    def __init__(self, path: str, max_bytes: int = 16 << 20,
                 on_error: Callable[[], None] = lambda: None, group: int | None = None):
        self.path, self.max_bytes, self.group = path, max_bytes, group
        self.on_error = on_error
        self.pending: collections.deque[bytes] = collections.deque()
        self.failures = 0           # write attempts that failed
        self.lost = 0               # lines dropped from a full `pending`
        self._fd: int | None = None
        self._size = 0
        self._failing: str | None = None    # why the last attempt failed, while failing
        self._streak = 0
        self._retry_at = 0.0
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()       # the events thread and the retry timer

    def write(self, line: str) -> None:
        with self._lock:
            self.pending.append((line + "\n").encode())
            if len(self.pending) > MAX_PENDING:
                self.pending.popleft()
                self.lost += 1
            if time.monotonic() >= self._retry_at:
                self._flush()

    def flush(self) -> bool:
        """Writes what is pending; True when nothing is left. Never raises."""
        with self._lock:
            return self._flush()

    def _retry(self) -> None:
        with self._lock:
            self._timer = None
            self._flush()

    def _flush(self) -> bool:
        try:
            while self.pending:
                self._write_one()
        except (OSError, UnsafePath) as exc:
            self._failed(exc)
            return False
        if self._failing:
            log.warning("events file %s is written again after %d failed attempt(s)%s",
                        self.path, self._streak,
                        f"; {self.lost} event line(s) were lost meanwhile" if self.lost else "")
            self._failing, self._streak = None, 0
        return True

    def _write_one(self) -> None:
        data = self.pending[0]
        if self.path == "-":
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
            self.pending.popleft()
            return
        if self._fd is None:
            self._fd = open_append(self.path, group=self.group)
            self._size = os.fstat(self._fd).st_size
        written = os.write(self._fd, data)
        self._size += written
        if written < len(data):             # the rest when it fits (a full disk)
            self.pending[0] = data[written:]
            raise OSError(f"short write ({written} of {len(data)} bytes)")
        self.pending.popleft()
        if self._size >= self.max_bytes:
            self._close_fd()
            os.replace(self.path, self.path + ".1")

    def _failed(self, exc: Exception) -> None:
        self._close_fd()
        self.failures += 1
        self._streak += 1
        self.on_error()
        delay = min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2 ** (self._streak - 1))
        self._retry_at = time.monotonic() + delay
        if self._timer is None:
            self._timer = threading.Timer(delay, self._retry)
            self._timer.daemon = True
            self._timer.start()
        why = str(exc)
        if why != self._failing:
            log.error("cannot write the events file %s: %s; %d event line(s) kept in memory "
                      "(at most %d), retrying", self.path, why, len(self.pending), MAX_PENDING)
        self._failing = why

    def _close_fd(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    def close(self) -> None:
        """A last attempt at what is pending; what still cannot be written is reported."""
        if self._timer is not None:
            self._timer.cancel()
        if self.pending and not self.flush():
            log.error("events file %s: %d event line(s) could not be written and are lost "
                      "(and %d dropped before, more than %d waiting)", self.path,
                      len(self.pending), self.lost, MAX_PENDING)
        self._close_fd()
