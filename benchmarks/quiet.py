"""Benchmarks that can be trusted: a figure is taken on a quiet machine or not recorded at all.

On 2 cores a test run, a helper or a second benchmark beside a benchmark moves its figures by 2x (load 7-18 gave
noise). So every benchmark here:
- waits (up to --quiet-wait seconds) for the 1-minute load average to fall to QUIET_LOAD_PER_CPU x cores (1.5 on
  2 cores) before it starts, and records the load before and after in its JSON;
- refuses to record (exit status 3, the JSON says "refused" and why) when the load was above that limit before or
  after the measurement;
- runs its variants interleaved (A B A B A B ...), at least 3 repetitions each, and reports the median and the
  spread (min, max) of each, and ratios of medians, so a slow moment hits every variant alike.
"""
from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

QUIET_LOAD_PER_CPU = 0.75  # 1.5 on the 2-core machines the figures are taken on
MIN_REPEATS = 3
REFUSED_EXIT = 3


def load_limit() -> float:
    return QUIET_LOAD_PER_CPU * (os.cpu_count() or 1)


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def wait_until_quiet(max_wait: float, poll: float = 5.0) -> float:
    """The load average once it is at most load_limit(), or after max_wait seconds (whatever it is then)."""
    deadline = time.monotonic() + max_wait
    load = load_average()
    while load > load_limit() and time.monotonic() < deadline:
        time.sleep(poll)
        load = load_average()
    return load


def interleaved(variants: dict[str, Callable[[], float]], repeats: int = MIN_REPEATS) -> dict[str, dict]:
    """Each variant's figure (a rate: higher is better), measured in turns, `repeats` times each (at least
    MIN_REPEATS): {name: {"median", "min", "max", "spread" (max/min - 1), "values"}}."""
    repeats = max(repeats, MIN_REPEATS)
    values: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, measure in variants.items():
            values[name].append(float(measure()))
    return {name: {"median": statistics.median(v), "min": min(v), "max": max(v),
                   "spread": round(max(v) / min(v) - 1, 3) if min(v) > 0 else None, "values": v}
            for name, v in values.items()}


def verdict(load_before: float, load_after: float) -> dict:
    """The JSON fields that say whether the figure may be recorded."""
    limit = load_limit()
    quiet = load_before <= limit and load_after <= limit
    return {"load_before": load_before, "load_after": load_after, "load_limit": limit, "cpus": os.cpu_count(),
            "recorded": quiet, "refused": None if quiet else
            f"load average {max(load_before, load_after):.2f} above {limit:.2f}: something else ran on the machine; "
            "run it again with nothing beside it"}
