#!/usr/bin/env bash
# Stop the cluster started by slurm/up.sh: only the processes named in its pid files, never by name, and (multi-node)
# only the bridge, network namespaces and veths that up.sh recorded in etc/network.
#
#   bash slurm/down.sh                # stop daemons, keep state (jobs, accounting DB, munge key)
#   bash slurm/down.sh --purge        # stop daemons and delete the state dir
#   bash slurm/down.sh --nodes 2      # the multi-node cluster of `up.sh --nodes 2` (state /tmp/tltrain-slurm-mn)
set -euo pipefail

purge=0 nodes=1
while (($#)); do
    case $1 in
        --purge) purge=1; shift ;;
        --nodes) nodes=${2:-1}; shift 2 || true ;;
        --nodes=*) nodes=${1#*=}; shift ;;
        *) echo "usage: $0 [--purge] [--nodes N]  (state dir: \$TLTRAIN_SLURM_DIR)" >&2; exit 2 ;;
    esac
done
if [[ $nodes =~ ^[0-9]+$ ]] && ((nodes > 1)); then
    STATE=${TLTRAIN_SLURM_DIR:-/tmp/tltrain-slurm-mn}
else
    STATE=${TLTRAIN_SLURM_DIR:-/tmp/tltrain-slurm}
fi
RUN=$STATE/run

log() { printf '[slurm/down] %s\n' "$*"; }

# Running = exists and is not a zombie: PID 1 here reaps exited daemons only every ~2 s.
pid_alive() {
    local pid=$1 comm=${2:-} st
    [[ -n $pid && -r /proc/$pid/stat ]] || return 1
    st=$(sed -E 's/^[0-9]+ \(.*\) ([A-Za-z]).*/\1/' "/proc/$pid/stat" 2>/dev/null) || return 1
    [[ $st != Z && $st != X ]] || return 1
    # A stale pid file may name a recycled pid: with COMM given, the process must also have that name.
    [[ -z $comm || $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]]
}

# pidfile_alive FILE [COMM]: the daemon named in FILE is running.
pidfile_alive() { [[ -s $1 ]] && pid_alive "$(tr -dc 0-9 <"$1")" "${2:-}"; }

# stop NAME: TERM the pid from NAME.pid, wait up to 20 s, then KILL. Reverse start order keeps logs clean.
stop() {
    local name=$1 pidfile=$RUN/$1.pid comm=$1 pid i
    [[ $name == mariadb ]] && comm=mariadbd
    [[ $name == slurmd-* ]] && comm=slurmd
    [[ -s $pidfile ]] || { log "$name: no pid file"; return 0; }
    pid=$(tr -dc 0-9 <"$pidfile")
    if ! pid_alive "$pid" "$comm"; then
        log "$name: not running (stale pid file)"; rm -f "$pidfile"; return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        pid_alive "$pid" "$comm" || break
        sleep 0.2
    done
    if pid_alive "$pid" "$comm"; then
        log "$name ($pid) ignored TERM for 20 s, sending KILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    rm -f "$pidfile"
    log "$name ($pid) stopped"
}

# Jobs first: their processes belong to slurmstepd, which outlives slurmd, so they would otherwise linger.
cancel_jobs() {
    export SLURM_CONF=$STATE/etc/slurm.conf
    pidfile_alive "$RUN/slurmctld.pid" slurmctld || return 0
    local jobs i
    jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
    [[ -n ${jobs// /} ]] || return 0
    log "cancelling jobs: $jobs"
    scancel $jobs 2>/dev/null || true
    for ((i = 0; i < 75; i++)); do   # up to 15 s for the steps to end (KillWait=5 before SIGKILL)
        [[ -z $(squeue -h -t running,completing -o %i 2>/dev/null) ]] && return 0
        sleep 0.2
    done
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
