"""The capture sidecar's disk and memory stay within their bounds whatever the traffic:
crafted connections (many request lines after a 500, long ones, many flows left open)
written onto a debug interface and recorded by the real sidecar, its files measured on
disk and its memory by its own accounting (status.json) and by the kernel (VmHWM).

Unit: the same bounds on the indexer alone."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from helpers import wait_until
from test_capture import (C4, C6, RESP_500, S4, S6, Conn, capture_proc,  # noqa: F401
                          write_pcap)
from mirror.capture.flow import MAX_LINE, MIN_KEEP, Limits
from mirror.capture.index import MAX_REQUESTS, Indexer, read_index
from mirror.capture.pcap import MAX_SNAPLEN, RECORD_HEADER_SIZE
from mirror.communityid import community_id
from mirror.flowkey import parse_endpoint

SHORT = [b"GET /s%03d HTTP/1.1\r\nHost: s\r\n\r\n" % n for n in range(128)]
LONG = [b"GET /" + b"l" * 8000 + b"%03d HTTP/1.1\r\nHost: s\r\n\r\n" % n for n in range(8)]


def crafted(cport: int, lines: list[bytes], close: bool, client=C4, server=S4) -> list[bytes]:
    """A 500, then requests after it (each starting a segment, a long one split over
    segments of 1400 bytes: frames fit the sink's MTU), closed or left open."""
    c = Conn(client, server, cport=cport)
    frames = [c.server_sends(RESP_500)]
    for line in lines:
        frames += [c.client_sends(line[i:i + 1400]) for i in range(0, len(line), 1400)]
    return frames + (c.close() if close else [])


@pytest.mark.unit
def test_indexer_bounds(tmp_path):
    limits = Limits(segments=64, payload_bytes=16384)
    ix = Indexer(tmp_path / "index.jsonl", max_bytes=20_000, max_open=10, limits=limits)
    frames = crafted(30000, SHORT, close=True) + crafted(30001, LONG, close=True, client=C6,
                                                         server=S6)
    for n in range(25):                          # 25 open flows: 15 evicted
        frames += crafted(31000 + n, [], close=False)
    for n in range(40):                          # 40 closed ones: the index rotates
        frames += crafted(32000 + n, SHORT[:20], close=True)
    ix.add_file(write_pcap(tmp_path / "f.pcap", frames))
    peak = ix.payload_kept
    assert len(ix.flows) <= 10 and ix.flows_evicted == 67 - 10
    ix.flush(final=True)
    assert peak <= 10 * (limits.payload_bytes + 2 * limits.segments * MIN_KEEP)
    sizes = [p.stat().st_size for p in tmp_path.glob("index.jsonl*")]
    assert len(sizes) == 2 and max(sizes) <= 20_000 and ix.rotations >= 2
    records = read_index(tmp_path / "index.jsonl")
    assert all(len(json.dumps(r)) <= 20_000 for r in records)
    assert ix.requests_dropped > 0 and ix.segments_dropped > 0 and ix.segments_cut > 0
    for r in records:
        (c, cp), (s, sp) = parse_endpoint(r["client"]), parse_endpoint(r["server"])
        assert len(r["requests"]) <= MAX_REQUESTS and r["community_id"] == community_id(
            c, s, cp, sp)
        assert all(len(line) <= MAX_LINE for line in r["requests"])


@pytest.mark.kernel
def test_sidecar_disk_and_memory_bounded(debug_iface, tmp_path, capture_proc):
    files, size_mb = 4, 1
    cap_dir = tmp_path / "cap"
    cap = capture_proc(debug_iface.name, cap_dir, "--file-size", str(size_mb), "--files",
                       str(files))
    assert cap.wait_state("capturing"), cap.stop_output()
    sent = 0
    peaks = {"flows_open": 0, "payload_bytes_kept": 0}

    def write(sock, frames):
        """In batches of at most 100 frames and 100 KB (the socket's send buffer), each
        waited for in the index (a burst would overflow tcpdump's buffer and the count
        would not be exact)."""
        nonlocal sent
        while frames:
            batch, size = [], 0
            while frames and len(batch) < 100 and size + len(frames[0]) <= 100_000:
                size += len(frames[0])
                batch.append(frames.pop(0))
            for fr in batch:
                sock.send(fr)
            sent += len(batch)
            status = cap.wait_indexed(lambda: sent, f"{sent} frames")
            for k in peaks:
                peaks[k] = max(peaks[k], status[k])
            assert status["payload_bytes_kept"] <= status["payload_bytes_max"] * 2, status

    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind((debug_iface.name, 0))
        write(sock, crafted(40000, SHORT, close=True))          # many request lines
        for n in range(24):                                      # long ones, the index rotates
            write(sock, crafted(41000 + n, LONG, close=True))
        open_flows = []
        for n in range(1100):                                    # more open flows than allowed
            open_flows += crafted(20000 + n, [b"GET /open HTTP/1.1\r\n\r\n"], close=False)
        write(sock, open_flows)
    live = wait_until(lambda: (cap.status().get("flows_indexed", 0) >= 25 + 76, cap.status()),
                      "the closed flows and the evicted ones in the index")
    hwm = vm_hwm(cap.proc.pid)
    assert cap.stop() == 0, cap.output
    status = cap.status()
    assert status["packets_dropped_kernel"] == 0 and status["packets_indexed"] == sent
    # Memory: the open flows never passed their count, the payload they kept its bound;
    # the process stayed under the container's memory limit (256 MiB).
    assert peaks["flows_open"] == status["flows_open_max"] == 1024
    assert live["flows_evicted"] >= 1100 - 1024 and status["segments_cut"] > 0
    assert status["requests_dropped"] == 128 - 16
    assert hwm < 256 << 20, hwm
    # Disk: every file of the directory within FILES slots of FILE_SIZE, plus a packet
    # per pcap and the small state files; the index rotated within its half slots.
    on_disk = {p.name: p.stat().st_size for p in Path(cap_dir).iterdir()}
    pcaps = [n for n in on_disk if ".pcap" in n]
    assert len(pcaps) <= files - 1, on_disk
    assert on_disk["index.jsonl"] <= size_mb * 500_000 and \
        on_disk["index.jsonl.1"] <= size_mb * 500_000 and status["index_rotations"] >= 1
    small = on_disk.get("status.json", 0) + on_disk.get(".cursors.json", 0)
    assert small < 65536
    assert sum(on_disk.values()) <= files * size_mb * 1_000_000 + \
        (files - 1) * (RECORD_HEADER_SIZE + MAX_SNAPLEN) + small
    lines = (cap_dir / "index.jsonl").read_bytes().splitlines() + \
        (cap_dir / "index.jsonl.1").read_bytes().splitlines()
    assert max(map(len, lines)) < 100_000          # was 1,024,113 bytes for one such flow


def vm_hwm(pid: int) -> int:
    """The process's peak resident memory, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")
