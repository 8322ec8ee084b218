"""Compiles and loads the classifier with bcc, and reads and writes its maps.

The C sources are found by mirror.abi.bpf_dir(); the layouts, enums and constants both
sides share are in mirror.abi, checked against what bcc compiled at every load."""
from __future__ import annotations

import ctypes
import functools
import operator
import os
import platform
from pathlib import Path

from . import abi, bpfsys
from .abi import (CLONE_WINDOW_NS, COUNTERS, DEFAULT_MAX_FLOWS, DEFAULT_REQUEST_BYTES,
                  DIRECTIONS, FLOW_KEY, FLOW_VALUE, GRPC_CLASSES, IFACE_SLOTS, IFACE_STATS,
                  MARKS_CLEARED, MARKS_MADE, STATUS_CLASSES, STATUS_CODES, bpf_dir,
                  cut_reasons, request_capacity, request_slots)
from .bpfsys import TestRun, batch_lookup, possible_cpus, test_run
from .errors import UsageError
from .flowkey import FlowKey


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


_LAST_NS_WORD = FLOW_VALUE.offset("last_ns") // 8


class Classifier:
    """The compiled classifier: two entry points (ingress, egress) over one set of maps."""

    PROG_NAMES = {"ingress": "mirror_ingress", "egress": "mirror_egress"}

    def __init__(self, max_flows: int = DEFAULT_MAX_FLOWS,
                 request_bytes: int = DEFAULT_REQUEST_BYTES, http2: bool = True):
        """`http2=False` compiles the HTTP/2 parser out (what the bench compares against).
        Raises abi.ContractMismatch (a UsageError) when the compiled layouts are not
        the ones mirror.abi states; nothing is attached yet then."""
        from bcc import BPF
        src = bpf_dir() / "mirror.c"
        self.request_capacity = request_capacity(request_bytes)
        self.max_requests = request_slots(max_flows)
        self.bpf = BPF(src_file=str(src).encode(),
                       cflags=[f"-I{bpf_dir()}", f"-DMAX_FLOWS={max_flows}",
                               f"-DREQUEST_BYTES={self.request_capacity}",
                               f"-DMAX_REQUESTS={self.max_requests}",
                               f"-DMIRROR_HTTP2={int(http2)}",
                               "-Wno-unused-function"])
        abi.check_tables(self.bpf, self.request_capacity)
        self.progs = {d: self.bpf.load_func(n.encode(), BPF.SCHED_CLS)
                      for d, n in self.PROG_NAMES.items()}
        self.max_flows = max_flows
        self._flows = self.bpf.get_table(b"flows")
        self._trigger = self.bpf.get_table(b"trigger")
        self._config = self.bpf.get_table(b"config")
        self._counters = self.bpf.get_table(b"counters")
        self._iface_stats = self.bpf.get_table(b"iface_stats")
        self._marks = self.bpf.get_table(b"marks")
        self._requests = self.bpf.get_table(b"requests")
        self._clone_rate = self.bpf.get_table(b"clone_rate")
        self.events = self.bpf.get_table(b"events")
        self._event_handler = None
        self._events_open = False
        self.set_request_bytes(request_bytes)
        self._monitored = self.bpf.get_table(b"monitored")
        self.set_budgets()

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

    def set_request_bytes(self, n: int) -> None:
        """How much of a request frame the snapshot keeps (0: the snapshot is off, and a
        status line counts whichever side sends it)."""
        if not 0 <= n <= self.request_capacity:
            raise ValueError(f"request bytes {n} beyond the compiled {self.request_capacity}")
        self._set_config(request_bytes=n)

    def set_budgets(self, max_packets_per_flow: int = 0, max_bytes_per_flow: int = 0,
                    max_clones_per_window: int = 0, window_ns: int = CLONE_WINDOW_NS) -> None:
        """Per-flow budgets (per flow and CPU) and the per-CPU clone rate, 0: unlimited;
        take effect on the next packet. Restarts every CPU's rate window, so that a new
        limit starts from zero clones."""
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
                         clone_window_ns=window_ns)
        self.set_clone_window()

    def set_clone_window(self, start_ns: int = 0, clones: int = 0) -> None:
        """Sets every CPU's rate window (tests use it to fill or age a window)."""
        key = self._clone_rate.Key(0)
        per_cpu = self._clone_rate[key]
        for w in per_cpu:
            w.start_ns, w.clones = start_ns, clones
        self._clone_rate[key] = per_cpu

    def clone_window(self) -> list[tuple[int, int]]:
        """(start_ns, clones) of each possible CPU's rate window."""
        return [(w.start_ns, w.clones) for w in self._clone_rate[self._clone_rate.Key(0)]]

    def _set_config(self, **fields) -> None:
        key = self._config.Key(0)
        cfg = self._config[key]
        for name, value in fields.items():
            setattr(cfg, name, value)
        self._config[key] = cfg

    def set_monitored(self, ifindex: int, monitored: bool) -> None:
        """Tells the classifier whether `ifindex` carries its hooks: a packet that entered
        through a monitored interface is not cloned again at egress (bpf/mirror.c)."""
        key = self._monitored.Key(ifindex)
        if monitored:
            self._monitored[key] = ctypes.c_uint8(1)
        else:
            try:
                del self._monitored[key]
            except KeyError:
                pass

    def delete_flow(self, key: FlowKey) -> bool:
        try:
            del self._flows[self._flows.Key.from_buffer_copy(key.to_bytes())]
            return True
        except KeyError:
            return False

    def clear(self) -> None:
        """Empties flows and counters (tests reset state between cases this way)."""
        self._flows.clear()
        self._requests.clear()
        self.note_if_empty()
        self._iface_stats.clear()       # zeroes every slot of the array
        zero = self._counters.Leaf(*([0] * len(self._counters.Leaf())))
        for i in range(len(COUNTERS)):
            self._counters[self._counters.Key(i)] = zero

    # --- reading ---------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        return {name: int(self._counters.sum(self._counters.Key(i)).value)
                for i, name in enumerate(COUNTERS)}

    def _flow_slots(self):
        """Yields (key bytes, [struct flow_value as a dict, per CPU]) for every marked
        flow."""
        ncpu = possible_cpus()
        stride = FLOW_VALUE.size * ncpu
        for keys, values, count in batch_lookup(self._flows.map_fd, FLOW_KEY.size,
                                                FLOW_VALUE.size):
            for i in range(count):
                yield (keys[i * FLOW_KEY.size:(i + 1) * FLOW_KEY.size],
                       [FLOW_VALUE.decode(values, i * stride + c * FLOW_VALUE.size)
                        for c in range(ncpu)])

    def flows(self) -> dict[FlowKey, dict]:
        """Marked flows with their per-CPU values summed (timestamps: min first, max last)."""
        out = {}
        for key, vals in self._flow_slots():
            # The trigger status lives in the slots of the CPUs that saw a trigger
            # response; the others carry later packets only.
            with_status = [v for v in vals if v["status"]]
            out[FlowKey.from_bytes(key)] = {
                "packets": sum(v["packets"] for v in vals),
                "bytes": sum(v["bytes"] for v in vals),
                "first_ns": min((v["first_ns"] for v in vals if v["first_ns"]), default=0),
                "last_ns": max(v["last_ns"] for v in vals),
                "status": (max(with_status, key=lambda v: v["last_ns"])["status"]
                           if with_status else 0),
                "cpus": [i for i, v in enumerate(vals) if v["packets"]],
                "cpu_packets": [v["packets"] for v in vals if v["packets"]],
                # A clone skipped for a budget on any CPU: the capture was cut.
                "cut": cut_reasons(functools.reduce(operator.or_, (v["cut"] for v in vals), 0)),
            }
        return out

    def note_if_empty(self) -> bool:
        """Lets the classifier skip flow lookups while the map is empty: reads the
        classifier's mark count, then scans the map, and if it is empty publishes the
        count read before the scan (bpf/mirror.h, enum marks_index). Returns whether
        the map was empty."""
        made = self._marks[self._marks.Key(MARKS_MADE)].value
        if self.flow_count():
            return False
        self._marks[self._marks.Key(MARKS_CLEARED)] = ctypes.c_uint64(made)
        return True

    def lookups_skipped(self) -> bool:
        """True while the classifier skips flow lookups (the map is known empty)."""
        return (self._marks[self._marks.Key(MARKS_MADE)].value ==
                self._marks[self._marks.Key(MARKS_CLEARED)].value)

    def flow_count(self) -> int:
        return sum(count for _, _, count in batch_lookup(self._flows.map_fd, FLOW_KEY.size,
                                                         FLOW_VALUE.size))

    def expire_idle(self, now_ns: int, idle_ns: int) -> int:
        """Deletes flows whose newest packet on any CPU is older than idle_ns; returns how
        many. A flow that sends between the read and the delete loses its mark, which its
        next trigger response restores."""
        ncpu = possible_cpus()
        words = FLOW_VALUE.size // 8 * ncpu          # u64 words per entry
        idle = []
        for keys, values, count in batch_lookup(self._flows.map_fd, FLOW_KEY.size,
                                                FLOW_VALUE.size):
            u64 = memoryview(values).cast("Q")[:count * words]
            # last_ns in each CPU's slot: one strided slice per CPU.
            per_cpu = [u64[_LAST_NS_WORD + c * FLOW_VALUE.size // 8::words]
                       for c in range(ncpu)]
            for i, last in enumerate(map(max, *per_cpu) if ncpu > 1 else per_cpu[0]):
                if last and now_ns - last > idle_ns:
                    idle.append(keys[i * FLOW_KEY.size:(i + 1) * FLOW_KEY.size])
        expired = 0
        for raw in idle:
            expired += self._expire_one(raw, now_ns, idle_ns)
        return expired

    def _expire_one(self, key: bytes, now_ns: int, idle_ns: int) -> int:
        """Deletes one idle flow atomically with reading it (BPF_MAP_LOOKUP_AND_DELETE_ELEM),
        so a packet that refreshed the flow since the scan is seen: the flow is then put
        back as it was (BPF_NOEXIST: unless the classifier re-marked it meanwhile)."""
        ncpu = possible_cpus()
        value = bpfsys.lookup_and_delete(self._flows.map_fd, key, FLOW_VALUE.size * ncpu)
        if value is None:
            return 0            # gone already (evicted, or expired by someone else)
        u64 = memoryview(value).cast("Q")
        last = max(u64[_LAST_NS_WORD + c * FLOW_VALUE.size // 8] for c in range(ncpu))
        if not last or now_ns - last > idle_ns:
            return 1
        bpfsys.update(self._flows.map_fd, key, value, bpfsys.BPF_NOEXIST)
        return 0

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
        """Frees the interface's statistics slots (on the CPUs where it owns them)."""
        for direction in range(len(DIRECTIONS)):
            key = self._iface_stats.Key((ifindex % IFACE_SLOTS) * 2 + direction)
            per_cpu = self._iface_stats[key]
            for v in per_cpu:
                if v.ifindex == ifindex:
                    ctypes.memset(ctypes.addressof(v), 0, ctypes.sizeof(v))
            self._iface_stats[key] = per_cpu

    def test_run(self, direction: str, frame: bytes, repeat: int = 1) -> TestRun:
        return test_run(self.fd(direction), frame, repeat)


class Sink:
    """The drop-everything ingress program for the far end of a debug veth."""

    def __init__(self):
        from bcc import BPF
        self.bpf = BPF(src_file=str(bpf_dir() / "sink.c").encode())
        self.prog = self.bpf.load_func(b"sink_drop", BPF.SCHED_CLS)

    @property
    def fd(self) -> int:
        return self.prog.fd
