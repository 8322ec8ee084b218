"""Atomic JSON files: written beside, then renamed over, so a reader (another controller,
`mirror status`, `mirror capture --list`) never sees half a file. The file beside is new
and unpredictable (mirror.safepath.write_atomic), so nothing planted in the directory is
followed or overwritten."""
from __future__ import annotations

import json
from pathlib import Path

from .safepath import write_atomic


def write(path: Path, data) -> None:
    write_atomic(Path(path), json.dumps(data, indent=1, sort_keys=True).encode())
