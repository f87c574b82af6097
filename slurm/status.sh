#!/usr/bin/env bash
# Is the cluster of slurm/up.sh up (one node, or TLTRAIN_SLURM_DIR=/tmp/tltrain-slurm-mn for --nodes N)? Prints its daemons, sinfo and squeue.
# Exit 0 when every daemon from the pid files runs and slurmctld answers; 1 otherwise (e.g. for CI guards).
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
RUN=$TLTRAIN_SLURM_DIR/run

# Running = exists and is not a zombie (PID 1 here reaps exited daemons only every ~2 s).
pid_alive() {
    local pid=$1 st
    [[ -n $pid && -r /proc/$pid/stat ]] || return 1
    st=$(sed -E 's/^[0-9]+ \(.*\) ([A-Za-z]).*/\1/' "/proc/$pid/stat" 2>/dev/null) || return 1
    [[ $st != Z && $st != X ]]
}

up=1
echo "state dir: $TLTRAIN_SLURM_DIR   SLURM_CONF=$SLURM_CONF"
slurmds=$(cd "$RUN" 2>/dev/null && ls slurmd*.pid 2>/dev/null | sed 's/\.pid$//' || true)
for name in munged mariadb slurmdbd slurmctld ${slurmds:-slurmd}; do
    pid=$( { tr -dc 0-9 <"$RUN/$name.pid"; } 2>/dev/null || true)
    if pid_alive "$pid"; then
        printf '  %-10s running (pid %s)\n' "$name" "$pid"
    else
        printf '  %-10s NOT running\n' "$name"; up=0
    fi
done

if ! sinfo >/dev/null 2>&1; then
    echo "slurmctld does not answer: run 'sudo bash slurm/up.sh'"
    exit 1
fi
echo; sinfo -N -o '%12N %10P %10T %5c %10m'   # memory in MB
echo; squeue -o '%.8i %.9P %.20j %.8u %.10T %.10M %.6D %R'
((up)) || { echo; echo "some daemons are down: run 'sudo bash slurm/up.sh'"; exit 1; }
