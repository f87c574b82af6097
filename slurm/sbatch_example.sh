#!/bin/bash
# Multi-node training with plain sbatch (no submitit): N nodes x one task per GPU, each task one torch rank.
#
#   sbatch slurm/sbatch_example.sh                       # as written below
#   sbatch --nodes=4 slurm/sbatch_example.sh model=resnet50 data.fraction=0.2
#
# Extra arguments are passed to `tltrain train` as Hydra overrides. Lines marked EDIT are the ones to adapt.
# Preemption: SLURM sends USR2 to every task 120 s before the time limit (or when the job is preempted); the
# trainer checkpoints and exits 75; this script then requeues the job, and the requeued run resumes from run_dir.
#
#SBATCH --job-name=tltrain
#SBATCH --nodes=2                 # EDIT: number of nodes
#SBATCH --ntasks-per-node=4       # EDIT: = GPUs per node (one rank per GPU)
#SBATCH --gpus-per-node=4         # EDIT: = ntasks-per-node; delete this line on CPU-only nodes
#SBATCH --cpus-per-task=8         # EDIT: data-loading CPU threads per rank
#SBATCH --mem-per-cpu=4G          # EDIT: or --mem=0 for the whole node
#SBATCH --time=12:00:00           # EDIT: wall time; the checkpoint warning comes 120 s before it ends
#SBATCH --partition=debug         # EDIT: your cluster's partition (debug on the slurm/up.sh cluster)
#SBATCH --output=slurm-%x-%j.out  # %x job name, %j job id; requeued runs append to the same file
#SBATCH --open-mode=append
#SBATCH --requeue                 # allow this job to be requeued (by us, or by the scheduler on node failure)
#SBATCH --signal=USR2@120         # USR2 to the tasks 120 s before the time limit: checkpoint, then requeue

set -euo pipefail

PYTHON=${PYTHON:-.venv/bin/python}   # EDIT: the interpreter with tltrain installed
PREEMPTED_EXIT_CODE=75               # tltrain.engine.signals.PREEMPTED_EXIT_CODE: "checkpointed, resume me"

# Rendezvous for torch.distributed: rank 0 lives on the first node of the allocation.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))   # per-job port: two jobs sharing a node do not collide
WORLD_SIZE=$SLURM_NTASKS
export MASTER_ADDR MASTER_PORT WORLD_SIZE

# The job id survives a requeue, so the run dir (and its checkpoints) does too: the run resumes by itself.
RUN_DIR=${RUN_DIR:-runs/slurm-$SLURM_JOB_ID}     # EDIT: where checkpoints, logs and metrics go

echo "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: $SLURM_JOB_NUM_NODES nodes x $SLURM_NTASKS_PER_NODE tasks," \
     "world $WORLD_SIZE, master $MASTER_ADDR:$MASTER_PORT, run_dir $RUN_DIR"

# RANK and LOCAL_RANK differ per task, so they are set inside each task from SLURM_PROCID / SLURM_LOCALID.
# EDIT: the overrides (trainer=deepspeed for ZeRO; data=eyepacs reads TLTRAIN_SHARDS or data.shards=...).
set +e
srun --kill-on-bad-exit=1 bash -c '
    export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID
    exec "$0" -m tltrain.cli train "$@"
' "$PYTHON" \
    data=eyepacs \
    model=resnet50 \
    trainer=ddp \
    trainer.strategy=ddp \
    device=cuda \
    run_dir="$RUN_DIR" \
    "$@"
status=$?
set -e

if ((status == PREEMPTED_EXIT_CODE)); then
    echo "preempted after a checkpoint: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$status"
