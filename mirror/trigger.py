"""Trigger specs: which HTTP status codes and gRPC status codes mark a connection.

A spec is a comma-separated list of codes (``500``), inclusive ranges (``500-504``) and
classes (``5xx``), or ``none`` for an empty set (count responses, mirror nothing).
gRPC codes (grpc-status 0-16, read in HTTP/2 trailers) follow ``grpc:``: numbers, ranges
or names, e.g. ``5xx,grpc:2,13,14`` or ``grpc:unavailable,internal``; every item after
``grpc:`` that is not an HTTP code or class is a gRPC one. ``grpc-error`` is codes 1-16.
In the returned set gRPC codes are the ints 0-16 (the classifier's trigger slots 0-16;
HTTP codes are 100-599, so the two never meet).
"""
from __future__ import annotations

import re

from .errors import UsageError

MIN_CODE = 100
MAX_CODE = 599

_CLASS = re.compile(r"^([1-5])xx$")
_RANGE = re.compile(r"^(\d{3})-(\d{3})$")
_CODE = re.compile(r"^\d{3}$")

SPEC_HELP = ("codes, ranges and classes such as '5xx', '500-504' or '429,5xx', gRPC codes "
             "after 'grpc:' such as 'grpc:2,13,14' or 'grpc-error' (or 'none')")

# grpc-status codes by name (the gRPC status code list), index = code.
GRPC_NAMES = ("ok", "cancelled", "unknown", "invalid_argument", "deadline_exceeded",
              "not_found", "already_exists", "permission_denied", "resource_exhausted",
              "failed_precondition", "aborted", "out_of_range", "unimplemented",
              "internal", "unavailable", "data_loss", "unauthenticated")
GRPC_MAX = len(GRPC_NAMES) - 1
GRPC_ERRORS = frozenset(range(1, GRPC_MAX + 1))
_GRPC_NUM = re.compile(r"^(\d{1,2})(?:-(\d{1,2}))?$")


def _grpc_codes(item: str, spec: str) -> range:
    """The gRPC codes of one item after 'grpc:' (a number, a range or a name)."""
    if item in GRPC_NAMES:
        code = GRPC_NAMES.index(item)
        return range(code, code + 1)
    m = _GRPC_NUM.match(item)
    if not m:
        raise UsageError(f"bad trigger spec {spec!r}: {item!r} is no gRPC code; use 0-{GRPC_MAX} "
                         f"or a name such as 'unavailable'")
    lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
    if hi > GRPC_MAX or lo > hi:
        raise UsageError(f"bad trigger spec {spec!r}: gRPC codes are 0-{GRPC_MAX}, "
                         f"in ascending ranges; got {item!r}")
    return range(lo, hi + 1)


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
    grpc = False
    for part in spec.split(","):
        item = part.strip().lower()
        if item == "grpc-error":
            codes.update(GRPC_ERRORS)
            continue
        if item.startswith("grpc:"):
            grpc, item = True, item[len("grpc:"):].strip()
            codes.update(_grpc_codes(item, spec))
            continue
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
        elif grpc:
            codes.update(_grpc_codes(item, spec))
        else:
            raise UsageError(f"bad trigger spec {spec!r}: cannot read {part.strip()!r}; "
                             f"use {SPEC_HELP}")
    return frozenset(codes)


def describe(codes: frozenset[int]) -> str:
    """Compact text for a code set: whole classes as NXX, runs as ranges."""
    if not codes:
        return "none"
    grpc = sorted(c for c in codes if c <= GRPC_MAX)
    http = _describe_http(frozenset(c for c in codes if c > GRPC_MAX))
    if not grpc:
        return http
    if set(grpc) == GRPC_ERRORS:
        text = "grpc-error"
    else:
        text = "grpc:" + _runs(grpc)
    return text if http == "none" else f"{http},{text}"


def _runs(codes: list[int]) -> str:
    """Sorted codes as comma-separated single codes and ranges."""
    parts, run = [], []
    for code in codes + [None]:
        if run and (code is None or code != run[-1] + 1):
            parts.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
            run = []
        if code is not None:
            run.append(code)
    return ",".join(parts)


def _describe_http(codes: frozenset[int]) -> str:
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
