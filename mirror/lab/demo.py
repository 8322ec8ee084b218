"""`mirror lab`: the built-in demo. Builds a server host in a network namespace (nginx
answering 200, 404 and 500 over HTTP/1.1, and over HTTP/2 cleartext on port 8080),
mirrors its host-side veth, records the debug interface with tcpdump, sends a mix of
requests over IPv4 and IPv6, and reports what was captured and the error events. Leaves
the pcap and the events file behind and the kernel as it found it."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from .. import ownership
from ..cliutil import count, text_checked
from ..errors import UsageError
from ..safepath import UnsafePath, check_directory, check_writable_file, pseudo_fs
from ..trigger import parse_trigger
from .client import send

log = logging.getLogger("mirror")

EPILOG = """\
examples:
  mirror lab                          # clsact hooks, trigger 5xx, pcap in ./lab-output
  mirror lab --hook htb --trigger 404,5xx
  tcpdump -nr lab-output/mirror.pcap  # read what was mirrored
  jq . lab-output/events.jsonl        # one line per error response, with its request
"""


def add_parser(sub) -> None:
    p = sub.add_parser("lab", help="run the built-in demo in network namespaces",
                       description=__doc__.split("\n\n")[0].replace("\n", " "),
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hook", choices=["clsact", "htb", "tcx"], default="clsact")
    p.add_argument("--trigger", default="5xx", metavar="SPEC",
                   type=text_checked(parse_trigger))
    p.add_argument("--rounds", type=count(1, 1000), default=3, metavar="N",
                   help="how many times to send the request mix, 1 to 1000 (default "
                   "%(default)s)")
    p.add_argument("--output", default="lab-output", metavar="DIR",
                   type=text_checked(_nonempty),
                   help="where the pcap and the events file are left, replacing those of "
                   "the last run (default %(default)s)")
    p.set_defaults(func=cmd_lab)


# (label, paths sent on one keep-alive connection)
MIX = [
    ("200 only", ["/ok", "/ok"]),
    ("404", ["/missing"]),
    ("500", ["/error"]),
    ("200, 200, 500, 200 on one connection", ["/ok", "/ok", "/error", "/ok"]),
    ("multi-segment 200 then 500", ["/big", "/error"]),
]
H2_PORT = 8080
# (label, paths sent as streams of one HTTP/2 cleartext connection)
H2_MIX = [
    ("h2c 200 only", ["/ok", "/"]),
    ("h2c 200 and 500", ["/ok", "/error"]),
]


def cmd_lab(args) -> int:
    from ..capture.flow import read_flows
    from ..capture.tcpdump import Tcpdump
    from ..controller import Controller, Options
    from ..flowkey import FlowKey
    from .client import send_h2
    from .netns import Host, cleanup_stale, unique_name
    from .nginx import Nginx

    if os.geteuid() != 0:
        raise UsageError("the lab builds network namespaces and loads BPF: run it as root")
    # Everything is checked before anything is touched: the last run's output, the
    # kernel (cleanup_stale, the namespace) and the state directory.
    out = Path(args.output)
    pcap_path = out / "mirror.pcap"
    events_path = out / "events.jsonl"
    _check_output(out, pcap_path, events_path)
    ownership.check_state_dir(creatable=True)
    out.mkdir(parents=True, exist_ok=True)
    cleanup_stale()
    events_path.unlink(missing_ok=True)
    steps = 6
    step = iter(range(1, steps + 1))

    def progress(msg):
        print(f"[{next(step)}/{steps}] {msg}", flush=True)

    progress("building a server host in a network namespace (nginx: /ok 200, /missing 404, "
             f"/error 500; HTTP/1.1 on port 80, h2c on {H2_PORT})")
    host = Host.create()
    nginx = ctl = dump = runner = None
    try:
        nginx = Nginx(host, h2_port=H2_PORT).start()
        print(f"      server {host.ns_v4} / {host.ns_v6} in netns {host.ns}; "
              f"host-side veth {host.host_if}")
        progress(f"compiling the classifier and attaching it to {host.host_if} "
                 f"({args.hook} hooks, trigger {args.trigger})")
        debug = unique_name("d")
        ctl = Controller(Options(ifaces=[host.host_if], debug_iface=debug, trigger=args.trigger,
                                 hook=args.hook, idle_timeout=60,
                                 events_file=str(events_path)))
        ctl.start()
        runner = threading.Thread(target=ctl.run, daemon=True)
        runner.start()
        progress(f"recording the debug interface {debug} with tcpdump")
        dump = Tcpdump(debug, str(pcap_path)).start()
        progress(f"sending {args.rounds} rounds of the request mix over IPv4 and IPv6")
        sent, sent_h2 = [], []
        for _ in range(args.rounds):
            for server, source in ((host.ns_v4, host.host_v4), (host.ns_v6, host.host_v6)):
                for label, paths in MIX:
                    tuple5, statuses = send(server, source, paths)
                    sent.append((label, FlowKey.from_endpoints(*tuple5), statuses))
                for label, paths in H2_MIX:
                    sent_h2.append((label, server, send_h2(server, H2_PORT, paths)))
        progress("waiting for the capture to hold every frame sent to the debug interface, "
                 "then stopping tcpdump")
        _wait_for_capture(ctl, dump)
        dump.stop()
        summary = dump.stats
        dump = None
        counters = ctl.counters()
        flows = read_flows(str(pcap_path))
        progress("report")
        unexpected = _report(sent, flows, counters, summary, pcap_path, ctl.codes)
        unexpected += _report_h2(sent_h2, flows, counters, ctl.codes)
        _report_events(events_path)
    finally:
        if dump:
            dump.stop()
        if ctl:
            ctl.stop_event.set()
            if runner:
                runner.join()       # it shares the controller's netlink socket
            ctl.close()
        if nginx:
            nginx.stop()
        host.destroy()
    print("kernel state cleaned up: namespace, veths, qdiscs, filters and debug interface "
          "removed")
    if unexpected:
        print(f"{unexpected} connection(s) were not mirrored as the trigger set says: "
              "see the UNEXPECTED lines above", file=sys.stderr)
        return 1
    return 0


def _nonempty(text: str) -> None:
    if not text.strip() or "\0" in text:
        raise ValueError(f"expected a directory, got {text!r}")


def _check_output(out: Path, *files: Path) -> None:
    """UsageError unless the output directory can be made or used and each file in it
    written as root (mirror.safepath), before the last run's files are replaced."""
    try:
        parent = check_directory(out)
        if parent.exists() and not parent.is_dir():
            raise UnsafePath(f"{out} is not a directory")
        if not parent.exists():
            existing = next(p for p in [parent, *parent.parents] if p.exists())
            if not existing.is_dir() or not os.access(existing, os.W_OK):
                raise UnsafePath(f"{existing} is not a writable directory")
            if pseudo_fs(str(existing)):
                raise UnsafePath(f"{existing} is in a kernel file system")
        else:
            for f in files:
                check_writable_file(str(f))
    except (UnsafePath, OSError) as exc:
        raise UsageError(f"cannot use --output {out}: {getattr(exc, 'strerror', None) or exc}") \
            from None


def _report(sent, flows, counters, tcpdump_summary, pcap_path, codes) -> int:
    """Prints what was sent and captured; returns how many connections were mirrored
    when they should not have been, or not when they should."""
    print()
    print(f"{'connection (client side first)':58} {'statuses':22} {'mirrored':>8}")
    mirrored_conns = unexpected = 0
    for label, key, statuses in sent:
        got = flows.get(key)
        n = len(got.packets) if got else 0
        mirrored_conns += bool(got)
        should = any(s in codes for s in statuses)
        mark = "ok" if bool(got) == should else "UNEXPECTED"
        unexpected += mark != "ok"
        print(f"{str(key):58} {','.join(map(str, statuses)):22} {n:>5} pk  {mark}")
    print()
    resp = Counter({cls: counters[f"resp_{cls}"] for cls in ("1xx", "2xx", "3xx", "4xx", "5xx")})
    print(f"classifier: {counters['packets']} packets seen, {counters['tcp']} TCP, "
          f"{counters['responses']} HTTP/1.x responses ({', '.join(f'{k}: {v}' for k, v in resp.items() if v)}), "
          f"{counters['h2_responses']} HTTP/2 statuses ({counters['h2_status_unknown']} "
          "not decodable without HPACK state)")
    print(f"            {counters['flows_marked']} connections marked, "
          f"{counters['mirrored_packets']} packets mirrored, "
          f"{counters['clone_failures']} clone failures; {counters['requests']} requests "
          f"kept, {counters['request_frames_written']} of them written to the capture with "
          "their error response")
    print(f"capture:    {sum(len(f.packets) for f in flows.values())} packets in "
          f"{len(flows)} connections, {mirrored_conns} of them HTTP/1.x connections sent "
          f"here; tcpdump: {tcpdump_summary['captured']} packets captured, "
          f"{tcpdump_summary['dropped']} dropped by kernel")
    print(f"pcap left at {pcap_path} (tcpdump -nr {pcap_path} -A | less)")
    return unexpected


def _wait_for_capture(ctl, dump, timeout: float = 30.0) -> None:
    """Until the controller has read every event the classifier emitted (each may write a
    request frame, and its line goes to the events file) and tcpdump has every clone and
    request frame the controller sent (its own counters, asked with SIGUSR1), the
    connections' last ACKs included."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c = ctl.counters()
        if c["events_read"] < c["events"]:
            time.sleep(0.02)
            continue
        want = c["mirrored_packets"] + c["request_frames_written"]
        reports = dump.stats_reports
        dump.request_stats()
        while dump.stats_reports == reports and time.monotonic() < deadline:
            time.sleep(0.02)
        if dump.stats["captured"] + dump.stats["dropped"] >= want:
            return
        time.sleep(0.1)


def _report_h2(sent_h2, flows, counters, codes) -> int:
    """The h2c connections: nghttp does not say which client port it used, so they are
    told apart by what they asked for; the capture must hold exactly the connections
    that got a trigger status, found by the server's h2c port."""
    print()
    print(f"{'h2c connection':58} {'statuses':22}")
    for label, server, statuses in sent_h2:
        print(f"{label + ' to ' + server:58} {','.join(map(str, statuses)):22}")
    expected = sum(any(s in codes for s in statuses) for _, _, statuses in sent_h2)
    got = [f for k, f in flows.items() if H2_PORT in (k.port_lo, k.port_hi)]
    mark = "ok" if len(got) == expected else "UNEXPECTED"
    print(f"h2c:        {len(got)} connections mirrored, {expected} expected (those with an "
          f"error stream)  {mark}")
    return mark != "ok"


def _report_events(events_path) -> None:
    import json
    lines = events_path.read_text().splitlines() if events_path.exists() else []
    print(f"events:     {len(lines)} error events in {events_path} (one per error "
          "response: HTTP/1.x with its request, h2 without)")
    for line in lines[:1]:
        e = json.loads(line)
        took = (f"{e['response_seconds'] * 1e3:.2f} ms" if e["response_seconds"] is not None
                else "-")
        print(f"            e.g. {e['status']} for {e['method']} {e['target']} (host "
              f"{e['host']}) from {e['client']}, answered in {took}")
