"""Marked flows: the JSON a controller serves for them (`flows` on its control socket)
and `mirror flows`, which asks every running controller and prints them."""
from __future__ import annotations

import sys
import time

from . import ownership
from .ctlsocket import ask
from .cliutil import table
from .flowkey import endpoint


def flows_json(flows: dict) -> list[dict]:
    """The rows of `mirror flows --json`, from mirror.bpfprog.Classifier.flows()."""
    now = time.monotonic_ns()
    out = []
    for key, v in sorted(flows.items()):
        out.append({"family": key.family, "a": key.addr_lo, "a_port": key.port_lo,
                    "b": key.addr_hi, "b_port": key.port_hi, "status": v["status"],
                    "packets": v["packets"], "bytes": v["bytes"],
                    "age_s": round((now - v["first_ns"]) / 1e9, 3) if v["first_ns"] else None,
                    "idle_s": round((now - v["last_ns"]) / 1e9, 3) if v["last_ns"] else None,
                    "cpus": v["cpus"], "cpu_packets": v["cpu_packets"],
                    "cut": v["cut"]})
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
    rows = [("FLOW", "STATUS", "PACKETS", "BYTES", "AGE s", "IDLE s", "CAPTURE")]
    for f in flows:
        flow = f"{endpoint(f['a'], f['a_port'])} <-> {endpoint(f['b'], f['b_port'])}"
        cut = f.get("cut") or []
        rows.append((flow, str(f["status"] or "-"),
                     str(f["packets"]), str(f["bytes"]), str(f["age_s"]), str(f["idle_s"]),
                     f"cut: {','.join(cut)}" if cut else "whole"))
    lines = table(rows)
    cut = sum(1 for f in flows if f.get("cut"))
    if cut:
        lines.append(f"{cut} of {len(flows)} flows: capture cut by a budget (flow_packets, "
                     "flow_bytes: the rest of the connection skipped; cpu_rate: packets "
                     "skipped while a CPU's clones per second were spent)")
    return "\n".join(lines)
