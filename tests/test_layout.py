"""README's "Layout" names every module of mirror/ and every file of bpf/, each under the
directory it lives in, so that a newcomer's map of the tree stays the tree."""
from __future__ import annotations

import re

import pytest

from helpers import ROOT

pytestmark = pytest.mark.unit


def layout_entries() -> set[str]:
    """Paths named in README's Layout block: `dir/` lines open a directory for the lines
    indented below them; every word ending in .py, .c or .h is a file of the directory
    open at its indentation."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Layout\n.*?```\n(.*?)```", text, re.S).group(1)
    open_dirs: list[tuple[int, str]] = []       # (indentation, path)
    out = set()
    for line in block.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        open_dirs = [(i, d) for i, d in open_dirs if i < indent]
        prefix = open_dirs[-1][1] if open_dirs else ""
        first = line.split()[0]
        if first.endswith("/"):
            open_dirs.append((indent, prefix + first))
            out.add(prefix + first)
        # the file names a line starts with, before its description
        for names in re.findall(r"^\s*((?:[\w.-]+\.(?:py|c|h)\s+)+)", line + " "):
            out.update(prefix + name for name in names.split())
    return out


def tree_files() -> set[str]:
    files = {f"bpf/{p.name}" for p in (ROOT / "bpf").iterdir() if p.suffix in (".c", ".h")}
    for p in (ROOT / "mirror").rglob("*.py"):
        if p.name in ("__init__.py", "__main__.py") or "__pycache__" in p.parts:
            continue
        files.add(p.relative_to(ROOT).as_posix())
    for d in (ROOT / "mirror").iterdir():
        if d.is_dir() and (d / "__init__.py").exists():
            files.add(d.relative_to(ROOT).as_posix() + "/")
    return files


def test_layout_names_every_module_where_it_lives():
    named = layout_entries()
    missing = sorted(tree_files() - named)
    assert not missing, f"README's Layout does not name: {', '.join(missing)}"


def test_layout_names_nothing_that_is_gone():
    named = {n for n in layout_entries() if n.startswith(("mirror/", "bpf/"))}
    gone = sorted(n for n in named if not (ROOT / n).exists())
    assert not gone, f"README's Layout names what the tree does not have: {', '.join(gone)}"
