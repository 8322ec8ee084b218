"""What the pcapng files of `mirror capture -w` and `--extract` say about each connection,
beside its packets, and the text escaping of everything a packet put into what an
operator reads (there, and in `mirror capture --list`).

An annotated file has one interface per monitored interface a connection came through,
where known (named after it, described as mirrored through the debug interface), else
the debug interface; and comments (pcapng opt_comment, tshark's frame.comment):
- on a connection's first frame: client -> server, its Community ID, its interface and
  the workload behind it (ns/pod (containers), as `mirror events` writes it);
- on an error response: its event (status, method, target, host, interface, workload,
  time), from the controller's events (the recording) or the capture index and the
  controller's events file (the extract);
- on a request moved before its response: that it was, and when it was captured.
Everything that comes from a packet is escaped (printable): Wireshark shows comments
as they are, and tshark prints them to a terminal."""
from __future__ import annotations

import collections
import os
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

from ..communityid import of_flow
from ..cliutil import printable
from ..errors import UsageError
from ..flowkey import FlowKey, endpoint, key_of
from ..http1 import status_line
from .pcap import PcapngWriter
from ..workload.model import HOST, PENDING_RUNTIME, Workload
from .reorder import Frame

MAX_CONNECTIONS = 65536         # connections remembered (their first frame written)


def event_key(event: dict) -> FlowKey | None:
    """The connection of an event (its client and server), None when they do not read."""
    try:
        return key_of(event["client"], event["server"])
    except (KeyError, TypeError, ValueError):
        return None


def describe_event(event: dict) -> str:
    """An error event (the controller's, or an index record) as one comment."""
    request = (f"{event.get('method')} {event.get('target')}" if event.get("method")
               else "a request not captured")
    proto = f" ({event['proto']})" if event.get("proto") not in (None, "h1") else ""
    parts = [f"mirror: error {event.get('status')}{proto} for {request}"]
    if event.get("host"):
        parts.append(f"host {event['host']}")
    if event.get("iface"):
        who = workload_phrase(event)
        parts.append(f"on {event['iface']}" + (f" ({who})" if who else ""))
    if event.get("time"):
        parts.append(f"at {event['time']}")
    return printable(", ".join(parts))


def workload_phrase(event: dict) -> str | None:
    """The workload an event names, as one phrase (mirror.workload.model.Workload
    .describe), None when it names none (a host interface, an answer still pending)."""
    w = Workload.from_attributes(event)
    return None if w.runtime in (HOST, PENDING_RUNTIME) else w.describe()


@dataclass
class Connection:
    iface: str | None = None
    workload: str | None = None
    annotated: set = field(default_factory=set)     # the events written (their numbers)


class AnnotatedWriter:
    """A pcapng stream of frames with their connections' notes. `events_of(key)` gives
    what is known of a connection: a list of event dicts (status, method, target, host,
    iface, time), perhaps empty."""

    def __init__(self, f: BinaryIO, debug_iface: str, linktype: int,
                 events_of: Callable[[FlowKey], list[dict]]):
        self.out = PcapngWriter(f)
        self.debug_iface, self.linktype = debug_iface, linktype
        self.events_of = events_of
        self.interfaces: dict[str, int] = {
            debug_iface: self.out.add_interface(debug_iface, "the mirror's debug interface",
                                                linktype)}
        self.connections: collections.OrderedDict[FlowKey, Connection] = \
            collections.OrderedDict()
        self.frames = 0
        self.events_written = 0

    @staticmethod
    def _where(conn: Connection, events: list[dict]) -> None:
        """The interface (and its workload) of the first event that names one."""
        event = next((e for e in events if e.get("iface")), None)
        if event is not None:
            conn.iface, conn.workload = event["iface"], workload_phrase(event)

    def _interface(self, name: str | None, workload: str | None) -> int:
        if name is None:
            return 0
        if name not in self.interfaces:
            behind = f" ({printable(workload)})" if workload else ""
            self.interfaces[name] = self.out.add_interface(
                printable(name), f"mirrored from {printable(name)}{behind} through "
                f"{printable(self.debug_iface)}", self.linktype)
        return self.interfaces[name]

    def write(self, frame: Frame) -> None:
        packet, comments, iface, workload = frame.packet, [], None, None
        if packet is not None:
            key = packet.key
            conn = self.connections.get(key)
            events = self.events_of(key)
            if conn is None:
                conn = self.connections[key] = Connection()
                if len(self.connections) > MAX_CONNECTIONS:
                    self.connections.popitem(last=False)
                self._where(conn, events)
                comments.append(self._first_note(frame, conn))
            else:
                self.connections.move_to_end(key)
                if conn.iface is None:
                    self._where(conn, events)
            iface, workload = conn.iface, conn.workload
            for event in self._events_here(packet, events, conn):
                comments.append(describe_event(event))
                self.events_written += 1
            if frame.moved_from_ns is not None:
                comments.append(
                    "mirror: request moved before the response it got (the controller "
                    "writes it after the response; captured at "
                    f"{frame.moved_from_ns // 1_000_000_000}."
                    f"{frame.moved_from_ns % 1_000_000_000:09d})")
        self.out.write(frame.ts_ns, frame.data, frame.orig_len, self._interface(iface, workload),
                       comments)
        self.frames += 1

    @staticmethod
    def _events_here(packet, events: list[dict], conn: Connection) -> list[dict]:
        """The events written on this frame: an HTTP/1.x error on the response that
        carries its status; another protocol's (h2, gRPC: the frame holding the status
        is not told apart here) on the first frame with a payload once it is known.
        Each event once."""
        if not packet.payload:
            return []
        status = int(packet.payload[9:12]) if status_line(packet.payload) else None
        out = []
        for n, event in enumerate(events):
            if n in conn.annotated:
                continue
            h1 = event.get("proto", "h1") == "h1"
            if (h1 and status is not None and event.get("status") == status) or not h1:
                conn.annotated.add(n)
                out.append(event)
                if h1:
                    break
        return out

    def _first_note(self, frame: Frame, conn: Connection) -> str:
        p = frame.packet
        if p.payload and status_line(p.payload):
            server, client = p.source, p.dest
        elif p.sport < p.dport:
            server, client = p.source, p.dest
        else:
            client, server = p.source, p.dest
        note = (f"mirror: connection {endpoint(*client)} -> {endpoint(*server)}, "
                f"community_id {of_flow(p.key)}")
        if conn.iface:
            note += f", on {conn.iface}" + (f" ({conn.workload})" if conn.workload else "")
        return printable(note)


def open_output(path: str) -> BinaryIO:
    """Where a pcapng goes: standard output for "-", else a regular file (or a FIFO),
    created 0600 or truncated, never through a symbolic link (O_NOFOLLOW: these commands
    run as root, and a link planted where the file goes would aim that elsewhere).
    UsageError when it cannot be."""
    if path == "-":
        if sys.stdout.isatty():
            raise UsageError("-w -: standard output is a terminal; pipe it (| wireshark -k "
                             "-i -, | tshark -r -) or give a file")
        return sys.stdout.buffer
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise UsageError(f"-w {path}: {exc.strerror}") from None
    if st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISFIFO(st.st_mode)):
        raise UsageError(f"-w {path}: exists and is not a regular file")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise UsageError(f"-w {path}: {exc.strerror}") from None
    return os.fdopen(fd, "wb")
