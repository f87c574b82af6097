#!/usr/bin/env bash
# Start a real SLURM cluster (munge, MariaDB, slurmdbd, slurmctld, slurmd) on a Debian machine where we are root
# and there is no systemd. Everything lives in one state dir, so it never touches a system-wide install.
#
#   bash slurm/up.sh                 # one node (this machine), state in /tmp/tltrain-slurm
#   bash slurm/up.sh --nodes 2       # two nodes n1, n2, each a slurmd in its own network namespace on a private
#                                    # bridge, slurmctld in this one; state in /tmp/tltrain-slurm-mn
#   TLTRAIN_SLURM_DIR=/x bash slurm/up.sh
#   source slurm/env.sh              # then sbatch / squeue / sacct talk to this cluster
#                                    # (multi-node: TLTRAIN_SLURM_DIR=/tmp/tltrain-slurm-mn source slurm/env.sh)
#
# Idempotent: a daemon whose pid file points at a live process is left alone, so running it twice starts nothing;
# network pieces that exist are kept. Ports (override via env): slurmctld 6817, slurmd 6818, slurmdbd 6819,
# MariaDB 13306 on 127.0.0.1 only; multi-node: 6827, 6818 (inside each node's namespace), 6829, 13316, so both
# clusters can run side by side.
set -euo pipefail
LOG_TAG=slurm/up
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }
NODES=1
while (($#)); do
    case $1 in
        --nodes) NODES=${2:-}; shift 2 || true ;;
        --nodes=*) NODES=${1#*=}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) printf '[slurm/up] ERROR: unknown option %s (see --help)\n' "$1" >&2; exit 2 ;;
    esac
done
[[ $NODES =~ ^[1-9][0-9]*$ && $NODES -le 50 ]] || { echo "[slurm/up] ERROR: --nodes needs 1..50, got '$NODES'" >&2; exit 2; }
MULTI=$((NODES > 1))

START_NS=$(date +%s%N)
STATE=$(slurm_state_dir "$NODES")
if ((MULTI)); then
    PORT_BASE=6827 DB_PORT_DEFAULT=13316
else
    PORT_BASE=6817 DB_PORT_DEFAULT=13306
fi
CLUSTER=${TLTRAIN_SLURM_CLUSTER:-tltrain}
CTLD_PORT=${TLTRAIN_SLURM_CTLD_PORT:-$PORT_BASE}
SLURMD_PORT=${TLTRAIN_SLURM_SLURMD_PORT:-6818}
DBD_PORT=${TLTRAIN_SLURM_DBD_PORT:-$((PORT_BASE + 2))}
DB_PORT=${TLTRAIN_SLURM_DB_PORT:-$DB_PORT_DEFAULT}
# Multi-node network: a private bridge with SUBNET.1 for slurmctld, node i at SUBNET.(10+i), in netns PREFIX-n<i>.
NET_PREFIX=${TLTRAIN_SLURM_NET_PREFIX:-tlslurm}
BRIDGE=${NET_PREFIX}0
SUBNET=${TLTRAIN_SLURM_SUBNET:-10.77.0}
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server iproute2 util-linux)

ETC=$STATE/etc RUN=$STATE/run LOG=$STATE/log
MUNGE_SOCKET=$RUN/munge.socket.2
DB_SOCKET=$RUN/mariadb.sock
DB_DATA=$STATE/mariadb

die() { printf '[slurm/up] ERROR: %s\n' "$*" >&2; exit 1; }

# Show the end of a daemon's log when it fails: config mistakes are only visible there.
die_with_log() {
    local msg=$1 file=$2
    printf '[slurm/up] ERROR: %s\n--- last lines of %s ---\n' "$msg" "$file" >&2
    tail -n 25 "$file" >&2 2>/dev/null || true
    exit 1
}

[[ $(id -u) -eq 0 ]] || die "must run as root (the daemons run as root; use sudo)"

# ---------------------------------------------------------------- packages
install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return 0
    log "installing ${missing[*]} (apt-get, once)"
    # Keep package scripts from starting the system-wide daemons: we run our own copies.
    local own_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && own_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${missing[@]}" >"$STATE/apt.log" 2>&1 || { ((own_policy)) && rm -f /usr/sbin/policy-rc.d; die_with_log "apt-get install failed" "$STATE/apt.log"; }
    ((own_policy)) && rm -f /usr/sbin/policy-rc.d
    return 0
}

# ---------------------------------------------------------------- configs
host_short=$(hostname -s)

write_configs() {
    mkdir -p "$ETC" "$RUN" "$LOG" "$STATE/ctld" "$STATE/spool" "$STATE/munge"
    # slurm.conf must stay readable for every user who submits jobs; the secrets get 0600 / 0700 below.
    chmod 755 "$ETC"
    chmod 700 "$STATE/munge"

    # Real topology from slurmd -C; leave 10% (at least 1 GiB) of the memory for the OS and the other processes.
    local node_line mem_total real_mem cpus
    node_line=$(slurmd -C | head -n 1)
    mem_total=$(sed -E 's/.*RealMemory=([0-9]+).*/\1/' <<<"$node_line")
    real_mem=$((mem_total - (mem_total / 10 > 1024 ? mem_total / 10 : 1024)))
    cpus=$(sed -E 's/.*CPUs=([0-9]+).*/\1/' <<<"$node_line")
    # OverSubscribe=FORCE:2 lets two jobs share a core, so default memory per CPU must leave room for both.
    local def_mem_per_cpu=$((real_mem / (cpus * 2)))
    node_line=$(sed -E "s/^NodeName=[^ ]+/NodeName=$host_short/; s/RealMemory=[0-9]+/RealMemory=$real_mem/" <<<"$node_line")

    [[ -s $ETC/db.pass ]] || (umask 077; head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$ETC/db.pass")
    DB_PASS=$(cat "$ETC/db.pass")
    local auth_info="socket=$MUNGE_SOCKET,cred_expire=10"
    local ctld_host=$host_short nodes_conf slurmd_suffix=""
    if ((MULTI)); then
        # slurmctld listens on the bridge address; every node reaches it there. Nodes are n1..nN, each with its
        # address on the bridge; slurmd in node i runs with hostname n<i> (UTS namespace) and its own /etc/hosts.
        ctld_host="$host_short($SUBNET.1)"
        slurmd_suffix=-%n  # one spool dir, pid file and log per node
        local topology i
        topology=$(sed -E 's/^NodeName=[^ ]+ //' <<<"$node_line")
        nodes_conf=$(for ((i = 1; i <= NODES; i++)); do
            echo "NodeName=n$i NodeHostname=n$i NodeAddr=$SUBNET.$((10 + i)) $topology State=UNKNOWN"
        done)
        {
            echo "127.0.0.1 localhost"
            echo "$SUBNET.1 $host_short"
            for ((i = 1; i <= NODES; i++)); do echo "$SUBNET.$((10 + i)) n$i"; done
        } >"$ETC/hosts"
        chmod 644 "$ETC/hosts"
    else
        nodes_conf="$node_line State=UNKNOWN"
    fi

    cat >"$ETC/slurm.conf" <<EOF
# Written by slurm/up.sh; rewritten on every run (edit up.sh, not this file).
ClusterName=$CLUSTER
SlurmctldHost=$ctld_host
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10: a requeued job may start again after ~11 s instead of the default ~121 s.
AuthInfo=$auth_info
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool$slurmd_suffix
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd$slurmd_suffix.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd$slurmd_suffix.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups without systemd: track processes by parent pid, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$def_mem_per_cpu
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=2
JobRequeue=1
ReturnToService=2
KillWait=5
InactiveLimit=0
MinJobAge=300
MailProg=/bin/true
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# For the slurmdbd connection, Slurm takes the munge socket from AccountingStoragePass, not from AuthInfo.
AccountingStoragePass=$MUNGE_SOCKET
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
$nodes_conf
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:2
EOF

    chmod 644 "$ETC/slurm.conf"

    rm -f "$ETC/slurmdbd.conf"
    (umask 077; cat >"$ETC/slurmdbd.conf") <<EOF
# Written by slurm/up.sh. slurmdbd finds it next to \$SLURM_CONF.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$ETC/slurmdbd.conf"   # it holds the DB password; slurmdbd also insists on 0600
}

# ---------------------------------------------------------------- daemons
start_munge() {
    local pidfile=$RUN/munged.pid
    pidfile_alive "$pidfile" munged && { log "munged already running"; return; }
    [[ -s $STATE/munge/munge.key ]] || mungekey --create --keyfile="$STATE/munge/munge.key" --bits=1024
    chmod 400 "$STATE/munge/munge.key"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    # --force: munged is wary of running as root and of sockets outside /run/munge; both are fine here.
    munged --force --socket="$MUNGE_SOCKET" --key-file="$STATE/munge/munge.key" --pid-file="$pidfile" \
        --log-file="$LOG/munged.log" --seed-file="$STATE/munge/munged.seed" ||
        die_with_log "munged did not start" "$LOG/munged.log"
    wait_for 10 munge bash -c "munge -S '$MUNGE_SOCKET' -n | unmunge -S '$MUNGE_SOCKET'" ||
        die_with_log "munge does not answer on $MUNGE_SOCKET" "$LOG/munged.log"
    log "munged started"
}

db_sql() { mariadb --no-defaults --socket="$DB_SOCKET" -u root -e "$1"; }

start_mariadb() {
    local pidfile=$RUN/mariadb.pid
    if pidfile_alive "$pidfile" mariadbd; then
        log "mariadb already running"
    else
        if [[ ! -d $DB_DATA/mysql ]]; then
            mkdir -p "$DB_DATA"
            mariadb-install-db --no-defaults --user=root --datadir="$DB_DATA" --skip-test-db \
                >"$LOG/mariadb-install.log" 2>&1 || die_with_log "mariadb-install-db failed" "$LOG/mariadb-install.log"
        fi
        # --no-defaults: ignore /etc/mysql so a system-wide MariaDB config cannot interfere.
        setsid mariadbd --no-defaults --user=root --datadir="$DB_DATA" --socket="$DB_SOCKET" \
            --pid-file="$pidfile" --bind-address=127.0.0.1 --port="$DB_PORT" --skip-name-resolve \
            --log-error="$LOG/mariadb.log" --innodb-buffer-pool-size=1024M --innodb-log-file-size=64M \
            --innodb-lock-wait-timeout=900 --max-allowed-packet=16M </dev/null >/dev/null 2>&1 &
        wait_for 60 mariadb mariadb-admin --no-defaults --socket="$DB_SOCKET" -u root ping ||
            die_with_log "mariadb does not answer on $DB_SOCKET" "$LOG/mariadb.log"
        wait_for 10 "mariadb pid file" test -s "$pidfile" || die "mariadb wrote no pid file $pidfile"
        log "mariadb started"
    fi
    db_sql "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
            CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
            ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" || die "could not create slurm_acct_db / user"
}

# start_slurm_daemon NAME PIDFILE COMMAND...: slurm daemons fork and write their own pid file.
start_slurm_daemon() {
    local name=$1 pidfile=$2; shift 2
    pidfile_alive "$pidfile" "$name" && { log "$name already running"; return; }
    rm -f "$pidfile"
    "$@" || die_with_log "$name did not start (run '$name -D -vvv' with SLURM_CONF=$ETC/slurm.conf to see why)" "$LOG/$name.log"
    wait_for 15 "$name pid file" pidfile_alive "$pidfile" "$name" ||
        die_with_log "$name exited right after starting" "$LOG/$name.log"
    log "$name started"
}

register_accounting() {
    # sacctmgr -i answers its own prompts; 'add' of an existing entity is a harmless no-op.
    sacctmgr -i -Q add cluster "$CLUSTER" >/dev/null 2>&1 || true
    sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER" || die "cluster $CLUSTER is not in slurmdbd"
    sacctmgr -i -Q add account tltrain Cluster="$CLUSTER" Description="tltrain jobs" Organization=tltrain >/dev/null 2>&1 || true
    sacctmgr -i -Q add user root Account=tltrain Cluster="$CLUSTER" >/dev/null 2>&1 || true
}

# Ready = idle, or busy with jobs (a second up.sh while jobs run must not wait for them).
node_ready() { [[ $(sinfo -h -N -n "$1" -o %T 2>/dev/null) =~ ^(idle|mixed|allocated|completing) ]]; }

wait_node() {
    local node=$1 logfile=$2
    node_ready "$node" && return 0
    # A node left DOWN/DRAIN by an earlier run (e.g. a killed slurmd) comes back with RESUME.
    wait_for 20 "node ready" node_ready "$node" || scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true
    wait_for 30 "node ready" node_ready "$node" || die_with_log "node $node is not usable: $(sinfo -h -N -n "$node" -o '%T %E')" "$logfile"
}

# ---------------------------------------------------------------- multi-node network
# Every piece made here is appended to $ETC/network ("bridge NAME", "netns NAME", "veth NAME") so down.sh removes
# exactly those; pieces that already exist are kept (idempotent) and not recorded twice.
record_net() { grep -qx "$1 $2" "$ETC/network" 2>/dev/null || echo "$1 $2" >>"$ETC/network"; }

setup_network() {
    local i ns veth addr
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link add "$BRIDGE" type bridge
        record_net bridge "$BRIDGE"
    fi
    # Traffic between the nodes crosses the bridge: keep the host's iptables FORWARD rules (Docker sets DROP) out
    # of it for this bridge only, rather than touching the global br_netfilter switches.
    ip link set "$BRIDGE" type bridge nf_call_iptables 0 nf_call_ip6tables 0 2>/dev/null || true
    ip addr replace "$SUBNET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    for ((i = 1; i <= NODES; i++)); do
        ns=$NET_PREFIX-n$i veth=$NET_PREFIX-v$i addr=$SUBNET.$((10 + i))
        if [[ ! -e /run/netns/$ns ]]; then
            ip netns add "$ns"
            record_net netns "$ns"
        fi
        if ! ip link show "$veth" >/dev/null 2>&1; then
            ip link add "$veth" type veth peer name eth0 netns "$ns"
            record_net veth "$veth"
        fi
        ip link set "$veth" master "$BRIDGE" up
        nsenter --net="/run/netns/$ns" ip link set lo up
        nsenter --net="/run/netns/$ns" ip addr replace "$addr/24" dev eth0
        nsenter --net="/run/netns/$ns" ip link set eth0 up
    done
}

# slurmd of node i: its network namespace (nsenter --net, which leaves /sys alone: `ip netns exec` remounts it and
# slurmd 22.05 then finds no cgroup filesystem), a private mount namespace to bind the cluster's /etc/hosts (so n1..nN
# resolve in jobs, for srun, gloo and MASTER_ADDR) and a UTS namespace with hostname n<i>.
start_node() {
    local i=$1 node=n$1 pidfile=$RUN/slurmd-n$1.pid
    pidfile_alive "$pidfile" slurmd && { log "slurmd $node already running"; return; }
    rm -f "$pidfile"
    mkdir -p "$STATE/spool/$node"
    nsenter --net="/run/netns/$NET_PREFIX-n$i" unshare --mount --uts --propagation private \
        sh -c "mount --bind '$ETC/hosts' /etc/hosts && hostname $node && exec slurmd -f '$SLURM_CONF' -N $node" ||
        die_with_log "slurmd $node did not start" "$LOG/slurmd-$node.log"
    wait_for 15 "slurmd $node pid file" pidfile_alive "$pidfile" slurmd ||
        die_with_log "slurmd $node exited right after starting" "$LOG/slurmd-$node.log"
    log "slurmd $node started ($SUBNET.$((10 + i)) in netns $NET_PREFIX-n$i)"
}

# ---------------------------------------------------------------- main
mkdir -p "$STATE"
install_packages
write_configs
export SLURM_CONF=$ETC/slurm.conf
((MULTI)) && setup_network

start_munge
start_mariadb
start_slurm_daemon slurmdbd "$RUN/slurmdbd.pid" slurmdbd
wait_for 30 "slurmdbd" sacctmgr -n list cluster || die_with_log "slurmdbd does not answer" "$LOG/slurmdbd.log"
register_accounting
start_slurm_daemon slurmctld "$RUN/slurmctld.pid" slurmctld -f "$SLURM_CONF"
wait_for 30 "slurmctld" scontrol ping || die_with_log "slurmctld does not answer" "$LOG/slurmctld.log"
if ((MULTI)); then
    for ((i = 1; i <= NODES; i++)); do start_node "$i"; done
    for ((i = 1; i <= NODES; i++)); do wait_node "n$i" "$LOG/slurmd-n$i.log"; done
else
    start_slurm_daemon slurmd "$RUN/slurmd.pid" slurmd -f "$SLURM_CONF"
    wait_node "$host_short" "$LOG/slurmd.log"
fi

elapsed=$((($(date +%s%N) - START_NS) / 1000000))
log "cluster '$CLUSTER' up in $((elapsed / 1000)).$(printf '%03d' $((elapsed % 1000))) s; state in $STATE"
env_prefix=""
[[ $STATE != /tmp/tltrain-slurm ]] && env_prefix="TLTRAIN_SLURM_DIR=$STATE "
log "use it with: ${env_prefix}source $(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/env.sh"
sinfo
