"""The pcap file format (libpcap's classic one, what tcpdump -w writes): the one place
that knows its bytes, for reading and for writing.

A file is a 24-byte file header (magic, version, time zone, significant figures, snaplen,
link type) and records, each a 16-byte record header (seconds, the fraction of the second,
captured length, original length) and the captured bytes. The magic tells the writer's
byte order and whether the fraction counts microseconds or nanoseconds. Every header field
is kept when read, so that a header written back is the bytes it was read from: the
reorder rewrites a file and keeps all it does not move.

Why the records are framed here and not by dpkt's pcap.Reader: the index reads files
tcpdump is still appending to, resumes at the record where it stopped, and must stop at a
record not yet whole (tcpdump -U writes whole records, but a read may meet one half
written); the reorder needs each record's place and header fields. What a frame holds is
decoded elsewhere (mirror.capture.flow); the tests check what the product wrote with
dpkt's framing and with tshark, not with this module.

Reading: read_whole (a file held in memory: the reorder, mirror.capture.flow's whole-file
readers), read_new (what was appended after a Cursor: the index), StreamReader (a pcap
arriving on a pipe, `tcpdump -w -`: the recording). Writing: Writer (classic pcap) and
PcapngWriter.

pcapng (the pcap-ng file format, what Wireshark writes) is written for what the classic
format cannot hold, and libpcap (tcpdump) cannot write: several interfaces, each with a
name and a description (Interface Description Blocks, which may come anywhere before
their first use, so a live stream adds one when it learns of an interface), and a
comment on a packet (the opt_comment option of an Enhanced Packet Block), which tshark
shows as frame.comment. Little-endian, nanosecond timestamps (if_tsresol 9)."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO

FILE_HEADER_SIZE = 24
RECORD_HEADER_SIZE = 16
# The longest frame a record holds as tcpdump writes it: its default snaplen (-s 0 and no
# -s alike), libpcap's maximum.
MAX_SNAPLEN = 262144
LINKTYPE_ETHERNET = 1
LINKTYPE_LINUX_SLL = 113        # Linux cooked capture (tcpdump -i any)

_MICRO, _NANO = 0xA1B2C3D4, 0xA1B23C4D
# The first four bytes read little-endian: the writer's byte order (a struct prefix) and
# whether the timestamps' fraction counts nanoseconds.
_MAGICS = {_MICRO: ("<", False), _NANO: ("<", True),
           0xD4C3B2A1: (">", False), 0x4D3CB2A1: (">", True)}
_RECORD = {endian: struct.Struct(endian + "IIII") for endian in "<>"}


@dataclass(frozen=True)
class FileHeader:
    endian: str = "<"
    nano: bool = False
    version: tuple[int, int] = (2, 4)
    thiszone: int = 0
    sigfigs: int = 0
    snaplen: int = MAX_SNAPLEN
    linktype: int = LINKTYPE_ETHERNET

    @classmethod
    def parse(cls, raw: bytes) -> "FileHeader":
        """ValueError when `raw` does not start with a pcap file header."""
        if len(raw) < FILE_HEADER_SIZE:
            raise ValueError(f"not a pcap file ({len(raw)} bytes, shorter than a header)")
        magic = struct.unpack_from("<I", raw)[0]
        if magic not in _MAGICS:
            raise ValueError(f"not a pcap file (magic {magic:#x})")
        endian, nano = _MAGICS[magic]
        major, minor, zone, sigfigs, snaplen, link = struct.unpack_from(endian + "HHiIII",
                                                                        raw, 4)
        return cls(endian, nano, (major, minor), zone, sigfigs, snaplen, link)

    def pack(self) -> bytes:
        return struct.pack(self.endian + "IHHiIII", _NANO if self.nano else _MICRO,
                           *self.version, self.thiszone, self.sigfigs, self.snaplen,
                           self.linktype)

    @property
    def unit(self) -> float:
        """A record's fraction of a second, in seconds."""
        return 1e-9 if self.nano else 1e-6

    def timestamp(self, record: "Record") -> float:
        return record.sec + record.frac * self.unit

    def pack_record(self, record: "Record") -> bytes:
        """The record's 16-byte header in this file's byte order."""
        return _RECORD[self.endian].pack(record.sec, record.frac, len(record.frame),
                                         record.orig_len)


@dataclass(frozen=True)
class Record:
    offset: int             # of its record header in the file it was read from
    sec: int
    frac: int               # the fraction of the second, in the file's unit
    orig_len: int           # the frame's length when captured; more than the bytes kept
                            # when a snaplen cut it
    frame: bytes | memoryview   # the bytes kept (the captured length is theirs)

    @property
    def size(self) -> int:
        return RECORD_HEADER_SIZE + len(self.frame)


def _frame(buf: bytes | memoryview, header: FileHeader,
           base: int) -> tuple[list[Record], int]:
    """The whole records at the start of `buf`, which holds a file from offset `base` on,
    and the offset where the rest (nothing, or a record not whole) starts. The frames are
    views of `buf`: framing a file copies none of it."""
    view, records, pos = memoryview(buf), [], 0
    unpack = _RECORD[header.endian].unpack_from
    while pos + RECORD_HEADER_SIZE <= len(view):
        sec, frac, caplen, orig_len = unpack(view, pos)
        end = pos + RECORD_HEADER_SIZE + caplen
        if end > len(view):
            break
        records.append(Record(base + pos, sec, frac, orig_len,
                              view[pos + RECORD_HEADER_SIZE:end]))
        pos = end
    return records, base + pos


@dataclass
class Contents:
    header: FileHeader
    records: list[Record]
    tail: memoryview        # a last record cut short (its writer killed mid-write), or empty


def read_whole(data: bytes) -> Contents:
    """A whole pcap file held in memory; ValueError when it is not one."""
    header = FileHeader.parse(data[:FILE_HEADER_SIZE])
    records, end = _frame(memoryview(data)[FILE_HEADER_SIZE:], header, FILE_HEADER_SIZE)
    return Contents(header, records, memoryview(data)[end:])


def read_file(path) -> Contents:
    with open(path, "rb") as f:
        return read_whole(f.read())


@dataclass
class Cursor:
    """How far a pcap file has been read: `first` identifies the file's generation (the
    header of its first record: a ring file rewritten by tcpdump starts with another
    packet), `offset` is where the next unread record starts."""
    first: str = ""
    offset: int = 0

    def to_json(self) -> dict:
        return {"first": self.first, "offset": self.offset}

    @classmethod
    def from_json(cls, data: dict) -> "Cursor":
        return cls(str(data.get("first", "")), int(data.get("offset", 0)))


@dataclass
class NewRecords:
    header: FileHeader | None       # None while the file header is not whole
    records: list[Record]
    partial: bool = False           # ends in a record not whole (being written, or cut)
    new_generation: bool = False    # the file was rewritten since the cursor was taken


def read_new(f: BinaryIO, cursor: Cursor) -> NewRecords:
    """The whole records of an open pcap file after `cursor` (all of them when the cursor
    is new or of another generation), the cursor moved past them; a record not yet whole
    is left for the next read. ValueError when the file is not a pcap."""
    raw = f.read(FILE_HEADER_SIZE)
    if len(raw) < FILE_HEADER_SIZE:
        return NewRecords(None, [], partial=True)
    header = FileHeader.parse(raw)
    first = f.read(RECORD_HEADER_SIZE).hex()
    new_generation = False
    if cursor.first != first or cursor.offset < FILE_HEADER_SIZE:
        new_generation = bool(cursor.first) and cursor.first != first
        cursor.first, cursor.offset = first, FILE_HEADER_SIZE
    f.seek(cursor.offset)
    rest = f.read()         # at most a ring file (--file-size MB and a packet), as the
                            # reorder holds whole
    records, end = _frame(rest, header, cursor.offset)
    partial = end < cursor.offset + len(rest)
    cursor.offset = end
    return NewRecords(header, records, partial, new_generation)


class Writer:
    """Writes a pcap file: its header, then records, each with its own original length
    (a frame cut at capture says so, and readers decode what it holds instead of waiting
    for the rest of it)."""

    def __init__(self, f: BinaryIO, header: FileHeader):
        self.f, self.header = f, header
        f.write(header.pack())

    def write(self, record: Record) -> None:
        self.f.write(self.header.pack_record(record))
        self.f.write(record.frame)


class StreamReader:
    """A pcap arriving in pieces (a pipe from `tcpdump -w -`): feed() takes the bytes read
    and returns the records now whole; `header` is None until the file header is."""

    def __init__(self):
        self.header: FileHeader | None = None
        self._buf = b""
        self.offset = 0             # of the first byte of _buf in the stream

    def feed(self, data: bytes) -> list[Record]:
        """ValueError when the stream does not start with a pcap file header."""
        self._buf += data
        if self.header is None:
            if len(self._buf) < FILE_HEADER_SIZE:
                return []
            self.header = FileHeader.parse(self._buf[:FILE_HEADER_SIZE])
            self._buf, self.offset = self._buf[FILE_HEADER_SIZE:], FILE_HEADER_SIZE
        records, end = _frame(self._buf, self.header, self.offset)
        # The frames are views of the old buffer: copied before it is dropped.
        records = [Record(r.offset, r.sec, r.frac, r.orig_len, bytes(r.frame))
                   for r in records]
        self._buf, self.offset = self._buf[end - self.offset:], end
        return records

    @property
    def pending(self) -> int:
        """Bytes of a record not yet whole (left over at the end of a stream: cut)."""
        return len(self._buf)


PCAPNG_SHB, PCAPNG_IDB, PCAPNG_EPB = 0x0A0D0D0A, 0x00000001, 0x00000006
PCAPNG_BYTE_ORDER = 0x1A2B3C4D
OPT_END, OPT_COMMENT = 0, 1
SHB_USERAPPL = 4
IF_NAME, IF_DESCRIPTION, IF_TSRESOL = 2, 3, 9
MAX_OPTION = 0xFFFF


def _option(code: int, value: bytes) -> bytes:
    value = value[:MAX_OPTION]
    return struct.pack("<HH", code, len(value)) + value + b"\0" * (-len(value) % 4)


def _text(text: str) -> bytes:
    """UTF-8, cut to what an option holds without splitting a character."""
    return text.encode("utf-8")[:MAX_OPTION].decode("utf-8", "ignore").encode("utf-8")


def _block(kind: int, body: bytes, options: list[bytes]) -> bytes:
    if options:
        body += b"".join(options) + _option(OPT_END, b"")
    total = 12 + len(body)
    return struct.pack("<II", kind, total) + body + struct.pack("<I", total)


class PcapngWriter:
    """Writes a pcapng stream: its section header at once, then interfaces (add_interface,
    at any time before their first packet) and packets, each with its own original length
    and an optional comment."""

    def __init__(self, f: BinaryIO, application: str = "mirror"):
        self.f = f
        self.interfaces: list[str] = []
        f.write(_block(PCAPNG_SHB, struct.pack("<IHHq", PCAPNG_BYTE_ORDER, 1, 0, -1),
                       [_option(SHB_USERAPPL, _text(application))]))

    def add_interface(self, name: str, description: str | None = None,
                      linktype: int = LINKTYPE_ETHERNET, snaplen: int = MAX_SNAPLEN) -> int:
        """Adds an interface; returns its id (the packets' interface number)."""
        options = [_option(IF_NAME, _text(name)), _option(IF_TSRESOL, b"\x09")]
        if description:
            options.append(_option(IF_DESCRIPTION, _text(description)))
        self.f.write(_block(PCAPNG_IDB, struct.pack("<HHI", linktype, 0, snaplen), options))
        self.interfaces.append(name)
        return len(self.interfaces) - 1

    def write(self, ts_ns: int, frame: bytes, orig_len: int | None = None,
              interface: int = 0, comments: list[str] | str | None = None) -> None:
        """One packet; `comments`, one or several, each an opt_comment."""
        frame = bytes(frame)
        if isinstance(comments, str):
            comments = [comments]
        body = struct.pack("<IIIII", interface, (ts_ns >> 32) & 0xFFFFFFFF,
                           ts_ns & 0xFFFFFFFF, len(frame), max(orig_len or 0, len(frame)))
        body += frame + b"\0" * (-len(frame) % 4)
        options = [_option(OPT_COMMENT, _text(c)) for c in comments or () if c]
        self.f.write(_block(PCAPNG_EPB, body, options))


def timestamp_ns(header: FileHeader, record: Record) -> int:
    """A record's time in nanoseconds, exactly (no float in between)."""
    return record.sec * 1_000_000_000 + record.frac * (1 if header.nano else 1000)
