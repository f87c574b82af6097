#!/usr/bin/env bash
# Stop the cluster started by slurm/up.sh: only the processes named in its pid files, never by name, and (multi-node)
# only the bridge, network namespaces and veths that up.sh recorded in etc/network.
#
#   bash slurm/down.sh                # stop daemons, keep state (jobs, accounting DB, munge key)
#   bash slurm/down.sh --purge        # stop daemons and delete the state dir
#   bash slurm/down.sh --nodes 2      # the multi-node cluster of `up.sh --nodes 2` (state /tmp/tltrain-slurm-mn)
set -euo pipefail
LOG_TAG=slurm/down
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

purge=0 nodes=1
while (($#)); do
    case $1 in
        --purge) purge=1; shift ;;
        --nodes) nodes=${2:-1}; shift 2 || true ;;
        --nodes=*) nodes=${1#*=}; shift ;;
        *) echo "usage: $0 [--purge] [--nodes N]  (state dir: \$TLTRAIN_SLURM_DIR)" >&2; exit 2 ;;
    esac
done
STATE=$(slurm_state_dir "$nodes")
RUN=$STATE/run

# stop NAME: TERM the pid from NAME.pid, wait up to 20 s, then KILL. Reverse start order keeps logs clean.
stop() {
    local name=$1 pidfile=$RUN/$1.pid comm=$1 pid
    [[ $name == mariadb ]] && comm=mariadbd
    [[ $name == slurmd-* ]] && comm=slurmd
    [[ -s $pidfile ]] || { log "$name: no pid file"; return 0; }
    pid=$(tr -dc 0-9 <"$pidfile")
    if ! pid_alive "$pid" "$comm"; then
        log "$name: not running (stale pid file)"; rm -f "$pidfile"; return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    wait_for 20 "$name to stop" pid_gone "$pid" "$comm" || true
    if pid_alive "$pid" "$comm"; then
        log "$name ($pid) ignored TERM for 20 s, sending KILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    rm -f "$pidfile"
    log "$name ($pid) stopped"
}

# no_running_jobs: squeue lists no running or completing job (or slurmctld does not answer).
no_running_jobs() { [[ -z $(squeue -h -t running,completing -o %i 2>/dev/null) ]]; }

# Jobs first: their processes belong to slurmstepd, which outlives slurmd, so they would otherwise linger.
cancel_jobs() {
    export SLURM_CONF=$STATE/etc/slurm.conf
    pidfile_alive "$RUN/slurmctld.pid" slurmctld || return 0
    local jobs
    jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
    [[ -n ${jobs// /} ]] || return 0
    log "cancelling jobs: $jobs"
    scancel $jobs 2>/dev/null || true
    # up to 15 s for the steps to end (KillWait=5 before SIGKILL)
    wait_for 15 "jobs to end" no_running_jobs && return 0
    log "some jobs are still ending; their processes may outlive the daemons"
}

# The multi-node network, newest first: veths (their peers inside the namespaces go with them), namespaces, bridge.
remove_network() {
    local record=$STATE/etc/network kind name
    [[ -s $record ]] || return 0
    tac "$record" | while read -r kind name; do
        case $kind in
            veth) ip link del "$name" 2>/dev/null && log "removed veth $name" || true ;;
            netns) ip netns del "$name" 2>/dev/null && log "removed netns $name" || true ;;
            bridge) ip link del "$name" 2>/dev/null && log "removed bridge $name" || true ;;
        esac
    done
    rm -f "$record"
}

if [[ -d $RUN ]]; then
    cancel_jobs
    nodes_daemons=$(cd "$RUN" && ls slurmd-*.pid 2>/dev/null | sed 's/\.pid$//' || true)
    for name in $nodes_daemons slurmd slurmctld slurmdbd mariadb munged; do stop "$name"; done
    remove_network
else
    log "no state dir $STATE: nothing to stop"
fi

if ((purge)); then
    # Refuse to delete anything that does not look like our state dir.
    if [[ -d $STATE && ( -d $STATE/etc || -d $STATE/run ) ]]; then
        rm -rf "$STATE"
        log "removed $STATE"
    elif [[ -e $STATE ]]; then
        log "not removing $STATE: it does not look like a tltrain-slurm state dir"; exit 1
    fi
fi
