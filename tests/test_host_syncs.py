"""No blocking host sync in the steady-state training step (issue 27): a real run of the synthetic engine with
every value read-back and collective counted per step (tests/sync_count_run.py). Between checks a step reads
nothing back from the device and asks the other ranks nothing; the loss, the non-finite check and the stop
signal are read once every trainer.check_every_steps steps. Several ranks agree before each step whether to stop
(one small CPU all-reduce: the price of interrupting a stalled data wait), or only at checks."""
import json
import subprocess
import sys

from conftest import ROOT, TORCHRUN, clean_env, free_port

SCRIPT = str(ROOT / "tests" / "sync_count_run.py")
ARGS = ["--epochs", "1", "--check-every", "5", "--log-every", "5"]  # 320 images, 20 steps of 16 (one rank)


def _steady(steps) -> bool:
    """Nothing read back in any step but the first, whose batch goes to TensorBoard's input grid once (rank 0)."""
    return steps[0] in ({}, {"cpu": 1}) and all(step == {} for step in steps[1:])


def _fetches(fetches, each) -> bool:
    """Every fetch made exactly `each`; the epoch's first also reads the in-memory test loader's epoch order once
    (tltrain.engine.synthetic.InMemoryLoader, one tolist of a CPU permutation)."""
    first = dict(fetches[0])
    if first.get("tolist", 0) > each.get("tolist", 0):
        first["tolist"] -= 1
        first = {k: v for k, v in first.items() if v}
    return first == each and all(fetch == each for fetch in fetches[1:])


def _counts(out, rank=0):
    return json.loads(out.with_name(f"{out.name}.{rank}.json").read_text())


def test_one_rank_steps_and_fetches_read_nothing_back(tmp_path):
    out = tmp_path / "counts"
    done = subprocess.run([sys.executable, SCRIPT, str(out), "--run-dir", str(tmp_path / "run"), "--batch-size", "16",
                           *ARGS], cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = _counts(out)
    assert len(counts["steps"]) == 20 and _steady(counts["steps"]), counts["steps"]
    assert _fetches(counts["fetches"], {}), counts["fetches"]
    # a check every 5 steps (4 per epoch): the losses read back once, no collective on one rank
    assert len(counts["checks"]) == 4 and all(check == {"tolist": 1} for check in counts["checks"]), counts["checks"]


def _two_ranks(tmp_path, *more):
    out = tmp_path / "counts"
    cmd = [TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()), SCRIPT, str(out),
           "--run-dir", str(tmp_path / "run"), "--batch-size", "8", "--strategy", "ddp", *ARGS, *more]
    done = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [_counts(out, rank) for rank in (0, 1)]


def test_two_ranks_ask_each_other_once_per_step_on_the_cpu_and_nothing_in_the_step(tmp_path):
    for counts in _two_ranks(tmp_path):
        assert len(counts["steps"]) == 20 and _steady(counts["steps"]), counts["steps"]
        # the stop agreement before each step: one gloo all-reduce of a CPU tensor, read back on the CPU
        assert _fetches(counts["fetches"], {"all_reduce": 1, "tolist": 1}), counts["fetches"]
        assert len(counts["checks"]) == 4
        assert all(check == {"tolist": 2, "all_reduce": 1} for check in counts["checks"]), counts["checks"]


def test_two_ranks_with_stop_checks_at_checks_only_sync_once_every_n_steps(tmp_path):
    for counts in _two_ranks(tmp_path, "--stop-check-at-checks-only"):
        assert _steady(counts["steps"])
        asked = [i for i, fetch in enumerate(counts["fetches"]) if fetch.get("all_reduce")]
        assert asked == [0, 5, 10, 15], counts["fetches"]  # before the first step and after each check
