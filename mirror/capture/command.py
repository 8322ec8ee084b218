"""`mirror capture`: the command line of the capture sidecar, and `--list`, which prints
the index of error flows as a table. What the sidecar does is in mirror.capture.sidecar."""
from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from pathlib import Path

from ..cliutil import count, env, positive_seconds, serve_metrics
from ..flowkey import endpoint
from .index import read_index
from .sidecar import INDEX_NAME, STATUS_NAME, CaptureSidecar, Options

log = logging.getLogger("mirror")

DESCRIPTION = ("The capture sidecar. Records the debug interface with tcpdump into a bounded "
               "ring of pcap files and indexes the error flows it recorded.")

EPILOG = """\
examples:
  mirror capture --iface mirror0 --dir /var/lib/mirror/captures
  mirror capture --file-size 10 --files 20 --metrics-addr 0.0.0.0:9465
  mirror capture --list --dir /var/lib/mirror/captures     # the index as a table
  tcpdump -nr /var/lib/mirror/captures/mirror-20250101T120000Z-r1.pcap03

environment (for containers; flags win): MIRROR_CAPTURE_IFACE (else MIRROR_DEBUG_IFACE),
MIRROR_CAPTURE_DIR, MIRROR_CAPTURE_FILE_SIZE, MIRROR_CAPTURE_FILES,
MIRROR_CAPTURE_BUFFER_KIB, MIRROR_CAPTURE_FLOW_IDLE, MIRROR_CAPTURE_METRICS_ADDR.

disk: at most FILES x (FILE_SIZE million bytes + one packet), plus the index.
overhead: tcpdump copies each mirrored packet to user space once; nothing else is
captured, because only mirrored packets reach the debug interface.
"""


def add_parser(sub) -> None:
    p = sub.add_parser("capture", help="record the debug interface into a ring of pcaps "
                       "and index the error flows (the capture sidecar)",
                       description=DESCRIPTION,
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iface", metavar="IF",
                   default=env("MIRROR_CAPTURE_IFACE", env("MIRROR_DEBUG_IFACE", "mirror0")),
                   help="the debug interface to record (default %(default)s)")
    p.add_argument("--dir", metavar="DIR",
                   default=env("MIRROR_CAPTURE_DIR", "/var/lib/mirror/captures"),
                   help="where the pcaps, index.jsonl and status.json go (default %(default)s)")
    p.add_argument("--file-size", type=count(1), metavar="MB",
                   default=env("MIRROR_CAPTURE_FILE_SIZE", "50"),
                   help="rotate after this many million bytes (tcpdump -C; default "
                   "%(default)s)")
    p.add_argument("--files", type=count(2), metavar="N",
                   default=env("MIRROR_CAPTURE_FILES", "10"),
                   help="keep at most N pcap files, overwriting the oldest (tcpdump -W; "
                   "default %(default)s)")
    p.add_argument("--buffer-kib", type=count(64), metavar="KIB",
                   default=env("MIRROR_CAPTURE_BUFFER_KIB", "32768"),
                   help="kernel capture buffer (tcpdump -B). tcpdump runs in immediate "
                   "mode, where each packet takes a slot of the interface's largest "
                   "packet, 64 KiB on a veth with offloads: the default rides out a "
                   "backlog of 512 packets (default %(default)s)")
    p.add_argument("--flow-idle", type=positive_seconds, metavar="SECONDS",
                   default=env("MIRROR_CAPTURE_FLOW_IDLE", "60"),
                   help="index a flow not closed by FIN or RST once nothing new of it has "
                   "been read for this long (default %(default)s)")
    p.add_argument("--metrics-addr", metavar="HOST:PORT",
                   default=env("MIRROR_CAPTURE_METRICS_ADDR"),
                   help="serve Prometheus metrics here (default: off)")
    p.add_argument("--list", action="store_true",
                   help="print the index of --dir as a table and exit")
    p.add_argument("--json", action="store_true", help="with --list: JSON lines")
    p.set_defaults(func=cmd_capture)


def cmd_capture(args) -> int:
    if args.list:
        return list_index(Path(args.dir), as_json=args.json)
    opts = Options(iface=args.iface, dir=Path(args.dir), file_size=int(args.file_size),
                   files=int(args.files), flow_idle=float(args.flow_idle),
                   buffer_kib=int(args.buffer_kib),
                   metrics_addr=args.metrics_addr)
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
    records = read_index(directory / INDEX_NAME)
    if as_json:
        for r in records:
            print(json.dumps(r, sort_keys=True))
        return 0
    try:
        status = json.loads((directory / STATUS_NAME).read_text())
    except (FileNotFoundError, ValueError):
        status = None
    print(render_index(records, status, directory))
    return 0


def render_index(records: list[dict], status: dict | None, directory: Path) -> str:
    if not records:
        lines = [f"no flows indexed in {directory / INDEX_NAME}"]
    else:
        lines = [f"{'first packet (UTC)':26} {'client':24} {'server':24} {'status':6} "
                 f"{'resp ms':>9}  {'request':32} {'host':20} {'later':8} {'pkts':>5} "
                 f"{'bytes':>8}  {'files':8} requests after the trigger"]
        lines += [_row(r, directory) for r in records]
        lines.append(f"{len(records)} flows; 'request' is the request the error answered "
                     "(resp ms: '-' when the capture cannot tell the time, see the "
                     "controller's error events); 'later' the statuses after it; 'files' "
                     "counts the pcaps holding a flow (present/listed when the ring has "
                     "overwritten some)")
    if status:
        lines.append(f"capture of {status['iface']}: {status['state']}; "
                     f"{status['packets_captured']} packets captured, "
                     f"{status['packets_dropped_kernel']} dropped by kernel; "
                     f"{status['files']} files, {status['bytes']} bytes on disk "
                     f"(at most {status['max_files']} x {status['file_size_mb']} MB)")
    return "\n".join(lines)


def _row(r: dict, directory: Path) -> str:
    """One index record as a table row; records written before the request fields
    existed show '-' there."""
    files = r.get("files", [])
    present = sum((directory / f).exists() for f in files)
    file_note = f"{present}/{len(files)}" if present < len(files) else str(len(files))
    statuses = r.get("statuses", [])
    status = r.get("status") or (statuses[0] if statuses else "-")
    ms = r.get("response_ms")
    request = f"{r['method']} {r['target']}" if r.get("method") else "-"
    later = ",".join(map(str, statuses[1:])) or "-"
    requests = "; ".join(r.get("requests", [])) or "-"
    return (f"{r['first_utc'][:26]:26} {endpoint(r['client'], r['client_port']):24} "
            f"{endpoint(r['server'], r['server_port']):24} {status!s:6} "
            f"{'-' if ms is None else f'{ms:.3f}':>9}  {_cut(request, 32):32} "
            f"{_cut(r.get('host') or '-', 20):20} {_cut(later, 8):8} {r['packets']:>5} "
            f"{r['bytes']:>8}  {file_note:8} {requests[:60]}")


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "~"
