"""Benchmarks that can be trusted: a figure is taken on a quiet machine or not recorded at all.

On 2 cores a test run, a helper or a second benchmark beside a benchmark moves its figures by 2x (load 7-18 gave
noise). So every benchmark here:
- waits (up to --quiet-wait seconds) for the 1-minute load average to fall to QUIET_LOAD_PER_CPU x cores (1.5 on
  2 cores) before it starts, and records the load before and after in its JSON;
- watches the machine while it runs: the CPU time every process spent (/proc/stat) less its own, its finished
  children's (getrusage) and its live descendants' (/proc/PID/stat: persistent DataLoader workers are alive when
  the verdict is taken, so getrusage has not counted them yet), so its own load does not count against it;
- refuses to record (exit status 3, the JSON says "refused" and why) when the load was above that limit before,
  or when other processes used more than FOREIGN_CORES cores on average during the measurement;
- runs its variants interleaved (A B A B A B ...), at least 3 repetitions each, and reports the median and the
  spread (min, max) of each, and ratios of medians, so a slow moment hits every variant alike.
"""
from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

QUIET_LOAD_PER_CPU = 0.75  # 1.5 on the 2-core machines the figures are taken on
FOREIGN_CORES = 0.25  # other processes' average use while measuring, in cores, above which a figure is refused
FOREIGN_SHARE = 0.05  # ... or this share of a larger machine's cores (a 16-core GPU host: drivers, interrupts)
MIN_REPEATS = 3
REFUSED_EXIT = 3


def add_arguments(parser, wait: float = 300) -> None:
    """The two options every benchmark takes: --quiet-wait (seconds to wait for a quiet machine) and --smoke (a
    loaded machine does not fail the run; the JSON still says the figure is not to be recorded: gpu_all's dry
    run, CI, tests)."""
    parser.add_argument("--quiet-wait", type=float, default=wait, help="seconds to wait for a quiet machine")
    parser.add_argument("--smoke", action="store_true", help="a loaded machine does not fail the run (the JSON "
                        "still says the figure is not to be recorded): gpu_all's dry run, CI, tests")


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


def _busy_seconds() -> float | None:
    """CPU seconds all processes of the machine spent so far (user, nice, system, irq, softirq, steal)."""
    try:
        fields = [int(v) for v in open("/proc/stat").readline().split()[1:]]
    except (OSError, ValueError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return (sum(fields[:3]) + sum(fields[5:8])) / ticks


def _own_seconds() -> float:
    """CPU seconds of this process, its waited-for children and its descendants still alive."""
    import resource

    own = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(r.ru_utime + r.ru_stime for r in own) + _live_descendants_seconds()


def _live_descendants_seconds() -> float:
    """user + system CPU seconds of the descendants of this process that are still running (0 without /proc)."""
    parent, ticks = {}, {}
    for entry in os.scandir("/proc") if os.path.isdir("/proc") else ():
        if not entry.name.isdigit():
            continue
        try:
            fields = open(f"/proc/{entry.name}/stat").read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        pid = int(entry.name)
        parent[pid], ticks[pid] = int(fields[1]), int(fields[11]) + int(fields[12])  # ppid, utime + stime
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    total, stack = 0, list(children.get(os.getpid(), []))
    while stack:
        pid = stack.pop()
        total += ticks[pid]
        stack += children.get(pid, [])
    return total / os.sysconf("SC_CLK_TCK")


class Watch:
    """The machine's CPU use by other processes while a benchmark measures (start() ... verdict())."""

    def start(self, max_wait: float) -> "Watch":
        self.load_before = wait_until_quiet(max_wait)
        self.started, self.busy, self.own = time.monotonic(), _busy_seconds(), _own_seconds()
        return self

    def verdict(self) -> dict:
        """The JSON fields that say whether the figure may be recorded."""
        wall = time.monotonic() - self.started
        busy = _busy_seconds()
        foreign = None
        if busy is not None and self.busy is not None and wall > 0:
            foreign = round(max(0.0, (busy - self.busy) - (_own_seconds() - self.own)) / wall, 2)
        limit, load_after = load_limit(), load_average()
        problems = []
        if self.load_before > limit:
            problems.append(f"load average {self.load_before:.2f} above {limit:.2f} when it started")
        foreign_limit = max(FOREIGN_CORES, FOREIGN_SHARE * (os.cpu_count() or 1))
        if foreign is not None and foreign > foreign_limit:
            problems.append(f"other processes used {foreign:.2f} cores on average while it measured (limit "
                            f"{foreign_limit:g})")
        return {"load_before": self.load_before, "load_after": load_after, "load_limit": limit,
                "foreign_cores": foreign, "cpus": os.cpu_count(), "seconds": round(wall, 1),
                "recorded": not problems, "refused": "; ".join(problems) + ": run it again with nothing beside it"
                if problems else None}
