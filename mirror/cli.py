"""Command line: `mirror run|status|flows|events|detach|lab|capture|cni`."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading

from pyroute2.netlink.exceptions import NetlinkError

from . import __version__
from .abi import (DEFAULT_MAX_EVENTS_PER_CONN, DEFAULT_MAX_FLOWS, DEFAULT_REQUEST_BYTES,
                  MAX_CONN_SLOTS, MAX_REQUEST_BYTES)
from .capture.command import add_parser as add_capture
from .cniinstall import add_parser as add_cni
from .cliutil import (add_workload_selectors, count, env, parse_metrics_addr, positive_seconds, serve_metrics,
                      text_checked)
from .debugif import check_name as check_debug_name
from .discovery import DEFAULT_MAX_IFACES, MAX_IFACES_LIMIT
from .errors import UsageError
from .hooks import NAMES as HOOK_NAMES
from .lab.demo import add_parser as add_lab
from .options import DEFAULT_MAX_EVENTS_PER_SECOND
from .trigger import parse_trigger

log = logging.getLogger("mirror")

EPILOG_RUN = """\
examples:
  mirror run --iface veth1a2b3c                 # mirror 5xx connections to mirror0
  mirror run --iface eth0 --trigger 429,5xx --metrics-addr 127.0.0.1:9464
  mirror run --iface eth0 --iface eth1 --hook htb --debug-iface dbg0
  mirror run --iface veth1a2b3c --events-file - | jq .target   # one line per error
  mirror run --iface 'veth*' --iface 'cali*' --exclude 'veth-infra*'  # every container
  tcpdump -ni mirror0 -w errors.pcap            # in another shell: record the mirror

environment (for containers; flags win): MIRROR_IFACE and MIRROR_EXCLUDE (comma-separated),
MIRROR_MAX_IFACES, MIRROR_DEBUG_IFACE, MIRROR_TRIGGER, MIRROR_HOOK, MIRROR_IDLE_TIMEOUT,
MIRROR_MAX_FLOWS, MIRROR_REQUEST_BYTES, MIRROR_EVENTS_FILE, MIRROR_EVENTS_FILE_MB,
MIRROR_METRICS_ADDR, MIRROR_CONFIG, MIRROR_MAX_PACKETS_PER_FLOW, MIRROR_MAX_BYTES_PER_FLOW,
MIRROR_MAX_CLONES_PER_SECOND, MIRROR_MAX_EVENTS_PER_SECOND, MIRROR_MAX_EVENTS_PER_CONNECTION.

interfaces: a plain name must exist at start and is followed through renames. A shell
pattern (*, ?, [...]) also selects interfaces created later: each is attached as soon as
the kernel announces it, before it can carry a packet, and forgotten when it goes away or
is renamed out of the patterns. The debug interface is never monitored.

signals: SIGINT/SIGTERM detach cleanly and exit; SIGHUP re-reads trigger and idle_timeout
from --config (a bad file is rejected and the running set kept).

overhead: every packet on a monitored interface runs the classifier (a few tens of ns:
header parsing and one hash lookup per TCP segment, one bpf_skb_load_bytes per data
segment). Packets of marked connections are also cloned, which costs far more; keep the
trigger set narrow on busy hosts. The --max-* budgets bound that cost in an error storm
(skipped clones: mirror_clones_skipped_total{reason}). See bench/ for measured numbers.
"""

EPILOG_EVENTS = """\
examples:
  mirror events                       # the recent error responses, one line each
  mirror events -n shop --pod 'checkout-*' --status 5xx --since 15m
  mirror events --iface 'veth*' --status grpc:unavailable,internal --follow
  mirror events --follow --json | jq -r '[.time_unix, .status, .target] | @tsv'
  mirror capture --extract --community-id "$(mirror events --json --pod checkout-7d9f \\
      | tail -1 | jq -r .community_id)" -w one.pcapng    # its packets, from the sidecar

filters: every one given must hold; a pattern is a shell pattern (*, ?, [...]) and a
repeated flag matches any of its patterns. --pod matches a podman pod too, --container a
Docker or podman container's name; --status takes the trigger's syntax (500, 5xx,
500-504, grpc:14, grpc:unavailable, grpc-error); --since/--until take RFC 3339, epoch
seconds, or a time before now (30s, 10m, 2h, 1d).

--follow loses nothing silently: a follower that fell behind the controller's last 1000
events, or error responses the kernel kept from becoming events, are said on standard
error with their count. A controller that starts is followed; one that stops hands over
its last events and is said ("controller PID stopped"); once none is left the follower
ends, with status 0 (1 when a controller vanished without stopping: killed).

--file PATH reads the events file instead (PATH.1, then PATH; --follow as tail -F, across
its rotations), with the same filters and output:
  mirror events --file /var/log/mirror/events.jsonl --pod 'checkout-*' --since 1h
  jq -c 'select(.["k8s.pod.name"] | startswith("checkout-")?)' /var/log/mirror/events.jsonl
"""

DESCRIPTION = """\
HTTP-aware selective traffic mirror. A tc BPF classifier reads every packet on the
monitored interfaces; when an HTTP/1.x or HTTP/2 (cleartext) response carries a status
code in the trigger set, that connection is marked and every packet of it from then on,
both directions, is cloned to a debug interface, where tcpdump or Wireshark can record it
(within the --max-* budgets), together with the request that got the error; each error
also becomes one event line (`mirror events`, --events-file). All other traffic passes
untouched."""


class Parser(argparse.ArgumentParser):
    """argparse with errors in one line: what is wrong and where the help is (argparse
    prints the whole usage first, seven lines for `mirror run`, which hides the line
    that matters in a container's log). Subcommands' parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"mirror: error: {message} (see `{self.prog} --help`)\n")


def hook_name(text: str) -> None:
    if text not in HOOK_NAMES:
        raise ValueError(f"unknown hook {text!r}: use {', '.join(HOOK_NAMES)}")


def iface_name(text: str) -> None:
    """An interface name as the kernel allows it (dev_valid_name)."""
    if not 0 < len(text) <= 15 or text in (".", "..") or "/" in text or ":" in text or \
            any(c.isspace() for c in text):
        raise ValueError(f"bad interface name {text!r}: 1-15 characters, no '/', ':' or "
                         "spaces")


def path_text(text: str) -> None:
    if not text.strip() or "\0" in text:
        raise ValueError(f"expected a path, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="mirror", description=DESCRIPTION,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"mirror {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="attach and mirror until stopped",
                         description="Load the classifier, attach it to the ingress and egress "
                         "of each --iface, and mirror error connections to --debug-iface until "
                         "SIGINT or SIGTERM.", epilog=EPILOG_RUN,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    env_ifaces = [i for i in env("MIRROR_IFACE", "").replace(" ", ",").split(",") if i]
    env_exclude = [i for i in env("MIRROR_EXCLUDE", "").replace(" ", ",").split(",") if i]
    run.add_argument("--iface", action="append", metavar="IF",
                     help="interface name or shell pattern ('veth*') to monitor, ingress and "
                     "egress (repeatable; env MIRROR_IFACE)")
    run.add_argument("--exclude", action="append", metavar="PATTERN",
                     help="never monitor interfaces matching this pattern, even when an "
                     "--iface pattern selects them (repeatable; env MIRROR_EXCLUDE)")
    run.add_argument("--max-ifaces", type=count(1, MAX_IFACES_LIMIT), metavar="N",
                     default=env("MIRROR_MAX_IFACES", str(DEFAULT_MAX_IFACES)),
                     help="monitor at most N interfaces; beyond it matching interfaces are "
                     "logged and counted, not attached (default %(default)s: above the 110 "
                     "pods per node Kubernetes allows by default, within the default limit of "
                     "1024 open files)")
    run.add_argument("--debug-iface", default=env("MIRROR_DEBUG_IFACE", "mirror0"),
                     type=text_checked(check_debug_name), metavar="NAME",
                     help="where clones go; created if missing and removed at exit only if "
                     "created here (default %(default)s)")
    run.add_argument("--trigger", default=env("MIRROR_TRIGGER", "5xx"), metavar="SPEC",
                     type=text_checked(parse_trigger),
                     help="status codes that mark a connection: codes, ranges, classes, "
                     "e.g. 5xx, 500-504, 429,5xx; gRPC codes (grpc-status in h2c "
                     "trailers) after grpc:, e.g. 5xx,grpc:2,13,14 or grpc:unavailable, "
                     "or grpc-error for 1-16; or none (default %(default)s)")
    run.add_argument("--hook", choices=list(HOOK_NAMES), type=text_checked(hook_name),
                     default=env("MIRROR_HOOK", "clsact"),
                     help="clsact: lockless, leaves the root qdisc alone (default); htb: "
                     "ingress qdisc + htb root qdisc, the original design's layout; tcx "
                     "(Linux 6.6+): BPF links, no qdisc at all, released when the controller "
                     "exits, so attaching and detaching never disturbs the device's queues")
    run.add_argument("--idle-timeout", type=positive_seconds, metavar="SECONDS",
                     default=env("MIRROR_IDLE_TIMEOUT", "30"),
                     help="stop mirroring a connection idle this long (default %(default)s)")
    run.add_argument("--max-flows", type=count(16, MAX_CONN_SLOTS),
                     default=env("MIRROR_MAX_FLOWS", str(DEFAULT_MAX_FLOWS)), metavar="N",
                     help="connection states kept (rounded up to a power of two): a new "
                     "connection takes the slot of the least recently active one of its "
                     "bucket beyond it (default %(default)s)")
    run.add_argument("--request-bytes", type=count(0, MAX_REQUEST_BYTES),
                     default=env("MIRROR_REQUEST_BYTES", str(DEFAULT_REQUEST_BYTES)),
                     metavar="N",
                     help="keep the first N bytes of each HTTP/1.x request frame, so that an "
                     "error response comes with its request (captured and in the event); 0: "
                     "off, and a status line then counts from either side (default "
                     "%(default)s)")
    run.add_argument("--max-packets-per-flow", type=count(0, (1 << 32) - 1),
                     default=env("MIRROR_MAX_PACKETS_PER_FLOW", "1000"), metavar="N",
                     help="clone at most N packets of a marked connection, counted from its "
                     "error response on, over every CPU that handles it; the rest is skipped "
                     "and counted; 0: unlimited (default %(default)s)")
    run.add_argument("--max-bytes-per-flow", type=count(0, (1 << 64) - 1),
                     default=env("MIRROR_MAX_BYTES_PER_FLOW", str(1 << 20)), metavar="N",
                     help="the same in bytes: a packet that would take a connection's clones "
                     "past N bytes is skipped, and so is the rest; 0: unlimited "
                     "(default %(default)s)")
    run.add_argument("--max-clones-per-second", type=count(0, (1 << 32) - 1),
                     default=env("MIRROR_MAX_CLONES_PER_SECOND", "10000"), metavar="N",
                     help="clone at most N packets per second on each CPU, whatever the "
                     "connection; the rest is skipped and counted; 0: unlimited (default "
                     "%(default)s)")
    run.add_argument("--max-events-per-second", type=count(0, (1 << 32) - 1),
                     default=env("MIRROR_MAX_EVENTS_PER_SECOND",
                                 str(DEFAULT_MAX_EVENTS_PER_SECOND)), metavar="N",
                     help="hand at most N error events a second to user space on each CPU; "
                     "the rest are counted (mirror_events_suppressed_total) and every error "
                     "still counts in mirror_error_responses_total; 0: unlimited (default "
                     "%(default)s)")
    run.add_argument("--max-events-per-connection", type=count(0, (1 << 32) - 1),
                     default=env("MIRROR_MAX_EVENTS_PER_CONNECTION",
                                 str(DEFAULT_MAX_EVENTS_PER_CONN)), metavar="N",
                     help="at most N error events for one connection, the same way; 0: "
                     "unlimited (default %(default)s)")
    run.add_argument("--events-file", default=env("MIRROR_EVENTS_FILE"), metavar="PATH",
                     type=text_checked(path_text),
                     help="append one JSON line per error response to PATH (mode 0600, 0640 "
                     "with --events-group; rotated to PATH.1 past --events-file-mb); '-': "
                     "standard output (default: off; `mirror events` works either way)")
    run.add_argument("--events-group", default=env("MIRROR_EVENTS_GROUP"), metavar="GROUP",
                     help="share the events file with this group (a name or a gid): mode "
                     "0640 and that group's, so that the capture sidecar, running as another "
                     "user in it, can read it (`mirror capture --events-file`); the "
                     "controller must be a member of the group, or have CAP_CHOWN "
                     "(default: none, mode 0600)")
    run.add_argument("--events-file-mb", type=count(1, 1 << 20),
                     default=env("MIRROR_EVENTS_FILE_MB", "16"), metavar="MB",
                     help="rotate the events file past this size (default %(default)s)")
    run.add_argument("--metrics-addr", default=env("MIRROR_METRICS_ADDR"), metavar="HOST:PORT",
                     type=text_checked(parse_metrics_addr),
                     help="serve Prometheus metrics here (default: off)")
    run.add_argument("--config", default=env("MIRROR_CONFIG"), metavar="FILE",
                     type=text_checked(path_text),
                     help="file with 'trigger = SPEC' and/or 'idle_timeout = SECONDS' lines, "
                     "applied at start (over the flags) and re-read on SIGHUP")
    run.set_defaults(func=cmd_run, env_ifaces=env_ifaces, env_exclude=env_exclude)

    st = sub.add_parser("status", help="what is attached where, by a live or a stale controller")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=cmd_status)

    fl = sub.add_parser("flows", help="marked flows now in the map of running controllers")
    fl.add_argument("--json", action="store_true", help="machine-readable output")
    fl.set_defaults(func=cmd_flows)

    ev = sub.add_parser("events", help="recent error responses of running controllers, "
                        "with the request that got them",
                        description="Error events of the running controllers: time, "
                        "interface, client, server, method, target, host, status and response "
                        "time of each error response (the last 1000 per controller).",
                        epilog=EPILOG_EVENTS, formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("--follow", "-f", action="store_true",
                    help="keep printing new events until interrupted")
    ev.add_argument("--json", action="store_true", help="JSON lines (what --events-file holds)")
    ev.add_argument("--file", metavar="PATH",
                    help="read an events file (what `mirror run --events-file PATH` writes; "
                    "PATH.1 first), not the running controllers; '-': standard input")
    add_workload_selectors(ev, "", "events")
    ev.add_argument("--iface", action="append", metavar="PATTERN",
                    help="events seen on an interface matching this")
    ev.add_argument("--status", metavar="CODES",
                    help="events with one of these statuses: 500, 5xx, 500-504, grpc:14, "
                    "grpc-error (comma-separated)")
    ev.add_argument("--since", metavar="TIME",
                    help="events at or after TIME: RFC 3339, epoch seconds, or a time "
                    "before now (10m)")
    ev.add_argument("--until", metavar="TIME", help="events at or before TIME (as --since)")
    ev.add_argument("--community-id", metavar="ID",
                    help="events of the connection with this Community ID (1:...)")
    ev.set_defaults(func=cmd_events)

    de = sub.add_parser("detach", help="remove this tool's hooks (only those) from an interface",
                        description="Remove this tool's filters from IF, and the qdiscs a "
                        "stopped controller recorded as its own. Other tools' qdiscs and "
                        "filters are never touched. Refuses while a live controller owns IF.")
    de.add_argument("--iface", action="append", required=True, metavar="IF",
                    type=text_checked(iface_name))
    de.set_defaults(func=cmd_detach)

    add_lab(sub)
    add_capture(sub)
    add_cni(sub)
    return p


def _require_root() -> None:
    from .privileges import require
    require("this command (tc state, the controllers' state directory)", ("CAP_NET_ADMIN",))


def cmd_run(args) -> int:
    from .controller import Controller
    from .options import Options
    flags = Options(ifaces=args.iface or args.env_ifaces, debug_iface=args.debug_iface,
                   trigger=args.trigger, hook=args.hook, idle_timeout=args.idle_timeout,
                   max_flows=args.max_flows, metrics_addr=args.metrics_addr,
                   config=args.config, request_bytes=int(args.request_bytes),
                   events_file=args.events_file,
                   events_file_bytes=int(args.events_file_mb) << 20,
                   events_group=args.events_group,
                   exclude=args.exclude or args.env_exclude, max_ifaces=args.max_ifaces,
                   max_packets_per_flow=int(args.max_packets_per_flow),
                   max_bytes_per_flow=int(args.max_bytes_per_flow),
                   max_clones_per_second=int(args.max_clones_per_second),
                   max_events_per_second=int(args.max_events_per_second),
                   max_events_per_connection=int(args.max_events_per_connection))
    ctl = Controller(flags)
    try:
        indexes = ctl.preflight()
        server = None
        if ctl.opts.metrics_addr:
            from .metrics import MapCollector
            server = serve_metrics(MapCollector(ctl), ctl.opts.metrics_addr)
    except BaseException:
        ctl.close()         # nothing was added yet: this only releases its sockets
        raise

    # Event.set() takes the event's lock, which the interrupted main thread may hold
    # (a signal landing inside Event.wait deadlocks the handler against its own thread:
    # seen as a controller that never stopped on SIGTERM): set it from a thread of its
    # own, never from the handler.
    def on_stop(signum, frame):
        threading.Thread(target=ctl.stop_event.set, name="stop", daemon=True).start()

    def on_hup(signum, frame):
        threading.Thread(target=ctl.reload_event.set, name="reload", daemon=True).start()
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    try:
        ctl.start(indexes)
        print(f"mirror: ready, pid {os.getpid()}", flush=True)
        ctl.run()
    finally:
        ctl.close()
        if server:
            server[0].shutdown()
    log.info("stopped")
    return 0


def cmd_status(args) -> int:
    """Exit status 0 when no hook of this tool is without a running controller, 3 when
    some are (stale: a controller was killed), so that a script can tell."""
    _require_root()
    from .status import collect, has_stale_hooks, render
    report = collect()
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 3 if has_stale_hooks(report) else 0


def cmd_flows(args) -> int:
    _require_root()
    from .flows import collect_flows, render_flows
    from .status import no_controller_note
    flows = collect_flows()
    note = no_controller_note()
    if args.json:
        print(json.dumps(flows, indent=2))
        if note:
            print(f"mirror: {note}", file=sys.stderr)
    else:
        print(note or render_flows(flows))
    return 0


def cmd_events(args) -> int:
    from .filters import event_filter
    flt = event_filter(namespace=args.namespace, pod=args.pod, container=args.container,
                       iface=args.iface, status=args.status, since=args.since,
                       until=args.until, community_id=args.community_id)
    if args.file:
        # The file needs only the right to read it: no controller is asked.
        from .events.tail import read_events_file
        return read_events_file(args.file, args.follow, args.json, flt)
    _require_root()
    from .events.follow import follow_events
    return follow_events(args.follow, args.json, flt)


def cmd_detach(args) -> int:
    _require_root()
    from .detach import detach
    return detach(args.iface)


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:       # a wrong value from the environment (cliutil.checked)
        print(f"mirror: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="mirror: %(message)s", stream=sys.stderr)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"mirror: error: {exc}", file=sys.stderr)
        return 2
    except NetlinkError as exc:
        print(f"mirror: error: the kernel refused a netlink request: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`mirror events --json | head -3`): it has what it wanted.
        # Nothing more may reach the closed pipe, not even the flush at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        print(f"mirror: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
