"""`mirror events`: the recent error events of the running controllers of this network
namespace, asked over their control sockets, printed as lines or as JSON."""
from __future__ import annotations

import json
import sys
import time

from .. import ownership
from ..cliutil import printable
from ..ctlsocket import ask
from ..status import no_controller_note


def render_event(e: dict) -> str:
    """One line for a terminal. What came from the network (target, host, method) and
    the interface name are escaped (mirror.cliutil.printable): an ESC or CR in a request
    must not drive the terminal or fake a line."""
    took = (f"{e['response_seconds'] * 1e3:.1f} ms" if e.get("response_seconds") is not None
            else "-")
    request = (f"{printable(e['method'])} {printable(e['target'])}" if e.get("method")
               else "(request not seen)")
    host = f" host {printable(e['host'])}" if e.get("host") else ""
    return (f"{printable(e['time'])}  {printable(e['iface'])}  {printable(e['status'])}  "
            f"{request}{host}  {took}  {printable(e['client'])} -> {printable(e['server'])}")


def follow_events(follow: bool, as_json: bool) -> int:
    """Prints the running controllers' recent events (and, with `follow`, new ones as
    they come, asking twice a second). No running controller is a state, not an error:
    it is said (on standard error with --json, which stays JSON lines) and the exit
    status is 0."""
    seen: dict[str, int] = {}
    while True:
        controllers = ownership.live_controllers()
        if not controllers and not follow:
            note = no_controller_note()
            print(f"mirror: {note}" if as_json else note,
                  file=sys.stderr if as_json else sys.stdout)
            return 0
        batch = []
        for rec in controllers:
            try:
                got = ask(ownership.socket_path(rec["id"]),
                          f"events {seen.get(rec['id'], 0)}")
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
