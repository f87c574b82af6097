"""Two-step transfer as dependent jobs: step 2 (e.g. fine-tuning on the target set) starts only after step 1
(e.g. training on EyePACS) ended successfully, from step 1's weights."""
from __future__ import annotations

from tltrain.errors import TltrainError
from tltrain.launch.config import LaunchConfig
from tltrain.launch.submit import check_run, job_run_dir, submit


def submit_chain(step1_overrides: list[str], step2_overrides: list[str], *, name: str = "chain", **launch):
    """Submit both steps at once; returns (job1, job2). Step 2 gets model.weights=<step 1's run dir> and, on
    SLURM, --dependency=afterok:<job1> (it never starts if step 1 fails). launch: `submit`'s keywords.

    The local executor has no dependencies, so there this waits for step 1 before submitting step 2.
    """
    step2 = [o for o in step2_overrides if not o.startswith("model.weights=")]
    launch_cfg = LaunchConfig(**launch)
    launch_cfg.validate()
    check_run(step2, launch_cfg)  # before step 1 is queued (its weights come from step 1's run dir, made below)
    job1 = submit(step1_overrides, name=f"{name}_step1", **launch)
    step1_dir = job_run_dir(job1)
    step2 = step2 + [f"model.weights={step1_dir}"]
    if type(job1).__name__ == "LocalJob":
        error = job1.exception()  # waits for the job
        if error is not None:
            raise TltrainError(f"step 1 ({step1_dir}) failed, step 2 not submitted: {error}")
        return job1, submit(step2, name=f"{name}_step2", **launch)
    return job1, submit(step2, name=f"{name}_step2", dependency=str(job1.job_id), **launch)
