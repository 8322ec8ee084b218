"""The events file: one JSON line per error response, for a log pipeline or `jq`."""
from __future__ import annotations

import os
import sys


class EventsFile:
    """JSON lines appended to PATH (mode 0600), moved to PATH.1 once PATH passes
    `max_bytes` (one rotated file: at most about twice max_bytes on disk); "-" writes to
    standard output instead."""

    def __init__(self, path: str, max_bytes: int = 16 << 20):
        self.path, self.max_bytes = path, max_bytes
        self._file = None

    def write(self, line: str) -> None:
        if self.path == "-":
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
            return
        if self._file is None:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._file = os.fdopen(fd, "a", buffering=1)
        self._file.write(line + "\n")
        if self._file.tell() >= self.max_bytes:
            self._file.close()
            self._file = None
            os.replace(self.path, self.path + ".1")

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None
