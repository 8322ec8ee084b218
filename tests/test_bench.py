"""The bench never rots: its quick mode runs end to end here and must produce well-formed
results, with every mirroring configuration's completeness verified. No performance
number is checked: benchmarks are not timed tests.

The parsers get fast tests of their own on recorded tool output."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import frames, workloads  # noqa: E402

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


@pytest.mark.unit
def test_parse_h2load_summary():
    out = workloads.parse_h2load(H2LOAD_OUTPUT)
    assert out["req_per_s"] == pytest.approx(21882.33)
    assert out["requests"] == 21882
    assert out["status"] == {"2xx": 0, "3xx": 0, "4xx": 0, "5xx": 21882}


@pytest.mark.unit
def test_parse_h2load_duration_in_milliseconds():
    text = H2LOAD_OUTPUT.replace("finished in 1.00s, 21882.33", "finished in 998.60ms, 21882.33")
    assert workloads.parse_h2load(text)["req_per_s"] == pytest.approx(21882.33)


@pytest.mark.unit
def test_parse_h2load_rejects_garbage():
    with pytest.raises(RuntimeError):
        workloads.parse_h2load("connect: Connection refused\n")


@pytest.mark.unit
def test_h2load_runner_parses_every_process_and_reports_a_failed_one():
    """The one h2load runner of both modes, on recorded output (sh prints it)."""
    ok = ["sh", "-c", 'printf "%s" "$0"', H2LOAD_OUTPUT]
    outs, wall = workloads.run_h2load([ok, ok], 1)
    assert [o["requests"] for o in outs] == [21882, 21882] and wall >= 0
    assert outs[0]["request_time"]["mean_us"] == 181
    with pytest.raises(RuntimeError, match="h2load exited 3"):
        workloads.run_h2load([ok, ["sh", "-c", "echo refused; exit 3"]], 1)


@pytest.mark.unit
def test_h2load_commands_of_both_modes():
    main = workloads.h2load_command("http://198.18.0.2/ok", 0, 4, 2.5, proto="h1", rps=625,
                                    log=Path("/dev/shm/x.log"))
    assert main == ["taskset", "-c", "0", "h2load", "--h1", "--rps=625", "-c", "4", "-m", "1",
                    "-t", "1", "-D", "2500ms", "--log-file=/dev/shm/x.log",
                    "http://198.18.0.2/ok"]
    scale = workloads.h2load_command("http://198.18.0.3/error", "0,1", 16, 1.0, threads=2)
    assert scale == ["taskset", "-c", "0,1", "h2load", "--h1", "-c", "16", "-m", "1", "-t", "2",
                     "-D", "1000ms", "http://198.18.0.3/error"]
    h2c = workloads.h2load_command("http://198.18.0.2:8080/ok", 0, 4, 1, proto="h2c")
    assert "--h1" not in h2c


@pytest.mark.unit
def test_one_writer_for_result_files(tmp_path):
    """Both modes' files come from report.write: the JSON reads back as written, one line
    per run, the Markdown beside it, latest.* only when asked."""
    from bench import report
    result = {"started": 1.5, "machine": {"cpus": 2}, "runs": [{"k": 1, "req_per_s": 2.0},
                                                              {"k": 2, "req_per_s": 3.0}]}
    path = report.write(result, tmp_path / "scale.json", "# scale\n")
    text = path.read_text()
    assert json.loads(text) == result
    assert '  {"k": 1, "req_per_s": 2.0},' in text.splitlines()
    assert (tmp_path / "scale.md").read_text() == "# scale\n"
    assert not (tmp_path / "latest.json").exists()
    report.write(result, tmp_path / "run" / "20261130T000000Z.json", "# run\n", latest=True)
    assert (tmp_path / "run" / "latest.json").read_text() == \
        (tmp_path / "run" / "20261130T000000Z.json").read_text()
    assert (tmp_path / "run" / "latest.md").read_text() == "# run\n"


def _containers_summary(**kw) -> dict:
    """The shape of one python -m bench.containers --json summary, per_container left out."""
    figures = {"containers": 2, "attached": 2, "attach_ms_p50": 100.0, "attach_ms_p99": 120.0,
               "event_to_attached_ms_p50": 5.0, "event_to_attached_ms_p99": 9.0,
               "first_packet_ms_p50": 300.0, "first_packet_ms_p99": 400.0,
               "margin_ms_p50": 200.0, "margin_ms_p99": 250.0, "margin_ms_min": 150.0,
               "first_packet_before_attach": 0, "packets_sent": 200, "packets_arrived": 200,
               "packets_seen": 200, "packets_missed": 0, "containers_with_misses": 0,
               "attached_by": {"cni": 0, "link-event": 2}, "cni_unanswered": 0}
    return {"attach_by": "link-event", "sender": "static", "hook": "clsact",
            "rate_pps": 1000.0, **figures, **kw}


@pytest.mark.unit
def test_a_run_of_some_passes_is_titled_partial_with_what_it_ran():
    """A run of a subset names its passes and configurations; a whole run, and a result
    written before runs recorded their subset, keep their plain title."""
    from bench import report
    whole = {"settings": {"mode": "full"}}
    assert report.run_title(whole) == "full run"
    subset = dict(whole, subset={"passes": ["in_traffic"],
                                 "configs": ["mirror-decide", "thesis", "untraced"]})
    assert report.run_title(subset) == ("partial run (full settings; passes: in_traffic; "
                                        "configurations: mirror-decide, thesis, untraced)")


@pytest.mark.unit
def test_the_report_shows_both_attach_modes_and_the_plugins_cost():
    """A row per attach mode, what the plugin adds (from the cni run's own arms), a mode
    that could not run said so; and a result from before the modes (one summary, the
    python3 sender) still renders."""
    from bench import report
    without = _containers_summary(first_packet_ms_p50=280.0, first_packet_ms_p99=390.0)
    cni = _containers_summary(attach_by="cni", without_plugin=without,
                              attached_by={"cni": 1, "link-event": 1},
                              plugin_adds_ms_p50=20.0, plugin_adds_ms_p99=10.0)
    text = "\n".join(report._containers_section(
        {"link-event": _containers_summary(), "cni": cni}))
    assert "| link-event watcher | 100.0 / 120.0 |" in text
    assert "| chained CNI plugin (1 by the plugin, 1 by the link event first;" in text
    assert "p50 300.0 / p99 400.0 ms with it, 280.0 / 390.0 ms without it" in text
    assert "+20.0 ms at p50, +10.0 ms at p99" in text
    assert "2 containers per attach mode" in text and "(a static binary)" in text
    skipped = "\n".join(report._containers_section(
        {"link-event": _containers_summary(), "cni": {"skipped": "go is not installed"}}))
    assert "chained CNI plugin: not measured (go is not installed)" in skipped
    assert "plugin adds" not in skipped
    old = _containers_summary()
    del old["sender"], old["attach_by"]
    old_text = "\n".join(report._containers_section(old))
    assert "| link-event watcher |" in old_text and "(python3)" in old_text
    assert "per attach mode" not in old_text

@pytest.mark.unit
def test_both_modes_fail_preflight_alike():
    """One preflight: a machine the bench cannot use (here: none of its tools on PATH, or
    not root) ends either mode with one line and exit status 2, before anything is made."""
    lines = {}
    for module in ("bench", "bench.scale"):
        proc = subprocess.run([sys.executable, "-m", module, "--quick" if module == "bench"
                               else "--cpus=1"], cwd=ROOT, capture_output=True, text=True,
                              env={"PATH": "/nonexistent", "PYTHONPATH": str(ROOT)},
                              timeout=60)
        assert proc.returncode == 2, proc.stderr
        [line] = proc.stderr.splitlines()
        prefix, _, lines[module] = line.partition(": ")
        assert prefix == module
    if os.geteuid() == 0:
        assert lines["bench"].startswith("missing h2load, iperf3, nginx, taskset, ip, ss")
        assert lines["bench.scale"].startswith("missing h2load, iperf3, nginx, taskset, ip, ss")
        assert lines["bench"].endswith("; scripts/setup installs them")
        assert lines["bench.scale"].endswith("; scripts/setup installs them")
    else:
        assert lines["bench"] == lines["bench.scale"]


@pytest.mark.unit
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


@pytest.mark.unit
def test_frames_have_the_lengths_their_headers_claim():
    for fc in frames.frame_classes():
        f = fc.frame
        if fc.family == 4:
            assert int.from_bytes(f[16:18], "big") == len(f) - 14
        else:
            assert int.from_bytes(f[18:20], "big") == len(f) - 14 - 40


@pytest.mark.unit
def test_bootstrap_interval_contains_the_mean_and_narrows_with_rounds():
    from bench import stats
    few = stats.bootstrap_mean([0.9, 1.1, 1.0, 0.95, 1.05])
    many = stats.bootstrap_mean([0.9, 1.1, 1.0, 0.95, 1.05] * 8)
    assert few["mean"] == pytest.approx(1.0)
    assert few["lo"] < few["mean"] < few["hi"]
    assert many["hi"] - many["lo"] < few["hi"] - few["lo"]
    assert stats.bootstrap_mean([]) is None


@pytest.mark.unit
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


@pytest.mark.unit
def test_paired_ratios_pair_rounds():
    from bench import stats
    assert stats.paired({1: 90.0, 2: 50.0, 3: 99.0}, {1: 100.0, 3: 100.0}) == [0.9, 0.99]


@pytest.mark.unit
def test_cpu_meter_counts_a_busy_loop():
    from bench.noise import CpuMeter
    m = CpuMeter()
    x, t = 0, time.monotonic()
    while time.monotonic() - t < 0.3:
        x += 1
    got = m.stop()
    # at least most of the busy loop's 0.3 s (the meter's unit is 10 ms per CPU)
    assert got["cpu_s"] >= 0.2 and got["wall_s"] >= 0.3


@pytest.mark.unit
def test_foreign_work_is_other_processes_not_the_bench_tree():
    """bench/noise.py charges the bench's descendants to the bench and an orphaned
    process (outside its tree, as another tenant's) to foreign work."""
    import subprocess

    from bench.noise import _process_ticks
    child = subprocess.Popen(["sleep", "30"])
    # `sh` starts sleep in the background and exits: the sleep is re-parented away
    # from this process's tree, as another tenant's process would be.
    orphan = int(subprocess.run(["sh", "-c", "sleep 30 >/dev/null 2>&1 & echo $!"],
                                capture_output=True, text=True).stdout)
    try:
        own, _kernel, others = _process_ticks(os.getpid())
        assert orphan in others and child.pid not in others
        assert 2 not in others      # kthreadd and its kernel threads are told apart
    finally:
        child.kill()
        child.wait()
        os.kill(orphan, 9)


@pytest.mark.unit
def test_a_reaped_child_counts_from_the_first_sample_only():
    """A parent (pid 10) reaps a child (11) that had used 500 ticks before the first
    sample and 5 after: its children's time jumps by 505, 5 of which are the window's.
    A child born and reaped within the window (20's 7 ticks) counts whole; so does a
    process started in the window (30); one that started before it and was not among the
    others then (40: the bench's own child, re-parented) counts nothing."""
    from bench.noise import _foreign_growth
    before = {10: (1, 100, 0, 50), 11: (10, 400, 100, 60), 20: (1, 0, 0, 70)}
    after = {10: (1, 103, 505, 50), 20: (1, 0, 7, 70),
             30: (1, 4, 0, 1001),        # started in the window: all of it
             40: (1, 900, 0, 80)}        # started before, not here then: none of it
    assert _foreign_growth(before, after, since=1000) == 3 + 5 + 7 + 4


@pytest.mark.unit
def test_large_map_filler_keys_are_the_programs_key_layouts():
    import ipaddress
    import socket
    import struct

    from bench import bigmaps
    ends = bigmaps.filler_endpoints(70000)
    assert len(set(ends)) == 70000
    assert all(ipaddress.ip_address(a) in ipaddress.ip_network("198.19.0.0/16")
               for a, _ in ends)
    addr, port = ends[1]
    assert bigmaps.thesis_keys(2)[12:] == struct.pack(
        "=4s4sHH", ipaddress.ip_address(bigmaps.SERVER).packed,
        ipaddress.ip_address(addr).packed, socket.htons(80), socket.htons(port))


@pytest.mark.testrun
def test_large_map_rows_fill_the_maps_the_programs_read_and_empty_them(clf, debug_iface):
    """The large-map rows time what they claim: both programs find the filler connections
    (the mirror holds each one's state and its request, the thesis mirrors it), the maps
    are about 90 % full during those rows, and the run leaves them as it found them."""
    from bench import bigmaps, microbench, report
    from bench.progs import EmptyProgram, ThesisProgram
    from mirror.bpfsys import test_run
    from mirror.flowkey import FlowKey
    thesis = ThesisProgram(max_connections=4096)
    clf.set_request_bytes(512)          # the bench's mirror keeps requests
    mirror_maps, thesis_maps = bigmaps.mirror_maps(clf), bigmaps.thesis_maps(thesis)
    held = mirror_maps.set(True)
    assert thesis_maps.set(True) == {"connections": int(4096 * bigmaps.FILL_SHARE)}
    filled = int(clf.conn_slots * bigmaps.FILL_SHARE)
    # Each filler connection has a state, unless a fuller bucket made it take another
    # filler's slot (counted), and the request array holds one request per bucket at most.
    assert held["conns"] == filled - clf.counters()["conns_replaced"] > 0.7 * clf.conn_slots
    assert 0.5 * clf.max_requests < held["requests"] <= clf.max_requests
    try:
        addr, port = bigmaps.filler_endpoints(1)[0]
        client = bigmaps.filler_address(addr)
        key = FlowKey.from_endpoints(client, port, bigmaps.SERVER, 80)
        states = [c for _, c in clf.conns() if c["flow"] == key]
        assert len(states) <= 1
        response = frames.ip_packet(4, bigmaps.SERVER, client, frames.IPPROTO_TCP,
                                    frames.tcp_segment(80, port, frames.RESPONSE_200))
        assert test_run(thesis.fd, response, 1).retval == 2    # a match: mirrored
    finally:
        mirror_maps.set(False)
        thesis_maps.set(False)
    assert clf.conn_count() == 0 and thesis.connection_count() == 0

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
        assert entries["mirror"]["conns"] > 0.7 * clf.conn_slots
        assert entries["mirror"]["requests"] > 0.5 * clf.max_requests
    assert clf.flow_count() == 0 and thesis.connection_count() == 0
    # The report names what the maps held (it once printed "-" for a renamed key).
    held = large[0]["large_map"]["entries"]
    text = "\n".join(report.per_packet_section(rows, 1))
    assert (f"connection states holding {held['mirror']['conns']:,} other connections"
            in text)
    assert f"request slots {held['mirror']['requests']:,} kept requests" in text




@pytest.mark.kernel
def test_empty_clsact_is_the_mirrors_layout_with_nothing_in_it(monkeypatch):
    """The floor configuration: clsact with the empty program where the mirror's filters
    go (both hooks, the mirror's handle and priority), and the interface as found after."""
    import itertools

    from mirror.lab import netns
    # A sequence of its own: the session's names stay those of a run without this test.
    monkeypatch.setattr(netns, "_seq", itertools.count(0xF0))
    host = netns.Host.create()
    try:
        _empty_clsact_on(host)
    finally:
        host.destroy()


def _empty_clsact_on(host) -> None:
    from types import SimpleNamespace

    from pyroute2 import IPRoute

    from bench.configs import EmptyClsact
    from bench.progs import EmptyProgram
    from conftest import tc_show
    from mirror.hooks import tc
    before = tc_show(host.host_if)
    empty = EmptyProgram()
    cfg = EmptyClsact(SimpleNamespace(empty=empty))
    try:
        cfg.setup(SimpleNamespace(host_if=host.host_if))
        assert "clsact" in tc_show(host.host_if)
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=host.host_if)[0]
            for parent in (tc.CLSACT_INGRESS, tc.CLSACT_EGRESS):
                [f] = tc.list_filters(ipr, idx, parent)
                assert f.ours and f.prio == tc.FILTER_PRIO, f
    finally:
        cfg.teardown()
    assert tc_show(host.host_if) == before


@pytest.mark.kernel
@pytest.mark.slow
def test_quick_bench_end_to_end(tmp_path):
    stats_before = Path("/proc/sys/kernel/bpf_stats_enabled").read_text()
    from helpers import run_module
    proc, stdout, stderr = run_module("bench", "--quick", "--out", str(tmp_path), timeout=900)
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
        {"completeness", "cpu-0", "cpu-0-floor", "cpu-100", "cpu-100-nobudget", "ns-0", "h2-parser",
         "attach-p99"}
    assert all(t["verdict"] in ("met", "not met", "inconclusive", "no data", "reported")
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
        # The thesis parses IPv4 HTTP/1.x: it sits out the h2c and gRPC rows.
        h2 = any(w in row["frame"] for w in ("h2c", "gRPC"))
        assert ("thesis" in row["handled_by"]) == (row["frame"].startswith("ipv4") and not h2)

    state = data["state"]
    assert "error" not in state["statecost"] and "error" not in state["eventcost"], state
    assert {"lru_hit", "way4_hit", "way4_new"} <= set(state["statecost"]["median_ns"])
    assert all(v > 0 for v in state["eventcost"]["us_per_event"].values())

    md = (tmp_path / "latest.md").read_text()
    for section in ("## Targets", "## Cost at a fixed offered load", "## Saturation",
                    "## In-traffic cost", "## Per-packet cost", "## One connection state",
                    "## User space per error event", "## New interfaces"):
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
    _kernel_clean(proc.pid)


@pytest.mark.kernel
def test_a_candidate_classifier_runs_beside_this_one_in_every_round(tmp_path):
    """--candidate DIR: each mirror configuration (but the one compiled without HTTP/2)
    also runs compiled from DIR's sources, for the same workloads in the same rounds, and
    the report gives their paired ratio; a candidate that does not compile ends the bench
    with one line and exit status 2, before the lab is made."""
    import shutil
    from helpers import run_module
    candidate, out = tmp_path / "bpf", tmp_path / "out"
    shutil.copytree(ROOT / "bpf", candidate)
    args = ("bench", "--quick", "--passes", "in_traffic", "--configs",
            "mirror-decide,mirror-noh2", "--candidate", str(candidate), "--out", str(out),
            "--no-plots")
    stats_before = Path("/proc/sys/kernel/bpf_stats_enabled").read_text()
    proc, stdout, stderr = run_module(*args, timeout=600)
    assert proc.returncode == 0, stderr[-4000:]
    _kernel_clean(proc.pid)
    assert Path("/proc/sys/kernel/bpf_stats_enabled").read_text() == stats_before
    data = json.loads((out / "latest.json").read_text())
    assert data["candidate"]["dir"] == str(candidate)
    assert sorted(c["key"] for c in data["configs"]) == \
        ["mirror-decide", "mirror-decide@candidate", "mirror-noh2", "untraced"]
    runs = [r for r in data["runs"] if r["pass"] == "in_traffic" and not r.get("discarded")]
    assert not [r for r in runs if "error" in r]
    planned = [(wl, cfgs) for wl, cfgs in data["plans"]["in_traffic"] if "mirror-decide" in cfgs]
    assert planned
    for wl, cfgs in planned:
        assert "mirror-decide@candidate" in cfgs and "mirror-noh2@candidate" not in cfgs
        [twin] = [r for r in runs if r["workload"] == wl
                  and r["config"] == "mirror-decide@candidate"]
        assert twin["ns_per_run"] > 0 and twin["round"] == 1
    md = (out / "latest.md").read_text()
    assert f"with a candidate classifier ({candidate})" in md.splitlines()[0]
    section = md.split("## The candidate classifier against this checkout's")[1]
    rows = [line for line in section.split("\n## ")[0].splitlines()
            if line.startswith("| in_traffic |")]
    assert [row.split(" | ")[1] for row in rows] == [wl for wl, _ in planned]
    assert all("| mirror, no budgets, clone off | ns_per_run |" in row for row in rows)

    (candidate / "mirror.c").write_text("this is not C\n")
    proc, stdout, stderr = run_module(*args, timeout=300)
    assert proc.returncode == 2, stderr[-4000:]
    assert stderr.splitlines()[-1].startswith(
        f"bench: the candidate classifier in {candidate} did not compile"), stderr[-2000:]
    assert "lab up" not in stderr
    _kernel_clean(proc.pid)


@pytest.mark.unit
def test_a_candidate_twin_runs_the_candidate_classifier_and_only_mirrors_have_twins():
    """What the end-to-end test cannot see (its candidate is a copy of bpf/): a twin runs
    the candidate's program, its configuration the checkout's; and --candidate with no
    configuration to compare is refused before anything is compiled."""
    from types import SimpleNamespace

    from bench import configs
    shared = SimpleNamespace(classifier="checkout", classifier_noh2="noh2",
                             classifier_candidate="candidate")
    base = {c.key: c for c in (configs.Untraced(shared), configs.Mirror(shared, "tcx"),
                               configs.Mirror(shared, variant="decide-bounded"),
                               configs.Mirror(shared, variant="noh2"), configs.Thesis(shared))}
    both = configs.with_candidates(shared, base)
    assert sorted(set(both) - set(base)) == ["mirror-decide-bounded@candidate",
                                             "mirror-tcx@candidate"]
    for key in ("mirror-tcx", "mirror-decide-bounded"):
        twin = both[key + configs.CANDIDATE]
        assert (twin.hook, twin.variant, twin.mirrors) == \
            (base[key].hook, base[key].variant, base[key].mirrors)
        assert (base[key].classifier(), twin.classifier()) == ("checkout", "candidate")
        assert twin.label.endswith(" [candidate]")
    shared.classifier_candidate = None
    assert configs.with_candidates(shared, base) == base
    for extra in (["--configs", "thesis,mirror-noh2"], ["--passes", "micro,attach"]):
        proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--candidate",
                               str(ROOT / "bpf"), *extra], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("bench: --candidate compares mirror configurations")


@pytest.mark.unit
def test_round_counts_set_their_pass_and_are_whole_numbers_of_at_least_one():
    from bench.__main__ import parse_args, settings_from
    st = settings_from(parse_args(["--in-traffic-rounds", "20", "--rounds", "3"]))
    assert (st.stats_rounds, st.rounds, st.saturation_rounds) == (20, 3, 5)
    for bad in ("0", "-2", "nan", "1.5"):
        for option in ("--rounds", "--in-traffic-rounds"):
            proc = subprocess.run([sys.executable, "-m", "bench", option, bad], cwd=ROOT,
                                  capture_output=True, text=True, timeout=60)
            assert proc.returncode == 2 and "error: argument" in proc.stderr, (option, bad)


@pytest.mark.unit
def test_a_setup_interrupted_halfway_is_torn_down():
    """SIGTERM arrives as KeyboardInterrupt, anywhere: in a configuration's setup too. A
    full run stopped that way once left the thesis's debug interface behind, made
    before the interrupt, because run_one() called setup outside its try."""
    from bench.runner import FULL, H1_0, run_one

    class HalfSetUp:
        key, debug_iface, budgeted, mirrors = "half", None, True, True
        torn_down = False

        def setup(self, lab):
            raise KeyboardInterrupt

        def teardown(self):
            self.torn_down = True

    cfg = HalfSetUp()
    with pytest.raises(KeyboardInterrupt):
        run_one(cfg, None, H1_0, FULL, "cost", None)
    assert cfg.torn_down


@pytest.mark.kernel
def test_eventcost_keep_up_reads_every_event_the_bound_lets_through():
    """bench.eventcost --keep-up end to end, short and slow: producers on every CPU above
    the per-CPU bound for a second, the real reader. Counts only: what the kernel made
    is what the reader handled, nothing lost, and the bound held some back."""
    proc = subprocess.run([sys.executable, "-m", "bench.eventcost", "--keep-up", "1",
                           "--offered", "2000", "--json"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["producers_failed"] == 0 and r["events_lost"] == 0
    assert r["handled"] == r["events"] > 0 and r["events_rate_limited"] > 0
    assert r["errors"] == r["events"] + r["events_rate_limited"]


@pytest.mark.unit
def test_keep_up_is_reported_from_the_state_pass():
    """The full bench runs --keep-up in its state pass: the report's table says what the
    child said, and a failed child is named, not dropped."""
    from bench import report
    ku = {"cpus": 2, "seconds": 10.01, "offered_per_cpu": 2000, "producers_failed": 0,
          "errors": 40000, "events": 20000, "events_rate_limited": 20000, "events_lost": 0,
          "handled": 20000, "events_per_second": 1998, "last_read_ms_after_the_end": 3.5,
          "reader_cpu_share": 0.14}
    text = "\n".join(report.state_section({"keepup": ku}))
    assert "| 40,000 | 20,000 | 20,000 | 0 | 20,000 | 1,998 | 3.5 ms | 14% of a core |" in text
    failed = "\n".join(report.state_section({"keepup": {"error": "boom\nat the end"}}))
    assert "bench.eventcost --keep-up failed: " in failed and "boom" in failed


# --- bench.scale: throughput by CPU count (issue 13 item 5) ---------------------------
import os  # noqa: E402

@pytest.mark.unit
def test_scale_default_cpu_counts_are_powers_of_two_and_all():
    from bench import scale
    assert scale.default_counts(1) == [1]
    assert scale.default_counts(2) == [1, 2]
    assert scale.default_counts(6) == [1, 2, 4, 6]
    assert scale.default_counts(8) == [1, 2, 4, 8]


@pytest.mark.unit
def test_scale_layout_splits_clients_and_servers_and_scales_connections():
    from bench.runner import layout
    one = layout(1, [0, 1], "split", 8)
    assert (one["client_cpus"], one["server_cpus"], one["connections"]) == ([0], [0], 8)
    two = layout(2, [0, 1], "split", 8)       # the main bench's 2-CPU layout
    assert (two["client_cpus"], two["server_cpus"], two["connections"]) == ([0], [1], 16)
    five = layout(5, list(range(8)), "split", 8)
    assert (five["client_cpus"], five["server_cpus"]) == ([0, 1, 2], [3, 4])
    assert five["connections"] == 42 and five["nginx_workers"] == 2   # a multiple of 3 threads
    four = layout(4, list(range(8)), "shared", 8)
    assert four["client_cpus"] == four["server_cpus"] == [0, 1, 2, 3]
    assert (four["h2load_threads"], four["nginx_workers"]) == (4, 4)


@pytest.mark.unit
def test_h2load_request_time_and_durations_it_accepts():
    t = workloads.request_time(H2LOAD_OUTPUT)
    assert (t["min_us"], t["max_us"], t["mean_us"]) == (23, 20100, 181)
    assert workloads.duration(1.0) == "1000ms" and workloads.duration(0.5) == "500ms"


@pytest.mark.unit
def test_scale_rejects_bad_arguments_with_exit_2():
    for bad in (["--cpus", "0"], ["--errors", "50"], ["--configs", "tcpdump"]):
        proc = subprocess.run([sys.executable, "-m", "bench.scale", *bad], cwd=ROOT,
                              capture_output=True, text=True)
        assert proc.returncode == 2, bad
        assert "error: argument" in proc.stderr.splitlines()[-1]


def _kernel_clean(pid: int) -> None:
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"mlab-{pid}-" not in netns
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    assert f"m{pid:06x}" not in links


@pytest.mark.kernel
@pytest.mark.slow
def test_scale_end_to_end(tmp_path):
    from bench import report
    out = tmp_path / "scale.json"
    stats_before = Path("/proc/sys/kernel/bpf_stats_enabled").read_text()
    from helpers import run_module
    proc, stdout, stderr = run_module("bench.scale", "--cpus", "1,2", "--rounds", "1",
                                      "--seconds", "1", "--settle", "0.1", "--out", str(out),
                                      "--json", timeout=600)
    assert proc.returncode == 0, stderr[-4000:]
    data = json.loads(out.read_text())
    assert json.loads(stdout) == data
    assert data["machine"]["cpus"] == os.cpu_count()
    assert [p["k"] for p in data["points"]] == [1, 2]
    keys = [c["key"] for c in data["configs"]]
    assert keys == ["untraced", "mirror-clsact", "thesis"]
    assert data["settings"]["error_levels"] == [0, 100]
    assert sum(line.startswith("[") for line in stderr.splitlines()) == 12   # progress

    runs = data["runs"]
    assert not [r for r in runs if "error" in r]
    assert sorted((r["k"], r["config"], r["error_pct"]) for r in runs) == \
        sorted((k, c, p) for k in (1, 2) for c in keys for p in (0, 100))
    for r in runs:
        assert r["req_per_s"] > 0 and r["requests"] > 0 and r["latency"]["mean_us"] > 0
        assert 0 <= r["cpu_busy"] <= 1 and 0 <= r["foreign_cpu"] <= 1
        assert r["status"]["5xx" if r["error_pct"] else "2xx"] == r["requests"]
        if r["config"] == "untraced":
            assert "mirror" not in r
        else:   # both monitors did their job: the comparison is fair
            assert r["mirror"]["complete"], r["mirror"]["problems"]
            assert (r["mirror"]["mirrored_packets"] > 0) == (r["error_pct"] == 100)

    rows = data["summary"]
    assert len(rows) == 2 * 3 * 2
    for row in rows:
        assert row["req_per_s"] > 0 and row["speedup"] > 0
        assert row["ratio"] == 1.0 if row["config"] == "untraced" else row["ratio"] > 0

    md = out.with_suffix(".md").read_text()
    assert md == report.scale_markdown(data)
    assert f"**{os.cpu_count()} CPUs**" in md
    assert md.count("| 1 |") == 3 and md.count("| 2 |") == 3    # layout + two error tables

    # the kernel is left as found
    assert Path("/proc/sys/kernel/bpf_stats_enabled").read_text() == stats_before
    _kernel_clean(proc.pid)


@pytest.mark.kernel
@pytest.mark.slow
def test_scale_sigterm_mid_run_cleans_up():
    proc = subprocess.Popen([sys.executable, "-m", "bench.scale", "--cpus", "1",
                             "--rounds", "1", "--seconds", "5", "--errors", "100"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:        # wait for the first run to finish: the lab is up
            lines.append(line)
            if line.startswith("["):
                break
        assert lines and lines[-1].startswith("["), "".join(lines)
        proc.terminate()
        _, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, rest[-2000:]
    assert "interrupted" in rest
    _kernel_clean(proc.pid)


PERF_SCRIPT = """\
\tffffffffc0012345 bpf_prog_0123456789abcdef_mirror_egress+0x40
\tffffffff81000000 cls_bpf_classify+0x10

\tffffffff81234567 skb_copy_bits+0x22
\tffffffff81234000 bpf_skb_load_bytes+0x1c
\tffffffffc0012345 bpf_prog_0123456789abcdef_mirror_egress+0x90
\tffffffff81000000 cls_bpf_classify+0x10

\tffffffff81999999 tcp_ack+0x5
\tffffffff81000000 tcp_rcv_established+0x10
"""


@pytest.mark.unit
def test_profile_puts_each_sample_on_the_programs_source_line():
    """A sample in the program is its own instruction's line; one in a kernel function
    it called goes on the calling line, with the callee; one outside is only counted."""
    from bench.profile import Program, attribute
    from mirror.bpfsys import SourceLine
    prog = Program("bpf_prog_0123456789abcdef_mirror_egress",
                   [SourceLine(0x0, "main.c", 10, "start"),
                    SourceLine(0x30, "main.c", 20, "the parse"),
                    SourceLine(0x80, "http1.h", 17, "the load")])
    total, under, where = attribute(PERF_SCRIPT, [prog])
    assert (total, under) == (3, 2)
    assert where == {("main.c:20: the parse", None): 1,
                     ("http1.h:17: the load", "skb_copy_bits"): 1}


@pytest.mark.testrun
def test_profile_reads_the_classifiers_source_lines_from_the_kernel():
    """The loaded classifier's line info, as the profile reads it: its perf symbol, and
    lines of bpf/mirror.c (bcc's main.c) and its headers, in JIT order."""
    from mirror.bpfprog import Classifier
    from mirror.bpfsys import jited_source_lines
    clf = Classifier()
    symbol, lines = jited_source_lines(clf.fd("ingress"))
    assert symbol.startswith("bpf_prog_") and symbol.endswith("_mirror_ingress")
    assert lines and lines[0].offset == 0
    assert [sl.offset for sl in lines] == sorted(sl.offset for sl in lines)
    files = {sl.file.rsplit("/", 1)[-1] for sl in lines}
    assert {"main.c", "parse.h", "http1.h"} <= files, files
    assert any("conn_key_eq" in sl.text for sl in lines)
