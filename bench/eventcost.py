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
The median over rounds is reported, with the events per second one core could handle."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from mirror import debugif
from mirror.bpfprog import Classifier, Sink
from mirror.events.file import EventsFile
from mirror.events.stream import EventStream
from mirror.lab.netns import unique_name

from .frames import CLIENT, REQUEST, RESPONSE_500, to_client, to_server_from

WAYS = ("keep", "file", "file+frame")


def burst(clf: Classifier, n: int) -> None:
    """n error responses, each of a connection opened by its SYN, with its request."""
    for i in range(n):
        port = 20000 + i % 40000
        client = CLIENT[4]
        clf.test_run("egress", to_server_from(4, client, port, b"", 0x02))
        clf.test_run("egress", to_server_from(4, client, port, REQUEST))
        clf.test_run("ingress", to_client(4, RESPONSE_500, port=port))


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.eventcost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=1000, help="events per measurement")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", action="store_true")
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
            for _ in range(args.rounds):
                for way in WAYS:
                    clf.clear()
                    us[way].append(measure_once(clf, way, args.events, dbg.ifindex, tmp))
    finally:
        with IPRoute() as ipr:
            debugif.remove(ipr, name, dbg.ifindex)
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
