"""The bench never rots: its quick mode runs end to end here and must produce well-formed
results, with every mirroring configuration's completeness verified. No performance
number is checked: benchmarks are not timed tests.

The parsers get fast tests of their own on recorded tool output."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import frames, report, workloads  # noqa: E402

H2LOAD_OUTPUT = """\
starting benchmark...
spawning thread #0: 4 total client(s). Timing-based test with 0s of warm-up time and 1s of main duration for measurements.
Application protocol: http/1.1
Main benchmark duration is over for thread #0. Stopping all clients.
Stopped all clients for thread #0

finished in 1.00s, 21882.33 req/s, 3.57MB/s
requests: 21882 total, 21882 started, 21882 done, 0 succeeded, 21882 failed, 0 errored, 0 timeout
status codes: 0 2xx, 0 3xx, 0 4xx, 21882 5xx
traffic: 3.57MB (3741822) total, 3.03MB (3181680) headers (space savings 0.00%), 106.85KB (109410) data
                     min         max         mean         sd        +/- sd
time for request:       23us     20.10ms       181us      1.24ms    98.58%
"""


def test_parse_h2load_summary():
    out = workloads.parse_h2load(H2LOAD_OUTPUT)
    assert out["req_per_s"] == pytest.approx(21882.33)
    assert out["requests"] == 21882
    assert out["status"] == {"2xx": 0, "3xx": 0, "4xx": 0, "5xx": 21882}


def test_parse_h2load_duration_in_milliseconds():
    text = H2LOAD_OUTPUT.replace("finished in 1.00s, 21882.33", "finished in 998.60ms, 21882.33")
    assert workloads.parse_h2load(text)["req_per_s"] == pytest.approx(21882.33)


def test_parse_h2load_rejects_garbage():
    with pytest.raises(RuntimeError):
        workloads.parse_h2load("connect: Connection refused\n")


def test_latency_summary_percentiles_and_log2_histogram(tmp_path):
    log = tmp_path / "requests.log"
    log.write_text("".join(f"1700000000{i:06d}\t500\t{us}\n"
                           for i, us in enumerate([100] * 90 + [1000] * 9 + [5000])))
    lat = workloads.Latencies()
    lat.add_log(log)
    s = lat.summary()
    assert (s["count"], s["p50_us"], s["p90_us"], s["p99_us"], s["max_us"]) == \
        (100, 100, 100, 1000, 5000)
    assert sum(s["log2_hist"]) == 100
    assert s["log2_hist"][6] == 90      # 100 us is in [64, 128)
    assert s["log2_hist"][9] == 9       # 1000 us is in [512, 1024)


def test_frames_have_the_lengths_their_headers_claim():
    for fc in frames.frame_classes():
        f = fc.frame
        if fc.family == 4:
            assert int.from_bytes(f[16:18], "big") == len(f) - 14
        else:
            assert int.from_bytes(f[18:20], "big") == len(f) - 14 - 40


@pytest.mark.unit
def test_large_map_filler_keys_are_the_programs_key_layouts():
    import ipaddress
    import socket
    import struct

    from bench import bigmaps
    from mirror.flowkey import FlowKey
    ends = bigmaps.filler_endpoints(70000)
    assert len(set(ends)) == 70000
    assert all(ipaddress.ip_address(a) in ipaddress.ip_network("198.19.0.0/16")
               for a, _ in ends)
    mine = bigmaps.mirror_keys(3)
    for i, (addr, port) in enumerate(ends[:3]):
        key = FlowKey.from_endpoints(bigmaps.filler_address(addr), port, bigmaps.SERVER, 80)
        assert mine[i * 40:(i + 1) * 40] == key.to_bytes()
    addr, port = ends[1]
    assert bigmaps.thesis_keys(2)[12:] == struct.pack(
        "=4s4sHH", ipaddress.ip_address(bigmaps.SERVER).packed,
        ipaddress.ip_address(addr).packed, socket.htons(80), socket.htons(port))


@pytest.mark.integration
def test_large_map_rows_fill_the_maps_the_programs_read_and_empty_them(clf, debug_iface):
    """The large-map rows time what they claim: both programs find the filler flows
    (the mirror counts a filler flow's packet as marked, the thesis mirrors it), the maps
    are 90 % full during those rows, and the run leaves the maps as it found them."""
    from bench import bigmaps, microbench
    from bench.progs import EmptyProgram, ThesisProgram
    from mirror.bpfsys import test_run
    from mirror.flowkey import FlowKey
    thesis = ThesisProgram(max_connections=4096)
    mirror_maps, thesis_maps = bigmaps.mirror_maps(clf), bigmaps.thesis_maps(thesis)
    held = mirror_maps.set(True)
    assert thesis_maps.set(True) == {"connections": int(4096 * bigmaps.FILL_SHARE)}
    assert held["flows"] == int(clf.max_flows * bigmaps.FILL_SHARE)
    try:
        addr, port = bigmaps.filler_endpoints(1)[0]
        client = bigmaps.filler_address(addr)
        # the classifier skips lookups until it has marked a flow itself
        test_run(clf.fd("ingress"), frames.other_marking_frame(4), 1)
        test_run(clf.fd("egress"), frames.ip_packet(
            4, client, bigmaps.SERVER, frames.IPPROTO_TCP,
            frames.tcp_segment(port, 80, frames.REQUEST)), 1)
        key = FlowKey.from_endpoints(client, port, bigmaps.SERVER, 80)
        assert clf.flows()[key]["packets"] == 2       # the filler's 1, and this one
        response = frames.ip_packet(4, bigmaps.SERVER, client, frames.IPPROTO_TCP,
                                    frames.tcp_segment(80, port, frames.RESPONSE_200))
        assert test_run(thesis.fd, response, 1).retval == 2    # a match: mirrored
    finally:
        mirror_maps.set(False)
        thesis_maps.set(False)
    assert clf.flow_count() == 1 and thesis.connection_count() == 0

    clf.clear()
    subjects = microbench.subjects(clf, thesis, EmptyProgram(), debug_iface.ifindex)
    results = microbench.run(subjects, rounds=1, repeat=10, singles=3, cpu=0)
    rows = microbench.summarize(results)
    assert [r["frame"] for r in rows] == [fc.key for fc in frames.frame_classes()]
    large = [r for r in rows if "large_map" in r]
    assert [r["frame"] for r in large] == [fc.key for fc in frames.large_map_classes()]
    for r in large:
        assert r["large_map"]["one_flow"] in {fc.key for fc in frames.frame_classes()}
        entries = r["large_map"]["entries"]
        assert set(entries) == {"thesis", "mirror", "mirror+clone"}
        assert entries["thesis"]["connections"] > 0.8 * 4096
        assert entries["mirror"]["flows"] > 0.8 * clf.max_flows
        # An LRU map this small (1,024) evicts some while it is filled: the nodes the
        # kernel keeps on other CPUs' free lists are not there for the filling CPU.
        assert entries["mirror"]["requests"] > 0.5 * clf.max_requests
    assert clf.flow_count() == 0 and thesis.connection_count() == 0


def test_paired_ratio_is_the_median_of_per_round_ratios():
    s = report._stat({1: 90.0, 2: 50.0, 3: 99.0}, {1: 100.0, 2: 100.0, 3: 100.0})
    assert s["median"] == 90.0
    assert s["ratio"] == pytest.approx(0.9)


@pytest.mark.integration
@pytest.mark.slow
def test_quick_bench_end_to_end(tmp_path):
    stats_before = Path("/proc/sys/kernel/bpf_stats_enabled").read_text()
    proc = subprocess.Popen([sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.terminate()        # the bench cleans up on SIGTERM
            proc.communicate()
    assert proc.returncode == 0, stderr[-4000:]
    assert "Targets:" in stdout

    data = json.loads((tmp_path / "latest.json").read_text())
    configs = [c["key"] for c in data["configs"]]
    assert configs == ["untraced", "qdiscs", "mirror-htb", "mirror-clsact", "thesis"]
    levels = data["settings"]["error_levels"]
    assert levels == [0, 25, 50, 75, 100]

    runs = [r for r in data["runs"] if not r.get("discarded")]
    failed = [r for r in runs if "error" in r]
    assert not failed, failed
    for cfg in configs:
        iperf = [r for r in runs if r["config"] == cfg and r["workload"] == "iperf3"]
        assert sorted(r["offloads"] for r in iperf) == ["off", "on"]
        assert all(r["bits_per_second"] > 0 for r in iperf)
        for pct in levels:
            [h2] = [r for r in runs if r["config"] == cfg and r["workload"] == "h2load"
                    and r["error_pct"] == pct]
            assert h2["requests"] > 0 and h2["req_per_s"] > 0
            assert h2["latency"]["count"] > 0
            assert 0 <= h2["foreign_cpu"] <= 1
            assert {"p50_us", "p90_us", "p99_us", "mean_us"} <= set(h2["latency"])
            n5xx = h2["status"]["5xx"]
            assert (n5xx > 0) == (pct > 0)
            assert (h2["status"]["2xx"] > 0) == (pct < 100)
            comp = h2.get("completeness")
            if cfg in ("mirror-htb", "mirror-clsact", "thesis"):
                # the baseline and the mirror both did their job, verified in the run
                assert comp["complete"], (cfg, pct, comp["problems"])
                assert comp["error_flows_mirrored"] == comp["error_connections"]
                assert comp["ok_flows_mirrored"] == 0
                assert comp["mirrored_packets"] >= n5xx
            else:
                assert comp is None

    summary = data["summary"]
    assert all(summary["completeness"].values())
    assert {t["id"] for t in summary["targets"]} == \
        {"completeness", "http-0", "http-100", "iperf-off", "per-packet"}
    assert all(isinstance(t["met"], bool) for t in summary["targets"])

    micro = data["microbench"]
    assert len(micro) == len(frames.frame_classes())
    for row in micro:
        assert set(row["ns"]) == {"empty", "thesis", "mirror", "mirror+clone"}
        assert all(v > 0 for v in row["ns"].values())
        assert ("thesis" in row["handled_by"]) == row["frame"].startswith("ipv4")

    in_traffic = [r for r in data["in_traffic"] if "error" not in r]
    assert {r["config"] for r in in_traffic} == {"mirror-htb", "mirror-clsact", "thesis"}
    assert all(r["runs"] > 0 and r["ns_per_run"] > 0 for r in in_traffic)

    md = (tmp_path / "latest.md").read_text()
    assert "## Targets" in md and "## Per-packet cost" in md
    for png in tmp_path.glob("*.png"):
        assert png.stat().st_size > 1000
    try:
        import matplotlib  # noqa: F401
        assert len(list(tmp_path.glob("*.png"))) == 4
    except ImportError:
        pass

    # the kernel is left as found
    assert Path("/proc/sys/kernel/bpf_stats_enabled").read_text() == stats_before
    pid = proc.pid
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"mlab-{pid}-" not in netns
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    assert f"m{pid:06x}" not in links
