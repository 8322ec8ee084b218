"""Trigger specs: which HTTP status codes mark a connection for mirroring.

A spec is a comma-separated list of codes (``500``), inclusive ranges (``500-504``) and
classes (``5xx``), or ``none`` for an empty set (count responses, mirror nothing).
"""
from __future__ import annotations

import re

from .errors import UsageError

MIN_CODE = 100
MAX_CODE = 599

_CLASS = re.compile(r"^([1-5])xx$")
_RANGE = re.compile(r"^(\d{3})-(\d{3})$")
_CODE = re.compile(r"^\d{3}$")

SPEC_HELP = "codes, ranges and classes such as '5xx', '500-504' or '429,5xx' (or 'none')"


def _code(text: str, spec: str) -> int:
    code = int(text)
    if not MIN_CODE <= code <= MAX_CODE:
        raise UsageError(f"bad trigger spec {spec!r}: status code {code} is outside "
                         f"{MIN_CODE}-{MAX_CODE}; use {SPEC_HELP}")
    return code


def parse_trigger(spec: str) -> frozenset[int]:
    """Returns the set of status codes a spec names; raises UsageError for a bad spec."""
    if spec is None or not spec.strip():
        raise UsageError(f"empty trigger spec; use {SPEC_HELP}")
    if spec.strip().lower() == "none":
        return frozenset()
    codes: set[int] = set()
    for part in spec.split(","):
        item = part.strip().lower()
        if m := _CLASS.match(item):
            base = int(m.group(1)) * 100
            codes.update(range(base, base + 100))
        elif m := _RANGE.match(item):
            lo, hi = _code(m.group(1), spec), _code(m.group(2), spec)
            if lo > hi:
                raise UsageError(f"bad trigger spec {spec!r}: range {item} runs backwards; "
                                 f"write {hi}-{lo}")
            codes.update(range(lo, hi + 1))
        elif _CODE.match(item):
            codes.add(_code(item, spec))
        else:
            raise UsageError(f"bad trigger spec {spec!r}: cannot read {part.strip()!r}; "
                             f"use {SPEC_HELP}")
    return frozenset(codes)


def describe(codes: frozenset[int]) -> str:
    """Compact text for a code set: whole classes as NXX, runs as ranges."""
    if not codes:
        return "none"
    parts, rest = [], set(codes)
    for cls in range(1, 6):
        block = set(range(cls * 100, cls * 100 + 100))
        if block <= rest:
            parts.append((cls * 100, f"{cls}xx"))
            rest -= block
    run: list[int] = []
    for code in sorted(rest) + [None]:
        if run and (code is None or code != run[-1] + 1):
            parts.append((run[0], str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}"))
            run = []
        if code is not None:
            run.append(code)
    return ",".join(text for _, text in sorted(parts))
