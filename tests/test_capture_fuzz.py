"""The capture's user-space parsers fuzzed with Hypothesis, each within a bounded budget
(a fixed number of examples, no deadline): the pcap readers (whole, incremental, from a
pipe), the indexer and the reorder on truncated and corrupt pcaps, and the index reader
on corrupt index files. What must hold: a parser refuses what it cannot read with the
exception it documents (ValueError, CorruptIndex), never another; a pcap cut anywhere
reads as its whole records; the reorder keeps every record."""
from __future__ import annotations

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_capture import (C4, C6, RESP_200, RESP_500, S4, S6, Conn, injected_keepalive,
                          write_pcap)
from mirror.capture.command import render_index
from mirror.capture.index import CorruptIndex, Indexer, read_index
from mirror.capture.pcap import (FILE_HEADER_SIZE, Cursor, StreamReader, read_new,
                                 read_whole)
from mirror.capture.reorder import Changed, reorder_file

pytestmark = pytest.mark.unit

BUDGET = settings(max_examples=150, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.function_scoped_fixture,
                                         HealthCheck.too_slow])


def sample_pcap(tmp_path) -> bytes:
    frames, _ = injected_keepalive()
    c = Conn(C6, S6)
    frames += [c.server_sends(RESP_500), c.client_sends(b"GET /x HTTP/1.1\r\n\r\n"),
               c.server_sends(RESP_200), *c.close()]
    return write_pcap(tmp_path / "sample.pcap", frames).read_bytes()


def mutate(data: bytes, edits: list[tuple[int, int]], cut: int) -> bytes:
    out = bytearray(data[:cut])
    for pos, value in edits:
        if out:
            out[pos % len(out)] = value
    return bytes(out)


@BUDGET
@given(data=st.binary(max_size=300))
def test_pcap_readers_on_any_bytes(data):
    for read in (lambda: read_whole(data), lambda: StreamReader().feed(data)):
        try:
            read()
        except ValueError:
            pass


@BUDGET
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
       cut=st.integers(0, 10**6), split=st.integers(1, 97))
def test_corrupt_and_truncated_pcaps(tmp_path, edits, cut, split):
    whole = sample_pcap(tmp_path)
    data = mutate(whole, edits, cut % (len(whole) + 1))
    try:
        contents = read_whole(data)
    except ValueError:
        return
    # Fed to a pipe reader in pieces, and read incrementally as it grows: the same records.
    stream = StreamReader()
    got = []
    for i in range(0, len(data), split):
        got += stream.feed(data[i:i + split])
    assert [bytes(r.frame) for r in got] == [bytes(r.frame) for r in contents.records]
    path = tmp_path / "m.pcap"
    path.write_bytes(data)
    cursor = Cursor()
    with open(path, "rb") as f:
        new = read_new(f, cursor)
    assert len(new.records) == len(contents.records)
    ix = Indexer(tmp_path / "index.jsonl", max_bytes=10_000)
    ix.add_file(path)
    ix.flush(final=True)
    records = read_index(tmp_path / "index.jsonl")
    render_index(records, None, tmp_path)
    (tmp_path / "index.jsonl").unlink(missing_ok=True)
    (tmp_path / "index.jsonl.1").unlink(missing_ok=True)
    before = sorted(bytes(r.frame) for r in contents.records)
    try:
        reorder_file(path)
    except Changed:
        pass
    after = read_whole(path.read_bytes())
    assert sorted(bytes(r.frame) for r in after.records) == before
    assert bytes(after.tail) == bytes(contents.tail)


RECORD = {"client": f"{C4}:40000", "server": f"{S4}:80",
          "time": "2025-01-01T00:00:00.000000Z", "time_unix": 1.0, "packets": 3,
          "bytes": 300}
JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() |
                       st.text(max_size=20),
                       lambda inner: st.lists(inner, max_size=4) |
                       st.dictionaries(st.text(max_size=10), inner, max_size=4),
                       max_leaves=12)


@BUDGET
@given(lines=st.lists(st.one_of(
    st.binary(max_size=60),
    JSONISH.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(sorted(RECORD) + ["files", "statuses", "requests",
                                                      "method", "target", "host", "status",
                                                      "response_seconds", "community_id"]),
                    JSONISH, max_size=12).map(lambda d: json.dumps({**RECORD, **d}).encode())),
    max_size=6), torn=st.binary(max_size=20))
def test_index_reader_on_corrupt_files(tmp_path, lines, torn):
    """read_index gives records or raises CorruptIndex; what it gives renders."""
    (tmp_path / "index.jsonl").write_bytes(b"".join(line + b"\n" for line in lines)
                                           + torn.replace(b"\n", b""))
    try:
        records = read_index(tmp_path / "index.jsonl")
    except CorruptIndex:
        return
    render_index(records, {"iface": "x", "state": 1}, tmp_path)


def test_the_header_alone_and_a_huge_record_length(tmp_path):
    """Two corruptions written by hand: a file that is only its header, and a record
    header claiming more bytes than the file has (it is a record not yet whole)."""
    header = sample_pcap(tmp_path)[:FILE_HEADER_SIZE]
    assert read_whole(header).records == []
    data = header + struct.pack("<IIII", 1, 2, 0xFFFFFFF0, 0xFFFFFFF0) + b"x" * 10
    contents = read_whole(data)
    assert contents.records == [] and len(contents.tail) == 26
