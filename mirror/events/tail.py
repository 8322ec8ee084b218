"""`mirror events --file PATH`: the events file (--events-file) read back with the same
filters and the same output as the control socket gives, for a host where the controller
has stopped, for a copy of the file, or for `kubectl logs` piped in (`--file -`).

The controller moves PATH to PATH.1 when it grows past --events-file-mb (one rotated
file, mirror.events.file), so PATH.1 is read first, then PATH. With --follow the file is
followed as `tail -F` does: the lines appended after the end are printed as they come,
and when PATH is moved away the rest of the old file is read to its end before the new
PATH is opened; no line is lost then. A rotation that happens twice between two reads
(PATH.1 is no longer the file that was being read) is said, since a file's worth of lines
went by unread. Lines that are not event objects (a truncated last line, another
program's output) are counted and said once at the end, never printed."""
from __future__ import annotations

import json
import os
import sys
import time
from typing import IO, Iterator

from ..filters import EventFilter
from .follow import POLL_SECONDS, note, print_event


class EventLines:
    """Complete lines of one open file, read as they are appended."""

    def __init__(self, stream: IO[bytes]):
        self.stream = stream
        self.partial = b""

    def read(self) -> Iterator[bytes]:
        while chunk := self.stream.read(1 << 16):
            lines = (self.partial + chunk).split(b"\n")
            self.partial = lines.pop()
            yield from lines

    def rest(self) -> Iterator[bytes]:
        """What is left after the file's last newline (a file that will grow no more)."""
        if self.partial:
            yield self.partial
            self.partial = b""


class Reader:
    def __init__(self, flt: EventFilter, as_json: bool):
        self.flt, self.as_json = flt, as_json
        self.skipped = 0

    def show(self, lines) -> None:
        for raw in lines:
            if not raw.strip():
                continue
            try:
                event = json.loads(raw)
            except ValueError:
                event = None
            if not isinstance(event, dict):
                self.skipped += 1
                continue
            if self.flt.matches(event):
                print_event(event, self.as_json)

    def done(self) -> int:
        if self.skipped:
            note(f"{self.skipped} line(s) that are not event objects skipped")
        return 0


def read_events_file(path: str, follow: bool, as_json: bool, flt: EventFilter) -> int:
    """Prints the events of the file at `path` that match `flt` ("-": standard input, read
    to its end); with `follow`, then the ones appended, until interrupted."""
    reader = Reader(flt, as_json)
    if path == "-":
        lines = EventLines(sys.stdin.buffer)
        reader.show(lines.read())
        reader.show(lines.rest())
        return reader.done()
    if not follow:
        for name in (path + ".1", path):
            try:
                with open(name, "rb") as f:
                    lines = EventLines(f)
                    reader.show(lines.read())
                    reader.show(lines.rest())
            except FileNotFoundError:
                if name == path and not os.path.exists(path + ".1"):
                    raise
        return reader.done()
    return _follow(path, reader)


def _follow(path: str, reader: Reader) -> int:
    """`tail -F` of the events file: what is there, then what is appended, across
    rotations (PATH moved to PATH.1, a new PATH)."""
    rotated = open_if_there(path + ".1")
    if rotated is not None:
        with rotated:
            lines = EventLines(rotated)
            reader.show(lines.read())
            reader.show(lines.rest())
    follower = FileFollower(path)
    while True:
        reader.show(follower.poll())
        time.sleep(POLL_SECONDS)


class FileFollower:
    """The lines appended to a file that its writer rotates (moves to PATH.1, then starts
    a new PATH), each once: poll() gives what came since the last call. Also what the
    capture sidecar reads the controller's events file with (mirror.capture.eventjoin)."""

    def __init__(self, path: str):
        self.path = path
        self.current = open_if_there(path)
        self.lines = EventLines(self.current) if self.current else None
        self.waiting = False

    def poll(self) -> Iterator[bytes]:
        if self.lines is not None:
            yield from self.lines.read()
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            now = None
        if self.lines is not None and now is not None and \
                (now.st_dev, now.st_ino) == _identity(self.current):
            return
        if self.lines is not None and now is not None:
            # Moved away (to PATH.1): its last lines first, then the new file.
            yield from self.lines.read()
            yield from self.lines.rest()
            _say_if_rotated_twice(self.path, self.current)
            self.close()
        if now is not None:
            self.current = open_if_there(self.path)
            self.lines = EventLines(self.current) if self.current else None
            self.waiting = False
        elif not self.waiting:
            note(f"{self.path} is not there (yet); waiting for it")
            self.waiting = True

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
        self.current, self.lines = None, None


def open_if_there(name: str) -> IO[bytes] | None:
    try:
        return open(name, "rb")
    except FileNotFoundError:
        return None


def _identity(f: IO[bytes]) -> tuple[int, int]:
    st = os.fstat(f.fileno())
    return st.st_dev, st.st_ino


def _say_if_rotated_twice(path: str, old: IO[bytes]) -> None:
    try:
        rotated = os.stat(path + ".1")
    except FileNotFoundError:
        return              # removed by hand, not rotated
    if (rotated.st_dev, rotated.st_ino) != _identity(old):
        note(f"{path} was rotated more than once between two reads: the lines of one "
             "file went by unread")
