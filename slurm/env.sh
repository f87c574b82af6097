# Source me: `source slurm/env.sh`. Points sbatch, srun, squeue, sinfo, sacct, scontrol and submitit at the
# one-node cluster started by slurm/up.sh (state dir $TLTRAIN_SLURM_DIR, default /tmp/tltrain-slurm).
# The munge socket is named inside slurm.conf (AuthInfo=socket=...), so SLURM_CONF is all the clients need.
export TLTRAIN_SLURM_DIR=${TLTRAIN_SLURM_DIR:-/tmp/tltrain-slurm}
export SLURM_CONF=$TLTRAIN_SLURM_DIR/etc/slurm.conf
if [[ ! -f $SLURM_CONF ]]; then
    echo "slurm/env.sh: $SLURM_CONF does not exist yet; run slurm/up.sh first" >&2
fi
