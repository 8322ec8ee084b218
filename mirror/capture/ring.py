"""The ring of pcap files tcpdump writes (-C SIZE -W FILES): their names, which one is
being written, in what order they were written."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

FILE_RE = re.compile(r"^mirror-\d{8}T\d{6}Z-r(\d+)\.pcap(\d+)$")


def file_signature(st: os.stat_result) -> tuple:
    """(inode, size, mtime_ns): changes when tcpdump rewrites a file, and when the
    reorder replaces one (the sidecar's cursors compare it, whoever took it)."""
    return (st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class PcapFile:
    path: Path
    run: int
    number: int
    signature: tuple        # (inode, size, mtime_ns): changes when tcpdump rewrites it

    @property
    def name(self) -> str:
        return self.path.name


def list_pcaps(directory: Path) -> list[PcapFile]:
    out = []
    for p in directory.iterdir():
        m = FILE_RE.match(p.name)
        if not m:
            continue
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        out.append(PcapFile(p, int(m.group(1)), int(m.group(2)), file_signature(st)))
    out.sort(key=lambda f: (f.signature[2], f.run, f.number))
    return out


def current_file(files: list[PcapFile], run: int, ring: int) -> PcapFile | None:
    """The file tcpdump run `run` is writing: the most recently modified of that run. On a
    tie (both within one clock tick) the later one in ring order."""
    mine = [f for f in files if f.run == run]
    if not mine:
        return None
    newest = max(f.signature[2] for f in mine)
    tied = sorted(f.number for f in mine if f.signature[2] == newest)
    if len(tied) > 1 and tied[0] == 0 and tied[-1] == ring - 1:
        number = 0                      # wrapped around: ring-1 was closed, 0 reopened
    else:
        number = tied[-1]
    return next(f for f in mine if f.number == number)
