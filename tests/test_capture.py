"""The capture sidecar (`mirror capture`) and its indexer.

Indexer: pcaps written here with dpkt (IPv4 and IPv6, retransmissions, out-of-order
segments, a request line split over two segments, sequence numbers wrapping, a flow
spread over two files, a truncated file). Sidecar: the real CLI process, real tcpdump and
real traffic through network namespaces: the ring stays bounded while traffic flows, it
waits for its interface and follows it when it is recreated, and behind a real `mirror
run` its index holds the error connections and nothing else. The request written after
its error response (as the controller writes it): pcaps written with dpkt reordered and
checked with dpkt and real tshark, the index's request fields, and the real sidecar
reordering the ring files it records."""
from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import dpkt
import pytest
from pyroute2 import IPRoute

from helpers import (MirrorProcess, counted_from_now, env_with, mirror_cmd,
                     mirrored_packets, run_cli, wait_closed, wait_until)
from mirror import debugif
from mirror.capture.command import render_index
from mirror.capture.index import Indexer, read_index
from mirror.capture.pcap import FILE_HEADER_SIZE, MAX_SNAPLEN, RECORD_HEADER_SIZE, Cursor
from mirror.capture.reorder import Changed, reorder_file
from mirror.capture.request import MAX_SPAN, covers, parse_request
from mirror.capture.ring import FILE_RE, current_file, list_pcaps
from mirror.capture.sidecar import CaptureSidecar, Options
from mirror.communityid import of_flow
from mirror.flowkey import FlowKey, endpoint, key_of, parse_endpoint
from mirror.lab.client import send
from mirror.lab.netns import sh, unique_name

ROOT = Path(__file__).resolve().parent.parent

# --- pcaps written with dpkt -----------------------------------------------------------

C4, S4 = "198.18.7.1", "198.18.7.2"
C6, S6 = "2001:db8:7::1", "2001:db8:7::2"
MAC_C, MAC_S = b"\x02\x00\x00\x00\x00\x01", b"\x02\x00\x00\x00\x00\x02"
ACK, PSH, FIN, RST = dpkt.tcp.TH_ACK, dpkt.tcp.TH_PUSH, dpkt.tcp.TH_FIN, dpkt.tcp.TH_RST

RESP_500 = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 5\r\n\r\nerror"
RESP_200 = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
REQ_OK = b"GET /ok HTTP/1.1\r\nHost: s\r\n\r\n"


def frame(src, sport, dst, dport, seq, ack=1, flags=ACK | PSH, data=b""):
    """An Ethernet frame carrying one TCP segment over IPv4 or IPv6 (by address)."""
    tcp = dpkt.tcp.TCP(sport=sport, dport=dport, seq=seq & 0xFFFFFFFF, ack=ack & 0xFFFFFFFF,
                       flags=flags, win=502, data=data)
    if ":" in src:
        ip = dpkt.ip6.IP6(src=socket.inet_pton(socket.AF_INET6, src),
                          dst=socket.inet_pton(socket.AF_INET6, dst), nxt=dpkt.ip.IP_PROTO_TCP,
                          hlim=64, plen=len(bytes(tcp)), data=tcp)
        ip.extension_hdrs = {}
        etype = dpkt.ethernet.ETH_TYPE_IP6
    else:
        ip = dpkt.ip.IP(src=socket.inet_aton(src), dst=socket.inet_aton(dst),
                        p=dpkt.ip.IP_PROTO_TCP, ttl=64, data=tcp)
        ip.len = 20 + len(bytes(tcp))
        etype = dpkt.ethernet.ETH_TYPE_IP
    return bytes(dpkt.ethernet.Ethernet(src=MAC_S if sport == 80 else MAC_C,
                                        dst=MAC_C if sport == 80 else MAC_S,
                                        type=etype, data=ip))


def write_pcap(path, frames, t0=1_700_000_000.0, nano=False):
    """frames: list of bytes; timestamps t0, t0+0.001, ..."""
    with open(path, "wb") as f:
        w = dpkt.pcap.Writer(f, linktype=dpkt.pcap.DLT_EN10MB, nano=nano)
        for i, fr in enumerate(frames):
            w.writepkt(fr, ts=t0 + i / 1000)
    return path


class Conn:
    """Builds the frames of one client/server connection with running sequence numbers."""

    def __init__(self, client, server, cport=40000, cseq=1000, sseq=5000):
        self.c, self.s, self.cport = client, server, cport
        self.cseq, self.sseq = cseq, sseq

    def server_sends(self, data=b"", flags=ACK | PSH):
        f = frame(self.s, 80, self.c, self.cport, self.sseq, self.cseq, flags, data)
        self.sseq += len(data) + (1 if flags & FIN else 0)
        return f

    def client_sends(self, data=b"", flags=ACK | PSH):
        f = frame(self.c, self.cport, self.s, 80, self.cseq, self.sseq, flags, data)
        self.cseq += len(data) + (1 if flags & FIN else 0)
        return f

    def close(self):
        return [self.client_sends(flags=FIN | ACK), self.server_sends(flags=FIN | ACK),
                self.client_sends(flags=ACK)]


def index_files(tmp_path, *frame_lists, idle=60.0):
    ix = Indexer(tmp_path / "index.jsonl", idle_seconds=idle)
    for n, frames in enumerate(frame_lists):
        ix.add_file(write_pcap(tmp_path / f"f{n}.pcap", frames))
    ix.flush(final=True)
    return read_index(tmp_path / "index.jsonl"), ix


@pytest.mark.parametrize("client,server", [(C4, S4), (C6, S6)], ids=["ipv4", "ipv6"])
@pytest.mark.unit
def test_index_error_flow_then_keepalive_request(tmp_path, client, server):
    c = Conn(client, server)
    frames = [c.server_sends(RESP_500), c.client_sends(),
              c.client_sends(REQ_OK), c.server_sends(RESP_200), c.client_sends(), *c.close()]
    (rec,), _ = index_files(tmp_path, frames)
    assert (rec["client"], rec["server"]) == (endpoint(client, 40000), endpoint(server, 80))
    assert rec["community_id"] == of_flow(FlowKey.from_endpoints(client, 40000, server, 80))
    assert rec["family"] == (6 if ":" in client else 4)
    assert rec["statuses"] == [500, 200]
    assert rec["requests"] == ["GET /ok HTTP/1.1"]
    assert rec["packets"] == len(frames)
    assert rec["bytes"] == sum(map(len, frames))
    assert rec["time_unix"] == pytest.approx(1_700_000_000.0)
    assert rec["time"] == "2023-11-14T22:13:20.000000Z"
    assert rec["last_unix"] == pytest.approx(1_700_000_000.0 + (len(frames) - 1) / 1000)
    assert rec["files"] == ["f0.pcap"] and rec["end"] == "fin" and rec["retransmissions"] == 0


@pytest.mark.unit
def test_index_retransmission_counted_once(tmp_path):
    c = Conn(C4, S4)
    first = c.server_sends(RESP_500)
    frames = [first, first, c.client_sends(), first]        # the 500 sent three times
    (rec,), _ = index_files(tmp_path, frames)
    assert rec["statuses"] == [500]
    assert rec["packets"] == 4 and rec["retransmissions"] == 2
    assert rec["end"] == "stop"                             # never closed: flushed at stop


@pytest.mark.unit
def test_index_out_of_order_and_split_request_line(tmp_path):
    c = Conn(C6, S6)
    r500 = c.server_sends(RESP_500)
    head, tail = b"GET /a/rather/long/pa", b"th?q=1 HTTP/1.1\r\nHost: s\r\n\r\n"
    req1, req2 = c.client_sends(head), c.client_sends(tail)
    r200 = c.server_sends(RESP_200)
    req3 = c.client_sends(b"DELETE /x HTTP/1.0\r\n\r\n")
    r503 = c.server_sends(b"HTTP/1.0 503 Service Unavailable\r\n\r\n")
    # Captured in a scrambled order: statuses and requests come out in sequence order.
    frames = [r200, r503, r500, req3, req2, req1, *c.close()]
    (rec,), _ = index_files(tmp_path, frames)
    assert rec["statuses"] == [500, 200, 503]
    assert rec["requests"] == ["GET /a/rather/long/path?q=1 HTTP/1.1", "DELETE /x HTTP/1.0"]
    assert (rec["client"], rec["server"]) == (endpoint(C6, 40000), endpoint(S6, 80))


@pytest.mark.unit
def test_index_sequence_numbers_wrapping(tmp_path):
    c = Conn(C4, S4, sseq=(1 << 32) - 10)                   # the 500 straddles 2**32
    r500 = c.server_sends(RESP_500)
    req = c.client_sends(REQ_OK)
    r200 = c.server_sends(RESP_200)
    (rec,), _ = index_files(tmp_path, [r200, req, r500])
    assert rec["statuses"] == [500, 200] and rec["requests"] == ["GET /ok HTTP/1.1"]


@pytest.mark.unit
def test_index_flow_over_two_files_is_one_record(tmp_path):
    c = Conn(C4, S4)
    a = Conn(C4, S4, cport=40001)
    first = [c.server_sends(RESP_500), a.server_sends(RESP_500), c.client_sends(REQ_OK)]
    fin_c, fin_s, last_ack = c.close()
    second = [c.server_sends(RESP_200), fin_c, fin_s]
    third = [last_ack]                                      # the last ACK in the next file
    ix = Indexer(tmp_path / "index.jsonl", idle_seconds=60, linger_seconds=2)
    for n, frames in enumerate([first, second]):
        ix.add_file(write_pcap(tmp_path / f"f{n}.pcap", frames, t0=1_700_000_000.0 + n))
    t = time.time()
    assert ix.flush(now=t) == 0                             # FIN/FIN just read: linger
    ix.add_file(write_pcap(tmp_path / "f2.pcap", third, t0=1_700_000_002.0))
    assert ix.flush(now=time.time() + 3) == 1               # c is over; a still open
    (rec,) = read_index(tmp_path / "index.jsonl")
    assert rec["client"].endswith(":40000") and rec["statuses"] == [500, 200]
    assert rec["files"] == ["f0.pcap", "f1.pcap", "f2.pcap"] and rec["packets"] == 6
    assert ix.flush(now=time.time() + 3600) == 1            # a: idle
    recs = read_index(tmp_path / "index.jsonl")
    assert [r["end"] for r in recs] == ["fin", "idle"] and recs[1]["client"].endswith(":40001")


@pytest.mark.unit
def test_index_rst_and_non_tcp_and_truncated_file(tmp_path):
    c = Conn(C4, S4)
    udp = bytes(dpkt.ethernet.Ethernet(
        src=MAC_C, dst=MAC_S, type=dpkt.ethernet.ETH_TYPE_IP,
        data=dpkt.ip.IP(src=socket.inet_aton(C4), dst=socket.inet_aton(S4), p=17, len=28,
                        data=dpkt.udp.UDP(sport=5, dport=6, ulen=8))))
    frames = [c.server_sends(RESP_500), udp, c.client_sends(flags=RST | ACK)]
    path = write_pcap(tmp_path / "f0.pcap", frames)
    with open(path, "ab") as f:                             # a record cut short
        f.write(b"\x01\x02\x03\x04\x05")
    ix = Indexer(tmp_path / "index.jsonl", linger_seconds=0)
    stats = ix.add_file(path)
    assert (stats.packets, stats.tcp, stats.skipped, stats.partial) == (3, 2, 1, True)
    assert ix.flush() == 1
    (rec,) = read_index(tmp_path / "index.jsonl")
    assert rec["end"] == "rst" and rec["statuses"] == [500] and rec["packets"] == 2


@pytest.mark.unit
def test_index_reads_a_growing_file_incrementally(tmp_path):
    """A file read while tcpdump appends to it, in pieces cut anywhere (mid-record too),
    gives the same flow as the whole file read at once; a rewritten ring file (another
    first packet) is read from its start again."""
    c = Conn(C6, S6)
    frames = [c.server_sends(RESP_500), c.client_sends(), c.client_sends(REQ_OK),
              c.server_sends(RESP_200), *c.close()]
    whole = write_pcap(tmp_path / "whole.pcap", frames).read_bytes()
    growing = tmp_path / "growing.pcap"
    ix = Indexer(tmp_path / "index.jsonl")
    cursor = Cursor()
    reads = []
    for cut_at in (10, 24, 40, 100, 250, len(whole) - 3, len(whole)):
        growing.write_bytes(whole[:cut_at])
        reads.append(ix.read(growing, cursor).packets)
    assert sum(reads) == len(frames) and cursor.offset == len(whole)
    assert ix.flush(final=True) == 1
    (tmp_path / "ref").mkdir()
    ref, _ = index_files(tmp_path / "ref", frames)
    (rec,) = read_index(tmp_path / "index.jsonl")
    assert {k: v for k, v in rec.items() if k != "files"} == \
        {k: v for k, v in ref[0].items() if k != "files"}
    # The ring comes round: the same name now holds other packets.
    other = Conn(C4, S4)
    write_pcap(growing, [other.server_sends(RESP_500)], t0=1_800_000_000.0)
    stats = ix.read(growing, cursor)
    assert stats.new_generation and stats.packets == 1


@pytest.mark.unit
def test_index_file_modes_and_render(tmp_path):
    c = Conn(C4, S4)
    recs, _ = index_files(tmp_path, [c.server_sends(RESP_500), *c.close()])
    assert stat.S_IMODE(os.stat(tmp_path / "index.jsonl").st_mode) == 0o600
    text = render_index(recs, None, tmp_path)
    assert "198.18.7.1:40000" in text and "500" in text and "1 flows" in text


@pytest.mark.unit
def test_current_file_is_the_newest_with_ring_tiebreak(tmp_path):
    names = [f"mirror-20250101T000000Z-r1.pcap{n}" for n in range(3)]
    for n, name in enumerate(names):
        p = tmp_path / name
        p.write_bytes(b"x")
        os.utime(p, ns=(1, 1000 + n))
    files = list_pcaps(tmp_path)
    assert all(FILE_RE.match(f.name) for f in files)
    assert current_file(files, 1, 3).number == 2
    os.utime(tmp_path / names[0], ns=(1, 1002))             # wrapped within one tick
    assert current_file(list_pcaps(tmp_path), 1, 3).number == 0
    assert current_file(list_pcaps(tmp_path), 2, 3) is None


# --- the sidecar process ---------------------------------------------------------------

class Capture:
    """`mirror capture` as a real process, stopped with SIGTERM."""

    def __init__(self, iface, directory, *extra):
        self.dir = Path(directory)
        self.proc = subprocess.Popen(
            mirror_cmd("capture", "--iface", iface, "--dir", str(directory), *extra),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
        self.output = ""

    def status(self) -> dict:
        try:
            return json.loads((self.dir / "status.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def wait_indexed(self, expected, what: str) -> dict:
        """Waits until the indexer has read at least `expected()` packets back from the
        pcaps (so tcpdump wrote them all); returns the status."""
        def check():
            assert self.proc.poll() is None, self.stop_output()
            status = self.status()
            want = expected()
            return status.get("packets_indexed", 0) >= want, {**status, "expected": want}
        return wait_until(check, f"the capture to index {what}")

    def wait_state(self, state, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.status().get("state") == state:
                return True
            assert self.proc.poll() is None, self.stop_output()
            time.sleep(0.1)
        return False

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        self.output += out.decode(errors="replace")
        return self.proc.returncode

    def stop_output(self) -> str:
        self.stop()
        return self.output


@pytest.fixture
def capture_proc():
    started = []

    def start(*args):
        c = Capture(*args)
        started.append(c)
        return c
    try:
        yield start
    finally:
        for c in started:
            if c.proc.poll() is None:
                c.proc.kill()
                c.proc.wait()


def pcap_count_ok(path: Path) -> int:
    """Packets in a pcap, read with dpkt (raises on a malformed file)."""
    with open(path, "rb") as f:
        return sum(1 for _ in dpkt.pcap.Reader(f))


@pytest.mark.kernel
def test_ring_stays_bounded_while_traffic_flows(host, nginx, tmp_path, capture_proc):
    """The traffic: 200 responses mirrored by a real `mirror run --trigger 200` (the
    sidecar records only a debug interface)."""
    cap_dir = tmp_path / "cap"
    files, size_mb = 3, 1
    debug, state = unique_name("d"), tmp_path / "state"
    cap = capture_proc(debug, cap_dir, "--file-size", str(size_mb), "--files", str(files))
    mirror = MirrorProcess("--iface", host.host_if, "--debug-iface", debug, "--trigger",
                           "200", env=env_with(MIRROR_STATE_DIR=state))
    mirror.start()
    try:
        ring_bounded(host, cap, cap_dir, files, size_mb,
                     counted_from_now(lambda: mirrored_packets(state)))
    finally:
        assert mirror.stop() == 0, mirror.output


def ring_bounded(host, cap, cap_dir, files, size_mb, crossed):
    assert cap.wait_state("capturing"), cap.stop_output()
    # tcpdump closes a file once it is larger than the cap: one packet may pass it.
    limit = size_mb * 1_000_000 + RECORD_HEADER_SIZE + MAX_SNAPLEN
    seen_names = set()
    for round_ in range(30):                                # ~256 KiB x 2 per round
        send(host.ns_v4, host.host_v4, ["/big", "/big"])
        # Paced: a round (about half a file) starts once the indexer has read all of
        # the last one, so no file is overwritten unread and tcpdump's buffer (4 MiB)
        # never fills: every count below is exact.
        wait_closed(host.ns_v4)
        cap.wait_indexed(crossed, f"round {round_}")
        now = list_pcaps(cap_dir)
        seen_names.update(f.name for f in now)
        assert len(now) <= files - 1, [f.name for f in now]     # the last slot: the index
        assert all(f.signature[1] <= limit for f in now), [f.signature for f in now]
    status_live = cap.status()
    assert cap.stop() == 0, cap.output
    remaining = list_pcaps(cap_dir)
    assert len(seen_names) >= files - 1 and len(remaining) <= files - 1
    # The ring wrapped: more data went through than the ring holds.
    assert cap.status()["packets_captured"] > sum(pcap_count_ok(f.path) for f in remaining)
    assert stat.S_IMODE(cap_dir.stat().st_mode) == 0o700
    for path in [f.path for f in remaining] + [cap_dir / "index.jsonl"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    status = cap.status()
    # tcpdump's own counters are reported: it wrote everything the kernel gave it.
    assert status["state"] == "stopped" and status["packets_dropped_kernel"] == 0
    assert status["packets_received"] == status["packets_captured"] == \
        status["packets_indexed"] > 0
    assert status["files"] <= files and status_live["state"] == "capturing"
    records = read_index(cap_dir / "index.jsonl")
    # Every connection is in the index: the indexer read every packet tcpdump wrote.
    assert status["packets_unindexed"] == 0, status
    assert len(records) == 30, status
    assert all(r["server"].endswith(":80") and set(r["statuses"]) <= {200} for r in records)
    assert "dropped by kernel" in cap.output
    assert status["index_bytes"] <= size_mb * 1_000_000


@pytest.mark.kernel
def test_waits_for_interface_and_follows_it_when_recreated(tmp_path, capture_proc, sink):
    """A debug interface as `mirror run` creates it (a dummy, or where the kernel has no
    dummy a veth with the sink); tests/test_capture_cli.py: what is not one is refused."""
    name = unique_name("c")
    cap = capture_proc(name, tmp_path / "cap")
    try:
        assert cap.wait_state("waiting"), cap.stop_output()
        for run in (1, 2):
            with IPRoute() as ipr:
                debugif.ensure(ipr, name, lambda: sink.fd)
            assert cap.wait_state("capturing"), cap.stop_output()
            assert {f.run for f in list_pcaps(tmp_path / "cap")} >= {run}
            sh("ip", "link", "del", name)                   # the controller went away
            assert cap.wait_state("waiting"), cap.stop_output()
        assert cap.stop() == 0, cap.output
        assert cap.status()["tcpdump_restarts"] == 2
        assert "waiting for interface" in cap.output
    finally:
        sh("ip", "link", "del", name, check=False)


@pytest.mark.unit
def test_refuses_unwritable_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run_cli("capture", "--iface", unique_name("x"), "--dir", str(blocker / "sub"))
    assert r.returncode == 2 and "not writable" in r.stderr


@pytest.mark.kernel
def test_behind_mirror_run_index_holds_error_flows_only(host, nginx, tmp_path, capture_proc):
    debug = unique_name("d")
    cap_dir = tmp_path / "cap"
    # The sidecar starts first and waits for the debug interface the controller creates.
    cap = capture_proc(debug, cap_dir)
    assert cap.wait_state("waiting"), cap.stop_output()
    mirror = MirrorProcess("--iface", host.host_if, "--debug-iface", debug,
                           env=env_with(MIRROR_STATE_DIR=tmp_path / "state"))
    mirror.start()
    try:
        assert cap.wait_state("capturing"), cap.stop_output()
        errors, oks = [], []
        for family in (4, 6):
            server, source = ((host.ns_v4, host.host_v4) if family == 4
                              else (host.ns_v6, host.host_v6))
            for paths, bucket in ((["/error"], errors), (["/ok"], oks),
                                  (["/ok", "/error", "/ok"], errors)):
                t5, _ = send(server, source, paths)
                bucket.append(FlowKey.from_endpoints(*t5))
        wait_closed(host.ns_v4, host.ns_v6)                 # the last ACKs sent
        cap.wait_indexed(lambda: mirrored_packets(tmp_path / "state"), "every clone")
        assert cap.stop() == 0, cap.output
    finally:
        assert mirror.stop() == 0, mirror.output
    records = read_index(cap_dir / "index.jsonl")
    keys = {key_of(r["client"], r["server"]) for r in records}
    assert keys == set(errors) and not keys & set(oks)
    by_key = {key_of(r["client"], r["server"]): r for r in records}
    for key in errors:
        rec = by_key[key]
        assert rec["server"].endswith(":80") and rec["statuses"][0] == 500
        assert all(f in {p.name for p in cap_dir.iterdir()} for f in rec["files"])
    keepalive = [r for r in records if r["statuses"] == [500, 200]]
    # The request that got the 500 (written by the mirror from its request snapshot) is
    # the flow's method and target; `requests` lists those after the trigger.
    assert len(keepalive) == 2 and all(r["requests"] == ["GET /ok HTTP/1.1"] for r in keepalive)
    for key in errors:
        rec = by_key[key]
        assert (rec["method"], rec["target"], rec["status"]) == ("GET", "/error", 500)
        assert rec["host"] in (f"{key.addr_hi}", f"[{key.addr_hi}]")
    # In the sidecar's files tshark pairs every 500 with the request the mirror wrote.
    pairs = [row for f in list_pcaps(cap_dir) for row in tshark_responses(f.path)
             if row[1] == 500]
    assert len(pairs) == len(errors)
    assert all(request_in and uri.endswith("/error") for _, _, request_in, uri in pairs)
    listed = run_cli("capture", "--list", "--dir", str(cap_dir))
    assert listed.returncode == 0 and f"{len(errors)} flows" in listed.stdout
    assert "GET /ok HTTP/1.1" in listed.stdout and "stopped" in listed.stdout


# --- the request before its error response ---------------------------------------------
#
# The controller writes the request of an error response onto the debug interface after
# the kernel cloned the response, so tcpdump records the request after it. These pcaps
# hold what tcpdump records; the sidecar's reorder puts each request back before its
# response, and the index names it.

REQ_FAIL = b"GET /fail?id=7 HTTP/1.1\r\nHost: shop.example\r\nAccept: */*\r\n\r\n"
# Longer than a 200-byte snapshot: the request line is whole, the Host line is cut off.
REQ_LONG = (b"GET /search?q=" + b"q" * 50 + b" HTTP/1.1\r\nUser-Agent: " + b"u" * 120
            + b"\r\nHost: shop.example\r\n\r\n")
RESP_502 = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n"
SNAPSHOT = 200


def snapshot(full: bytes, n: int, keep_lengths: bool = False) -> bytes:
    """A request frame as the controller writes it: its first n bytes with the IP
    length fields rewritten to the cut (and the IPv4 header checksum); with keep_lengths
    the lengths stay, a frame cut the way tcpdump -s cuts."""
    out = bytearray(full[:n])
    if keep_lengths:
        return bytes(out)
    if out[12:14] == b"\x08\x00":
        out[16:18] = (n - 14).to_bytes(2, "big")
        out[24:26] = b"\0\0"
        words = sum(int.from_bytes(out[i:i + 2], "big") for i in range(14, 34, 2))
        while words >> 16:
            words = (words & 0xFFFF) + (words >> 16)
        out[24:26] = (~words & 0xFFFF).to_bytes(2, "big")
    else:
        out[18:20] = (n - 54).to_bytes(2, "big")
    return bytes(out)


def injected_basic(client=C4, server=S4, cut=None, cport=40000):
    """The 500 clone, the client's ACK, then the request (cut=(n, keep_lengths) cuts it)."""
    c = Conn(client, server, cport=cport)
    req = c.client_sends(REQ_LONG if cut else REQ_FAIL)
    if cut:
        req = snapshot(req, *cut)
    resp = c.server_sends(RESP_500)
    target = "/search?q=" + "q" * 50 if cut else "/fail?id=7"
    return [resp, c.client_sends(), req, *c.close()], [(500, target)]


def injected_keepalive(cport=40000):
    """200, 200, 500, 200 on one connection: the capture starts at the 500; the 500's
    request is written after the next request and its 200."""
    c = Conn(C4, S4, cport=cport)
    for _ in range(2):                                      # before the trigger: not mirrored
        c.client_sends(REQ_OK)
        c.server_sends(RESP_200)
    req = c.client_sends(REQ_FAIL)
    r500 = c.server_sends(RESP_500)
    ack = c.client_sends()
    nxt = c.client_sends(REQ_OK)
    r200 = c.server_sends(RESP_200)
    frames = [r500, ack, nxt, r200, c.client_sends(), req, *c.close()]
    return frames, [(500, "/fail?id=7"), (200, "/ok")]


def injected_interleaved():
    """Two connections with the same sequence numbers, responses and requests crossed."""
    a, b = Conn(C4, S4, cport=40001), Conn(C4, S4, cport=40002)
    ra = a.client_sends(b"GET /a HTTP/1.1\r\nHost: s\r\n\r\n")
    rb = b.client_sends(b"POST /b HTTP/1.1\r\nHost: s\r\nContent-Length: 3\r\n\r\nabc")
    pa, pb = a.server_sends(RESP_500), b.server_sends(RESP_502)
    frames = [pa, pb, a.client_sends(), rb, b.client_sends(), ra, *a.close(), *b.close()]
    return frames, [(500, "/a"), (502, "/b")]


SCENARIOS = {
    "ipv4": lambda: injected_basic(),
    "ipv6": lambda: injected_basic(C6, S6),
    "cut": lambda: injected_basic(cut=(SNAPSHOT, False)),
    "cut-lengths-kept": lambda: injected_basic(cut=(SNAPSHOT, True)),
    "cut-ipv6-lengths-kept": lambda: injected_basic(C6, S6, cut=(SNAPSHOT, True)),
    "keepalive": injected_keepalive,
    "interleaved": injected_interleaved,
}


def frames_of(path):
    """(ts, frame) of a pcap's whole records (a cut-short last one is left out)."""
    out = []
    with open(path, "rb") as f:
        try:
            for ts, buf in dpkt.pcap.Reader(f):
                out.append((ts, buf))
        except dpkt.NeedData:
            pass
    return out


def tcp_of(buf):
    return dpkt.ethernet.Ethernet(buf).data.data


def first_line(buf) -> bytes:
    return bytes(tcp_of(buf).data).split(b"\r\n", 1)[0]


def where(records, start: bytes) -> list[int]:
    return [n for n, (_, buf) in enumerate(records) if first_line(buf).startswith(start)]


@pytest.mark.parametrize("name", SCENARIOS)
@pytest.mark.unit
def test_reorder_puts_each_request_before_its_response(tmp_path, name):
    frames, pairs = SCENARIOS[name]()
    path = write_pcap(tmp_path / "f.pcap", frames)
    os.chmod(path, 0o600)
    before, head, mtime = frames_of(path), path.read_bytes()[:24], path.stat().st_mtime_ns
    moved = sum(1 for st, _ in pairs if st != 200)          # the 200 of (c) is in order
    result = reorder_file(path)
    assert result is not None and result.moved == moved
    after = frames_of(path)
    assert path.read_bytes()[:24] == head and path.stat().st_mtime_ns == mtime
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert result.signature == (path.stat().st_ino, path.stat().st_size, mtime)
    assert result.first == path.read_bytes()[24:40].hex()
    for status, target in pairs:
        (resp,) = [n for n in where(after, b"HTTP/1.") if first_line(after[n][1])[9:12]
                   == str(status).encode()]
        (req,) = where(after, b" ".join([b"GET", target.encode()])) \
            or where(after, b" ".join([b"POST", target.encode()]))
        assert req < resp, (name, status)
        if status != 200:                                   # moved: 1 us before, right before
            assert req == resp - 1
            assert after[req][0] == pytest.approx(after[resp][0] - 1e-6, abs=1e-9)
    # Nothing else changed: same frames, the others with their own timestamps.
    assert sorted(buf for _, buf in after) == sorted(buf for _, buf in before)
    kept = [(ts, buf) for ts, buf in before if not where([(ts, buf)], b"GET /fail")
            and not where([(ts, buf)], b"GET /search") and not where([(ts, buf)], b"GET /a")
            and not where([(ts, buf)], b"POST /b")]
    assert [x for x in after if x in kept] == kept
    assert reorder_file(path) is None                       # done once: nothing moves again


@pytest.mark.unit
@pytest.mark.parametrize("name", SCENARIOS)
def test_reordered_files_pair_in_tshark(tmp_path, name):
    """Real tshark, default preferences: after the reorder the error response names its
    request (http.response_for.uri) and the request's frame comes first; before it,
    tshark shows the error response alone. A cut request whose IP lengths were rewritten
    to the cut holds half a head, which tshark waits to complete unless told not to
    (http.desegment_headers): with the lengths kept, the reorder marks the frame as cut
    at capture (its record's original length) and tshark reads what it holds."""
    frames, pairs = SCENARIOS[name]()
    path = write_pcap(tmp_path / "f.pcap", frames)
    opts = ["-o", "http.desegment_headers:FALSE"] if name == "cut" else []
    errors = [p for p in pairs if p[0] != 200]
    assert not [r for r in tshark_responses(path, opts) if r[1] in {s for s, _ in errors}
                and r[3]]
    reorder_file(path)
    rows = tshark_responses(path, opts)
    for status, target in pairs:
        (row,) = [r for r in rows if r[1] == status]
        number, _, request_in, uri = row
        assert uri.endswith(target) and 0 < request_in < number, (name, row)


def tshark_responses(path, opts=()) -> list[tuple]:
    """(frame number, status, request frame number or 0, response_for.uri) per HTTP
    response in a pcap, as tshark dissects it."""
    out = subprocess.run(["tshark", "-r", str(path), *opts, "-Y", "http.response", "-T",
                          "fields", "-e", "frame.number", "-e", "http.response.code",
                          "-e", "http.request_in", "-e", "http.response_for.uri"],
                         capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        number, code, request_in, uri = line.split("\t")
        rows.append((int(number), int(code), int(request_in or 0), uri))
    return rows


@pytest.mark.unit
def test_reorder_leaves_what_it_cannot_or_need_not_move(tmp_path):
    # Already before its response, and a retransmitted copy after it: nothing moves.
    c = Conn(C4, S4)
    req = c.client_sends(REQ_FAIL)
    resp = c.server_sends(RESP_500)
    path = write_pcap(tmp_path / "a.pcap", [req, resp, c.client_sends(), req])
    data = path.read_bytes()
    assert reorder_file(path) is None and path.read_bytes() == data
    # The response in the previous ring file: the request stays in the next one, and the
    # index, which reads the connection across files, still pairs them.
    c = Conn(C6, S6)
    req = c.client_sends(REQ_FAIL)
    resp = c.server_sends(RESP_500)
    first = write_pcap(tmp_path / "r.pcap0", [resp, c.client_sends()])
    second = write_pcap(tmp_path / "r.pcap1", [req, *c.close()], t0=1_700_000_001.0)
    assert reorder_file(first) is None and reorder_file(second) is None
    ix = Indexer(tmp_path / "index.jsonl")
    ix.add_file(first)
    ix.add_file(second)
    ix.flush(final=True)
    (rec,) = read_index(tmp_path / "index.jsonl")
    assert (rec["method"], rec["target"], rec["host"], rec["status"]) == \
        ("GET", "/fail?id=7", "shop.example", 500)
    # A later request of the keep-alive connection (its seq is the 500's ack) is not the
    # 500's request; a file that changed since it was read is not rewritten.
    c = Conn(C4, S4)
    resp = c.server_sends(RESP_500)
    path = write_pcap(tmp_path / "b.pcap",
                      [resp, c.client_sends(REQ_OK), c.server_sends(RESP_200)])
    assert reorder_file(path) is None
    st = path.stat()
    with pytest.raises(Changed):
        reorder_file(path, expect=(st.st_ino, st.st_size + 1, st.st_mtime_ns))


@pytest.mark.unit
def test_reorder_nanosecond_file_and_cut_short_tail(tmp_path):
    frames, _ = injected_basic()
    path = write_pcap(tmp_path / "n.pcap", frames, t0=1_700_000_000.0, nano=True)
    with open(path, "ab") as f:                             # tcpdump killed mid-record
        f.write(b"\x01\x02\x03")
    size = path.stat().st_size
    assert reorder_file(path).moved == 1
    assert path.stat().st_size == size and path.read_bytes().endswith(b"\x01\x02\x03")
    after = frames_of(path)
    # The 500 at exactly t0 s: the request 1 us before it, borrowing from the seconds.
    assert first_line(after[0][1]).startswith(b"GET /fail")
    raw = path.read_bytes()
    sec, frac = int.from_bytes(raw[24:28], "little"), int.from_bytes(raw[28:32], "little")
    assert (sec, frac) == (1_699_999_999, 999_999_000)


@pytest.mark.unit
def test_request_heads_and_pairing_rule():
    head = parse_request(REQ_FAIL)
    assert (head.method, head.target, head.host, head.complete, head.length) == \
        ("GET", "/fail?id=7", "shop.example", True, len(REQ_FAIL))
    cut = parse_request(REQ_LONG[:SNAPSHOT - 66])
    assert (cut.host, cut.complete, cut.length) == (None, False, None)
    post = b"POST /p HTTP/1.1\r\ncontent-length: 10\r\n\r\n"
    assert parse_request(post).length == len(post) + 10
    assert parse_request(b"GET /x HTTP/1.1\r\nHost:s\r\nHost: t\r\n\r\n").host == "s"
    assert parse_request(b"GETX / HTTP/1.1\r\n\r\n") is None
    assert parse_request(b"HTTP/1.1 500 Oops\r\n\r\n") is None
    assert parse_request(b"GET /very/long/targ").target == "/very/long/targ"
    # Acknowledged exactly, past the segment (not allowed for a whole head without a body),
    # before it, across 2**32; a cut head is allowed up to MAX_SPAN.
    seq = (1 << 32) - 10
    assert covers(seq, REQ_FAIL, seq + len(REQ_FAIL))
    assert not covers(seq, REQ_FAIL, seq + len(REQ_FAIL) + 1)
    assert not covers(seq, REQ_FAIL, seq) and not covers(seq, REQ_FAIL, seq - 5)
    part = REQ_LONG[:100]
    assert covers(seq, part, seq + len(REQ_LONG)) and covers(seq, part, seq + MAX_SPAN)
    assert not covers(seq, part, seq + MAX_SPAN + 1)


def index_record(tmp_path, frames, t0=1_700_000_000.0):
    ix = Indexer(tmp_path / "index.jsonl")
    ix.add_file(write_pcap(tmp_path / "i.pcap", frames, t0=t0))
    ix.flush(final=True)
    return read_index(tmp_path / "index.jsonl")


@pytest.mark.parametrize("name", SCENARIOS)
@pytest.mark.unit
def test_index_names_the_request_of_the_error(tmp_path, name):
    """The same fields whether the indexer reads the file as tcpdump wrote it or after
    the reorder; no response time from an injected request (captured after its
    response, or 1 us before it once reordered)."""
    frames, pairs = SCENARIOS[name]()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    recs = index_record(tmp_path / "a", frames)
    reorder_file(tmp_path / "a" / "i.pcap")
    ix = Indexer(tmp_path / "b" / "index.jsonl")
    ix.add_file(tmp_path / "a" / "i.pcap")
    ix.flush(final=True)
    recs_after = read_index(tmp_path / "b" / "index.jsonl")
    errors = [p for p in pairs if p[0] != 200]
    assert len(recs) == len(recs_after) == len(errors)
    host = None if name.startswith("cut") else ("s" if name == "interleaved" else "shop.example")
    for rec, rec_after, (status, target) in zip(recs, recs_after, errors):
        fields = {k: rec[k] for k in ("method", "target", "host", "status",
                                      "response_seconds")}
        assert fields == {"method": "POST" if target == "/b" else "GET", "target": target,
                          "host": host, "status": status, "response_seconds": None}, name
        assert {k: rec_after[k] for k in fields} == fields
        assert rec["requests"] == (["GET /ok HTTP/1.1"] if name == "keepalive" else [])
        # The moved request's new time may make the connection start 1 us earlier.
        same = set(rec) - {"files", "time", "time_unix"}
        assert {k: rec_after[k] for k in same} == {k: rec[k] for k in same}
        assert 0 <= rec["time_unix"] - rec_after["time_unix"] < 2e-6


@pytest.mark.unit
def test_index_response_time_of_a_request_captured_in_order(tmp_path):
    """A whole connection captured (or a request sent after the flow was marked): the
    response time is the capture's; two requests in flight: the last one is the one the
    response answered, as the kernel reports it."""
    c = Conn(C4, S4)
    frames = [c.client_sends(b"GET /first HTTP/1.1\r\n\r\n"), c.client_sends(REQ_FAIL),
              c.server_sends(RESP_500), *c.close()]
    (rec,) = index_record(tmp_path, frames)                 # frames 1 ms apart
    assert (rec["target"], rec["status"], rec["response_seconds"]) == ("/fail?id=7", 500,
                                                                        0.001)
    assert rec["requests"] == ["GET /first HTTP/1.1"]
    # No request captured at all; or only the next request of the keep-alive connection
    # (sent after the 500, so not the 500's request).
    c = Conn(C4, S4)
    (tmp_path / "n").mkdir()
    (rec,) = index_record(tmp_path / "n", [c.server_sends(RESP_500), *c.close()])
    assert (rec["method"], rec["target"], rec["host"], rec["status"], rec["response_seconds"]) \
        == (None, None, None, 500, None)
    frames, _ = injected_keepalive()
    (tmp_path / "k").mkdir()
    (rec,) = index_record(tmp_path / "k", [f for f in frames if b"GET /fail" not in f])
    assert (rec["method"], rec["status"], rec["statuses"]) == (None, 500, [500, 200])
    assert rec["requests"] == ["GET /ok HTTP/1.1"]


@pytest.mark.unit
def test_list_shows_the_request_of_the_error(tmp_path):
    frames, _ = injected_keepalive()
    recs = index_record(tmp_path, frames)
    text = render_index(recs, None, tmp_path)
    row = text.splitlines()[1]
    assert "GET /fail?id=7" in row and "shop.example" in row and " 500 " in row
    assert "GET /ok HTTP/1.1" in row and " 200 " in row     # later status and request
    recs[0]["response_seconds"] = 0.0125
    assert "12.500" in render_index(recs, None, tmp_path)


RING0 = "mirror-20250101T000000Z-r1.pcap0"
RING1 = "mirror-20250101T000000Z-r1.pcap1"


@pytest.mark.unit
def test_sidecar_reorders_closed_files_and_reads_them_once(tmp_path):
    """The sidecar reads a closed file to its end, then reorders it (here the request
    becomes the file's first record, another `first` for the cursor), and neither it nor
    a restarted sidecar reads the rewritten file again: every packet counted once, every
    flow indexed once. Not rewritten: the file tcpdump is writing, and the newest file of
    an earlier sidecar's run (its tcpdump may outlive it) until a run of this one."""
    frames0, _ = injected_basic()
    frames1, _ = injected_basic(C6, S6)
    path0 = write_pcap(tmp_path / RING0, frames0)
    path1 = write_pcap(tmp_path / RING1, frames1)
    for n, path in enumerate((path0, path1)):
        os.chmod(path, 0o600)
        os.utime(path, ns=(1, 1_000_000_000 * (n + 1)))
    side = CaptureSidecar(Options(iface="none0", dir=tmp_path))
    side._load_state()
    files = list_pcaps(tmp_path)
    side._read(files[0], True)
    assert not side._reorder(files, files[0])               # being written: left alone
    assert first_line(frames_of(path0)[0][1]).startswith(b"HTTP/1.1 500")
    side._index_leftovers()                                 # an earlier sidecar's files
    assert first_line(frames_of(path0)[0][1]).startswith(b"GET /fail")
    assert first_line(frames_of(path1)[0][1]).startswith(b"HTTP/1.1 500")
    assert (side.files_reordered, side.requests_moved) == (1, 1)
    assert side.indexer.packets_indexed == len(frames0) + len(frames1)
    side.first_run = side.run_number = 1                    # as if run 1 were ours, stopped
    reads = side.indexer.reads
    side._housekeeping()
    assert first_line(frames_of(path1)[0][1]).startswith(b"GET /fail")
    assert side.indexer.reads == reads and side.files_reordered == 2
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["files_reordered"] == 2 and status["requests_moved"] == 2
    (tmp_path / f".{RING0}.reorder").write_bytes(b"half a rewrite")    # a killed rewrite
    again = CaptureSidecar(Options(iface="none0", dir=tmp_path))
    again._load_state()
    again._index_leftovers()
    assert again.indexer.packets_indexed == 0 and again.files_reordered == 0
    assert not (tmp_path / f".{RING0}.reorder").exists()
    recs = read_index(tmp_path / "index.jsonl")
    assert sorted((r["packets"], r["target"], r["family"]) for r in recs) == \
        [(len(frames0), "/fail?id=7", 4), (len(frames1), "/fail?id=7", 6)]


def filler(count: int) -> list[bytes]:
    """Large UDP frames between the test hosts: they fill ring files, the index skips them."""
    udp = dpkt.udp.UDP(sport=9, dport=9, data=b"f" * 1400)
    udp.ulen = len(bytes(udp))
    ip = dpkt.ip.IP(src=socket.inet_aton(C4), dst=socket.inet_aton(S4), p=17, ttl=64,
                    data=udp)
    ip.len = 20 + udp.ulen
    frame_ = bytes(dpkt.ethernet.Ethernet(src=MAC_C, dst=MAC_S, data=ip,
                                          type=dpkt.ethernet.ETH_TYPE_IP))
    return [frame_] * count


@pytest.mark.kernel
def test_sidecar_files_pair_requests_written_after_responses(debug_iface, tmp_path,
                                                            capture_proc):
    """The real sidecar on the debug veth. The test writes frames onto it with an
    AF_PACKET socket in the order the mirror does (the error response's clone, then its
    request), each connection in a new ring file (bulk between them makes tcpdump
    rotate). Closed files are reordered while tcpdump runs, the last one at stop; then
    tshark pairs every error response of every file with its request, the index names
    the requests, and every packet was indexed once."""
    cap_dir = tmp_path / "cap"
    cap = capture_proc(debug_iface.name, cap_dir, "--file-size", "1", "--files", "10")
    assert cap.wait_state("capturing"), cap.stop_output()
    conns = [injected_basic(cport=41000), injected_basic(C6, S6, cport=41001),
             injected_keepalive(cport=41002),
             injected_basic(cut=(SNAPSHOT, True), cport=41003)]
    sent = []

    def recorded() -> int:
        """Bytes of records tcpdump has written (each file starts with a file header)."""
        files = list_pcaps(cap_dir)
        return sum(f.signature[1] for f in files) - FILE_HEADER_SIZE * len(files)

    def write(sock, frames):
        """A few frames at a time, each batch waited for on disk: written in bursts of
        100 frames, the kernel dropped some before tcpdump read them here (its counter
        said so)."""
        for i in range(0, len(frames), 8):
            for fr in frames[i:i + 8]:
                sock.send(fr)
                sent.append(fr)
            total = sum(RECORD_HEADER_SIZE + len(fr) for fr in sent)
            wait_until(lambda: (recorded() == total, (recorded(), total)),
                       "the frames on disk")

    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind((debug_iface.name, 0))
        for frames, _ in conns:
            files_before = len(list_pcaps(cap_dir))
            write(sock, frames)
            while len(list_pcaps(cap_dir)) == files_before:    # bulk to the next ring file
                write(sock, filler(64))
    wait_until(lambda: (cap.status().get("files_reordered", 0) >= 2, cap.status()),
               "two ring files reordered")
    assert cap.status()["state"] == "capturing"             # reordered while recording
    assert cap.stop() == 0, cap.output
    status = cap.status()
    files = list_pcaps(cap_dir)
    assert len(files) >= len(conns) + 1 and status["requests_moved"] == 4, cap.output
    assert (status["packets_captured"], status["packets_indexed"]) == (len(sent), len(sent))
    paired = {}
    for f in files:
        assert stat.S_IMODE(f.path.stat().st_mode) == 0o600
        for number, code, request_in, uri in tshark_responses(f.path):
            assert 0 < request_in < number, (f.name, number, code, uri)
            paired.setdefault(code, []).append(uri)
    assert sorted(paired[500]) == sorted(["http://shop.example/fail?id=7"] * 3
                                         + ["/search?q=" + "q" * 50])  # no Host: cut off
    assert paired[200] == ["http://s/ok"]
    records = sorted(read_index(cap_dir / "index.jsonl"),
                     key=lambda r: parse_endpoint(r["client"])[1])
    assert [(parse_endpoint(r["client"])[1], r["method"], r["target"], r["host"], r["status"],
             r["response_seconds"]) for r in records] == [
        (41000, "GET", "/fail?id=7", "shop.example", 500, None),
        (41001, "GET", "/fail?id=7", "shop.example", 500, None),
        (41002, "GET", "/fail?id=7", "shop.example", 500, None),
        (41003, "GET", "/search?q=" + "q" * 50, None, 500, None)]
    listed = run_cli("capture", "--list", "--dir", str(cap_dir))
    assert listed.returncode == 0 and listed.stdout.count("GET /fail?id=7") == 3
