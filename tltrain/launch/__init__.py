"""Launching runs on SLURM (or locally) with submitit: submit, chain, requeue, and list jobs.

The CLI wires `cli_submit` (`tltrain submit`) and `cli_jobs` (`tltrain jobs`); sweeps use Hydra's
submitit launcher with configs/hydra/launcher/slurm.yaml and `sweep.SweepJobCallback`.
"""
from tltrain.launch.chain import submit_chain
from tltrain.launch.cli import cli_submit
from tltrain.launch.config import LaunchConfig
from tltrain.launch.jobs import cli_jobs, list_jobs
from tltrain.launch.submit import TrainJob, job_run_dir, submit

__all__ = ["LaunchConfig", "TrainJob", "cli_jobs", "cli_submit", "job_run_dir", "list_jobs", "submit",
           "submit_chain"]
