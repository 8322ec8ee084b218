"""`mirror capture`: the command line of the capture sidecar, and its other modes:
`--list` (the index of error flows as a table), `-w FILE` (a recording of the debug
interface with each request before its response: mirror.capture.record) and `--extract`
(the connections of the ring that match, into one file: mirror.capture.extract). What
the sidecar does is in mirror.capture.sidecar.

Every refusal is one line and exit status 2, before anything is created: options of
another mode (`--list --file-size 3`), values out of bounds (flag or environment
variable, named as given), a directory that is not there to list, a corrupt index."""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from ..cliutil import (add_workload_selectors, count, env, positive_seconds, printable,
                       serve_metrics)
from ..errors import UsageError
from ..filters import WorkloadPatterns

from .index import CorruptIndex, read_index, rotated
from .sidecar import INDEX_NAME, STATUS_NAME, CaptureSidecar, Options

log = logging.getLogger("mirror")

DESCRIPTION = ("The capture sidecar. Records the debug interface with tcpdump into a bounded "
               "ring of pcap files and indexes the error flows it recorded. With -w, records "
               "the debug interface into one pcapng file (or a pipe) instead, each request "
               "before its response; with --extract, writes the connections of the ring "
               "that match into one pcapng file.")

EPILOG = """\
examples:
  mirror capture --iface mirror0 --dir /var/lib/mirror/captures
  mirror capture --file-size 10 --files 20 --metrics-addr 0.0.0.0:9465
  mirror capture --list --dir /var/lib/mirror/captures     # the index as a table
  mirror capture -w errors.pcapng                 # record mirror0 until Ctrl-C
  mirror capture -w - | wireshark -k -i -         # live, into Wireshark
  mirror capture --extract --community-id '1:LQU9qZlK+B5F3KDmev6m5PMibrg=' -w one.pcapng
  mirror capture --extract --status 5xx --since 2025-01-01T12:00:00Z -w errors.pcapng
  mirror capture --extract -n shop --pod 'checkout-*' --since 15m -w checkout.pcapng
  tshark -r errors.pcapng -Y http.response_for.uri -T fields -e http.response.code \\
      -e http.response_for.uri -e frame.comment   # h2c: add -d tcp.port==8080,http2

environment (for containers; flags win): MIRROR_CAPTURE_IFACE (else MIRROR_DEBUG_IFACE),
MIRROR_CAPTURE_DIR, MIRROR_CAPTURE_FILE_SIZE, MIRROR_CAPTURE_FILES,
MIRROR_CAPTURE_BUFFER_KIB, MIRROR_CAPTURE_FLOW_IDLE, MIRROR_CAPTURE_METRICS_ADDR,
MIRROR_CAPTURE_EVENTS_FILE.

workload: the sidecar records the debug interface, where every connection looks alike;
the interface and the pod a connection came from are in the controller's events. Given
the controller's events file (--events-file, a file both can read), the sidecar joins it
by Community ID: index rows carry `iface` and the workload's attributes (k8s.pod.name...),
and --extract selects by --namespace/--pod/--container. Without it they stay unnamed.

disk: --files slots of --file-size million bytes: FILES-1 pcaps (each may pass the size
by one packet, 262,160 bytes at most) and the index (index.jsonl and index.jsonl.1, half
a slot each); while a closed pcap is rewritten (its requests put before their
responses), one copy of it besides.
overhead: tcpdump copies each mirrored packet to user space once; nothing else is
captured, because only mirrored packets reach the debug interface.
"""

MAX_FILE_SIZE = 1000        # million bytes: the sidecar holds one closed file in memory
MAX_FILES = 10000
MAX_BUFFER_KIB = 1 << 20    # 1 GiB of kernel capture buffer


class Setting:
    """An option of the sidecar: its flag's value if given, else its environment
    variable's, else the default; parsed and bounded, a bad value named as given."""

    def __init__(self, dest: str, flag: str, env_name: str | None, default: str | None,
                 parse=str, maximum: int | None = None, why_max: str = ""):
        self.dest, self.flag, self.env_name, self.default = dest, flag, env_name, default
        self.parse, self.maximum, self.why_max = parse, maximum, why_max

    def value(self, args):
        given = getattr(args, self.dest)
        source = self.flag
        if given is None:
            text = env(self.env_name) if self.env_name else None
            if text is None:
                text, source = self.default, f"{self.flag} (default)"
            else:
                source = self.env_name
            if text is None:
                return None
            try:
                given = self.parse(text)
            except (argparse.ArgumentTypeError, ValueError) as exc:
                raise UsageError(f"{source}: {exc}") from None
        if self.maximum is not None and given > self.maximum:
            raise UsageError(f"{source}: at most {self.maximum}{self.why_max}, got {given}")
        return given


SIDECAR_SETTINGS = [
    Setting("file_size", "--file-size", "MIRROR_CAPTURE_FILE_SIZE", "50", count(1),
            MAX_FILE_SIZE, " (million bytes: the sidecar holds a closed file in memory)"),
    Setting("files", "--files", "MIRROR_CAPTURE_FILES", "10", count(3), MAX_FILES),
    Setting("buffer_kib", "--buffer-kib", "MIRROR_CAPTURE_BUFFER_KIB", "32768", count(64),
            MAX_BUFFER_KIB),
    Setting("flow_idle", "--flow-idle", "MIRROR_CAPTURE_FLOW_IDLE", "60", positive_seconds),
    Setting("metrics_addr", "--metrics-addr", "MIRROR_CAPTURE_METRICS_ADDR", None),
    Setting("events_file", "--events-file", "MIRROR_CAPTURE_EVENTS_FILE", None),
]
IFACE = Setting("iface", "--iface", "MIRROR_CAPTURE_IFACE", None)
DIR = Setting("dir", "--dir", "MIRROR_CAPTURE_DIR", "/var/lib/mirror/captures")
# The options each mode takes besides --iface/--dir (given on the command line, that is:
# the environment sets the sidecar's and never makes another mode refuse).
MODE_OPTIONS = {
    "sidecar": {"file_size", "files", "buffer_kib", "flow_idle", "metrics_addr", "iface",
                "dir", "events_file"},
    "list": {"dir", "json"},
    "record": {"iface", "buffer_kib", "hold", "write"},
    "extract": {"dir", "write", "community_id", "status", "since", "until", "namespace",
                "pod", "container", "events_file"},
}
OPTION_FLAGS = {"file_size": "--file-size", "files": "--files", "buffer_kib": "--buffer-kib",
                "flow_idle": "--flow-idle", "metrics_addr": "--metrics-addr",
                "iface": "--iface", "dir": "--dir", "json": "--json", "hold": "--hold",
                "write": "-w", "community_id": "--community-id", "status": "--status",
                "since": "--since", "until": "--until", "namespace": "--namespace",
                "pod": "--pod", "container": "--container", "events_file": "--events-file"}
MODE_NAMES = {"sidecar": "the sidecar", "list": "--list", "record": "-w (recording)",
              "extract": "--extract"}


def add_parser(sub) -> None:
    p = sub.add_parser("capture", help="record the debug interface into a ring of pcaps "
                       "and index the error flows (the capture sidecar); record it into one "
                       "pcapng (-w); extract connections from the ring (--extract)",
                       description=DESCRIPTION,
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iface", metavar="IF",
                   help="the debug interface to record (default: MIRROR_CAPTURE_IFACE, else "
                   "MIRROR_DEBUG_IFACE, else mirror0)")
    p.add_argument("--dir", metavar="DIR",
                   help="where the pcaps, index.jsonl and status.json go (default "
                   "/var/lib/mirror/captures)")
    p.add_argument("--file-size", type=count(1), metavar="MB",
                   help="rotate after this many million bytes (tcpdump -C; at most "
                   f"{MAX_FILE_SIZE}; default 50)")
    p.add_argument("--files", type=count(3), metavar="N",
                   help="disk slots of --file-size: N-1 pcap files, the oldest overwritten "
                   "(tcpdump -W), and the index (default 10)")
    p.add_argument("--buffer-kib", type=count(64), metavar="KIB",
                   help="kernel capture buffer (tcpdump -B). tcpdump runs in immediate "
                   "mode, where each packet takes a slot of the interface's largest "
                   "packet, 64 KiB on a veth with offloads: the default rides out a "
                   "backlog of 512 packets (default 32768)")
    p.add_argument("--flow-idle", type=positive_seconds, metavar="SECONDS",
                   help="index a flow not closed by FIN or RST once nothing new of it has "
                   "been read for this long (default 60)")
    p.add_argument("--metrics-addr", metavar="HOST:PORT",
                   help="serve Prometheus metrics here (default: off)")
    p.add_argument("--list", action="store_true",
                   help="print the index of --dir as a table and exit")
    p.add_argument("--json", action="store_true", help="with --list: JSON lines")
    p.add_argument("-w", dest="write", metavar="FILE",
                   help="record the debug interface into FILE (pcapng; '-': standard "
                   "output, for a pipe into Wireshark) until interrupted, each request "
                   "before its response, each connection's interface and error event "
                   "written into it; with --extract: where the extract goes")
    p.add_argument("--hold", type=positive_seconds, metavar="SECONDS",
                   help="with -w: hold each frame this long at most, so that a request the "
                   "controller writes after its response can be put before it (default "
                   "0.5)")
    p.add_argument("--extract", action="store_true",
                   help="write the packets of the ring's connections that match "
                   "--community-id, --status, --since/--until (all that are given) into "
                   "one pcapng file (-w)")
    p.add_argument("--community-id", metavar="ID",
                   help="with --extract: the connection of this Community ID (1:...)")
    p.add_argument("--status", metavar="CODES",
                   help="with --extract: connections that got one of these statuses "
                   "(the trigger's syntax: 500, 5xx, 500-504, grpc:14, comma-separated); "
                   "h2c and gRPC statuses are known from the controller's events "
                   "(--events-file, or the index rows of a sidecar that reads them)")
    p.add_argument("--since", metavar="TIME",
                   help="with --extract: connections with a packet at or after TIME "
                   "(RFC 3339, e.g. 2025-01-01T12:00:00Z, or epoch seconds)")
    p.add_argument("--until", metavar="TIME",
                   help="with --extract: connections with a packet at or before TIME")
    add_workload_selectors(p, "with --extract: ", "connections")
    p.add_argument("--events-file", metavar="PATH",
                   help="the controller's events file (`mirror run --events-file`), joined "
                   "by Community ID: the sidecar's index rows and an extract then name each "
                   "connection's interface and workload (default: "
                   "MIRROR_CAPTURE_EVENTS_FILE for the sidecar; none)")
    p.set_defaults(func=cmd_capture)


def mode_of(args) -> str:
    if args.list and args.extract:
        raise UsageError("--list and --extract are two modes: give one")
    if args.list:
        return "list"
    if args.extract:
        return "extract"
    return "record" if args.write is not None else "sidecar"


def check_options(args, mode: str) -> None:
    """Refuses an option given on the command line that `mode` would ignore."""
    for dest, flag in OPTION_FLAGS.items():
        given = getattr(args, dest)
        if given not in (None, False) and dest not in MODE_OPTIONS[mode]:
            raise UsageError(f"{flag} does not go with {MODE_NAMES[mode]}")
    if mode == "extract" and args.write is None:
        raise UsageError("--extract writes into the file given with -w FILE (or -w -)")


def iface_of(args) -> str:
    return IFACE.value(args) or env("MIRROR_DEBUG_IFACE", "mirror0")


def cmd_capture(args) -> int:
    mode = mode_of(args)
    check_options(args, mode)
    if mode == "list":
        return list_index(Path(DIR.value(args)), as_json=args.json)
    if mode == "record":
        from .record import record_command
        return record_command(iface_of(args), args.write,
                              hold=args.hold if args.hold is not None else 0.5,
                              buffer_kib=SIDECAR_SETTINGS[2].value(args))
    if mode == "extract":
        from .extract import extract_command
        return extract_command(Path(DIR.value(args)), args.write, args.community_id,
                               args.status, args.since, args.until,
                               workload=WorkloadPatterns(tuple(args.namespace or ()),
                                                         tuple(args.pod or ()),
                                                         tuple(args.container or ())),
                               events_file=args.events_file)
    settings = {s.dest: s.value(args) for s in SIDECAR_SETTINGS}
    opts = Options(iface=iface_of(args), dir=Path(DIR.value(args)),
                   file_size=settings["file_size"], files=settings["files"],
                   flow_idle=float(settings["flow_idle"]),
                   buffer_kib=settings["buffer_kib"], metrics_addr=settings["metrics_addr"],
                   events_file=settings["events_file"])
    sidecar = CaptureSidecar(opts)
    sidecar.preflight()
    server = None
    if opts.metrics_addr:
        from .metrics import SidecarCollector
        server = serve_metrics(SidecarCollector(sidecar), opts.metrics_addr)

    # Not in the handler itself: Event.set() and logging take locks the interrupted main
    # thread may hold (see mirror/cli.py, cmd_run).
    def stop(signum):
        log.info("capture: %s received, stopping", signal.Signals(signum).name)
        sidecar.stop_event.set()

    def on_stop(signum, frame):
        threading.Thread(target=stop, args=(signum,), name="stop", daemon=True).start()
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    try:
        sidecar.run()
    finally:
        if server:
            server[0].shutdown()
    return 0


def list_index(directory: Path, as_json: bool = False) -> int:
    if not directory.is_dir():
        raise UsageError(f"no capture directory {directory}: nothing to list (--dir)")
    try:
        records = read_index(directory / INDEX_NAME)
    except CorruptIndex as exc:
        raise UsageError(f"corrupt index: {exc}") from None
    except OSError as exc:
        raise UsageError(f"cannot read the index in {directory}: {exc.strerror}") from None
    if as_json:
        try:
            for r in records:
                print(json.dumps(r, sort_keys=True))
            sys.stdout.flush()
        except BrokenPipeError:
            sys.stdout = None       # the reader left (| head): not an error
        return 0
    try:
        status = json.loads((directory / STATUS_NAME).read_text())
    except (OSError, ValueError):
        status = None
    print(render_index(records, status if isinstance(status, dict) else None, directory))
    return 0


def render_index(records: list[dict], status: dict | None, directory: Path) -> str:
    if not records:
        lines = [f"no flows indexed in {printable(directory / INDEX_NAME)}"]
    else:
        lines = [f"{'first packet (UTC)':26} {'client':24} {'server':24} {'status':7} "
                 f"{'resp ms':>9}  {'request':32} {'host':20} {'later':8} {'pkts':>5} "
                 f"{'bytes':>8}  {'files':8} {'community id':30} requests after the trigger"]
        lines += [_row(r, directory) for r in records]
        lines.append(f"{len(records)} flows; 'request' is the request the error answered "
                     "(resp ms: '-' when the capture cannot tell the time, see the "
                     "controller's error events); 'later' the statuses after it; 'files' "
                     "counts the pcaps holding a flow (present/listed when the ring has "
                     "overwritten some); `mirror capture --extract --community-id ID -w "
                     "FILE` writes a flow's packets into one file")
        if rotated(directory / INDEX_NAME).exists():
            lines.append(f"(older records in {printable(rotated(directory / INDEX_NAME))} "
                         "included; those before it were rotated away)")
    if status:
        s = {k: printable(status.get(k, "?")) for k in
             ("iface", "state", "packets_captured", "packets_dropped_kernel", "files",
              "bytes", "max_files", "file_size_mb")}
        lines.append(f"capture of {s['iface']}: {s['state']}; "
                     f"{s['packets_captured']} packets captured, "
                     f"{s['packets_dropped_kernel']} dropped by kernel; "
                     f"{s['files']} files, {s['bytes']} bytes on disk "
                     f"(at most {s['max_files']} slots of {s['file_size_mb']} MB, the "
                     "index's included)")
    return "\n".join(lines)


def _row(r: dict, directory: Path) -> str:
    """One index record as a table row; records written before a field existed show '-'
    there. Every text from a packet is escaped (printable)."""
    files = r.get("files", [])
    present = sum((directory / Path(f).name).exists() for f in files)
    file_note = f"{present}/{len(files)}" if present < len(files) else str(len(files))
    # gRPC codes as the events write them (grpc:14): grpc-status 14 is no HTTP status.
    codes = ([str(c) for c in r.get("statuses", [])]
             + [f"grpc:{c}" for c in r.get("grpc_statuses", [])])
    if r.get("status") is not None:
        status = f"grpc:{r['status']}" if r.get("proto") == "grpc" else str(r["status"])
    else:
        status = codes[0] if codes else "-"
    if status in codes:
        codes.remove(status)
    seconds = r.get("response_seconds")
    request = printable(f"{r['method']} {r['target']}") if r.get("method") else "-"
    later = ",".join(codes) or "-"
    requests = printable("; ".join(r.get("requests", []))) or "-"
    client, server = printable(r["client"]), printable(r["server"])
    return (f"{printable(r['time'][:26]):26} {client:24} {server:24} {status!s:7} "
            f"{'-' if seconds is None else f'{seconds * 1e3:.3f}':>9}  {_cut(request, 32):32} "
            f"{_cut(printable(r.get('host') or '-'), 20):20} {_cut(later, 8):8} "
            f"{r['packets']:>5} {r['bytes']:>8}  {file_note:8} "
            f"{printable(r.get('community_id', '-')):30} {requests[:60]}")


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "~"
