"""`mirror events`: the recent error events of the running controllers of this network
namespace, asked over their control sockets, printed as lines or as JSON."""
from __future__ import annotations

import json
import sys
import time

from .. import ownership
from ..ctlsocket import ask


def render_event(e: dict) -> str:
    took = (f"{e['response_seconds'] * 1e3:.1f} ms" if e.get("response_seconds") is not None
            else "-")
    request = f"{e['method']} {e['target']}" if e.get("method") else "(request not seen)"
    host = f" host {e['host']}" if e.get("host") else ""
    return (f"{e['time']}  {e['iface']}  {e['status']}  {request}{host}  {took}  "
            f"{e['client']} -> {e['server']}")


def follow_events(follow: bool, as_json: bool) -> int:
    """Prints the running controllers' recent events (and, with `follow`, new ones as
    they come, asking twice a second)."""
    seen: dict[str, int] = {}
    while True:
        controllers = ownership.live_controllers()
        if not controllers and not follow:
            print("no running controller in this network namespace", file=sys.stderr)
            return 1
        batch = []
        for rec in controllers:
            try:
                got = ask(rec["socket"], f"events {seen.get(rec['id'], 0)}")
            except OSError as exc:
                print(f"mirror: controller {rec['pid']} did not answer: {exc}", file=sys.stderr)
                continue
            if got:
                seen[rec["id"]] = got[-1]["seq"]
            batch += got
        for e in sorted(batch, key=lambda e: e["time"]):
            e.pop("seq", None)
            print(json.dumps(e) if as_json else render_event(e), flush=True)
        if not follow:
            return 0
        time.sleep(0.5)
