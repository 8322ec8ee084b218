"""Observations in fixed buckets, read by the Prometheus collectors at scrape time.

prometheus-client's own Histogram lives in a registry and is updated as things happen;
the mirror's metrics are collected at scrape time from what the controller holds (the
BPF maps, these objects), and the bench needs the raw values of the attach latency, so
the buckets are counted here (the error response time is counted in the kernel: see
mirror.bpfprog.Classifier.response_times)."""
from __future__ import annotations

import threading
from bisect import bisect_left

# Seconds from a link event to both hooks attached.
ATTACH_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)


class Histogram:
    """Observations counted in buckets whose upper bounds are `bounds` (an observation
    equal to a bound counts in that bucket, as Prometheus's `le` says), plus +Inf.
    `keep` values are kept as observed, for the bench; `le` writes a bound as its label
    (each metric keeps the labels it has always had). Safe to observe from one thread
    while another reads."""

    def __init__(self, bounds: tuple[float, ...], keep: int = 0, le=str):
        self.bounds = bounds
        self.le = le
        self.counts = [0] * (len(bounds) + 1)       # the last one: above every bound
        self.sum = 0.0
        self.count = 0
        self.keep = keep
        self.values: list[float] = []
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.counts[bisect_left(self.bounds, value)] += 1
            self.sum += value
            self.count += 1
            if len(self.values) < self.keep:
                self.values.append(value)

    def buckets(self) -> list[tuple[str, int]]:
        """Cumulative (upper bound as Prometheus writes it, count) pairs, +Inf last."""
        with self._lock:
            counts = list(self.counts)
        out, total = [], 0
        for bound, n in zip((*map(self.le, self.bounds), "+Inf"), counts):
            total += n
            out.append((bound, total))
        return out
