#!/usr/bin/env bash
# Is the cluster of slurm/up.sh up? Prints its daemons, sinfo and squeue.
#
#   bash slurm/status.sh              # the one-node cluster (state dir $TLTRAIN_SLURM_DIR, default /tmp/tltrain-slurm)
#   bash slurm/status.sh --nodes 2    # the multi-node cluster of `up.sh --nodes 2` (default /tmp/tltrain-slurm-mn)
#
# Exit 0 when every daemon from the pid files runs and slurmctld answers; 1 otherwise (e.g. for CI guards).
set -uo pipefail
here=$(dirname "${BASH_SOURCE[0]}")
source "$here/lib.sh"
nodes=1
while (($#)); do
    case $1 in
        --nodes) nodes=${2:-1}; shift 2 || shift ;;
        --nodes=*) nodes=${1#*=}; shift ;;
        *) echo "usage: $0 [--nodes N]  (state dir: \$TLTRAIN_SLURM_DIR)" >&2; exit 2 ;;
    esac
done
TLTRAIN_SLURM_DIR=$(slurm_state_dir "$nodes")
up_cmd="sudo bash slurm/up.sh"
[[ $nodes =~ ^[0-9]+$ ]] && ((nodes > 1)) && up_cmd+=" --nodes $nodes"
source "$here/env.sh"
RUN=$TLTRAIN_SLURM_DIR/run

up=1
echo "state dir: $TLTRAIN_SLURM_DIR   SLURM_CONF=$SLURM_CONF"
# slurmd.pid (one node) or slurmd-n<i>.pid (multi-node); not slurmdbd.pid, which the list names already.
slurmds=$(cd "$RUN" 2>/dev/null && ls slurmd.pid slurmd-*.pid 2>/dev/null | sed 's/\.pid$//' || true)
for name in munged mariadb slurmdbd slurmctld ${slurmds:-slurmd}; do
    pid=$( { tr -dc 0-9 <"$RUN/$name.pid"; } 2>/dev/null || true)
    if pid_alive "$pid"; then
        printf '  %-10s running (pid %s)\n' "$name" "$pid"
    else
        printf '  %-10s NOT running\n' "$name"; up=0
    fi
done

if ! sinfo >/dev/null 2>&1; then
    echo "slurmctld does not answer: run '$up_cmd'"
    exit 1
fi
echo; sinfo -N -o '%12N %10P %10T %5c %10m'   # memory in MB
echo; squeue -o '%.8i %.9P %.20j %.8u %.10T %.10M %.6D %R'
((up)) || { echo; echo "some daemons are down: run '$up_cmd'"; exit 1; }
