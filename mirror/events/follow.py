"""`mirror events`: the recent error events of the running controllers of this network
namespace, asked over their control sockets, filtered (mirror.filters), printed as lines
or as JSON (one object per line, what --events-file holds).

With --follow nothing is lost silently. Each controller numbers its events and keeps the
last RECENT (mirror.events.stream); the follower asks for what came after the last number
it got, so that every event is printed once, and when the controller has already pushed
some out of what it keeps (a follower that fell behind: a stopped terminal, a slow pipe,
a burst of more than RECENT between two questions), it says on standard error how many
it missed and why. It says too when the kernel kept error responses from becoming events
(its ring buffer full, or its bounds: the metrics count them all). A controller that
stops cleanly waits for its followers to ask once more (EventStream.farewell) and tells
them it is the end: the follower prints those last events, says "controller PID
stopped", and ends with status 0 once no followed controller runs. One that vanishes
without that word (killed) is said too, with status 1: what it emitted after the last
event asked for may be missing. A controller that starts while followed is followed
from its first event."""
from __future__ import annotations

import json
import secrets
import sys
import time
from dataclasses import dataclass, field

from .. import ownership
from ..cliutil import printable
from ..ctlsocket import ask
from ..filters import EventFilter
from ..status import no_controller_note
from ..workload.model import HOST, Workload

POLL_SECONDS = 0.5


def render_event(e: dict) -> str:
    """One line for a terminal. What came from the network (target, host, method), the
    interface name and the workload's names are escaped (mirror.cliutil.printable): an
    ESC or CR in a request must not drive the terminal or fake a line. A gRPC status is
    written as the trigger and the metrics write it (grpc:14)."""
    took = (f"{e['response_seconds'] * 1e3:.1f} ms"
            if isinstance(e.get("response_seconds"), (int, float)) else "-")
    request = (f"{printable(e['method'])} {printable(e.get('target'))}" if e.get("method")
               else "(request not seen)")
    host = f" host {printable(e['host'])}" if e.get("host") else ""
    status = f"grpc:{e.get('status')}" if e.get("proto") == "grpc" else e.get("status")
    return (f"{printable(e.get('time'))}  {printable(e.get('iface'))}{workload_text(e)}  "
            f"{printable(status)}  {request}{host}  {took}  {printable(e.get('client'))} -> "
            f"{printable(e.get('server'))}")


def workload_text(e: dict) -> str:
    """" ns/pod (containers)", " docker:name", " netns:NAME" after the interface; nothing
    for a host interface or an event without workload attributes."""
    w = Workload.from_attributes(e)
    return "" if w.runtime == HOST else f" {printable(w.describe())}"


def print_event(e: dict, as_json: bool) -> None:
    print(json.dumps(e) if as_json else render_event(e), flush=True)


def note(text: str) -> None:
    """What is said about the stream, never in it: standard error."""
    print(f"mirror: {text}", file=sys.stderr, flush=True)


@dataclass
class Followed:
    """What the follower knows of one controller."""
    pid: int
    seq: int = 0                        # the last event number handed out to us
    asked: bool = False                 # an answer came (numbers after it are gaps)
    kernel: tuple[int, int] | None = None   # (lost, held back) at the last answer
    silent: bool = False                # its last question went unanswered (said once)


@dataclass
class Follower:
    """Asks the running controllers of this network namespace for their events, one
    round at a time (round()), and prints those that match."""
    flt: EventFilter
    as_json: bool
    follow: bool
    controllers: dict[str, Followed] = field(default_factory=dict)
    started: bool = False               # the first round is over
    followed_any: bool = False          # a controller was followed (and so can stop)
    killed: int = 0                     # controllers that vanished without a farewell
    token: str = field(default_factory=lambda: secrets.token_hex(8))

    def round(self) -> int:
        """Asks every running controller once and prints what matches; returns how many
        controllers are still followed."""
        running = {rec["id"]: rec for rec in ownership.live_controllers()}
        for gone in [cid for cid in self.controllers if cid not in running]:
            self._vanished(gone)
        batch = []
        for cid, rec in running.items():
            batch += self._ask(cid, rec)
        for e in sorted(batch, key=lambda e: (e.get("time_unix") or 0, e.get("time", ""))):
            e.pop("seq", None)
            print_event(e, self.as_json)
        self.started = True
        return len(self.controllers)

    def _ask(self, cid: str, rec: dict) -> list[dict]:
        known = self.controllers.get(cid)
        if known is None:
            known = self.controllers[cid] = Followed(rec.get("pid"))
            self.followed_any = True
            if self.started:
                note(f"controller {known.pid} started; following it")
                known.asked = True      # every event it numbered is one to show
        try:
            answer = ask(ownership.socket_path(cid), f"window {known.seq} {self.token}")
        except OSError as exc:
            # A controller between its lock and its socket (starting), or one that just
            # closed its socket: the next round tells. Said once while it lasts.
            if ownership.is_held(f"controller-{cid}") and not known.silent:
                known.silent = True
                note(f"controller {known.pid} did not answer: {exc}")
            return []
        if not isinstance(answer, dict) or not isinstance(answer.get("events"), list):
            if not known.silent:
                known.silent = True
                note(f"controller {known.pid} gave no events: "
                     f"{answer.get('error') if isinstance(answer, dict) else answer}")
            return []
        known.silent = False
        self._gaps(known, answer)
        known.seq = max(known.seq, int(answer.get("last", known.seq)))
        known.asked = True
        if answer.get("stopping"):
            self.controllers.pop(cid, None)
            if self.follow:
                note(f"controller {known.pid} stopped")
        return [e for e in answer["events"] if isinstance(e, dict) and self.flt.matches(e)]

    def _gaps(self, known: Followed, answer: dict) -> None:
        """Says what this follower did not get since its last question: events pushed out
        of the controller's recent ones, error responses the kernel did not hand over."""
        first = int(answer.get("first", known.seq + 1))
        if known.asked and first > known.seq + 1:
            note(f"{first - known.seq - 1} events of controller {known.pid} missed: they "
                 f"left the {answer.get('kept')} it keeps before they were asked for (this "
                 "follower fell behind; --events-file keeps every one)")
        kernel = (int(answer.get("kernel_lost", 0)), int(answer.get("kernel_held", 0)))
        if known.kernel is not None and self.follow:
            lost, held = (now - before for now, before in zip(kernel, known.kernel))
            if lost > 0:
                note(f"{lost} error responses on controller {known.pid} became no event: "
                     "its ring buffer from the kernel was full (mirror_events_lost_total)")
            if held > 0:
                note(f"{held} error responses on controller {known.pid} became no event: "
                     "held back by --max-events-per-second or --max-events-per-connection "
                     "(mirror_events_suppressed_total; every error still counts in "
                     "mirror_error_responses_total)")
        known.kernel = kernel

    def _vanished(self, cid: str) -> None:
        """A followed controller that is no longer running and never said it stopped."""
        known = self.controllers.pop(cid)
        self.killed += 1
        cleaned = ownership.read("controller", cid) is None
        note(f"controller {known.pid} stopped "
             + ("before this follower asked for its last events"
                if cleaned else "without cleaning up (killed?)")
             + f": events it emitted after #{known.seq} may be missing "
               "(--events-file keeps every one)")


def follow_events(follow: bool, as_json: bool, flt: EventFilter = EventFilter()) -> int:
    """Prints the running controllers' recent events that match `flt` (and, with `follow`,
    new ones as they come, asking twice a second). No running controller is a state, not
    an error: it is said (on standard error with --json, which stays JSON lines) and the
    exit status is 0; a follower waits for one. A follower ends when every controller it
    followed has stopped: status 0 when each said so, 1 when one vanished (killed)."""
    follower = Follower(flt, as_json, follow)
    if not follower.round() and not follower.followed_any:
        text = no_controller_note() or "no running controller in this network namespace"
        if follow:
            text += "; waiting for one to start"
        print(f"mirror: {text}" if as_json or follow else text,
              file=sys.stderr if as_json or follow else sys.stdout, flush=True)
    while follow:
        if follower.followed_any and not follower.controllers:
            break
        time.sleep(POLL_SECONDS)
        follower.round()
    return 1 if follower.killed else 0
