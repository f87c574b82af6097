"""The process pool that prepare and verify share: results in job order, streamed back as they finish."""
from __future__ import annotations

import itertools
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor


def usable_cpus() -> int:
    """The cores this process may run on: a SLURM task's --cpus-per-task, not the whole node's."""
    return len(os.sched_getaffinity(0))


def _run_chunk(fn, chunk: list) -> list:
    return [fn(job) for job in chunk]


def pool_map(fn, jobs, workers: int, chunksize: int | None = None, count: int | None = None):
    """fn over jobs (any iterable; `count` its length when it has no len()) in order across `workers` processes
    (0: usable_cpus()); in this process when one would do. chunksize (default: up to 64 jobs, a quarter of an
    even share per worker) trades scheduling overhead for balance.

    At most 4 chunks per worker are in flight: jobs are drawn from the iterable as results are consumed, and a
    slow consumer (the parent writing tars) never piles up finished results. Executor.map would submit every job
    at once and keep every result it finishes ahead of the consumer, so memory would grow with the dataset."""
    workers = workers or usable_cpus()
    count = len(jobs) if count is None else count
    if workers == 1 or count <= 1:
        yield from map(fn, jobs)
        return
    workers = min(workers, count)
    if chunksize is None:
        chunksize = max(1, min(64, count // (workers * 4)))
    source = iter(jobs)
    chunks = iter(lambda: list(itertools.islice(source, chunksize)), [])
    with ProcessPoolExecutor(workers) as pool:
        pending = deque(pool.submit(_run_chunk, fn, chunk) for chunk in itertools.islice(chunks, 4 * workers))
        try:
            while pending:
                results = pending.popleft().result()
                for chunk in itertools.islice(chunks, 1):
                    pending.append(pool.submit(_run_chunk, fn, chunk))
                yield from results
        finally:
            for future in pending:  # a consumer that stops early (an error while writing) leaves no work behind
                future.cancel()
