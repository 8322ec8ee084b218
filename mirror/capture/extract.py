"""`mirror capture --extract`: the packets of the connections of the sidecar's ring that
match (a Community ID, statuses, a time window: all the criteria given) into one pcapng
file, each request before its response, annotated like a recording
(mirror.capture.annotate) with what the index says of each connection.

Two passes over the ring's files, oldest first, one file in memory at a time: the first
sums up every connection (its Community ID, the statuses its server sent, its first and
last packet time), the second writes the packets of those that match, through the
reorder's Holder (size-bounded, no time bound), so that a request still after its
response (in the file tcpdump is writing, not yet reordered, or in the next ring file)
is put before it. A file the ring overwrites between the passes gives what it holds by
then.

Selector.extra is where further criteria go (the workload of a connection, once the
index names it): predicates on a connection's Summary, all of which must hold."""
from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..communityid import of_flow
from ..errors import UsageError
from ..flowkey import FlowKey, key_of
from ..http1 import status_line
from .annotate import AnnotatedWriter, open_output
from .flow import Packet
from .index import CorruptIndex, read_index
from .pcap import read_file, timestamp_ns
from .reorder import Frame, Holder
from .ring import list_pcaps
from .sidecar import INDEX_NAME, STATUS_NAME

log = logging.getLogger("mirror")

_STATUS_ITEM = re.compile(r"^([1-5])xx$|^(\d{3})(?:-(\d{3}))?$")


@dataclass
class Summary:
    """A connection of the ring, as the first pass saw it."""
    key: FlowKey
    community_id: str
    statuses: set = field(default_factory=set)
    first_ts: float = math.inf
    last_ts: float = -math.inf


@dataclass(frozen=True)
class Selector:
    community_id: str | None = None
    statuses: frozenset | None = None
    since: float | None = None
    until: float | None = None
    extra: tuple[Callable[[Summary], bool], ...] = ()

    def matches(self, s: Summary) -> bool:
        return ((self.community_id is None or s.community_id == self.community_id)
                and (self.statuses is None or bool(s.statuses & self.statuses))
                and (self.since is None or s.last_ts >= self.since)
                and (self.until is None or s.first_ts <= self.until)
                and all(check(s) for check in self.extra))


def parse_statuses(spec: str) -> frozenset:
    """"500", "5xx", "500-504", comma-separated; UsageError otherwise."""
    codes: set[int] = set()
    for item in spec.split(","):
        m = _STATUS_ITEM.match(item.strip().lower())
        if not m:
            raise UsageError(f"--status {spec!r}: cannot read {item.strip()!r}; use codes "
                             "(500), classes (5xx) or ranges (500-504), comma-separated")
        if m.group(1):
            base = int(m.group(1)) * 100
            codes.update(range(base, base + 100))
            continue
        lo, hi = int(m.group(2)), int(m.group(3) or m.group(2))
        if not 100 <= lo <= hi <= 599:
            raise UsageError(f"--status {spec!r}: {item.strip()} is not a range of status "
                             "codes (100-599, low to high)")
        codes.update(range(lo, hi + 1))
    return frozenset(codes)


def parse_time(text: str, flag: str) -> float:
    """RFC 3339 (a time without an offset is UTC) or epoch seconds; UsageError otherwise."""
    try:
        value = float(text)
    except ValueError:
        try:
            when = datetime.fromisoformat(text.strip().replace("Z", "+00:00")
                                          .replace("z", "+00:00"))
        except ValueError:
            raise UsageError(f"{flag} {text!r}: use RFC 3339 (2025-01-01T12:00:00Z) or "
                             "epoch seconds") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        value = when.timestamp()
    if not math.isfinite(value):
        raise UsageError(f"{flag} {text!r}: not a finite time")
    return value


def check_community_id(text: str) -> str:
    try:
        ok = text.startswith("1:") and len(base64.b64decode(text[2:], validate=True)) == 20
    except (binascii.Error, ValueError):
        ok = False
    if not ok:
        raise UsageError(f"--community-id {text!r}: a Community ID v1 is '1:' and the "
                         "base64 of 20 bytes, e.g. 1:LQU9qZlK+B5F3KDmev6m5PMibrg=")
    return text


def selector_of(community_id, status, since, until) -> Selector:
    sel = Selector(community_id=check_community_id(community_id) if community_id else None,
                   statuses=parse_statuses(status) if status else None,
                   since=parse_time(since, "--since") if since else None,
                   until=parse_time(until, "--until") if until else None)
    if sel.since is not None and sel.until is not None and sel.since > sel.until:
        raise UsageError("--since is after --until")
    return sel


def summarise(files) -> dict[FlowKey, Summary]:
    """The first pass: every connection of the ring's files."""
    out: dict[FlowKey, Summary] = {}
    for f in files:
        for packet in _packets(f.path):
            s = out.get(packet.key)
            if s is None:
                s = out[packet.key] = Summary(packet.key, of_flow(packet.key))
            s.first_ts = min(s.first_ts, packet.ts)
            s.last_ts = max(s.last_ts, packet.ts)
            if packet.payload and status_line(packet.payload):
                s.statuses.add(int(packet.payload[9:12]))
    return out


def _packets(path):
    try:
        contents = read_file(path)
    except FileNotFoundError:
        return                          # overwritten or pruned meanwhile
    except (OSError, ValueError) as exc:
        log.warning("extract: cannot read %s: %s", path.name, exc)
        return
    for rec in contents.records:
        packet = Packet.decode(contents.header.linktype, contents.header.timestamp(rec),
                               rec.frame)
        if packet is not None:
            yield packet


def index_events(directory: Path) -> dict[FlowKey, list[dict]]:
    """What the index says of each connection, as event-like dicts for the comments."""
    try:
        records = read_index(directory / INDEX_NAME)
    except (CorruptIndex, OSError) as exc:
        log.warning("extract: the index is not read (%s): no request names in the comments",
                    exc)
        return {}
    out: dict[FlowKey, list[dict]] = {}
    for r in records:
        try:
            key = key_of(r["client"], r["server"])
        except ValueError:
            continue
        out.setdefault(key, []).append({"status": r.get("status"), "method": r.get("method"),
                                        "target": r.get("target"), "host": r.get("host"),
                                        "time": r.get("time")})
    return out


def extract_command(directory: Path, out_path: str, community_id, status, since,
                    until) -> int:
    selector = selector_of(community_id, status, since, until)
    if not directory.is_dir():
        raise UsageError(f"no capture directory {directory} (--dir)")
    files = list_pcaps(directory)
    summaries = summarise(files)
    keys = {k for k, s in summaries.items() if selector.matches(s)}
    if not keys:
        log.error("extract: no connection of the %d in %s matches; nothing written",
                  len(summaries), directory)
        return 1
    events = index_events(directory)
    out = open_output(out_path)
    holder = Holder(hold=math.inf)
    writer: AnnotatedWriter | None = None
    debug = _debug_iface(directory)
    try:
        for f in files:
            try:
                contents = read_file(f.path)
            except (OSError, ValueError):
                continue
            header = contents.header
            if writer is None:
                writer = AnnotatedWriter(out, debug, header.linktype,
                                         lambda key: events.get(key, []))
            elif header.linktype != writer.linktype:
                log.warning("extract: %s has another link type; left out", f.name)
                continue
            for rec in contents.records:
                packet = Packet.decode(header.linktype, header.timestamp(rec), rec.frame)
                if packet is None or packet.key not in keys:
                    continue
                holder.add(Frame(timestamp_ns(header, rec), bytes(rec.frame), rec.orig_len,
                                 header.linktype, packet=packet))
                for frame in holder.due(0.0):
                    writer.write(frame)
        for frame in holder.due(0.0, everything=True):
            writer.write(frame)
    finally:
        try:
            out.close()
        except BrokenPipeError:
            pass
    log.info("extract: %d connections, %d packets into %s (%d requests moved before their "
             "responses)", len(keys), writer.frames if writer else 0,
             "standard output" if out_path == "-" else out_path, holder.moved)
    return 0


def _debug_iface(directory: Path) -> str:
    """The interface the ring recorded, as its status.json says."""
    try:
        name = json.loads((directory / STATUS_NAME).read_text()).get("iface")
    except (OSError, ValueError, AttributeError):
        name = None
    return name if isinstance(name, str) else "debug interface"
