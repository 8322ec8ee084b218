"""python -m bench.eventcost: what one error event costs user space, in CPU microseconds,
and so how many events a second one core can take (the default --max-events-per-second
is chosen from it).

Real events: the classifier (loaded here) answers a burst of error responses on
BPF_PROG_TEST_RUN, each an event with its 512-byte request, into its ring buffer; the
controller's own reader (mirror.events.stream.EventStream) drains them as `mirror run`
does, and the CPU time of the draining thread (time.thread_time) is divided by the
events it handled. Three ways, each measured `rounds` times, interleaved:
  keep        decode, keep for `mirror events` (no events file, no request frames)
  file        the same, and each event's JSON line written to an events file
  file+frame  the same, and each event's request frame written to a debug interface
              (a veth pair made here, whose far end drops it, as the controller's)
The median over rounds is reported, with the events per second one core could handle.

--keep-up SECONDS asks the question the default bound must answer: at the bound, does the
reader keep up, losing nothing, on this machine? One producer process per CPU (forked
after the load, pinned) offers error responses on BPF_PROG_TEST_RUN at --offered a
second each, every one a new connection (so each event carries its request frame); the
kernel's per-CPU bound (the default --max-events-per-second) lets through what it lets
through; the controller's own reader (EventStream, in its thread, with its events file
and its request frames to a debug interface) reads them as `mirror run` does. Reported:
events the kernel made, suppressed by the bound and lost (ring buffer full), events the
reader handled, how long after the producers stopped it had read the last, and the
reader thread's CPU time per second."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from mirror import debugif
from mirror.abi import DEFAULT_MAX_EVENTS_PER_CONN
from mirror.bpfprog import Classifier, Sink
from mirror.events.file import EventsFile
from mirror.events.stream import EventStream
from mirror.lab.netns import unique_name
from mirror.options import DEFAULT_MAX_EVENTS_PER_SECOND

from .frames import CLIENT, REQUEST, RESPONSE_500, to_client, to_server_from

WAYS = ("keep", "file", "file+frame")


def one_error(clf: Classifier, port: int) -> None:
    """An error response on a connection from client port `port`, opened by its SYN,
    with its request: one event."""
    clf.test_run("egress", to_server_from(4, CLIENT[4], port, b"", 0x02))
    clf.test_run("egress", to_server_from(4, CLIENT[4], port, REQUEST))
    clf.test_run("ingress", to_client(4, RESPONSE_500, port=port))


def burst(clf: Classifier, n: int) -> None:
    """n error responses, each of a connection opened by its SYN, with its request."""
    for i in range(n):
        one_error(clf, 20000 + i % 40000)


def measure_once(clf: Classifier, way: str, n: int, debug_ifindex: int, tmp: str) -> float:
    """CPU microseconds per event of the draining thread."""
    out = EventsFile(os.path.join(tmp, "events.jsonl"), 1 << 30) if way != "keep" else None
    stream = EventStream(clf, lambda i: "eth0",
                         (lambda: debug_ifindex) if way == "file+frame" else (lambda: 0),
                         out, {})
    clf.on_events(stream._on_record)
    clf.poll_events(0)                              # nothing left from before
    burst(clf, n)
    t0 = time.thread_time()
    seq0 = stream.seq
    stream._polling = True
    clf.poll_events(0)
    stream._polling = False
    stream.writer.flush()
    spent = time.thread_time() - t0
    handled = stream.seq - seq0
    stream.writer.close()
    if out:
        out.close()
    clf.on_events(None)
    if handled != n:
        raise RuntimeError(f"{handled} events of {n} handled (the ring buffer holds "
                           "fewer: lower --events)")
    return spent / n * 1e6


def _produce(clf: Classifier, cpu: int, first_port: int, ports: int, offered: int,
             seconds: float, go: int) -> None:
    """A producer process: pinned to `cpu`, it waits for a byte on `go`, then offers
    error responses (each a new connection from a client port of first_port + 0..ports-1,
    in turn: SYN, request, 500) at `offered` a second for `seconds`, paced in steps of
    10 ms. Never returns."""
    try:
        os.sched_setaffinity(0, {cpu})
        os.read(go, 1)
        per_step = max(1, offered // 100)
        start = time.monotonic()
        n = 0
        while time.monotonic() - start < seconds:
            for _ in range(per_step):
                one_error(clf, first_port + n % ports)
                n += 1
            time.sleep(max(0.0, start + n / offered - time.monotonic()))
        os._exit(0)
    except BaseException:
        os._exit(1)


def _thread_cpu_seconds(tid: int) -> float:
    """User and system CPU time of one thread of this process."""
    fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def keep_up(clf: Classifier, seconds: float, offered: int, debug_ifindex: int,
            tmp: str) -> dict:
    """The --keep-up experiment (module docstring): one producer per CPU at `offered`
    errors a second, the default event bounds, the real reader."""
    cpus = sorted(os.sched_getaffinity(0))
    clf.set_event_limits(DEFAULT_MAX_EVENTS_PER_SECOND, DEFAULT_MAX_EVENTS_PER_CONN)
    go_r, go_w = os.pipe()
    pids = []
    ports = 40000 // len(cpus)          # client ports 20000-59999, a share for each CPU
    for i, cpu in enumerate(cpus):
        pid = os.fork()                 # before any thread of ours exists
        if pid == 0:
            _produce(clf, cpu, 20000 + i * ports, ports, offered, seconds, go_r)
        pids.append(pid)
    os.close(go_r)
    out = EventsFile(os.path.join(tmp, "keepup.jsonl"), 1 << 30)
    stream = EventStream(clf, lambda i: "eth0", lambda: debug_ifindex, out, {})
    before = clf.counters()
    stream.start()
    tid = stream._thread.native_id
    cpu0 = _thread_cpu_seconds(tid)
    try:
        os.write(go_w, b"x" * len(pids))
        t0 = time.monotonic()
        failed = sum(os.waitpid(pid, 0)[1] != 0 for pid in pids)
        pids = []
        produced_s = time.monotonic() - t0
        made = clf.counters()["events"] - before["events"]
        end = time.monotonic()
        while stream.seq < made and time.monotonic() - end < 30:
            time.sleep(0.005)
        drained_ms = (time.monotonic() - end) * 1e3
        cpu_s = _thread_cpu_seconds(tid) - cpu0
    finally:
        for pid in pids:                # interrupted: the producers go too
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(go_w)
        stream.close()
        out.close()
    after = clf.counters()
    delta = {k: after[k] - before[k] for k in ("errors", "events", "events_rate_limited",
                                               "events_lost")}
    return {"cpus": len(cpus), "seconds": round(produced_s, 2), "offered_per_cpu": offered,
            "producers_failed": failed, **delta, "handled": stream.seq,
            "events_per_second": round(delta["events"] / produced_s),
            "last_read_ms_after_the_end": round(drained_ms, 1),
            "reader_cpu_share": round(cpu_s / produced_s, 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.eventcost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=1000, help="events per measurement")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", action="store_true")
    p.add_argument("--keep-up", type=float, metavar="SECONDS",
                   help="the reader at the default bound instead (module docstring)")
    p.add_argument("--offered", type=int, default=1500,
                   help="--keep-up: error responses offered a second on each CPU")
    args = p.parse_args(argv)
    clf = Classifier(max_flows=65536)
    clf.set_trigger(frozenset(range(500, 600)))
    clf.set_event_limits(0, 0)
    sink = Sink()
    from pyroute2 import IPRoute
    name = unique_name("d")
    with IPRoute() as ipr:
        dbg = debugif.ensure(ipr, name, lambda: sink.fd)
    us: dict[str, list[float]] = {w: [] for w in WAYS}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if args.keep_up:
                kept_up = keep_up(clf, args.keep_up, args.offered, dbg.ifindex, tmp)
            else:
                for _ in range(args.rounds):
                    for way in WAYS:
                        clf.clear()
                        us[way].append(measure_once(clf, way, args.events, dbg.ifindex,
                                                    tmp))
    finally:
        with IPRoute() as ipr:
            debugif.remove(ipr, name, dbg.ifindex)
    if args.keep_up:
        if args.json:
            json.dump(kept_up, sys.stdout, indent=1)
            print()
        else:
            print(" ".join(f"{k}={v}" for k, v in kept_up.items()))
        return 0
    result = {"events": args.events, "rounds": args.rounds,
              "us_per_event": {w: statistics.median(v) for w, v in us.items()},
              "per_round_us": us}
    result["events_per_cpu_second"] = {w: round(1e6 / v) for w, v in
                                       result["us_per_event"].items()}
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        print()
        return 0
    print(f"user space per error event (median of {args.rounds} rounds of {args.events}):")
    for w in WAYS:
        print(f"  {w:11} {result['us_per_event'][w]:7.1f} us   "
              f"{result['events_per_cpu_second'][w]:>8,} events/s on one core")
    return 0


if __name__ == "__main__":
    sys.exit(main())
