"""`mirror capture -w FILE` (and `-w -`, a live pipe into Wireshark): the debug interface
recorded into one pcapng file, each request frame before the error response it got,
each connection's interface and error event written into it.

Why not `tcpdump -w`: the controller writes an error response's request onto the debug
interface after the kernel cloned the response, so a plain recording holds the request
after its response (and the client's ACK): tshark takes it for a spurious
retransmission and pairs no response with a request. Here tcpdump writes its pcap to a
pipe (`-w -`, packet-buffered), and each frame is held (mirror.capture.reorder.Holder)
for at most --hold seconds after it was read (and at most 100,000 frames or 64 MiB):
a request that arrives while the response it answered is held is put before it. The
order is by TCP acknowledgement number, the pairing the file reorder uses (a response
answers the request whose bytes its acknowledgement covers), never by timestamps; the
moved request takes the response's time less 1 us, and its capture time goes into its
comment. Frames are written as their hold ends, so a pipe shows them --hold late.

What goes into the file (mirror.capture.annotate): the interface each connection was
mirrored from and its error event (status, method, target, host, time), asked of the
running controllers of this network namespace (as `mirror events` does, every 0.2 s),
where they know it; a connection whose event is not known when its first frames are
written goes under the debug interface."""
from __future__ import annotations

import collections
import logging
import select
import signal
import threading
import time

from .. import debugif, ownership
from ..ctlsocket import ask
from ..errors import UsageError
from ..flowkey import FlowKey
from .annotate import AnnotatedWriter, event_key, open_output
from .pcap import StreamReader, timestamp_ns
from .reorder import Frame, Holder
from .sidecar import debug_ifindex
from .tcpdump import Tcpdump

log = logging.getLogger("mirror")

MAX_HOLD = 10.0             # seconds: frames are held in memory
EVENT_POLL = 0.2            # seconds between two questions to the controllers
MAX_EVENT_CONNECTIONS = 65536


class EventFeed:
    """The error events of the running controllers, by connection: asked for what is new
    since the last answer. A controller that does not answer costs a warning, once."""

    def __init__(self):
        self.by_key: collections.OrderedDict[FlowKey, list[dict]] = collections.OrderedDict()
        self.seen: dict[str, int] = {}
        self.failed: set[str] = set()
        self.events = 0

    def poll(self) -> None:
        try:
            controllers = ownership.live_controllers()
        except OSError:
            return
        for rec in controllers:
            try:
                got = ask(rec["socket"], f"events {self.seen.get(rec['id'], 0)}", timeout=1)
            except (OSError, ValueError, KeyError) as exc:
                if rec.get("id") not in self.failed:
                    self.failed.add(rec.get("id"))
                    log.warning("capture: controller %s did not answer (%s): its events "
                                "are not in the recording", rec.get("pid"), exc)
                continue
            if not isinstance(got, list) or not got:
                continue
            self.seen[rec["id"]] = got[-1].get("seq", 0)
            for event in got:
                key = event_key(event)
                if key is None:
                    continue
                self.by_key.setdefault(key, []).append(event)
                self.by_key.move_to_end(key)
                self.events += 1
            while len(self.by_key) > MAX_EVENT_CONNECTIONS:
                self.by_key.popitem(last=False)

    def of(self, key: FlowKey) -> list[dict]:
        return self.by_key.get(key, [])


def record_command(iface: str, out_path: str, hold: float, buffer_kib: int) -> int:
    """Checks everything, then records until SIGINT/SIGTERM (or the reader of a pipe
    leaves, or the interface goes away)."""
    debugif.check_name(iface)
    if hold > MAX_HOLD:
        raise UsageError(f"--hold: at most {MAX_HOLD:g} seconds (frames are held in "
                         f"memory), got {hold:g}")
    if debug_ifindex(iface) is None:
        raise UsageError(f"no debug interface {iface}: start `mirror run` (it creates it) "
                         "or give --iface")
    out = open_output(out_path)
    stop = threading.Event()

    def on_stop(signum, frame):
        threading.Thread(target=stop.set, name="stop", daemon=True).start()
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    dump = Tcpdump(iface, "-", buffer_kib=buffer_kib)
    try:
        dump.start()
    except RuntimeError as exc:
        out.close()
        raise UsageError(f"{exc}: tcpdump needs CAP_NET_RAW (and CAP_NET_ADMIN)") from None
    log.info("capture: recording %s into %s (held up to %g s to put requests before their "
             "responses)", iface, "standard output" if out_path == "-" else out_path, hold)
    recorder = Recorder(out, iface, Holder(hold))
    try:
        recorder.run(dump, stop)
    finally:
        dump.stop(timeout=10)
        try:
            out.close()
        except BrokenPipeError:
            pass
    totals = dump.stats
    log.info("capture: %d frames written, %d requests moved before their responses, %d "
             "error events written; tcpdump: %d captured, %d dropped by kernel",
             recorder.writer.frames if recorder.writer else 0, recorder.holder.moved,
             recorder.writer.events_written if recorder.writer else 0,
             totals["captured"], totals["dropped"])
    if recorder.reader.pending:
        log.warning("capture: tcpdump's stream ended inside a record (%d bytes left out)",
                    recorder.reader.pending)
    return 0


class Recorder:
    """tcpdump's pcap stream, through a Holder, into an annotated pcapng stream."""

    def __init__(self, out, iface: str, holder: Holder, events: EventFeed | None = None):
        self.out, self.iface, self.holder = out, iface, holder
        self.events = events or EventFeed()
        self.reader = StreamReader()
        self.writer: AnnotatedWriter | None = None
        self._polled = 0.0

    def run(self, dump: Tcpdump, stop: threading.Event) -> None:
        """Until `stop`, the end of tcpdump's stream, or a reader that went away; then
        tcpdump is stopped, its stream read to its end and every held frame written."""
        pipe = dump.proc.stdout
        try:
            while not stop.is_set():
                if not self._read(pipe, timeout=0.1):
                    break                   # tcpdump exited: the interface went away
                self._poll_events()
                self._release(time.monotonic())
            dump.stop(timeout=10)
            while self._read(pipe, timeout=1.0):
                pass
            self._poll_events(force=True)
            self._release(time.monotonic(), everything=True)
        except BrokenPipeError:
            log.info("capture: the reader of the output went away; stopping")

    def _read(self, pipe, timeout: float) -> bool:
        """Reads what tcpdump wrote; False at the end of its stream."""
        ready, _, _ = select.select([pipe], [], [], timeout)
        if not ready:
            return True
        data = pipe.read1(1 << 20)
        if not data:
            return False
        try:
            records = self.reader.feed(data)
        except ValueError as exc:
            raise UsageError(f"tcpdump's output is not a pcap stream: {exc}") from None
        header, now = self.reader.header, time.monotonic()
        for rec in records:
            self.holder.add(Frame(timestamp_ns(header, rec), rec.frame, rec.orig_len,
                                  header.linktype, arrival=now))
        return True

    def _poll_events(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._polled >= EVENT_POLL:
            self._polled = now
            self.events.poll()

    def _release(self, now: float, everything: bool = False) -> None:
        due = self.holder.due(now, everything)
        if not due:
            if self.writer is None and self.reader.header is not None:
                self._start_writer()
                self.out.flush()
            return
        if self.writer is None:
            self._start_writer()
        for frame in due:
            self.writer.write(frame)
        self.out.flush()

    def _start_writer(self) -> None:
        self.writer = AnnotatedWriter(self.out, self.iface, self.reader.header.linktype,
                                      self.events.of)

