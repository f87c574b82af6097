"""The process pool that prepare and verify share: results in job order, streamed back as they finish."""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor


def usable_cpus() -> int:
    """The cores this process may run on: a SLURM task's --cpus-per-task, not the whole node's."""
    return len(os.sched_getaffinity(0))


def pool_map(fn, jobs, workers: int, chunksize: int | None = None):
    """fn over jobs in order across `workers` processes (0: usable_cpus()); in this process when one would do.
    Lazy: a caller that consumes results in order holds only the finished ones it has not used yet. chunksize
    (default: up to 64 jobs, a quarter of an even share per worker) trades scheduling overhead for balance."""
    workers = workers or usable_cpus()
    if workers == 1 or len(jobs) <= 1:
        yield from map(fn, jobs)
        return
    if chunksize is None:
        chunksize = max(1, min(64, len(jobs) // (workers * 4)))
    with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
        yield from pool.map(fn, jobs, chunksize=chunksize)
