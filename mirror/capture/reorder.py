"""Putting each request frame back before the error response it got, in a finished pcap.

Why: the kernel clones an error response to the debug interface as it passes; the
request that got it went by earlier, so the controller writes the kernel's snapshot of
that request onto the debug interface afterwards, a few ms later. tcpdump records what
arrives in arrival order, so its files hold the request after its response, and tshark
and Wireshark, which pair an HTTP response with an earlier request of the connection,
show the response alone.

What moves: a segment that starts a request (mirror.capture.request), placed after a
status-line segment of the same connection travelling the other way whose
acknowledgement number covers the request (request.seq < response.ack <= the request's
end, modulo 2**32: mirror.capture.request.covers). It goes to just before the earliest
such response, with that response's timestamp less 1 microsecond, and nothing else of
the file changes: the file header, every other record and its timestamp, and a cut-short
last record (kept at the end) stay as tcpdump wrote them. (One more fact may change on a
moved request: a frame shorter than its IP header says, a snapshot cut the way tcpdump -s
cuts, gets that length as its record's original length; see moved.)

What stays: a request already before its response; a request with no response in the
same file, in particular one whose response tcpdump wrote into the previous ring file
(the file rotated between the response and the request: the index still pairs them,
since it reads a connection across files, but tshark on one file cannot); a second copy
of a request whose sequence number the file already holds before the response (a
retransmission: the first copy pairs). A response gets at most one request moved to it.

How: the file is read whole (a ring file is at most --file-size MB plus one packet),
written beside it as ".NAME.reorder" (created O_EXCL|O_NOFOLLOW: never an existing file
nor through a link) with the original's mode, given the original's modification time
(the ring tells the file tcpdump is writing by modification time), and renamed over it
(atomically: a reader sees the old file or the new one), unless the original changed
meanwhile. Only a file tcpdump has closed
may be rewritten: the caller (the sidecar) decides which.

What tshark still cannot pair: a request cut by the snapshot whose IP length fields were
rewritten to the cut, when the cut took its head's blank line: tshark's HTTP dissector
waits for the rest of the head, which never comes, and shows no request (unless run with
-o http.desegment_headers:FALSE). A frame cut with its IP lengths kept, marked here as
cut at capture, is read as far as it goes."""
from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

from ..http1 import status_line
from .flow import Packet
from .pcap import (FILE_HEADER_SIZE, LINKTYPE_ETHERNET, Contents, FileHeader, Record, Writer,
                   read_whole)
from .request import SEQ_MOD, ack_distance, covers, parse_request
from .ring import file_signature


@dataclass
class Result:
    moved: int              # request frames moved
    first: str              # the new file's first record header, hex (a Cursor's `first`)
    signature: tuple        # (inode, size, mtime_ns) of the new file


class Changed(Exception):
    """The file changed while it was being reordered (tcpdump reopened it)."""


# A data segment: its record's number in the file, and its packet.
Segment = tuple[int, Packet]


def segments(contents: Contents) -> list[Segment]:
    """The TCP segments with a payload among the records."""
    header, out = contents.header, []
    for n, rec in enumerate(contents.records):
        packet = Packet.decode(header.linktype, header.timestamp(rec), rec.frame)
        if packet is not None and packet.payload:
            out.append((n, packet))
    return out


def plan(segs: list[Segment]) -> dict[int, int]:
    """Which request record goes before which response record: {request: response}."""
    sent_by: dict[tuple, list[Segment]] = {}    # status-line segments per sender, in order
    moves: dict[int, int] = {}
    taken: set[int] = set()
    seen: set[tuple] = set()        # (key, src, seq) of the request starts met so far
    for n, seg in segs:
        if status_line(seg.payload):
            sent_by.setdefault((seg.key, seg.source), []).append((n, seg))
            continue
        if parse_request(seg.payload) is None:
            continue
        ident = (seg.key, seg.source, seg.seq)
        if ident not in seen:
            resp = answered_by(seg, sent_by.get((seg.key, seg.dest), []), taken)
            if resp is not None:
                moves[n] = resp
                taken.add(resp)
        seen.add(ident)
    return moves


def answered_by(req: Packet, responses: list[Segment], taken: set[int]) -> int | None:
    """The record of the earliest of the earlier responses (of the other side, in file
    order) that answered `req` and has no request moved to it yet. Looked for backwards
    and no further than a response sent before the request arrived (its acknowledgement
    at or before the request's first byte): a sender's acknowledgement numbers only
    grow, so the responses before that one are older still, and a request in its place
    costs one look."""
    found = None
    for n, resp in reversed(responses):
        d = ack_distance(req.seq, resp.ack)
        if d == 0 or d >= SEQ_MOD // 2:
            break
        if n not in taken and covers(req.seq, req.payload, resp.ack):
            found = n
    return found


def new_order(count: int, moves: dict[int, int]) -> list[int]:
    before = {resp: req for req, resp in moves.items()}
    out = []
    for n in range(count):
        if n in moves:
            continue
        if n in before:
            out.append(before[n])
        out.append(n)
    return out


def earlier(sec: int, frac: int, unit: float) -> tuple[int, int]:
    """A record timestamp (seconds, fraction in the file's unit) less 1 microsecond."""
    step, per_sec = (1, 1_000_000) if unit == 1e-6 else (1000, 1_000_000_000)
    if frac >= step:
        return sec, frac - step
    return sec - 1, frac + per_sec - step


def wire_length(frame: bytes, link: int) -> int | None:
    """The length of an Ethernet frame as its IP header states it (VLAN tags included),
    None when it is not Ethernet + IPv4/IPv6 or too short to tell."""
    if link != LINKTYPE_ETHERNET:
        return None
    offset = 12
    while frame[offset:offset + 2] in (b"\x81\x00", b"\x88\xa8"):
        offset += 4
    etype, offset = frame[offset:offset + 2], offset + 2
    if etype == b"\x08\x00" and len(frame) >= offset + 4:
        return offset + struct.unpack_from("!H", frame, offset + 2)[0]
    if etype == b"\x86\xdd" and len(frame) >= offset + 6:
        return offset + 40 + struct.unpack_from("!H", frame, offset + 4)[0]
    return None


def moved(req: Record, resp: Record, header: FileHeader) -> Record:
    """A moved request's record: the response's time less 1 us, and, when the frame is
    shorter than its IP header says (a snapshot cut as tcpdump -s cuts, IP lengths
    kept), that length as the original length, so that readers see a frame cut at
    capture and decode what it holds instead of waiting for the rest of it."""
    sec, frac = earlier(resp.sec, resp.frac, header.unit)
    wire = wire_length(bytes(req.frame), header.linktype)
    return replace(req, sec=sec, frac=frac, orig_len=max(req.orig_len, wire or 0))


def reordered(contents: Contents, moves: dict[int, int]) -> list[Record]:
    """The records with the moved requests before their responses."""
    records = contents.records
    return [moved(records[n], records[moves[n]], contents.header) if n in moves
            else records[n] for n in new_order(len(records), moves)]


def reorder_file(path: str | os.PathLike, expect: tuple | None = None) -> Result | None:
    """Rewrites a finished pcap file with each request before its response; None when
    nothing had to move (the file is left alone). Raises Changed when the file is not
    the one of signature `expect` (inode, size, mtime_ns: the one the indexer read) or
    changed while it was being rewritten (the original is then kept), ValueError for a
    file that is not a pcap."""
    path = Path(path)
    with open(path, "rb") as f:
        before = os.fstat(f.fileno())
        if expect is not None and file_signature(before) != tuple(expect):
            raise Changed(f"{path.name} is not the file that was read")
        data = f.read()
    if len(data) < FILE_HEADER_SIZE:
        return None
    contents = read_whole(data)
    moves = plan(segments(contents))
    if not moves:
        return None
    records = reordered(contents, moves)

    def write(f: BinaryIO) -> None:
        """The records as they were but for the moves, and a cut-short tail as it was
        (views of `data`: the file is not copied whole)."""
        writer = Writer(f, contents.header)
        for rec in records:
            writer.write(rec)
        f.write(contents.tail)

    signature = _replace(path, write, before)
    return Result(len(moves), contents.header.pack_record(records[0]).hex(), signature)


def temporary_files(directory: Path) -> list[Path]:
    """Rewrites a killed process left behind."""
    return sorted(directory.glob(".*.reorder"))


def _create(tmp: Path) -> int:
    """A new file, never an existing one nor through a symbolic link (O_EXCL and
    O_NOFOLLOW): one left by a killed rewrite is removed first."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(tmp, flags, 0o600)
    except FileExistsError:
        tmp.unlink()
        return os.open(tmp, flags, 0o600)


def _replace(path: Path, write, before: os.stat_result) -> tuple:
    """Writes the new file beside `path` with `write` and renames it over `path`,
    keeping the mode and the modification time; returns the new file's signature."""
    tmp = path.with_name(f".{path.name}.reorder")
    fd = _create(tmp)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(fd, stat.S_IMODE(before.st_mode))
        write(f)
        f.flush()
        os.utime(fd, ns=(before.st_atime_ns, before.st_mtime_ns))
        os.fsync(fd)
        after = os.fstat(fd)
    try:
        if file_signature(os.stat(path)) != file_signature(before):
            raise Changed(f"{path.name} changed while it was reordered")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return file_signature(after)


# --- the same, on a stream --------------------------------------------------------------

@dataclass
class Frame:
    """A frame on its way through a Holder."""
    ts_ns: int
    data: bytes
    orig_len: int
    linktype: int = LINKTYPE_ETHERNET
    arrival: float = 0.0            # when it was read (time.monotonic()): the hold's clock
    packet: Packet | None = None    # its TCP facts, None when it holds no TCP
    moved_from_ns: int | None = None    # a moved request's capture time
    serial: int = 0


class Holder:
    """Frames held for a bounded time (`hold` seconds after they were read) and size
    (`max_frames`, `max_bytes`), so that a request written after its response can be put
    back before it while both are held. The rule is the file reorder's (answered_by: the
    pairing by TCP acknowledgement number, never by time), the moved request's time is
    the response's less 1 us and its original capture time is kept on the Frame. A
    request that arrives after its response was released stays where it is: the hold
    bounds how late a request may come (the controller writes it within milliseconds)."""

    def __init__(self, hold: float = 0.5, max_frames: int = 100_000,
                 max_bytes: int = 64 << 20):
        self.hold, self.max_frames, self.max_bytes = hold, max_frames, max_bytes
        self.held: list[Frame] = []
        self.held_bytes = 0
        self.moved = 0
        self._serial = 0
        self._responses: dict[tuple, list[Segment]] = {}   # held status lines by sender
        self._taken: set[int] = set()
        self._seen: dict[tuple, None] = {}      # recent request starts (key, src, seq)

    def add(self, frame: Frame) -> None:
        self._serial += 1
        frame.serial = self._serial
        if frame.packet is None:
            frame.packet = Packet.decode(frame.linktype, frame.ts_ns / 1e9, frame.data)
        seg = frame.packet
        at = len(self.held)
        if seg is not None and seg.payload:
            if status_line(seg.payload):
                self._responses.setdefault((seg.key, seg.source), []).append(
                    (frame.serial, seg))
            elif parse_request(seg.payload) is not None:
                at = self._place(frame, seg, at)
        self.held.insert(at, frame)
        self.held_bytes += len(frame.data)

    def _place(self, frame: Frame, req: Packet, at: int) -> int:
        """Where a request start goes: before the held response that answered it."""
        ident = (req.key, req.source, req.seq)
        first_copy = ident not in self._seen
        self._seen[ident] = None
        if len(self._seen) > 65536:
            del self._seen[next(iter(self._seen))]
        if not first_copy:
            return at
        resp = answered_by(req, self._responses.get((req.key, req.dest), []), self._taken)
        if resp is None:
            return at
        self._taken.add(resp)
        for n, held in enumerate(self.held):
            if held.serial == resp:
                frame.moved_from_ns = frame.ts_ns
                frame.ts_ns = held.ts_ns - 1000
                wire = wire_length(frame.data, frame.linktype)
                frame.orig_len = max(frame.orig_len, wire or 0)
                self.moved += 1
                return n
        return at

    def due(self, now: float, everything: bool = False) -> list[Frame]:
        """Removes and returns, in order, the frames whose hold is over (all of them with
        `everything`), and the oldest past the size bounds."""
        n = 0
        bytes_left = self.held_bytes
        for frame in self.held:
            if not (everything or now - frame.arrival >= self.hold
                    or len(self.held) - n > self.max_frames or bytes_left > self.max_bytes):
                break
            n += 1
            bytes_left -= len(frame.data)
        out, self.held = self.held[:n], self.held[n:]
        self.held_bytes = bytes_left
        for frame in out:
            self._forget(frame)
        return out

    def _forget(self, frame: Frame) -> None:
        seg = frame.packet
        self._taken.discard(frame.serial)
        if seg is not None and seg.payload and status_line(seg.payload):
            sent = self._responses.get((seg.key, seg.source))
            if sent:
                sent[:] = [s for s in sent if s[0] != frame.serial]
                if not sent:
                    del self._responses[(seg.key, seg.source)]
