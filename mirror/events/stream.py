"""The reader of the classifier's `events` ring buffer: one thread that keeps the recent
events for `mirror events` and hands each to the events file and the request-frame writer.

The kernel bounds the events (per CPU and second, per connection) and counts every error
response itself (the metrics read its `errors` map), so this thread's work per second is
bounded however many errors there are; what it does per event is kept small."""
from __future__ import annotations

import collections
import json
import logging
import threading
import time

from .file import EventsFile
from .frames import RequestWriter
from .record import Event

log = logging.getLogger("mirror")

RECENT = 1000                           # events kept for `mirror events`
# A follower asks twice a second (mirror.events.follow); one that asked in the last few
# seconds is waiting for this controller's last events when it stops, and is given up
# to FAREWELL_SECONDS to ask for them before the control socket closes.
FOLLOWER_ACTIVE_SECONDS = 3.0
FAREWELL_SECONDS = 2.0


class EventStream:
    """Reads the classifier's ring buffer in a thread and hands each event on."""

    def __init__(self, classifier, ifname_of, debug_ifindex, events_file: EventsFile | None,
                 budget: dict | None = None, workload_of=lambda ifindex: {}):
        """`classifier`: whose `events` ring buffer to read (mirror.bpfprog.Classifier);
        `ifname_of(ifindex)` names an interface; `debug_ifindex()` is where request frames
        go (0: nowhere); `budget`: the budgets in force, copied into every event;
        `workload_of(ifindex)`: the workload's attributes (mirror.workload), asked when
        the event is read, so that it carries the answer as soon as there is one."""
        self.workload_of = workload_of
        self.classifier = classifier
        self.ifname_of = ifname_of
        self.debug_ifindex = debug_ifindex
        self.file = events_file
        self.budget = budget
        self.writer = RequestWriter()
        self.recent: collections.deque = collections.deque(maxlen=RECENT)
        self.seq = 0
        self._polling = False
        self.errors = 0                 # records that could not be handled
        self.realtime_offset_ns = time.time_ns() - time.monotonic_ns()
        self._names: dict[int, tuple[str, float]] = {}     # ifindex -> (name, when asked)
        self._lock = threading.Lock()
        self._farewell = threading.Condition(self._lock)
        # follower -> (when it last asked, whether that answer said `stopping`)
        self._followers: dict[str, tuple[float, bool]] = {}
        self._stop = threading.Event()
        self._closed = False            # read no more: the events kept are the last ones
        self._thread: threading.Thread | None = None

    def start(self) -> "EventStream":
        self.classifier.on_events(self._on_record)
        self._thread = threading.Thread(target=self._poll, name="events", daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            # The frames of one poll's events go out together, once it returns.
            self._polling = True
            try:
                self.classifier.poll_events(100)
            finally:
                self._polling = False
            self.writer.flush()

    def _on_record(self, raw: bytes) -> None:
        try:
            self.handle(raw)
        except Exception as exc:        # one bad record must not stop the stream
            self.errors += 1
            log.error("error event dropped: %s", exc)

    def handle(self, raw: bytes) -> Event:
        """Keeps an event; its JSON object is built only when someone reads it (the events
        file, `mirror events`). Its request frame is queued, and written at the end of
        the poll that brought it (or at once when called outside a poll)."""
        ev = Event.from_record(raw)
        iface = self._ifname(ev.ifindex)
        # A response whose clone a budget skipped (the rate, or a byte budget smaller
        # than the response's packet) goes without its request frame too: the
        # capture would hold a request with no answer, and the frames written from
        # here stay bounded by the clone rate in an error storm.
        if ev.request and ev.new_flow and not ev.cut:
            ifindex = self.debug_ifindex()
            if ifindex:
                # Cut frames go out as cut, their IP lengths kept (as `tcpdump -s` cuts):
                # the sidecar marks the record's original length when it reorders, and
                # tshark then takes it for a frame cut at capture, dissectable.
                self.writer.write(ev.request, ifindex)
        # Written before it is counted: a reader that waits for the count of events
        # read (the lab, the tests) then finds the line in the file.
        if self.file:
            self.file.write(json.dumps(self.render(ev, iface), separators=(", ", ": ")))
        with self._lock:
            self.seq += 1
            self.recent.append((self.seq, ev, iface))
        if not self._polling:
            self.writer.flush()
        return ev

    def _ifname(self, ifindex: int) -> str:
        """The interface's name, asked of the controller at most once a second per
        ifindex (a rename shows within a second)."""
        now = time.monotonic()
        cached = self._names.get(ifindex)
        if cached and now - cached[1] < 1.0:
            return cached[0]
        name = self.ifname_of(ifindex) or f"ifindex{ifindex}"
        self._names[ifindex] = (name, now)
        return name

    def render(self, ev: Event, iface: str) -> dict:
        return ev.to_json(iface, self.realtime_offset_ns, self.budget,
                          self.workload_of(ev.ifindex))

    def since(self, seq: int) -> list[dict]:
        """Recent events after `seq`, each with its sequence number."""
        return self.window(seq)["events"]

    def window(self, seq: int, follower: str = "") -> dict:
        """What a follower (`mirror events --follow`) needs to lose nothing silently: the
        recent events after `seq` (each with its sequence number), the first sequence
        number still kept (`first`: a follower at `seq` missed first - seq - 1 events when
        that is above 0, pushed out of the RECENT kept before it asked), the last one
        handed out (`last`), and `stopping` once the stream is closed: these are then
        its last events. `follower` names the asker, so that close() can wait for it."""
        with self._lock:
            first = self.recent[0][0] if self.recent else self.seq + 1
            last = self.seq
            kept = [(s, ev, iface) for s, ev, iface in self.recent if s > seq]
            stopping = self._closed
            if follower:
                now = time.monotonic()
                for gone in [f for f, (asked, _) in self._followers.items()
                             if now - asked > FOLLOWER_ACTIVE_SECONDS]:
                    del self._followers[gone]
                self._followers[follower] = (now, stopping)
                if stopping:
                    self._farewell.notify_all()
        return {"events": [dict(self.render(ev, iface), seq=s) for s, ev, iface in kept],
                "first": first, "last": last, "kept": RECENT, "stopping": stopping}

    def farewell(self, timeout: float = FAREWELL_SECONDS) -> int:
        """After close(): waits, at most `timeout` seconds, until every follower that asked
        in the last FOLLOWER_ACTIVE_SECONDS has asked again and so has the last events and
        the word that there are no more (a follower that stopped asking is not waited
        for past the timeout). Returns how many followers were still owed an answer."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                now = time.monotonic()
                owed = [f for f, (asked, told) in self._followers.items()
                        if not told and now - asked < FOLLOWER_ACTIVE_SECONDS]
                if not owed or now >= deadline:
                    return len(owed)
                self._farewell.wait(deadline - now)

    def close(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(2)
        self.classifier.on_events(None)
        with self._lock:
            self._closed = True
        self.writer.close()
        if self.file:
            self.file.close()
