"""Ratios with confidence intervals, and verdicts that say when a run cannot tell.

Every ratio the bench reports is paired: configuration A and configuration B ran in the
same round (in a random order within it), so each round gives one ratio a_r / b_r and slow
drift of the machine cancels. The point estimate is the mean of those per-round ratios;
its 95 % interval comes from a percentile bootstrap over rounds (rounds resampled with
replacement, RESAMPLES times, with a fixed seed so a report can be rebuilt exactly).

A target "ratio <= T" is met when the whole interval lies at or below T, not met when the
whole interval lies above it, and inconclusive when the interval straddles T: the run
could not tell, and more rounds (or a quieter machine) are needed."""
from __future__ import annotations

import math
import random
import statistics

RESAMPLES = 10000
LEVEL = 0.95
SEED = 20190601


def paired(a_by_round: dict, b_by_round: dict) -> list[float]:
    """Per-round ratios a/b over the rounds both have (and b is non-zero)."""
    return [a_by_round[r] / b_by_round[r] for r in sorted(a_by_round)
            if r in b_by_round and b_by_round[r] and a_by_round[r] is not None]


def bootstrap_mean(values: list[float], resamples: int = RESAMPLES, level: float = LEVEL,
                   seed: int = SEED) -> dict | None:
    """Mean of `values` and its percentile-bootstrap interval; None without values. With
    one value the interval is that value (no spread is known: the verdict will say so)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    n = len(values)
    mean = statistics.fmean(values)
    if n == 1:
        return {"mean": mean, "lo": mean, "hi": mean, "n": 1}
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(values, k=n)) for _ in range(resamples))
    tail = (1 - level) / 2
    lo = means[int(math.floor(tail * (resamples - 1)))]
    hi = means[int(math.ceil((1 - tail) * (resamples - 1)))]
    return {"mean": mean, "lo": lo, "hi": hi, "n": n}


def bootstrap_percentile(values: list[float], q: float, resamples: int = 2000,
                         level: float = LEVEL, seed: int = SEED) -> dict | None:
    """The q-th percentile of `values` (nearest rank) and its bootstrap interval."""
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    rng = random.Random(seed)
    n = len(values)
    est = sorted(nearest_rank(rng.choices(values, k=n), q) for _ in range(resamples))
    tail = (1 - level) / 2
    return {"value": nearest_rank(values, q), "lo": est[int(tail * (resamples - 1))],
            "hi": est[int(math.ceil((1 - tail) * (resamples - 1)))], "n": n}


def nearest_rank(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q / 100 * len(v)) - 1))]


def verdict_at_least(ci: dict | None, limit: float) -> str:
    """'met', 'not met' or 'inconclusive' for "the quantity is at least `limit`"."""
    if not ci:
        return "no data"
    if ci.get("n", 2) < 2:
        return "inconclusive"
    if ci["lo"] >= limit:
        return "met"
    if ci["hi"] < limit:
        return "not met"
    return "inconclusive"


def verdict_at_most(ci: dict | None, limit: float, low_key="lo", high_key="hi") -> str:
    """'met', 'not met' or 'inconclusive' for "the quantity is at most `limit`"."""
    if not ci:
        return "no data"
    if ci.get("n", 2) < 2:
        return "inconclusive"
    if ci[high_key] <= limit:
        return "met"
    if ci[low_key] > limit:
        return "not met"
    return "inconclusive"
