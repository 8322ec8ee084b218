"""Compiles and loads the classifier with bcc, and reads and writes its maps.

The C sources are found by mirror.abi.bpf_dir(); the layouts, enums and constants both
sides share are in mirror.abi, checked against what bcc compiled at every load."""
from __future__ import annotations

import ctypes
import os
import platform
import time
from pathlib import Path

from . import abi, bpfsys
from .abi import (CONN, COUNTERS, DEFAULT_MAX_EVENTS_PER_CONN, DEFAULT_MAX_FLOWS,
                  DEFAULT_REQUEST_BYTES, DIRECTIONS, ERROR_COUNT_KEY, GRPC_CLASSES,
                  IFACE_SLOTS, IFACE_STATS, KEPT_REQUEST_HEAD, MARKS_CLEARED, MARKS_MADE,
                  RATE_WINDOW_NS, RESPONSE_BUCKETS, STATUS_CLASSES, STATUS_CODES, bpf_dir,
                  conn_slots, cut_reasons, request_capacity, request_slots)
from .bpfsys import TestRun, batch_lookup, possible_cpus, test_run
from .errors import UsageError
from .flowkey import FlowKey

_MARKED = abi.CONN_FLAGS["marked"]
_LAST_NS_WORD = CONN.offset("last_ns") // 8
_FLAGS_AT = CONN.offset("flags")
_CLIENT_KNOWN = abi.CONN_FLAGS["client_known"]
_CLIENT_LO = abi.CONN_FLAGS["client_lo"]
_CLIENT_EGRESS = abi.CONN_FLAGS["client_egress"]


def check_environment() -> None:
    """Raises UsageError unless bcc imports and kernel headers are where bcc looks."""
    try:
        import bcc  # noqa: F401
    except ImportError as exc:
        raise UsageError(
            f"cannot import bcc ({exc}): install Debian's python3-bpfcc and run from a "
            "virtualenv made with --system-site-packages (scripts/setup does both)") from None
    # bcc reads BCC_KERNEL_SOURCE first, then /lib/modules/$(uname -r)/build.
    build = Path(os.environ.get("BCC_KERNEL_SOURCE") or
                 Path("/lib/modules") / platform.release() / "build")
    if not (build / "include").is_dir():
        raise UsageError(
            f"kernel headers missing: {build}/include does not exist; install "
            "linux-headers-amd64 and link it there (scripts/setup does this), or mount the "
            "host's /lib/modules and /usr/src into the container")
    if not (bpf_dir() / "mirror.c").is_file():
        raise UsageError(f"classifier source not found in {bpf_dir()}; set MIRROR_BPF_DIR")


class Classifier:
    """The compiled classifier: two entry points (ingress, egress) over one set of maps."""

    PROG_NAMES = {"ingress": "mirror_ingress", "egress": "mirror_egress"}

    def __init__(self, max_flows: int = DEFAULT_MAX_FLOWS,
                 request_bytes: int = DEFAULT_REQUEST_BYTES, http2: bool = True,
                 src_dir: Path | None = None):
        """`max_flows`: connection slots (rounded up to a power of two); `http2=False`
        compiles the HTTP/2 parser out (what the bench compares against); `src_dir`: the
        sources to compile instead of bpf_dir()'s (the bench's candidate classifier).
        Raises abi.ContractMismatch (a UsageError) when the compiled layouts are not the
        ones mirror.abi states; nothing is attached yet then."""
        from bcc import BPF
        src_dir = Path(src_dir) if src_dir else bpf_dir()
        src = src_dir / "mirror.c"
        self.request_capacity = request_capacity(request_bytes)
        self.conn_slots = conn_slots(max_flows)
        self.max_requests = request_slots(self.conn_slots)
        self.bpf = BPF(src_file=str(src).encode(),
                       cflags=[f"-I{src_dir}", f"-DCONN_SLOTS={self.conn_slots}",
                               f"-DREQUEST_BYTES={self.request_capacity}",
                               f"-DREQUEST_SLOTS={self.max_requests}",
                               f"-DMIRROR_HTTP2={int(http2)}",
                               "-Wno-unused-function"])
        abi.check_tables(self.bpf, self.request_capacity)
        self.progs = {d: self.bpf.load_func(n.encode(), BPF.SCHED_CLS)
                      for d, n in self.PROG_NAMES.items()}
        if http2:
            # The HTTP/2 walk, a program of its own reached by a tail call (bpf/mirror.c).
            self.progs["h2"] = self.bpf.load_func(b"mirror_h2", BPF.SCHED_CLS)
            walk = self.bpf.get_table(b"h2_walk")
            walk[walk.Key(0)] = walk.Leaf(self.progs["h2"].fd)
        self.max_flows = self.conn_slots
        self._conns = self.bpf.get_table(b"conns")
        self._requests = self.bpf.get_table(b"requests")
        self._trigger = self.bpf.get_table(b"trigger")
        self._config = self.bpf.get_table(b"config")
        self._counters = self.bpf.get_table(b"counters")
        self._iface_stats = self.bpf.get_table(b"iface_stats")
        self._errors = self.bpf.get_table(b"errors")
        self._response_time = self.bpf.get_table(b"response_time")
        self._marks = self.bpf.get_table(b"marks")
        self._clone_rate = self.bpf.get_table(b"clone_rate")
        self._event_rate = self.bpf.get_table(b"event_rate")
        self._monitored = self.bpf.get_table(b"monitored")
        self.events = self.bpf.get_table(b"events")
        self._event_handler = None
        self._events_open = False
        self._expired_seen: set[tuple[int, int]] = set()
        # The seed of the connection index: a sender who cannot know it cannot choose
        # 4-tuples that land in another connection's bucket.
        self._set_config(hash_seed=int.from_bytes(os.urandom(4), "little"))
        self.set_request_bytes(request_bytes)
        self.set_budgets()
        self.set_event_limits()

    def fd(self, direction: str) -> int:
        return self.progs[direction].fd

    # --- writing ---------------------------------------------------------------------
    def set_trigger(self, codes: frozenset[int]) -> None:
        """Makes the trigger array hold exactly `codes`; takes effect on the next packet."""
        for code in range(STATUS_CODES):
            want = 1 if code in codes else 0
            key = self._trigger.Key(code)
            if self._trigger[key].value != want:
                self._trigger[key] = ctypes.c_uint8(want)

    def trigger_codes(self) -> frozenset[int]:
        return frozenset(k.value for k, v in self._trigger.items() if v.value)

    def set_debug_ifindex(self, ifindex: int) -> None:
        self._set_config(debug_ifindex=ifindex)

    def set_request_bytes(self, n: int) -> None:
        """How much of a request frame is kept for its connection (0: none)."""
        if not 0 <= n <= self.request_capacity:
            raise ValueError(f"request bytes {n} beyond the compiled {self.request_capacity}")
        self._set_config(request_bytes=n)

    def set_idle_timeout(self, seconds: float) -> None:
        """A marked connection idle this long is unmarked (by the classifier, at its next
        packet; flows() leaves it out from then on). 0: never. The classifier reads the
        coarse clock (a scheduler tick, 1 to 10 ms): idleness is known to that grain."""
        self._set_config(idle_ns=int(seconds * 1e9))

    def set_budgets(self, max_packets_per_flow: int = 0, max_bytes_per_flow: int = 0,
                    max_clones_per_window: int = 0, window_ns: int = RATE_WINDOW_NS) -> None:
        """Per-connection budgets and the per-CPU clone rate, 0: unlimited; take effect on
        the next packet. `window_ns` is the width of the rate windows (clones and events).
        Restarts every CPU's windows, so that a new limit starts from zero."""
        for name, value in (("max_packets_per_flow", max_packets_per_flow),
                            ("max_bytes_per_flow", max_bytes_per_flow),
                            ("max_clones_per_window", max_clones_per_window)):
            if value < 0:
                raise ValueError(f"{name} must be 0 (unlimited) or more, not {value}")
        if window_ns <= 0:
            raise ValueError(f"the rate window must be positive, not {window_ns} ns")
        self._set_config(max_packets_per_flow=max_packets_per_flow,
                         max_bytes_per_flow=max_bytes_per_flow,
                         max_clones_per_window=max_clones_per_window,
                         rate_window_ns=window_ns)
        self.set_clone_window()
        self.set_event_window()

    def set_event_limits(self, per_window: int = 0,
                         per_conn: int = DEFAULT_MAX_EVENTS_PER_CONN) -> None:
        """Events per CPU per rate window and per connection, 0: unlimited. What they
        hold back is counted (events_rate_limited, events_conn_limited), and every error
        response is counted in errors() whatever they do."""
        if per_window < 0 or per_conn < 0:
            raise ValueError("event limits must be 0 (unlimited) or more")
        self._set_config(max_events_per_window=per_window, max_events_per_conn=per_conn)

    def _set_window(self, table, start_ns: int, count: int) -> None:
        key = table.Key(0)
        per_cpu = table[key]
        for w in per_cpu:
            w.start_ns, w.count = start_ns, count
        table[key] = per_cpu

    def set_clone_window(self, start_ns: int = 0, clones: int = 0) -> None:
        """Sets every CPU's clone rate window (tests use it to fill or age a window)."""
        self._set_window(self._clone_rate, start_ns, clones)

    def set_event_window(self, start_ns: int = 0, events: int = 0) -> None:
        self._set_window(self._event_rate, start_ns, events)

    def clone_window(self) -> list[tuple[int, int]]:
        """(start_ns, clones) of each possible CPU's clone rate window."""
        return [(w.start_ns, w.count) for w in self._clone_rate[self._clone_rate.Key(0)]]

    def _set_config(self, **fields) -> None:
        key = self._config.Key(0)
        cfg = self._config[key]
        for name, value in fields.items():
            setattr(cfg, name, value)
        self._config[key] = cfg

    def config(self) -> dict:
        cfg = self._config[self._config.Key(0)]
        return {name: getattr(cfg, name) for name in abi.MIRROR_CONFIG.offsets()}

    def set_monitored(self, ifindex: int, monitored: bool) -> None:
        """Tells the classifier whether `ifindex` carries its hooks: a packet that entered
        through a monitored interface is not counted, cloned or reported again at egress,
        and a monitored lo is handled at its egress only (bpf/mirror.c)."""
        key = self._monitored.Key(ifindex)
        if monitored:
            self._monitored[key] = ctypes.c_uint8(1)
        else:
            try:
                del self._monitored[key]
            except KeyError:
                pass

    def clear(self) -> None:
        """Empties the connection states, kept requests, error counts and counters (tests
        reset state between cases this way)."""
        for table, size in ((self._conns, CONN.size),
                            (self._requests, KEPT_REQUEST_HEAD.size + self.request_capacity)):
            n = table.max_entries
            keys = b"".join(i.to_bytes(4, "little") for i in range(n))
            bpfsys.batch_update(table.map_fd, keys, bytes(size * n), n)
        self._errors.clear()
        self._expired_seen.clear()
        self.note_if_empty()
        self._iface_stats.clear()       # zeroes every slot of the array
        for table, entries in ((self._counters, len(COUNTERS)),
                               (self._response_time, RESPONSE_BUCKETS + 2)):
            zero = table.Leaf(*([0] * len(table.Leaf())))
            for i in range(entries):
                table[table.Key(i)] = zero

    # --- the events ring buffer ------------------------------------------------------
    def on_events(self, handler) -> None:
        """Hands each record of the `events` ring buffer to `handler(raw bytes)` from now
        on (None: drop them). bcc opens a ring buffer once per program, so the buffer is
        opened at the first call and the handler swapped after that (the bench runs
        controller after controller on one classifier)."""
        self._event_handler = handler
        if not self._events_open:
            self.events.open_ring_buffer(self._dispatch_event)
            self._events_open = True

    def _dispatch_event(self, ctx, data, size) -> int:
        handler = self._event_handler
        if handler is not None:
            handler(ctypes.string_at(data, size))
        # an int: bcc converts the callback's result with int() and, for None, raises
        # and catches a TypeError on every record
        return 0

    def poll_events(self, timeout_ms: int) -> None:
        """Waits up to `timeout_ms` for a wakeup, then hands over every record there: the
        classifier wakes the reader at most once per 10 ms per CPU (bpf/mirror.c,
        report_error), so records may be waiting without one."""
        if self._events_open:
            self.bpf.ring_buffer_poll(timeout_ms)
            self.bpf.ring_buffer_consume()

    # --- reading ---------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        return {name: int(self._counters.sum(self._counters.Key(i)).value)
                for i, name in enumerate(COUNTERS)}

    def _conn_slots(self, marked_only: bool = False):
        """Yields (slot, raw struct conn) of the slots that hold a state (with
        `marked_only`, a marked one). The whole array is read in batches; which slots
        are taken is read off strided views of the batch, so that the Python loop runs
        only over the states there are, not over every slot."""
        size = CONN.size
        for keys, values, count in batch_lookup(self._conns.map_fd, 4, size,
                                                per_cpu=False):
            view = memoryview(values)[:count * size]
            last = view.cast("Q")[_LAST_NS_WORD::size // 8]
            flags = view[_FLAGS_AT::size]
            slots = memoryview(keys)[:count * 4].cast("I")
            for i in range(count):
                if last[i] and (not marked_only or flags[i] & _MARKED):
                    yield slots[i], view[i * size:(i + 1) * size]

    @staticmethod
    def _decode_conn(raw) -> dict:
        c = CONN.decode(raw)
        key = c.pop("key")
        del c["hpack"]          # the classifier's own: nothing a flow listing shows
        c["flow"] = FlowKey.from_bytes(key[:40])
        c["ifindex"] = int.from_bytes(key[40:44], "little")
        return c

    def conns(self):
        """Yields (slot, struct conn as a dict with `flow`, a FlowKey, and `ifindex`) for
        every slot that holds a connection's state."""
        for slot, raw in self._conn_slots():
            yield slot, self._decode_conn(raw)

    def _idle_ns(self) -> int:
        return self._config[self._config.Key(0)].idle_ns

    def _marked(self, now_ns: int):
        """(slot, conn) of the marked connections not idle past the idle timeout (the
        classifier unmarks those at their next packet)."""
        idle_ns = self._idle_ns()
        for slot, raw in self._conn_slots(marked_only=True):
            c = self._decode_conn(raw)
            if not (idle_ns and now_ns - c["last_ns"] > idle_ns):
                yield slot, c

    def flows(self, now_ns: int | None = None) -> dict[FlowKey, dict]:
        """The marked connections. A connection seen on several interfaces is one entry
        per interface in the kernel; here the entry of the interface that marked it
        first."""
        now_ns = time.monotonic_ns() if now_ns is None else now_ns
        out: dict[FlowKey, dict] = {}
        for _slot, c in self._marked(now_ns):
            if c["flow"] in out and out[c["flow"]]["first_ns"] <= c["first_ns"]:
                continue
            client_known = bool(c["flags"] & _CLIENT_KNOWN)
            out[c["flow"]] = {
                "packets": c["packets"], "bytes": c["bytes"], "first_ns": c["first_ns"],
                "last_ns": c["last_ns"], "status": c["status"], "ifindex": c["ifindex"],
                "client_lo": bool(c["flags"] & _CLIENT_LO) if client_known else None,
                "cut": cut_reasons(c["cut"]), "events": c["events"]}
        return out

    def flow_count(self, now_ns: int | None = None) -> int:
        now_ns = time.monotonic_ns() if now_ns is None else now_ns
        return sum(1 for _ in self._marked(now_ns))

    def conn_count(self) -> int:
        """Connection states held now (marked or not)."""
        return sum(1 for _ in self.conns())

    def note_if_empty(self) -> bool:
        """Lets the classifier skip the lookups of packets that only ask whether their
        connection is marked: reads the classifier's mark count, then scans the states,
        and if none is marked publishes the count read before the scan (bpf/mirror.h,
        enum marks_index). Returns whether none was."""
        made = self._marks[self._marks.Key(MARKS_MADE)].value
        if self.flow_count():
            return False
        self._marks[self._marks.Key(MARKS_CLEARED)] = ctypes.c_uint64(made)
        return True

    def lookups_skipped(self) -> bool:
        """True while the classifier skips those lookups (no connection is marked)."""
        return (self._marks[self._marks.Key(MARKS_MADE)].value ==
                self._marks[self._marks.Key(MARKS_CLEARED)].value)

    def expire_idle(self, now_ns: int, idle_ns: int) -> int:
        """Marked connections idle past `idle_ns` seen for the first time: the classifier
        unmarks them at their next packet (and never clones another of theirs), so this
        only counts them, once each; nothing is written to the kernel's states, which the
        classifier may be updating at the same moment."""
        expired = 0
        seen_now = set()
        for slot, raw in self._conn_slots(marked_only=True):
            c = CONN.decode(raw)
            if idle_ns and now_ns - c["last_ns"] > idle_ns:
                tag = (slot, c["gen"])
                seen_now.add(tag)
                if tag not in self._expired_seen:
                    expired += 1
        self._expired_seen = seen_now
        return expired

    def kept_requests(self) -> dict[int, dict]:
        """slot -> the request kept for the connection in that slot (what it holds, with
        the bytes), for every kept request whose connection still has it. A map lookup
        copies each entry without the classifier's sequence lock, so what it reads is
        whole only while no packet is being classified (tests; a diagnostic)."""
        conns = dict(self.conns())
        size = KEPT_REQUEST_HEAD.size + self.request_capacity
        out = {}
        for keys, values, count in batch_lookup(self._requests.map_fd, 4, size,
                                                per_cpu=False):
            for i in range(count):
                r = KEPT_REQUEST_HEAD.decode(values, i * size)
                c = conns.get(r["slot"])
                if not r["request_ns"] or r["seq"] & 1 or not c or c["gen"] != r["gen"]:
                    continue
                start = i * size + KEPT_REQUEST_HEAD.size
                r["data"] = values[start:start + r["len"]]
                r["flow"], r["ifindex"] = c["flow"], c["ifindex"]
                out[r["slot"]] = r
        return out

    def errors(self) -> dict[tuple[int, int, str], int]:
        """Error responses counted by the classifier: (ifindex, status, proto) -> count,
        summed over CPUs; proto "h1", "h2" or "grpc" (then status is the grpc-status)."""
        out = {}
        for keys, values, count in batch_lookup(self._errors.map_fd, ERROR_COUNT_KEY.size, 8):
            ncpu = possible_cpus()
            for i in range(count):
                k = ERROR_COUNT_KEY.decode(keys, i * ERROR_COUNT_KEY.size)
                n = sum(int.from_bytes(values[(i * ncpu + c) * 8:(i * ncpu + c + 1) * 8],
                                       "little") for c in range(ncpu))
                proto = abi.APP_PROTOS.get(k["proto"], str(k["proto"]))
                out[(k["ifindex"], k["status"], proto)] = n
        return out

    def response_times(self) -> tuple[list[int], float]:
        """The time from kept requests to their error responses: the count of each
        bucket (upper bounds abi.RESPONSE_BOUNDS_S, then above them) and the sum in
        seconds, over every CPU."""
        sums = [int(self._response_time.sum(self._response_time.Key(i)).value)
                for i in range(RESPONSE_BUCKETS + 2)]
        return sums[:RESPONSE_BUCKETS + 1], sums[RESPONSE_BUCKETS + 1] / 1e9

    def iface_stats(self) -> dict[tuple[int, str], dict]:
        """Per-interface, per-direction statistics summed over CPUs, keyed by
        (ifindex, direction); only interfaces that saw a response or a mirrored packet.
        HTTP/1.x responses count under their class ("5xx"), HTTP/2 ones under "h2_5xx",
        gRPC ones under "grpc_ok" and "grpc_error"."""
        out: dict[tuple[int, str], dict] = {}
        ncpu = possible_cpus()
        for keys, values, count in batch_lookup(self._iface_stats.map_fd, 4, IFACE_STATS.size):
            for i in range(count):
                slot = int.from_bytes(keys[i * 4:i * 4 + 4], "little")
                for c in range(ncpu):
                    v = IFACE_STATS.decode(values, (i * ncpu + c) * IFACE_STATS.size)
                    if not v["ifindex"]:
                        continue        # this CPU's copy of the slot is unused
                    stats = out.setdefault((v["ifindex"], DIRECTIONS[slot & 1]), {
                        **{cls: 0 for cls in STATUS_CLASSES},
                        "mirrored_packets": 0, "mirrored_bytes": 0,
                        **{f"h2_{cls}": 0 for cls in STATUS_CLASSES},
                        **{f"grpc_{cls}": 0 for cls in GRPC_CLASSES}})
                    for j, cls in enumerate(STATUS_CLASSES):
                        stats[cls] += v["responses"][j]
                        stats[f"h2_{cls}"] += v["h2_responses"][j]
                    for j, cls in enumerate(GRPC_CLASSES):
                        stats[f"grpc_{cls}"] += v["grpc_responses"][j]
                    stats["mirrored_packets"] += v["mirrored_packets"]
                    stats["mirrored_bytes"] += v["mirrored_bytes"]
        return out

    def forget_iface(self, ifindex: int) -> None:
        """Frees the interface's statistics slots (on the CPUs where it owns them) and
        its error counts: the series of an interface that is gone leave the metrics."""
        for k in list(self._errors.keys()):
            if k.ifindex == ifindex:
                try:
                    del self._errors[k]
                except KeyError:
                    pass
        for direction in range(len(DIRECTIONS)):
            key = self._iface_stats.Key((ifindex % IFACE_SLOTS) * 2 + direction)
            per_cpu = self._iface_stats[key]
            for v in per_cpu:
                if v.ifindex == ifindex:
                    ctypes.memset(ctypes.addressof(v), 0, ctypes.sizeof(v))
            self._iface_stats[key] = per_cpu

    def test_run(self, direction: str, frame: bytes, repeat: int = 1,
                 ifindex: int = 0, ingress_ifindex: int = 0) -> TestRun:
        """BPF_PROG_TEST_RUN of one entry point; by default on lo (ifindex 1)."""
        ctx = bpfsys.skb_ctx(ifindex, ingress_ifindex) if ifindex or ingress_ifindex else None
        return test_run(self.fd(direction), frame, repeat, ctx)


class Sink:
    """The drop-everything ingress program for the far end of a debug veth."""

    def __init__(self):
        from bcc import BPF
        self.bpf = BPF(src_file=str(bpf_dir() / "sink.c").encode())
        self.prog = self.bpf.load_func(b"sink_drop", BPF.SCHED_CLS)

    @property
    def fd(self) -> int:
        return self.prog.fd
