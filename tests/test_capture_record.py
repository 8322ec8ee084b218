"""`mirror capture -w` (the recording) and `--extract`, and what they are built of: the
pcapng writer, the stream reorder (Holder), the extract's selectors.

End to end: a real `mirror run` on a namespace's veth, nginx behind it, the recording as
a real process (into a file, and into a pipe), the sidecar's ring for the extract; what
they wrote read by tshark (HTTP pairing, comments, interfaces, Community ID) and by
dpkt's pcapng reader, never by this project's readers."""
from __future__ import annotations

import io
import signal
import struct
import subprocess
from pathlib import Path

import dpkt
import pytest

from helpers import (MirrorProcess, counted_from_now, env_with, mirror_cmd, mirrored_packets,
                     run_cli, wait_closed, wait_until)
from test_capture import (C4, C6, S4, S6, capture_proc, injected_basic,  # noqa: F401
                          injected_keepalive)
from mirror.capture.extract import Selector, Summary
from mirror.capture.pcap import PcapngWriter
from mirror.capture.reorder import Frame, Holder
from mirror.communityid import of_flow
from mirror.filters import Statuses, parse_time
from mirror.flowkey import FlowKey
from mirror.lab.client import send, send_h2
from mirror.lab.netns import unique_name
from mirror.lab.nginx import Nginx

ROOT = Path(__file__).resolve().parent.parent


def pcapng_packets(data: bytes) -> list[tuple[float, bytes]]:
    """A pcapng's packets, read by dpkt."""
    return list(dpkt.pcapng.Reader(io.BytesIO(data)))


def whole_blocks(data: bytes) -> int:
    """Enhanced Packet Blocks whole in a pcapng being written."""
    pos, count = 0, 0
    while pos + 12 <= len(data):
        kind, length = struct.unpack_from("<II", data, pos)
        if length < 12 or pos + length > len(data):
            break
        count += kind == 6
        pos += length
    return count


def tshark(path, *args: str) -> list[list[str]]:
    out = subprocess.run(["tshark", "-r", str(path), *args], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return [line.split("\t") for line in out.stdout.splitlines() if line]


# --- unit: the parts -------------------------------------------------------------------

def frames_through(holder: Holder, frames: list[bytes], arrivals=None) -> list[Frame]:
    out = []
    for n, data in enumerate(frames):
        now = arrivals[n] if arrivals else 0.0
        out += holder.due(now)                  # time went by before this frame came
        holder.add(Frame(1_700_000_000_000_000_000 + n * 1_000_000, data, len(data),
                         arrival=now))
        out += holder.due(now)
    return out + holder.due(1e9, everything=True)


def first_line(frame: Frame) -> bytes:
    return frame.packet.payload.split(b"\r\n", 1)[0]


@pytest.mark.unit
def test_holder_puts_a_request_before_its_held_response():
    frames, _ = injected_keepalive()
    out = frames_through(Holder(hold=1.0), frames)
    lines = [first_line(f) for f in out if f.packet.payload]
    assert lines == [b"GET /fail?id=7 HTTP/1.1", b"HTTP/1.1 500 Internal Server Error",
                     b"GET /ok HTTP/1.1", b"HTTP/1.1 200 OK"]
    moved = next(f for f in out if f.moved_from_ns is not None)
    assert moved.ts_ns == out[1].ts_ns - 1000 and moved.moved_from_ns > out[1].ts_ns


@pytest.mark.unit
def test_holder_bounds_time_and_size():
    """A request read after its response's hold ended, or after the size bound pushed
    the response out, stays where it came."""
    frames, _ = injected_basic()                # 500, ACK, request, FIN...
    late = frames_through(Holder(hold=0.5), frames, arrivals=[0, 0, 1.0, 1, 1, 1])
    assert first_line(late[0]).startswith(b"HTTP/1.1 500")
    squeezed = frames_through(Holder(hold=60, max_frames=1), frames)
    assert first_line(squeezed[0]).startswith(b"HTTP/1.1 500")
    within = frames_through(Holder(hold=60, max_frames=10), frames)
    assert first_line(within[0]).startswith(b"GET /fail")


@pytest.mark.unit
def test_pcapng_writer_read_by_dpkt_and_tshark(tmp_path):
    frames, _ = injected_basic(C6, S6)
    buf = io.BytesIO()
    w = PcapngWriter(buf)
    first = w.add_interface("mirror0", "debug")
    w.write(1_700_000_000_123_456_789, frames[0], comments=["one \u00e9", "two"],
            interface=first)
    second = w.add_interface("veth-\u00e9", "later")            # mid-stream, as a pipe does
    w.write(1_700_000_000_223_456_789, frames[1], orig_len=len(frames[1]) + 100,
            interface=second)
    path = tmp_path / "w.pcapng"
    path.write_bytes(buf.getvalue())
    assert [buf for _, buf in pcapng_packets(path.read_bytes())] == frames[:2]
    rows = tshark(path, "-T", "fields", "-e", "frame.time_epoch", "-e",
                  "frame.interface_name", "-e", "frame.comment", "-e", "frame.len")
    assert rows == [["1700000000.123456789", "mirror0", "one \u00e9,two", str(len(frames[0]))],
                    ["1700000000.223456789", "veth-\u00e9", "", str(len(frames[1]) + 100)]]


@pytest.mark.unit
def test_extract_selectors():
    key = FlowKey.from_endpoints(C4, 40000, S4, 80)
    s = Summary(key, of_flow(key), {500, 200}, {14}, 100.0, 110.0)
    assert Selector(community_id=of_flow(key), statuses=Statuses.parse("5xx")).matches(s)
    assert not Selector(statuses=Statuses.parse("502-504,404")).matches(s)
    # gRPC codes apart from HTTP ones: grpc:14 is the gRPC status, never an HTTP one.
    assert Selector(statuses=Statuses.parse("grpc:unavailable")).matches(s)
    assert not Selector(statuses=Statuses.parse("grpc:13")).matches(
        Summary(key, of_flow(key), {200, 500}))
    assert Selector(since=105, until=105).matches(s) and not Selector(since=111).matches(s)
    assert not Selector(extra=(lambda summary: False,)).matches(s)     # the workload hook
    assert parse_time("1970-01-01T00:01:40Z", "--since") == 100.0
    assert parse_time("1970-01-01T00:01:40", "--since") == 100.0 == parse_time("100", "x")


# --- kernel: the real recording and extract --------------------------------------------

class Recording:
    """`mirror capture -w PATH` (or `-w -` into PATH through a pipe) as a real process."""

    def __init__(self, iface: str, path: Path, state: Path, pipe: bool):
        self.path = path
        self.out = open(path, "wb") if pipe else None
        target = "-" if pipe else str(path)
        self.proc = subprocess.Popen(mirror_cmd("capture", "--iface", iface, "-w", target),
                                     stdout=self.out or subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, cwd=ROOT,
                                     env=env_with(MIRROR_STATE_DIR=state))

    def frames(self) -> int:
        return whole_blocks(self.path.read_bytes()) if self.path.exists() else 0

    def wait_frames(self, expected) -> None:
        def check():
            assert self.proc.poll() is None, self.stop()
            return self.frames() >= expected(), (self.frames(), expected())
        wait_until(check, "the recording to hold every mirrored frame")

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        if self.out:
            self.out.close()
        return err.decode(errors="replace")


def error_traffic(host) -> tuple[list[FlowKey], list[FlowKey]]:
    """Error connections (one a keep-alive one with a 200 after its 500) and good ones,
    over IPv4 and IPv6."""
    errors, good = [], []
    for server, source in ((host.ns_v4, host.host_v4), (host.ns_v6, host.host_v6)):
        for paths, bucket in ((["/error"], errors), (["/ok", "/missing"], good),
                              (["/ok", "/error", "/ok"], errors)):
            t5, _ = send(server, source, paths)
            bucket.append(FlowKey.from_endpoints(*t5))
    return errors, good


@pytest.mark.kernel
@pytest.mark.parametrize("pipe", [False, True], ids=["file", "pipe"])
def test_recording_pairs_every_error_with_its_request(host, nginx, tmp_path, pipe):
    debug = unique_name("d")
    state = tmp_path / "state"
    mirror = MirrorProcess("--iface", host.host_if, "--debug-iface", debug,
                           env=env_with(MIRROR_STATE_DIR=state))
    mirror.start()
    rec = None
    try:
        mirrored = counted_from_now(lambda: mirrored_packets(state))
        rec = Recording(debug, tmp_path / "rec.pcapng", state, pipe)
        wait_until(lambda: (rec.frames() == 0 and rec.path.exists()
                            and rec.path.stat().st_size > 0, rec.path.exists()),
                   "the recording to start")
        errors, good = error_traffic(host)
        wait_closed(host.ns_v4, host.ns_v6)
        rec.wait_frames(mirrored)
        err = rec.stop()
        assert rec.proc.returncode == 0, err
    finally:
        if rec:
            rec.stop()
        assert mirror.stop() == 0, mirror.output
    path = tmp_path / "rec.pcapng"
    assert len(pcapng_packets(path.read_bytes())) == rec.frames() > 0
    # tshark pairs every response with its request: the 500s with GET /error.
    rows = tshark(path, "-Y", "http.response", "-T", "fields", "-e", "http.response.code",
                  "-e", "http.response_for.uri", "-e", "frame.interface_name")
    codes = sorted(int(code) for code, _, _ in rows)
    assert codes == [200] * 2 + [500] * len(errors), rows
    assert all(uri.endswith("/error" if code == "500" else "/ok") for code, uri, _ in rows)
    assert {iface for code, _, iface in rows if code == "500"} == {host.host_if}
    # The comments: each connection's Community ID (as tshark computes it), its event.
    comments = "\n".join(c for (c,) in tshark(path, "-T", "fields", "-e", "frame.comment"))
    ids = {c for (c,) in tshark(path, "--enable-protocol", "communityid", "-T", "fields",
                                "-e", "communityid")}
    assert ids == {of_flow(k) for k in errors}
    for key in errors:
        assert f"community_id {of_flow(key)}" in comments
    assert comments.count("mirror: error 500 for GET /error") == len(errors)
    assert comments.count("mirror: request moved before the response") == len(errors)
    assert not any(of_flow(k) in comments for k in good)


@pytest.mark.kernel
def test_recording_h2c(host, tmp_path):
    """h2c on 8080, read with the decode-as `-d tcp.port==8080,http2`: the error
    responses are there, decoded, with their event comments. (The kernel keeps no h2
    request, so there is no request frame to pair them with.)"""
    srv = Nginx(host, h2_port=8080).start()
    debug = unique_name("d")
    state = tmp_path / "state"
    mirror = MirrorProcess("--iface", host.host_if, "--debug-iface", debug,
                           env=env_with(MIRROR_STATE_DIR=state))
    rec = None
    try:
        mirror.start()
        mirrored = counted_from_now(lambda: mirrored_packets(state))
        rec = Recording(debug, tmp_path / "h2.pcapng", state, pipe=False)
        wait_until(lambda: (rec.path.exists() and rec.path.stat().st_size > 0, None),
                   "the recording to start")
        assert send_h2(host.ns_v4, 8080, ["/error"]) == [500]
        assert send_h2(host.ns_v6, 8080, ["/ok"]) == [200]
        wait_closed(host.ns_v4, host.ns_v6, port=8080)
        rec.wait_frames(mirrored)
        err = rec.stop()
        assert rec.proc.returncode == 0, err
    finally:
        if rec:
            rec.stop()
        mirror.stop()
        srv.stop()
    rows = tshark(tmp_path / "h2.pcapng", "-d", "tcp.port==8080,http2", "-Y",
                  "http2.headers.status", "-T", "fields", "-e", "http2.headers.status",
                  "-e", "frame.comment")
    assert [r[0] for r in rows] == ["500"], rows
    assert "mirror: error 500" in rows[0][1] and "community_id 1:" in rows[0][1]


@pytest.mark.kernel
def test_extract_by_community_id_status_and_time(host, nginx, tmp_path, capture_proc):
    debug = unique_name("d")
    state, cap_dir = tmp_path / "state", tmp_path / "cap"
    cap = capture_proc(debug, cap_dir)
    assert cap.wait_state("waiting"), cap.stop_output()
    mirror = MirrorProcess("--iface", host.host_if, "--debug-iface", debug,
                           env=env_with(MIRROR_STATE_DIR=state))
    mirror.start()
    try:
        assert cap.wait_state("capturing"), cap.stop_output()
        errors, _ = error_traffic(host)
        wait_closed(host.ns_v4, host.ns_v6)
        cap.wait_indexed(lambda: mirrored_packets(state), "every clone")
        wait_until(lambda: (cap.status().get("flows_indexed", 0) == len(errors), cap.status()),
                   "the error flows in the index (its rows name the requests)")
        # Extracted while the sidecar records: the file tcpdump writes is not reordered
        # yet, the extract puts the requests first itself.
        chosen = errors[-1]
        one = tmp_path / "one.pcapng"
        r = run_cli("capture", "--extract", "--dir", str(cap_dir), "--community-id",
                    of_flow(chosen), "-w", str(one))
        assert r.returncode == 0, (r.stderr, sorted(p.name for p in cap_dir.iterdir()))
        assert cap.stop() == 0, cap.output
    finally:
        assert mirror.stop() == 0, mirror.output
    ring = [p for p in cap_dir.iterdir() if ".pcap" in p.name]
    in_ring = [buf for p in ring for _, buf in dpkt.pcap.Reader(open(p, "rb"))
               if _key(buf) == chosen]
    got = [buf for _, buf in pcapng_packets(one.read_bytes())]
    assert sorted(got) == sorted(in_ring) and len(got) > 3
    assert {_key(buf) for buf in got} == {chosen}
    rows = tshark(one, "-Y", "http.response", "-T", "fields", "-e", "http.response.code",
                  "-e", "http.response_for.uri", "-e", "frame.comment")
    assert [(c, u) for c, u, _ in rows] == [("500", f"http://[{host.ns_v6}]/error"),
                                            ("200", f"http://[{host.ns_v6}]/ok")]
    assert "mirror: error 500 for GET /error" in rows[0][2]
    # By status: every error connection; by a time window after it all: nothing, and no
    # file.
    every = tmp_path / "all.pcapng"
    r = run_cli("capture", "--extract", "--dir", str(cap_dir), "--status", "5xx", "-w",
                str(every))
    assert r.returncode == 0, r.stderr
    keys = {_key(buf) for _, buf in pcapng_packets(every.read_bytes())}
    assert keys == set(errors)
    none = tmp_path / "none.pcapng"
    r = run_cli("capture", "--extract", "--dir", str(cap_dir), "--since", "2999-01-01T00:00:00Z",
                "-w", str(none))
    assert r.returncode == 1 and not none.exists() and len(r.stderr.splitlines()) == 1


def _key(frame: bytes) -> FlowKey | None:
    from mirror.capture.flow import Packet
    p = Packet.decode(1, 0.0, frame)
    return p.key if p else None

