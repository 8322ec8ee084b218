"""The bench never rots: its quick mode runs end to end here and must produce well-formed
results, with every mirroring configuration's completeness verified. No performance
number is checked: benchmarks are not timed tests.

The parsers get fast tests of their own on recorded tool output."""
from __future__ import annotations

import json
import subprocess
import sys
import time
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


def test_bootstrap_interval_contains_the_mean_and_narrows_with_rounds():
    from bench import stats
    few = stats.bootstrap_mean([0.9, 1.1, 1.0, 0.95, 1.05])
    many = stats.bootstrap_mean([0.9, 1.1, 1.0, 0.95, 1.05] * 8)
    assert few["mean"] == pytest.approx(1.0)
    assert few["lo"] < few["mean"] < few["hi"]
    assert many["hi"] - many["lo"] < few["hi"] - few["lo"]
    assert stats.bootstrap_mean([]) is None


def test_verdicts():
    from bench import stats
    assert stats.verdict_at_most({"mean": 1.0, "lo": 0.99, "hi": 1.01, "n": 20}, 1.02) == "met"
    assert stats.verdict_at_most({"mean": 1.1, "lo": 1.05, "hi": 1.2, "n": 20}, 1.02) == \
        "not met"
    assert stats.verdict_at_most({"mean": 1.0, "lo": 0.9, "hi": 1.1, "n": 20}, 1.02) == \
        "inconclusive"
    # one round says nothing about the spread
    assert stats.verdict_at_most({"mean": 1.0, "lo": 1.0, "hi": 1.0, "n": 1}, 1.02) == \
        "inconclusive"


def test_paired_ratios_pair_rounds():
    from bench import stats
    assert stats.paired({1: 90.0, 2: 50.0, 3: 99.0}, {1: 100.0, 3: 100.0}) == [0.9, 0.99]


def test_cpu_meter_counts_a_busy_loop():
    from bench.noise import CpuMeter
    m = CpuMeter()
    x, t = 0, time.monotonic()
    while time.monotonic() - t < 0.3:
        x += 1
    got = m.stop()
    # at least most of the busy loop's 0.3 s (the meter's unit is 10 ms per CPU)
    assert got["cpu_s"] >= 0.2 and got["wall_s"] >= 0.3


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
    from bench.configs import KEYS
    assert [c["key"] for c in data["configs"]] == list(KEYS)
    runs = [r for r in data["runs"] if not r.get("discarded")]
    failed = [r for r in runs if "error" in r]
    assert not failed, failed
    for pass_, plan in data["plans"].items():
        for wl, cfgs in plan:
            for cfg in cfgs:
                [rec] = [r for r in runs if r["pass"] == pass_ and r["workload"] == wl
                         and r["config"] == cfg]
                assert rec["cpu_s"] > 0 and 0 <= rec["foreign_cpu"] <= 1
                if wl.startswith("iperf3"):
                    assert rec["bits_per_second"] > 0
                    if pass_ == "cost":
                        assert rec["cpu_s_per_gb"] > 0
                    continue
                assert rec["requests"] > 0 and rec["latency"]["count"] > 0
                assert (rec["offered_req_per_s"] is not None) == (pass_ != "saturation")
                assert rec["cpu_us_per_request"] > 0
                n5xx = rec["status"]["5xx"]
                assert (n5xx > 0) == wl.endswith("-100")
                comp = rec.get("completeness")
                if comp:        # the baseline and the mirror both did their job
                    assert comp["complete"], (pass_, wl, cfg, comp["problems"])
                    assert comp["ok_flows_mirrored"] == 0
                if pass_ == "in_traffic":
                    assert rec["runs"] > 0 and rec["ns_per_run"] > 0
    judged = {r["config"] for r in runs if r.get("completeness")}
    assert judged >= {"mirror-clsact", "mirror-tcx", "mirror-htb", "mirror-nosnap",
                      "mirror-noh2", "mirror-nobudget", "thesis"}

    summary = data["summary"]
    assert {t["id"] for t in summary["targets"]} >= \
        {"completeness", "cpu-0", "cpu-100", "cpu-100-nobudget", "ns-0", "h2-parser",
         "attach-p99"}
    assert all(t["verdict"] in ("met", "not met", "inconclusive", "no data")
               for t in summary["targets"])
    assert summary["cost"]["http1-0"]["mirror-clsact"]["vs_untraced"]["n"] == 1
    for hook in ("clsact", "tcx"):
        att = data["attach"][hook]
        assert "error" not in att, att
        assert att["interfaces"] == data["settings"]["attach_count"]

    micro = data["microbench"]
    assert len(micro) == len(frames.frame_classes())
    for row in micro:
        assert set(row["ns"]) == {"empty", "thesis", "mirror", "mirror+clone"}
        assert all(v > 0 for v in row["ns"].values())
        assert ("thesis" in row["handled_by"]) == row["frame"].startswith("ipv4")

    md = (tmp_path / "latest.md").read_text()
    for section in ("## Targets", "## Cost at a fixed offered load", "## Saturation",
                    "## In-traffic cost", "## Per-packet cost", "## New interfaces"):
        assert section in md
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
