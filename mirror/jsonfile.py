"""Atomic JSON files: written beside, then renamed over, so a reader (another controller,
`mirror status`, `mirror capture --list`) never sees half a file."""
from __future__ import annotations

import json
from pathlib import Path


def write(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(path)
