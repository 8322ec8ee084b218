"""Marked flows: the JSON a controller serves for them (`flows` on its control socket)
and `mirror flows`, which asks every running controller and prints them."""
from __future__ import annotations

import sys
import time

from . import ownership
from .abi import MIN_HTTP_STATUS
from .cliutil import printable, table
from .connection import conn_fields
from .ctlsocket import ask
from .events.record import grpc_name
from .workload import Workload


def flows_json(flows: dict, ifname_of=lambda ifindex: None,
               workload_of=lambda ifindex: {}) -> list[dict]:
    """The rows of `mirror flows --json`, from mirror.bpfprog.Classifier.flows(), in the
    connection vocabulary of mirror.connection (and the workload's attributes)."""
    now = time.monotonic_ns()
    out = []
    for key, v in sorted(flows.items()):
        status = v["status"]
        grpc = 0 <= status < MIN_HTTP_STATUS
        out.append({**conn_fields(key, v["client_lo"], ifname_of(v["ifindex"])),
                    **workload_of(v["ifindex"]),
                    "status": status, **({"grpc_status": grpc_name(status)} if grpc else {}),
                    "packets": v["packets"], "bytes": v["bytes"],
                    "age_seconds": round((now - v["first_ns"]) / 1e9, 3) if v["first_ns"]
                    else None,
                    "idle_seconds": round((now - v["last_ns"]) / 1e9, 3) if v["last_ns"]
                    else None,
                    "events": v["events"], "cut": v["cut"]})
    return out


def collect_flows() -> list[dict]:
    flows = []
    for rec in ownership.live_controllers():
        try:
            for f in ask(ownership.socket_path(rec["id"]), "flows"):
                flows.append(dict(f, controller=rec["pid"]))
        except OSError as exc:
            print(f"mirror: controller {rec['pid']} did not answer: {exc}", file=sys.stderr)
    return flows


def render_flows(flows: list[dict]) -> str:
    if not flows:
        return "no marked flows"
    rows = [("CLIENT", "SERVER", "IFACE", "WORKLOAD", "STATUS", "PACKETS", "BYTES", "AGE s",
             "IDLE s", "CAPTURE")]
    for f in flows:
        client, server = (f["client"], f["server"]) if f.get("client") else \
            tuple(f.get("endpoints") or ("?", "?"))
        cut = f.get("cut") or []
        workload = Workload.from_attributes({k: v for k, v in f.items() if "." in k})
        status = f"grpc:{f['status']}" if "grpc_status" in f else str(f["status"] or "-")
        rows.append((printable(client), printable(server), printable(f.get("iface") or "-"),
                     printable(workload.describe()) if workload else "-", status,
                     str(f["packets"]), str(f["bytes"]), str(f["age_seconds"]),
                     str(f["idle_seconds"]), f"cut: {','.join(cut)}" if cut else "whole"))
    lines = table(rows)
    cut = sum(1 for f in flows if f.get("cut"))
    if cut:
        lines.append(f"{cut} of {len(flows)} flows: capture cut by a budget (flow_packets, "
                     "flow_bytes: the rest of the connection skipped; cpu_rate: packets "
                     "skipped while a CPU's clones per second were spent)")
    return "\n".join(lines)
