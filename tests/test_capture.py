"""The capture sidecar (`mirror capture`) and its indexer.

Indexer: pcaps written here with dpkt (IPv4 and IPv6, retransmissions, out-of-order
segments, a request line split over two segments, sequence numbers wrapping, a flow
spread over two files, a truncated file). Sidecar: the real CLI process, real tcpdump and
real traffic through network namespaces: the ring stays bounded while traffic flows, it
waits for its interface and follows it when it is recreated, and behind a real `mirror
run` its index holds the error connections and nothing else."""
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

from helpers import (MirrorProcess, counted_from_now, env_with, link_packets, mirror_cmd,
                     mirrored_packets, run_cli, wait_closed, wait_until)
from mirror.capture import FILE_RE, current_file, list_pcaps, render_index
from mirror.flowkey import FlowKey
from mirror.lab import send
from mirror.netns import sh, unique_name
from mirror.pcapindex import Cursor, Indexer, read_index

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


def write_pcap(path, frames, t0=1_700_000_000.0):
    """frames: list of bytes; timestamps t0, t0+0.001, ..."""
    with open(path, "wb") as f:
        w = dpkt.pcap.Writer(f, linktype=dpkt.pcap.DLT_EN10MB)
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
def test_index_error_flow_then_keepalive_request(tmp_path, client, server):
    c = Conn(client, server)
    frames = [c.server_sends(RESP_500), c.client_sends(),
              c.client_sends(REQ_OK), c.server_sends(RESP_200), c.client_sends(), *c.close()]
    (rec,), _ = index_files(tmp_path, frames)
    assert (rec["client"], rec["client_port"], rec["server"], rec["server_port"]) == \
        (client, 40000, server, 80)
    assert rec["family"] == (6 if ":" in client else 4)
    assert rec["statuses"] == [500, 200]
    assert rec["requests"] == ["GET /ok HTTP/1.1"]
    assert rec["packets"] == len(frames)
    assert rec["bytes"] == sum(map(len, frames))
    assert rec["first"] == pytest.approx(1_700_000_000.0)
    assert rec["last"] == pytest.approx(1_700_000_000.0 + (len(frames) - 1) / 1000)
    assert rec["files"] == ["f0.pcap"] and rec["end"] == "fin" and rec["retransmissions"] == 0


def test_index_retransmission_counted_once(tmp_path):
    c = Conn(C4, S4)
    first = c.server_sends(RESP_500)
    frames = [first, first, c.client_sends(), first]        # the 500 sent three times
    (rec,), _ = index_files(tmp_path, frames)
    assert rec["statuses"] == [500]
    assert rec["packets"] == 4 and rec["retransmissions"] == 2
    assert rec["end"] == "stop"                             # never closed: flushed at stop


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
    assert (rec["client"], rec["server"]) == (C6, S6)


def test_index_sequence_numbers_wrapping(tmp_path):
    c = Conn(C4, S4, sseq=(1 << 32) - 10)                   # the 500 straddles 2**32
    r500 = c.server_sends(RESP_500)
    req = c.client_sends(REQ_OK)
    r200 = c.server_sends(RESP_200)
    (rec,), _ = index_files(tmp_path, [r200, req, r500])
    assert rec["statuses"] == [500, 200] and rec["requests"] == ["GET /ok HTTP/1.1"]


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
    assert rec["client_port"] == 40000 and rec["statuses"] == [500, 200]
    assert rec["files"] == ["f0.pcap", "f1.pcap", "f2.pcap"] and rec["packets"] == 6
    assert ix.flush(now=time.time() + 3600) == 1            # a: idle
    recs = read_index(tmp_path / "index.jsonl")
    assert [r["end"] for r in recs] == ["fin", "idle"] and recs[1]["client_port"] == 40001


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


def test_index_file_modes_and_render(tmp_path):
    c = Conn(C4, S4)
    recs, _ = index_files(tmp_path, [c.server_sends(RESP_500), *c.close()])
    assert stat.S_IMODE(os.stat(tmp_path / "index.jsonl").st_mode) == 0o600
    text = render_index(recs, None, tmp_path)
    assert "198.18.7.1:40000" in text and "500" in text and "1 flows" in text


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


@pytest.mark.integration
def test_ring_stays_bounded_while_traffic_flows(host, nginx, tmp_path, capture_proc):
    cap_dir = tmp_path / "cap"
    files, size_mb = 3, 1
    cap = capture_proc(host.host_if, cap_dir, "--file-size", str(size_mb), "--files",
                       str(files))
    assert cap.wait_state("capturing"), cap.stop_output()
    crossed = counted_from_now(lambda: link_packets(host.host_if))
    # tcpdump closes a file once it is larger than the cap: one packet may pass it.
    limit = size_mb * 1_000_000 + 262144 + 16
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
        assert len(now) <= files, [f.name for f in now]
        assert all(f.signature[1] <= limit for f in now), [f.signature for f in now]
    status_live = cap.status()
    assert cap.stop() == 0, cap.output
    remaining = list_pcaps(cap_dir)
    assert len(seen_names) >= files and len(remaining) <= files
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
    assert all(r["server_port"] == 80 and set(r["statuses"]) <= {200} for r in records)
    assert "dropped by kernel" in cap.output


@pytest.mark.integration
def test_waits_for_interface_and_follows_it_when_recreated(tmp_path, capture_proc):
    name, peer = unique_name("c"), unique_name("p")
    cap = capture_proc(name, tmp_path / "cap")
    try:
        assert cap.wait_state("waiting"), cap.stop_output()
        for run in (1, 2):
            sh("ip", "link", "add", name, "type", "veth", "peer", "name", peer)
            sh("ip", "link", "set", name, "up")
            sh("ip", "link", "set", peer, "up")
            assert cap.wait_state("capturing"), cap.stop_output()
            assert {f.run for f in list_pcaps(tmp_path / "cap")} >= {run}
            sh("ip", "link", "del", name)                   # the controller went away
            assert cap.wait_state("waiting"), cap.stop_output()
        assert cap.stop() == 0, cap.output
        assert cap.status()["tcpdump_restarts"] == 2
        assert "waiting for interface" in cap.output
    finally:
        sh("ip", "link", "del", name, check=False)


@pytest.mark.integration
def test_refuses_unwritable_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run_cli("capture", "--iface", "lo", "--dir", str(blocker / "sub"))
    assert r.returncode == 2 and "not writable" in r.stderr


@pytest.mark.integration
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
    keys = {FlowKey.from_endpoints(r["client"], r["client_port"], r["server"],
                                   r["server_port"]) for r in records}
    assert keys == set(errors) and not keys & set(oks)
    by_key = {FlowKey.from_endpoints(r["client"], r["client_port"], r["server"],
                                     r["server_port"]): r for r in records}
    for key in errors:
        rec = by_key[key]
        assert rec["server_port"] == 80 and rec["statuses"][0] == 500
        assert all(f in {p.name for p in cap_dir.iterdir()} for f in rec["files"])
    keepalive = [r for r in records if r["statuses"] == [500, 200]]
    assert len(keepalive) == 2 and all(r["requests"] == ["GET /ok HTTP/1.1"] for r in keepalive)
    listed = run_cli("capture", "--list", "--dir", str(cap_dir))
    assert listed.returncode == 0 and f"{len(errors)} flows" in listed.stdout
    assert "GET /ok HTTP/1.1" in listed.stdout and "stopped" in listed.stdout
