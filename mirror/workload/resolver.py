"""The workload behind each monitored interface, answered off the caller's thread.

Workloads.lookup() never blocks: it returns the answer it has, or PENDING and asks the
resolver thread for one. The resolver thread answers in passes (mirror.workload.match):
it gathers what was asked for a moment (a burst of new interfaces is one pass), asks
every runtime for its containers at once, each call bounded by `timeout`, and publishes
the answers (on_change() is told of each one that changed). A runtime that fails (no
socket, a hung or garbage-speaking one) costs its call's timeout at most, a counted
failure and a warning when it starts failing; its last good list stands in for it
meanwhile, so an answer does not flip to the bare namespace because containerd
restarted. Each runtime's own events (a container started, stopped, removed) are
followed on a thread of their own and make every interface be answered again; so does a
periodic pass, for whatever an event stream missed while it was down."""
from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait

from ..histogram import Histogram
from .containerd import Containerd
from .docker import Docker
from .match import match
from .model import PENDING, RUNTIMES, RuntimeFailure, Workload
from .netns import NETNS_DIR
from .podman import Podman

log = logging.getLogger("mirror")

DEFAULT_TIMEOUT = 2.0           # seconds per runtime per pass
BATCH_SECONDS = 0.05            # gathers a burst of link events into one pass
RESYNC_SECONDS = 60.0
EVENTS_RETRY_FIRST, EVENTS_RETRY_MAX = 1.0, 30.0
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0)
RUNTIME_CLASSES = {"containerd": Containerd, "docker": Docker, "podman": Podman}


def default_runtimes(environ=os.environ) -> list:
    """One client per runtime, in the order that names a namespace first (a kubelet's
    containerd, then Docker, then podman), each at its usual socket unless
    MIRROR_<RUNTIME>_SOCKET names another ("off": that runtime is not asked)."""
    out = []
    for name in RUNTIMES:
        cls = RUNTIME_CLASSES[name]
        path = environ.get(f"MIRROR_{name.upper()}_SOCKET") or cls.default_socket
        if path != "off":
            out.append(cls(path))
    return out


class Stats:
    """What the metrics read: lookups (and how many were answered pending), passes,
    failures by runtime and reason, the time from a question to its answer, and each
    runtime's call time."""

    def __init__(self, runtimes):
        self.lookups = 0
        self.pending = 0
        self.passes = 0
        self.failures: dict[tuple[str, str], int] = {}
        self.latency = Histogram(LATENCY_BUCKETS)
        self.runtime_seconds = {r: Histogram(LATENCY_BUCKETS) for r in runtimes}
        self._lock = threading.Lock()

    def fail(self, runtime: str, reason: str) -> None:
        with self._lock:
            self.failures[(runtime, reason)] = self.failures.get((runtime, reason), 0) + 1

    def as_dict(self) -> dict:
        with self._lock:
            failures = {f"{r}/{why}": n for (r, why), n in sorted(self.failures.items())}
        return {"lookups": self.lookups, "pending": self.pending, "passes": self.passes,
                "failures": failures, "answered": self.latency.count,
                "latency_seconds_sum": self.latency.sum,
                "runtime_calls": {r: h.count for r, h in self.runtime_seconds.items()},
                "runtime_seconds_sum": {r: h.sum for r, h in self.runtime_seconds.items()}}


def failure_level(failure: RuntimeFailure) -> int:
    """How loud a runtime's failure is logged: a socket that is absent is a runtime not
    installed here, which a node with one runtime of three meets at every start (and
    `mirror status` leaves out): info; a socket that is there and fails: a warning."""
    return logging.INFO if failure.reason == "absent" else logging.WARNING


class Inventories:
    """Each runtime's containers, asked of all runtimes at once with one deadline; a
    runtime that fails is reported and its last good list used."""

    def __init__(self, runtimes, timeout: float, stats: Stats, warn: bool = True,
                 stop: threading.Event | None = None):
        self.runtimes = list(runtimes)
        self.timeout = timeout
        self.stats = stats
        self.warn = warn
        self.stop = stop or threading.Event()   # set: stop waiting for the answers
        self.last_good: dict[str, list] = {}
        self.failing: dict[str, str] = {}        # runtime -> reason, while it fails
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(self.runtimes)),
                                        thread_name_prefix="mirror-workload-ask")
        self._running: dict[str, Future] = {}

    def fetch(self) -> tuple[dict[str, list], dict[str, RuntimeFailure]]:
        deadline = time.monotonic() + self.timeout
        futures = {}
        failures: dict[str, RuntimeFailure] = {}
        for rt in self.runtimes:
            previous = self._running.get(rt.name)
            if previous is not None and not previous.done():
                # Still in a call that outlived its timeout: never a second one beside it.
                failures[rt.name] = RuntimeFailure("timeout", "the previous call still runs")
                continue
            futures[rt.name] = self._running[rt.name] = self._pool.submit(self._timed, rt,
                                                                          deadline)
        # Calls honour the deadline themselves; the margin only covers a slow scheduler.
        # Waited for in slices, so that stopping never waits for a hung runtime.
        until = deadline + 1.0
        while not self.stop.is_set() and time.monotonic() < until:
            if not wait(list(futures.values()), timeout=0.1).not_done:
                break
        for name, future in futures.items():
            if not future.done():
                if not self.stop.is_set():      # stopping is no failure of the runtime
                    failures[name] = RuntimeFailure("timeout", "no answer in time")
                continue
            try:
                self.last_good[name] = future.result()
            except RuntimeFailure as exc:
                failures[name] = exc
            except Exception as exc:        # a bug in a client: counted, never fatal
                log.exception("asking %s for its containers failed", name)
                failures[name] = RuntimeFailure("error", repr(exc))
        for rt in self.runtimes:
            self._note(rt, failures.get(rt.name))
        return {rt.name: self.last_good.get(rt.name, []) for rt in self.runtimes}, failures

    def _timed(self, rt, deadline: float) -> list:
        t0 = time.monotonic()
        try:
            return rt.containers(deadline)
        finally:
            self.stats.runtime_seconds[rt.name].observe(time.monotonic() - t0)

    def _note(self, rt, failure: RuntimeFailure | None) -> None:
        """Counts a failure; logs once (failure_level) when a runtime starts failing (or
        fails another way), and says when it answers again."""
        if failure is None:
            if self.failing.pop(rt.name, None) and self.warn:
                log.info("workloads: %s answers again on %s", rt.name, rt.socket_path)
            return
        self.stats.fail(rt.name, failure.reason)
        if self.failing.get(rt.name) != failure.reason:
            self.failing[rt.name] = failure.reason
            if self.warn:
                log.log(failure_level(failure), "workloads: %s on %s gives no containers "
                        "(%s); interfaces in its containers are named by their network "
                        "namespace until it answers", rt.name, rt.socket_path, failure)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def resolve(ifindexes, runtimes=None, timeout: float = DEFAULT_TIMEOUT,
            netns_dir: str = NETNS_DIR) -> tuple[dict[int, Workload | None],
                                                  dict[str, RuntimeFailure]]:
    """One pass in the caller's thread, for a command that answers once (`mirror status`):
    ifindex -> workload (None: gone), and the runtimes that failed. Takes at most about
    `timeout`, whatever the runtimes do."""
    own = runtimes is None
    runtimes = default_runtimes() if own else runtimes
    # One answer, read by a person: the failures are returned, not logged.
    inventories = Inventories(runtimes, timeout, Stats([r.name for r in runtimes]),
                              warn=False)
    try:
        found, failures = inventories.fetch()
    finally:
        inventories.close()
        if own:
            for rt in runtimes:
                rt.close()
    return match(list(ifindexes), found, [r.name for r in runtimes], netns_dir), failures


class Workloads:
    """The workload of each interface asked about, kept up to date in the background.

    lookup(ifindex) answers at once (PENDING the first time); refresh(ifindex) after a
    link event; forget(ifindex) when the interface is gone. on_change(ifindex, workload)
    is called from the resolver thread with every new answer (workload None: the
    interface is gone). stats holds the counters."""

    def __init__(self, runtimes=None, timeout: float = DEFAULT_TIMEOUT, on_change=None,
                 resync_seconds: float = RESYNC_SECONDS, netns_dir: str = NETNS_DIR,
                 batch_seconds: float = BATCH_SECONDS):
        self.runtimes = default_runtimes() if runtimes is None else list(runtimes)
        self.timeout = timeout
        self.on_change = on_change
        self.resync_seconds = resync_seconds
        self.netns_dir = netns_dir
        self.batch_seconds = batch_seconds
        self.stats = Stats([r.name for r in self.runtimes])
        self._stop = threading.Event()
        self._inventories = Inventories(self.runtimes, timeout, self.stats, stop=self._stop)
        self._answers: dict[int, Workload] = {}
        self._wanted: set[int] = set()
        self._asked: dict[int, float] = {}      # ifindex -> when first asked, unanswered
        self._answering: set[int] = set()       # taken by the pass under way
        self._everything = False                # answer every wanted interface again
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._events_failing: dict[str, str] = {}

    # --- the caller's side: never blocks on a runtime -----------------------------------
    def lookup(self, ifindex: int) -> Workload:
        with self._cond:
            self.stats.lookups += 1
            answer = self._answers.get(ifindex)
            if answer is not None:
                return answer
            self.stats.pending += 1
            self._ask(ifindex)
            return PENDING

    def refresh(self, ifindex: int) -> None:
        """The interface appeared or changed: answer it (again)."""
        with self._cond:
            self._ask(ifindex)

    def forget(self, ifindex: int) -> None:
        """The interface is gone: no answer is kept or published for it."""
        with self._cond:
            self._wanted.discard(ifindex)
            self._asked.pop(ifindex, None)
            self._answers.pop(ifindex, None)
            self._cond.notify_all()

    def answers(self) -> dict[int, Workload]:
        with self._cond:
            return dict(self._answers)

    def wait(self, ifindexes, timeout: float) -> bool:
        """Until no question about `ifindexes` is open (each has its answer, or is gone),
        or `timeout`; whether none is (for commands and tests)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while any(self._open(i) for i in ifindexes):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def _open(self, ifindex: int) -> bool:
        return (ifindex in self._asked or ifindex in self._answering or
                (ifindex in self._wanted and ifindex not in self._answers))

    def _ask(self, ifindex: int) -> None:
        self._wanted.add(ifindex)
        self._asked.setdefault(ifindex, time.monotonic())
        self._cond.notify_all()

    def _everything_again(self) -> None:
        with self._cond:
            self._everything = True
            self._cond.notify_all()

    # --- threads ------------------------------------------------------------------------
    def start(self) -> "Workloads":
        """Starts the resolver thread and one event follower per runtime; returns at
        once (nothing here waits for a runtime)."""
        self._threads.append(threading.Thread(target=self._loop, name="mirror-workload",
                                              daemon=True))
        for rt in self.runtimes:
            self._threads.append(threading.Thread(
                target=self._follow, args=(rt,), name=f"mirror-workload-{rt.name}",
                daemon=True))
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Ends the threads (a pass under way stops waiting for its runtimes), then closes
        the runtimes' connections."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for rt in self.runtimes:
            rt.interrupt()
        for thread in self._threads:
            thread.join(self.timeout + 5)
        self._threads = []
        self._inventories.close()
        for rt in self.runtimes:
            rt.close()

    def _loop(self) -> None:
        next_resync = time.monotonic() + self.resync_seconds
        while not self._stop.is_set():
            with self._cond:
                while not (self._asked or self._everything) and not self._stop.is_set():
                    left = next_resync - time.monotonic()
                    if left <= 0:
                        self._everything = True
                        break
                    self._cond.wait(left)
            if self._stop.wait(self.batch_seconds):
                return
            with self._cond:
                asked, self._asked = self._asked, {}
                todo = set(self._wanted) if self._everything else set(asked)
                self._everything = False
                self._answering = todo
            if not todo:
                next_resync = time.monotonic() + self.resync_seconds
                continue
            try:
                self._pass(todo, asked)
            except Exception:
                # A bug or an unexpected system error must not end the answers: the
                # questions are asked again and the next pass tries.
                log.exception("workloads: resolver pass failed")
                with self._cond:
                    for ifindex, since in asked.items():
                        self._asked.setdefault(ifindex, since)
                self._stop.wait(1.0)
            finally:
                with self._cond:
                    self._answering = set()
                    self._cond.notify_all()
            next_resync = time.monotonic() + self.resync_seconds

    def _pass(self, todo: set[int], asked: dict[int, float]) -> None:
        inventories, _failures = self._inventories.fetch()
        if self._stop.is_set():
            return                  # cut short by stop(): its lists may be incomplete
        answers = match(sorted(todo), inventories, [r.name for r in self.runtimes],
                        self.netns_dir)
        now = time.monotonic()
        changed = []
        with self._cond:
            self.stats.passes += 1
            for ifindex, answer in answers.items():
                if ifindex not in self._wanted:
                    continue                    # forgotten during the pass
                if ifindex in asked:
                    self.stats.latency.observe(now - asked[ifindex])
                if answer is None:
                    self._wanted.discard(ifindex)
                    self._asked.pop(ifindex, None)
                    if self._answers.pop(ifindex, None) is not None:
                        changed.append((ifindex, None))
                elif self._answers.get(ifindex) != answer:
                    self._answers[ifindex] = answer
                    changed.append((ifindex, answer))
        for ifindex, answer in changed:
            if self.on_change is None:
                continue
            try:
                self.on_change(ifindex, answer)
            except Exception:
                log.exception("workloads: on_change for ifindex %d failed", ifindex)

    def _follow(self, rt) -> None:
        """Follows one runtime's events; each one (and each new subscription, after which
        nothing is missed) has every interface answered again. Retried with backoff."""
        delay = EVENTS_RETRY_FIRST

        def subscribed() -> None:
            nonlocal delay
            delay = EVENTS_RETRY_FIRST
            self._everything_again()
            if self._events_failing.pop(rt.name, None):
                log.info("workloads: following %s's events again", rt.name)
        while not self._stop.is_set():
            try:
                for _event in rt.events(self.timeout, subscribed):
                    self._everything_again()
                    if self._stop.is_set():
                        return
            except RuntimeFailure as exc:
                if self._stop.is_set():
                    return
                self.stats.fail(rt.name, exc.reason)
                if self._events_failing.get(rt.name) != exc.reason:
                    self._events_failing[rt.name] = exc.reason
                    log.log(failure_level(exc), "workloads: cannot follow %s's events "
                            "(%s); retrying, and answering again every %g s meanwhile",
                            rt.name, exc, self.resync_seconds)
            except Exception:
                log.exception("workloads: following %s's events failed", rt.name)
            if self._stop.wait(delay):
                return
            delay = min(EVENTS_RETRY_MAX, delay * 2)
