"""The budgets of bpf/mirror.c (over_budget, take_token) through BPF_PROG_TEST_RUN: per
connection, whatever CPUs carry it, at most max_packets_per_flow packets and
max_bytes_per_flow bytes from the mark on are cloned; per CPU, at most
max_clones_per_window clones per window. What a budget skips is counted by reason and
flagged on the connection.

Every test opens its connection first (the client's SYN at ingress, the server's SYN-ACK
at egress: only the server's statuses mark). Tests run pinned to one CPU (the rate is per
CPU), except the ones that move between CPUs on purpose. The rate tests never depend on the clock's speed: their window is
wider than any run can last (2**62 ns, about 146 years), and a window is made to restart
by writing its start where the unsigned difference to any clock reading is past it."""
from __future__ import annotations

import os
import time

import pytest

from frames import TCP_ACK, TCP_SYN, tcp4
from mirror.abi import COUNTERS, TC_ACT_UNSPEC, cut_reasons
from mirror.flowkey import FlowKey, key_of

CLOCK_MONOTONIC_COARSE = 6    # bpf_ktime_get_coarse_ns() reads it
SRV4, CLI4 = "198.18.0.80", "198.19.7.10"
SPORT, CPORT = 80, 40000
KEY = FlowKey.from_endpoints(SRV4, SPORT, CLI4, CPORT)
ERR500 = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"
WIDE = 1 << 62          # a rate window no test run can outlast


def s2c(payload=b"", **kw) -> bytes:
    return tcp4(SRV4, SPORT, CLI4, CPORT, payload, **kw)


def c2s(payload=b"", **kw) -> bytes:
    return tcp4(CLI4, CPORT, SRV4, SPORT, payload, **{"flags": TCP_ACK, **kw})


def open_conn(clf, cport: int = CPORT) -> None:
    run(clf, tcp4(CLI4, cport, SRV4, SPORT, flags=TCP_SYN), "ingress")
    run(clf, tcp4(SRV4, SPORT, CLI4, cport, flags=TCP_SYN | TCP_ACK), "egress")


def run(clf, frame: bytes, direction: str = "egress", repeat: int = 1) -> dict:
    """Runs a frame (`repeat` times in one BPF_PROG_TEST_RUN); returns the counter deltas."""
    before = clf.counters()
    res = clf.test_run(direction, frame, repeat)
    assert res.retval == TC_ACT_UNSPEC and res.data_out == frame
    after = clf.counters()
    return {k: after[k] - before[k] for k in COUNTERS if after[k] != before[k]}


def mirrored(delta: dict) -> int:
    return delta.get("mirrored_packets", 0)


def tx_packets(iface) -> int:
    return int(open(f"/sys/class/net/{iface.name}/statistics/tx_packets").read())


def two_cpus():
    original = os.sched_getaffinity(0)
    if not {0, 1} <= original:
        pytest.skip(f"needs CPUs 0 and 1, this thread may run on {sorted(original)}")
    return original


# --- per-flow packets ------------------------------------------------------------------

@pytest.mark.testrun
@pytest.mark.parametrize("budget", [1, 2, 5])
def test_flow_cloned_exactly_n_packets_then_skipped(clf, pinned, debug_iface, budget):
    clf.set_budgets(max_packets_per_flow=budget)
    open_conn(clf)
    tx = tx_packets(debug_iface)
    first = run(clf, s2c(ERR500))
    assert first["flows_marked"] == 1 and first["events"] == 1 and mirrored(first) == 1
    frames = [c2s(), s2c(b"body"), c2s(b"GET / HTTP/1.1\r\n\r\n"), s2c(ERR500), c2s()] * 2
    got = [run(clf, f, "ingress" if f in (c2s(), c2s(b"GET / HTTP/1.1\r\n\r\n")) else "egress")
           for f in frames]
    clones = 1 + sum(map(mirrored, got))
    skipped = sum(d.get("skip_flow_packets", 0) for d in got)
    assert (clones, skipped) == (budget, 1 + len(frames) - budget)
    # A prefix: every packet up to the budget cloned, none after.
    assert [mirrored(d) for d in got] == [1] * (budget - 1) + [0] * (len(frames) - budget + 1)
    assert tx_packets(debug_iface) == tx + budget, "the clones that left the debug interface"
    flow = clf.flows()[KEY]
    assert (flow["packets"], flow["cut"]) == (1 + len(frames), ["flow_packets"])
    # The later 500 on the cut flow still reports its event, and it is counted as skipped.
    assert got[8]["events"] == 1 and got[8]["skip_flow_packets"] == 1
    assert not {"skip_flow_bytes", "skip_cpu_rate", "clone_failures"} & set(
        k for d in got for k in d)


@pytest.mark.testrun
def test_flow_within_budget_is_not_flagged(clf, pinned):
    clf.set_budgets(max_packets_per_flow=3, max_bytes_per_flow=10_000,
                    max_clones_per_window=10, window_ns=WIDE)
    open_conn(clf)
    for f in (s2c(ERR500), c2s(), s2c(b"x")):
        assert "skip_flow_packets" not in run(clf, f)
    assert clf.flows()[KEY]["cut"] == []


@pytest.mark.testrun
def test_packet_budget_changed_at_run_time(clf, pinned):
    """The budgets sit in the config map: a new one applies to the next packet, no reload;
    it counts against the flow's packets since the mark, skipped ones included."""
    clf.set_budgets(max_packets_per_flow=2)
    open_conn(clf)
    assert [mirrored(run(clf, f)) for f in (s2c(ERR500), c2s(), c2s(), c2s())] == [1, 1, 0, 0]
    clf.set_budgets(max_packets_per_flow=6)
    assert [mirrored(run(clf, c2s())) for _ in range(3)] == [1, 1, 0]
    clf.set_budgets(max_packets_per_flow=0)         # unlimited
    assert mirrored(run(clf, c2s())) == 1
    assert clf.flows()[KEY]["cut"] == ["flow_packets"]     # the flag stays: it was cut


# --- per-flow bytes --------------------------------------------------------------------

@pytest.mark.testrun
def test_byte_budget(clf, pinned, debug_iface):
    open_conn(clf)
    resp, ack, body = s2c(ERR500), c2s(), s2c(b"y" * 100)
    # Room for the response, one ACK and part of the body: the body is skipped (it would
    # pass the budget), and so is everything after it, however small.
    clf.set_budgets(max_bytes_per_flow=len(resp) + len(ack) + len(body) - 1)
    got = [run(clf, f) for f in (resp, ack, body, ack, ack)]
    assert [mirrored(d) for d in got] == [1, 1, 0, 0, 0]
    assert [d.get("skip_flow_bytes", 0) for d in got] == [0, 0, 1, 1, 1]
    assert sum(d.get("mirrored_bytes", 0) for d in got) == len(resp) + len(ack)
    assert clf.flows()[KEY]["cut"] == ["flow_bytes"]


@pytest.mark.testrun
def test_byte_budget_is_inclusive(clf, pinned):
    open_conn(clf)
    resp, ack = s2c(ERR500), c2s()
    clf.set_budgets(max_bytes_per_flow=len(resp) + 2 * len(ack))
    assert [mirrored(run(clf, f)) for f in (resp, ack, ack, ack)] == [1, 1, 1, 0]


@pytest.mark.testrun
def test_marking_packet_larger_than_the_byte_budget(clf, pinned):
    """The flow is still marked and its event reported; only the clone is skipped."""
    open_conn(clf)
    resp = s2c(ERR500)
    clf.set_budgets(max_bytes_per_flow=len(resp) - 1)
    d = run(clf, resp)
    assert (d["flows_marked"], d["events"], mirrored(d), d["skip_flow_bytes"]) == (1, 1, 0, 1)
    assert clf.flows()[KEY]["cut"] == ["flow_bytes"]


@pytest.mark.testrun
def test_packet_budget_is_checked_before_bytes(clf, pinned):
    """A packet over both budgets counts once, under flow_packets."""
    open_conn(clf)
    resp = s2c(ERR500)
    clf.set_budgets(max_packets_per_flow=1, max_bytes_per_flow=len(resp))
    run(clf, resp)
    d = run(clf, c2s())
    assert (d.get("skip_flow_packets"), d.get("skip_flow_bytes")) == (1, None)


@pytest.mark.testrun
def test_syn_starts_a_new_budget(clf, pinned):
    """A SYN unmarks a reused 4-tuple; the next error connection on it starts afresh."""
    clf.set_budgets(max_packets_per_flow=1)
    open_conn(clf)
    run(clf, s2c(ERR500))
    assert run(clf, c2s()).get("skip_flow_packets") == 1
    assert run(clf, c2s(flags=TCP_SYN), "ingress")["syn_unmarked"] == 1
    assert mirrored(run(clf, s2c(ERR500))) == 1
    assert clf.flows()[KEY]["cut"] == []


@pytest.mark.testrun
def test_http2_flow_budget(clf, pinned):
    """The HTTP/2 path marks and mirrors through the same budget."""
    headers_500 = b"\x00\x00\x01\x01\x04\x00\x00\x00\x01\x8e"   # HEADERS :status 500 (idx 14)
    data = b"\x00\x00\x04\x00\x01\x00\x00\x00\x01oops"          # DATA, END_STREAM
    clf.set_budgets(max_packets_per_flow=2)
    open_conn(clf)
    first = run(clf, s2c(headers_500))
    assert (first["flows_marked"], first["h2_responses"], mirrored(first)) == (1, 1, 1)
    assert [mirrored(run(clf, s2c(data))) for _ in range(3)] == [1, 0, 0]
    assert run(clf, s2c(headers_500)).get("skip_flow_packets") == 1
    assert clf.flows()[KEY]["cut"] == ["flow_packets"]


@pytest.mark.testrun
def test_per_flow_budget_is_per_connection_across_cpus(clf):
    """One budget for the connection, whatever CPUs carry its packets (its state is shared
    by all CPUs)."""
    original = two_cpus()
    clf.set_budgets(max_packets_per_flow=2)
    try:
        os.sched_setaffinity(0, {0})
        open_conn(clf)
        assert [mirrored(run(clf, f)) for f in (s2c(ERR500), c2s(), c2s())] == [1, 1, 0]
        os.sched_setaffinity(0, {1})
        assert [mirrored(run(clf, c2s())) for _ in range(3)] == [0, 0, 0]
    finally:
        os.sched_setaffinity(0, original)
    flow = clf.flows()[KEY]
    assert (flow["packets"], flow["cut"]) == (6, ["flow_packets"])
    assert clf.counters()["skip_flow_packets"] == 4


# --- per-CPU clone rate ----------------------------------------------------------------

@pytest.mark.testrun
@pytest.mark.parametrize("limit,repeat", [(1, 2), (5, 50), (100, 1000)])
def test_rate_exactly_k_clones_in_one_window(clf, pinned, debug_iface, limit, repeat):
    open_conn(clf)
    run(clf, s2c(ERR500))                           # marked while unlimited
    clf.set_budgets(max_clones_per_window=limit, window_ns=WIDE)     # windows emptied
    tx = tx_packets(debug_iface)
    d = run(clf, c2s(), "ingress", repeat=repeat)
    assert (mirrored(d), d["skip_cpu_rate"]) == (limit, repeat - limit)
    assert "skip_flow_packets" not in d and "skip_flow_bytes" not in d
    assert tx_packets(debug_iface) == tx + limit
    assert clf.clone_window()[pinned][1] == limit
    assert clf.flows()[KEY]["cut"] == ["cpu_rate"]


@pytest.mark.testrun
def test_rate_spans_flows(clf, pinned):
    """The rate is per CPU, not per flow: a second flow finds the window spent."""
    clf.set_budgets(max_clones_per_window=3, window_ns=WIDE)
    open_conn(clf)
    open_conn(clf, CPORT + 1)
    other = tcp4(SRV4, SPORT, CLI4, CPORT + 1, ERR500)
    assert [mirrored(run(clf, f)) for f in (s2c(ERR500), c2s(), other, c2s())] == [1, 1, 1, 0]
    d = run(clf, other)
    assert (mirrored(d), d["skip_cpu_rate"], d["events"]) == (0, 1, 1)
    flows = clf.flows()
    assert flows[KEY]["cut"] == ["cpu_rate"]
    assert flows[FlowKey.from_endpoints(SRV4, SPORT, CLI4, CPORT + 1)]["cut"] == ["cpu_rate"]


@pytest.mark.testrun
def test_flow_budget_skips_take_no_clone_from_the_rate(clf, pinned):
    clf.set_budgets(max_packets_per_flow=1, max_clones_per_window=2, window_ns=WIDE)
    open_conn(clf)
    open_conn(clf, CPORT + 1)
    run(clf, s2c(ERR500))
    assert run(clf, c2s(), repeat=10)["skip_flow_packets"] == 10
    assert clf.clone_window()[pinned][1] == 1
    other = tcp4(SRV4, SPORT, CLI4, CPORT + 1, ERR500)
    assert mirrored(run(clf, other)) == 1           # the window's second clone


@pytest.mark.testrun
def test_rate_window_restarts(clf, pinned):
    open_conn(clf)
    run(clf, s2c(ERR500))
    clf.set_budgets(max_clones_per_window=4, window_ns=WIDE)
    # A spent window that started at 0: the clock is far less than WIDE past it.
    clf.set_clone_window(start_ns=0, clones=4)
    assert run(clf, c2s()).get("skip_cpu_rate") == 1
    # A spent window whose start the clock is (unsigned) at least WIDE past: restarted
    # at the next clone, which it counts.
    clf.set_clone_window(start_ns=1 << 63, clones=4)
    t0 = time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)
    d = run(clf, c2s())
    t1 = time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)
    assert mirrored(d) == 1 and "skip_cpu_rate" not in d
    start, clones = clf.clone_window()[pinned]
    assert t0 <= start <= t1 and clones == 1


@pytest.mark.testrun
def test_rate_is_per_cpu(clf):
    original = two_cpus()
    try:
        os.sched_setaffinity(0, {0})
        open_conn(clf)
        run(clf, s2c(ERR500))
        clf.set_budgets(max_clones_per_window=2, window_ns=WIDE)
        assert mirrored(run(clf, c2s(), repeat=5)) == 2
        os.sched_setaffinity(0, {1})
        assert mirrored(run(clf, c2s(), repeat=5)) == 2
    finally:
        os.sched_setaffinity(0, original)
    assert [c for _, c in clf.clone_window()[:2]] == [2, 2]
    assert clf.counters()["skip_cpu_rate"] == 6


@pytest.mark.testrun
def test_no_budget_no_skip(clf, pinned):
    """0 everywhere (the fixture's setting): nothing is ever skipped."""
    open_conn(clf)
    run(clf, s2c(ERR500))
    d = run(clf, c2s(), repeat=2000)
    assert mirrored(d) == 2000
    assert not {"skip_flow_packets", "skip_flow_bytes", "skip_cpu_rate"} & set(d)
    assert clf.flows()[KEY]["cut"] == []


@pytest.mark.testrun
def test_no_debug_interface_spends_no_budget(clf, pinned):
    """Without a debug interface there is no clone to bound: counted as before."""
    clf.set_debug_ifindex(0)
    clf.set_budgets(max_packets_per_flow=1, max_clones_per_window=1, window_ns=WIDE)
    open_conn(clf)
    d = [run(clf, f) for f in (s2c(ERR500), c2s(), c2s())]
    assert [x.get("no_debug_if") for x in d] == [1, 1, 1]
    assert not any(k.startswith("skip_") for x in d for k in x)


@pytest.mark.testrun
def test_bad_budgets_rejected(clf):
    with pytest.raises(ValueError):
        clf.set_budgets(max_packets_per_flow=-1)
    with pytest.raises(ValueError):
        clf.set_budgets(window_ns=0)


@pytest.mark.unit
def test_cut_reason_names():
    assert cut_reasons(0) == []
    assert cut_reasons(7) == ["flow_packets", "flow_bytes", "cpu_rate"]
    assert cut_reasons(4) == ["cpu_rate"]


# --- end to end: real nginx, real `mirror run` -----------------------------------------

def _descendants(pid: int) -> list[int]:
    out = [pid]
    for task in os.listdir(f"/proc/{pid}/task"):
        children = open(f"/proc/{pid}/task/{task}/children").read().split()
        for child in map(int, children):
            out += _descendants(child)
    return out


@pytest.mark.kernel
def test_capture_cut_at_the_packet_budget(host, nginx, tmp_path):
    """`mirror run --max-packets-per-flow 6`: a keep-alive connection answering 500, four
    200s, 500, 200 is captured from its first 500 for 6 packets, the rest is counted in
    mirror_clones_skipped_total{reason="flow_packets"}, `mirror flows` says the capture
    was cut, and the second 500's event says so too. The client and nginx run on one CPU,
    so that the classifier sees the packets in the order the reference capture lists
    them."""
    import json

    from helpers import (controller_ask, env_with, from_first_status, request_of, run_cli,
                         same_packets, signature)
    from test_integration import Session, connect
    from test_metrics import free_port, scrape
    budget = 6
    port = free_port()
    events = tmp_path / "events.jsonl"
    original = os.sched_getaffinity(0)
    cpu = min(original)
    nginx_pids = _descendants(nginx.proc.pid)
    assert len(nginx_pids) >= 2, "nginx master and its worker"
    for pid in nginx_pids:
        os.sched_setaffinity(pid, {cpu})
    extra = ("--max-packets-per-flow", str(budget), "--metrics-addr", f"127.0.0.1:{port}",
             "--events-file", str(events))
    with Session(host, tmp_path, "clsact", extra=extra) as s:
        os.sched_setaffinity(0, {cpu})
        try:
            key, statuses = connect(host, 4, ["/error", "/ok", "/ok", "/ok", "/ok", "/error",
                                              "/ok"])
            ok_key, _ = connect(host, 4, ["/ok"])
        finally:
            os.sched_setaffinity(0, original)
        mirrored, ref = s.finish()
        flow = [f for f in controller_ask(s.state_dir, "flows")
                if key_of(f["client"], f["server"]) == key][0]
        table = run_cli("flows", env=env_with(MIRROR_STATE_DIR=s.state_dir))
        metrics = scrape(port)
    assert statuses == [500, 200, 200, 200, 200, 500, 200]
    assert ok_key not in mirrored
    after_500 = from_first_status(ref[key].packets, 500)
    # The classifier saw every packet of the connection from the 500 on, and cloned the
    # first `budget` of them (the budget is the connection's, whatever CPUs carry it).
    assert flow["packets"] == len(after_500) > 2 * budget
    clones = budget
    request = request_of(ref[key].packets, 500)        # written by the controller
    assert len(mirrored[key].packets) == len(request) + clones
    captured = {signature(p) for p in mirrored[key].packets}
    assert all(signature(p) in captured for p in after_500[:budget])
    assert same_packets(mirrored[key].packets, request + after_500[:budget])
    skipped = {dict(labels)["reason"]: v for (name, labels), v in metrics.items()
               if name == "mirror_clones_skipped_total"}
    assert skipped == {"flow_packets": len(after_500) - clones, "flow_bytes": 0,
                       "cpu_rate": 0}
    assert metrics[("mirror_mirrored_packets_total", ())] == clones
    assert flow["cut"] == ["flow_packets"]
    assert table.returncode == 0 and "cut: flow_packets" in table.stdout
    assert "1 of 1 flows: capture cut by a budget" in table.stdout
    # Events: the first 500 before any cut, the second one after the connection's budget
    # was spent, each with the budgets in force.
    records = [json.loads(line) for line in events.read_text().splitlines()]
    assert [(r["status"], r["capture_cut"]) for r in records] == [
        (500, []), (500, ["flow_packets"])]
    assert records[0]["budget"] == {"max_packets_per_flow": budget,
                                    "max_bytes_per_flow": 1 << 20,
                                    "max_clones_per_second": 10000}


# --- events ----------------------------------------------------------------------------

def _record(cut: int, new_flow: bool = True) -> bytes:
    """A raw error event as the classifier hands it over: a 500 answering a kept GET."""
    from mirror.abi import EVENT_HEAD
    req = c2s(b"GET /orders/7 HTTP/1.1\r\nHost: shop.example\r\n\r\n")
    head = EVENT_HEAD.struct.pack(2_000_000, 1_000_000, KEY.to_bytes(), 1, 500, 1, 1,
                                  int(new_flow), 1, cut, 0, len(req), len(req))
    return head + req


@pytest.mark.testrun
def test_the_request_frames_of_one_poll_go_out_in_batches(debug_iface):
    """Events read in one poll queue their request frames, sent together when the poll
    returns: one sendmmsg(2) per BATCH frames, not one write per event."""
    from mirror.events.frames import BATCH
    from mirror.events.stream import EventStream
    stream = EventStream(None, lambda i: "eth0", lambda: debug_iface.ifindex, None, {})
    n = BATCH + 44
    try:
        tx = tx_packets(debug_iface)
        stream._polling = True          # as inside classifier.poll_events()
        for _ in range(n):
            stream.handle(_record(0))
        # A full batch went as soon as it filled; the rest waits for the poll's end.
        assert (stream.writer.written, stream.writer.calls) == (BATCH, 1)
        stream._polling = False
        stream.writer.flush()           # what _poll() does when the poll returns
        assert tx_packets(debug_iface) == tx + n
    finally:
        stream.writer.close()
    assert (stream.writer.written, stream.writer.calls, stream.seq) == (n, 2, n)


@pytest.mark.testrun
@pytest.mark.parametrize("cut,written", [(0, 1), (4, 0), (2, 0)])
def test_event_json_and_request_frame_of_a_cut_response(debug_iface, cut, written):
    """The event names the cut and the budgets in force; the request frame goes to the
    debug interface only when the response it answers was cloned."""
    from mirror.events.stream import EventStream
    budget = {"max_packets_per_flow": 7, "max_bytes_per_flow": 0, "max_clones_per_second": 9}
    stream = EventStream(None, lambda i: "eth0", lambda: debug_iface.ifindex, None, budget)
    try:
        tx = tx_packets(debug_iface)
        stream.handle(_record(cut))
        assert tx_packets(debug_iface) == tx + written
        [record] = stream.since(0)
    finally:
        stream.writer.close()
    assert stream.writer.written == written
    assert record["capture_cut"] == cut_reasons(cut)
    assert record["budget"] == budget
    assert (record["method"], record["target"], record["status"]) == ("GET", "/orders/7", 500)
