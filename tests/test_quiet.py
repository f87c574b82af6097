"""benchmarks/quiet.py counts the benchmark's own CPU, including descendants that are still alive when the verdict
is taken (persistent DataLoader workers), so its own work is not refused as another process's load."""
import multiprocessing
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import quiet  # noqa: E402


def _spin_then_wait(seconds: float, done) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
    done.set()
    time.sleep(60)  # alive, not yet waited for, when the parent measures


def test_live_children_count_as_own_cpu():
    before = quiet._own_seconds()
    context = multiprocessing.get_context("fork")
    done = context.Event()
    child = context.Process(target=_spin_then_wait, args=(0.6, done), daemon=True)
    child.start()
    try:
        assert done.wait(30)
        assert quiet._live_descendants_seconds() >= 0.5
        assert quiet._own_seconds() - before >= 0.5
    finally:
        child.kill()
        child.join()
