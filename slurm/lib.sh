# Sourced by up.sh, down.sh and status.sh (not by users: that is env.sh): the helpers the three share, so the
# state-dir choice, the "is this daemon running" test and the polling loop are written once.
# The caller sets LOG_TAG (e.g. slurm/up) before calling log.

# slurm_state_dir NODES: the cluster's state dir, $TLTRAIN_SLURM_DIR first; NODES > 1 is the multi-node cluster,
# whose default dir differs so that both clusters can run side by side.
slurm_state_dir() {
    if [[ $1 =~ ^[0-9]+$ ]] && (($1 > 1)); then
        echo "${TLTRAIN_SLURM_DIR:-/tmp/tltrain-slurm-mn}"
    else
        echo "${TLTRAIN_SLURM_DIR:-/tmp/tltrain-slurm}"
    fi
}

log() { printf '[%s] %s\n' "${LOG_TAG:-slurm}" "$*"; }

# pid_alive PID [COMM]: a pid counts as running when it exists and is not a zombie (PID 1 here reaps exited
# daemons only every ~2 s).
pid_alive() {
    local pid=$1 comm=${2:-} st
    [[ -n $pid && -r /proc/$pid/stat ]] || return 1
    st=$(sed -E 's/^[0-9]+ \(.*\) ([A-Za-z]).*/\1/' "/proc/$pid/stat" 2>/dev/null) || return 1
    [[ $st != Z && $st != X ]] || return 1
    # A stale pid file may name a recycled pid: with COMM given, the process must also have that name.
    [[ -z $comm || $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]]
}

# pid_gone PID [COMM]: the opposite, as a command for wait_for.
pid_gone() { ! pid_alive "$@"; }

# pidfile_alive FILE [COMM]: the daemon named in FILE is running.
pidfile_alive() { [[ -s $1 ]] && pid_alive "$(tr -dc 0-9 <"$1")" "${2:-}"; }

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.2 s until it succeeds; 1 when SECONDS pass first.
wait_for() {
    local secs=$1 what=$2; shift 2
    local deadline=$(($(date +%s) + secs))
    until "$@" >/dev/null 2>&1; do
        (($(date +%s) < deadline)) || return 1
        sleep 0.2
    done
}
