#!/usr/bin/env bash
# A private single-node SLURM cluster on this machine, for attnlab's SLURM test (tests/test_slurm.py)
# and for trying `attnlab train -m hydra/launcher=slurm ...` by hand. See tests/slurm/README.md.
#
#   tests/slurm/cluster.sh up       install the Debian packages if missing, write the configs, start
#                                   munged, MariaDB, slurmdbd, slurmctld, slurmd; wait for an idle node
#   tests/slurm/cluster.sh down     cancel every job, stop the daemons this script started
#   tests/slurm/cluster.sh status   daemons, sinfo, squeue
#   tests/slurm/cluster.sh env      print `export SLURM_CONF=...` (eval "$(tests/slurm/cluster.sh env)")
#
# Every command is idempotent. Everything lives in $ATTNLAB_SLURM_DIR (default /tmp/attnlab-slurm):
# configs, munge key and socket, MariaDB data, state, logs, pid files. Nothing is written under /etc
# except a symlink /etc/slurm/slurm.conf -> $ATTNLAB_SLURM_DIR/etc/slurm.conf (so sinfo/sbatch work
# without SLURM_CONF), and only when /etc/slurm/slurm.conf does not exist or is that symlink already.
# A slurm.conf this script did not write is never touched: `up` refuses unless ATTNLAB_SLURM_FORCE=1,
# which runs the private cluster anyway, reachable only with SLURM_CONF set (see `env`).
#
# The cluster: one node (this machine's short hostname, CPUs = nproc, RealMemory from /proc/meminfo),
# proctrack/linuxproc, task/none, no cgroups, root as SlurmUser; accounting through slurmdbd and a
# private MariaDB on 127.0.0.1 (submitit polls sacct to see jobs that died without a result);
# two partitions over the node: `low` (default, PriorityTier 1, PreemptMode REQUEUE, GraceTime 20 s)
# and `high` (PriorityTier 2), PreemptType preempt/partition_prio: a `high` job that needs the node
# preempts `low` jobs, which get SIGTERM, then SIGKILL after the grace time, and are requeued.
# Short scheduler intervals and cred_expire (a requeued job may start again after ~15 s, not 120 s).
#
# Settings (environment): ATTNLAB_SLURM_DIR, ATTNLAB_SLURM_FORCE=1, ATTNLAB_SLURM_CLUSTER (attnlab),
# ATTNLAB_SLURM_PORTS ("6817 6818 6819": slurmctld slurmd slurmdbd), ATTNLAB_SLURM_DB_PORT (3307),
# ATTNLAB_SLURM_GRACE (20), ATTNLAB_SLURM_TIMEOUT (120: seconds `up` waits for the idle node).
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin

DIR=${ATTNLAB_SLURM_DIR:-/tmp/attnlab-slurm}
CLUSTER=${ATTNLAB_SLURM_CLUSTER:-attnlab}
read -r CTLD_PORT SLURMD_PORT DBD_PORT <<<"${ATTNLAB_SLURM_PORTS:-6817 6818 6819}"
DB_PORT=${ATTNLAB_SLURM_DB_PORT:-3307}
GRACE=${ATTNLAB_SLURM_GRACE:-20}
TIMEOUT=${ATTNLAB_SLURM_TIMEOUT:-120}
FORCE=${ATTNLAB_SLURM_FORCE:-0}
CONF=$DIR/etc/slurm.conf
ETC_CONF=/etc/slurm/slurm.conf
MARKER="# written by attnlab tests/slurm/cluster.sh"
PACKAGES=(slurmctld slurmd slurmdbd slurm-client munge mariadb-server)
DB_USER=slurm
DB_PASS=attnlab-slurm
export SLURM_CONF=$CONF

say() { echo "cluster.sh: $*"; }
die() { echo "cluster.sh: error: $*" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------
# helpers

pid_alive() { # pid file -> 0 if the process in it runs
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

wait_for() { # seconds description command...: poll every 0.5 s; says what it waits for if slow
    local limit=$1 what=$2 start=$SECONDS told=0
    shift 2
    until "$@" >/dev/null 2>&1; do
        ((SECONDS - start < limit)) || return 1
        if ((!told && SECONDS - start >= 10)); then
            say "waiting for $what (up to $limit s)"
            told=1
        fi
        sleep 0.5
    done
}

stop_pid() { # name pid-file: TERM, wait up to 20 s, then KILL
    local name=$1 file=$2 pid i
    pid_alive "$file" || { rm -f "$file"; return 0; }
    pid=$(cat "$file")
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 40; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
        say "$name ($pid) did not stop on SIGTERM; SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
    say "stopped $name"
}

ours_etc_conf() { # /etc/slurm/slurm.conf is absent, or is our symlink, or carries our marker
    [[ ! -e $ETC_CONF && ! -L $ETC_CONF ]] && return 0
    [[ -L $ETC_CONF && $(readlink "$ETC_CONF") == "$CONF" ]] && return 0
    [[ -f $ETC_CONF ]] && head -n 1 "$ETC_CONF" | grep -qF "$MARKER"
}

need_root() {
    [[ $(id -u) == 0 ]] || die "must run as root (it installs packages and starts slurmd, which runs jobs as any user)"
}

# ---------------------------------------------------------------------------------------------
# up

install_packages() {
    local missing=() cmd
    for cmd in slurmctld slurmd slurmdbd sbatch sacctmgr munged mungekey mariadbd mariadb-install-db; do
        command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
    done
    ((${#missing[@]} == 0)) && return 0
    command -v apt-get >/dev/null || die "missing ${missing[*]} and there is no apt-get to install ${PACKAGES[*]}"
    say "installing ${PACKAGES[*]} (missing: ${missing[*]})"
    # keep the packages' init scripts from starting system-wide daemons (this script runs its own)
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT # also when interrupted
    fi
    local ok=0 log=$DIR/log/apt.log
    export DEBIAN_FRONTEND=noninteractive
    if apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >"$log" 2>&1; then
        ok=1
    elif apt-get update -q >>"$log" 2>&1 &&
        apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >>"$log" 2>&1; then
        ok=1
    fi
    if ((made_policy)); then
        rm -f "$policy"
        trap - EXIT
    fi
    ((ok)) || { tail -n 20 "$log" >&2; die "apt-get install ${PACKAGES[*]} failed (log: $log)"; }
}

write_if_changed() { # path mode content-on-stdin -> 0 if the file changed
    local path=$1 mode=$2 tmp
    tmp=$(mktemp "$path.XXXXXX")
    cat >"$tmp"
    chmod "$mode" "$tmp"
    if [[ -f $path ]] && cmp -s "$tmp" "$path"; then
        rm -f "$tmp"
        return 1
    fi
    mv -f "$tmp" "$path"
}

write_configs() { # -> 0 if slurm.conf or slurmdbd.conf changed
    local host cpus mem_mb def_mem changed=1
    host=$(hostname -s)
    cpus=$(nproc)
    mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
    def_mem=$((mem_mb / cpus / 2))
    ((def_mem > 2048)) && def_mem=2048
    write_if_changed "$CONF" 644 <<EOF && changed=0
$MARKER (ATTNLAB_SLURM_DIR=$DIR); regenerated by \`cluster.sh up\`
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=15
StateSaveLocation=$DIR/state/slurmctld
SlurmdSpoolDir=$DIR/state/slurmd
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups: processes are tracked by parent pid, tasks are not bound
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SwitchType=switch/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# the munge socket for connections to slurmdbd (AuthInfo's socket= covers the others)
AccountingStoragePass=$DIR/munge/munge.socket
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=$def_mem
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,sched_min_interval=200000,bf_interval=2,batch_sched_delay=1
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
JobRequeue=1
MinJobAge=60
KillWait=15
InactiveLimit=0
Waittime=0
ReturnToService=2
SlurmdTimeout=60
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=low Nodes=$host Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=$GRACE
PartitionName=high Nodes=$host MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
EOF
    write_if_changed "$DIR/etc/slurmdbd.conf" 600 <<EOF && changed=0
$MARKER
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
DbdHost=$host
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$DIR/log/slurmdbd.log
PidFile=$DIR/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
    return $changed
}

start_munge() {
    pid_alive "$DIR/run/munged.pid" && return 0
    install -d -o munge -g munge -m 700 "$DIR/munge"
    if [[ ! -s $DIR/munge/munge.key ]]; then
        mungekey --create --keyfile="$DIR/munge/munge.key" >/dev/null 2>&1 ||
            dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    fi
    chown munge:munge "$DIR/munge/munge.key"
    chmod 400 "$DIR/munge/munge.key"
    touch "$DIR/log/munged.log" "$DIR/run/munged.pid"
    chown munge:munge "$DIR/log/munged.log" "$DIR/run/munged.pid"
    # --force: the private directory sits under /tmp (world-writable, sticky), which munged
    # otherwise refuses as insecure
    runuser -u munge -- /usr/sbin/munged --force --socket="$DIR/munge/munge.socket" \
        --key-file="$DIR/munge/munge.key" --pid-file="$DIR/run/munged.pid" \
        --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" ||
        die "munged did not start (log: $DIR/log/munged.log)"
    wait_for 20 munge pid_alive "$DIR/run/munged.pid" || die "munged did not start (log: $DIR/log/munged.log)"
    say "started munged"
}

mariadb_sql() {
    mariadb --no-defaults --socket="$DIR/mysql/mysqld.sock" -u root -e "$1"
}

start_mariadb() {
    if ! pid_alive "$DIR/run/mariadbd.pid"; then
        if [[ ! -d $DIR/mysql/mysql ]]; then
            install -d -o mysql -g mysql -m 750 "$DIR/mysql"
            mariadb-install-db --no-defaults --datadir="$DIR/mysql" --user=mysql \
                --auth-root-authentication-method=socket --skip-test-db >"$DIR/log/mariadb-install.log" 2>&1 ||
                die "mariadb-install-db failed (log: $DIR/log/mariadb-install.log)"
        fi
        touch "$DIR/log/mariadb.log" && chown mysql:mysql "$DIR/log/mariadb.log"
        install -d -o mysql -g mysql "$DIR/run/mysql"
        setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$DIR/mysql" \
            --socket="$DIR/mysql/mysqld.sock" --port="$DB_PORT" --bind-address=127.0.0.1 \
            --skip-name-resolve --pid-file="$DIR/run/mysql/mariadbd.pid" --log-error="$DIR/log/mariadb.log" \
            --innodb-buffer-pool-size=64M --innodb-log-file-size=16M </dev/null >/dev/null 2>&1 &
        echo $! >"$DIR/run/mariadbd.pid"
        wait_for 60 mariadb mariadb-admin --no-defaults --socket="$DIR/mysql/mysqld.sock" ping ||
            die "MariaDB did not start (log: $DIR/log/mariadb.log)"
        say "started MariaDB on 127.0.0.1:$DB_PORT"
    fi
    mariadb_sql "CREATE USER IF NOT EXISTS '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
        GRANT ALL ON slurm_acct_db.* TO '$DB_USER'@'127.0.0.1'; FLUSH PRIVILEGES;" ||
        die "could not create the slurm database user"
}

start_daemon() { # name pid-file command...
    local name=$1 pidfile=$2
    shift 2
    pid_alive "$pidfile" && return 0
    "$@" || die "$name did not start (log: $DIR/log/$name.log)"
    wait_for 30 "$name" pid_alive "$pidfile" || die "$name did not start (log: $DIR/log/$name.log)"
    say "started $name"
}

register_accounting() {
    wait_for 60 slurmdbd sacctmgr -n list cluster || die "slurmdbd does not answer (log: $DIR/log/slurmdbd.log)"
    if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster $CLUSTER failed"
    fi
    if ! sacctmgr -n -P list account format=account | grep -qx attnlab; then
        sacctmgr -i add account attnlab cluster="$CLUSTER" description=attnlab organization=attnlab >/dev/null ||
            die "sacctmgr add account attnlab failed"
    fi
    if ! sacctmgr -n -P list assoc user=root account=attnlab format=user | grep -qx root; then
        sacctmgr -i add user root account=attnlab cluster="$CLUSTER" >/dev/null || true
    fi
}

node_idle() {
    local state
    state=$(sinfo -h -N -o %T 2>/dev/null | sort -u | head -n 1)
    [[ $state == idle || $state == mixed || $state == allocated ]]
}

up() {
    need_root
    if ! ours_etc_conf; then
        if [[ $FORCE != 1 ]]; then
            die "$ETC_CONF exists and was not written by this script: this machine seems to have its own
SLURM setup, which this script will not touch. Set ATTNLAB_SLURM_FORCE=1 to run the private cluster anyway
($CONF, reachable with SLURM_CONF=$CONF), or use your cluster."
        fi
        say "ATTNLAB_SLURM_FORCE=1: leaving $ETC_CONF alone; use SLURM_CONF=$CONF"
    fi
    local start=$SECONDS
    mkdir -p "$DIR"/{etc,log,run,state/slurmctld,state/slurmd}
    chmod 755 "$DIR"
    install_packages
    if write_configs && pid_alive "$DIR/run/slurmctld.pid"; then
        say "configuration changed: restarting the SLURM daemons"
        stop_pid slurmd "$DIR/run/slurmd.pid"
        stop_pid slurmctld "$DIR/run/slurmctld.pid"
        stop_pid slurmdbd "$DIR/run/slurmdbd.pid"
    fi
    if ours_etc_conf; then
        mkdir -p /etc/slurm
        ln -sfn "$CONF" "$ETC_CONF"
    fi
    start_munge
    start_mariadb
    start_daemon slurmdbd "$DIR/run/slurmdbd.pid" /usr/sbin/slurmdbd
    register_accounting
    start_daemon slurmctld "$DIR/run/slurmctld.pid" /usr/sbin/slurmctld -f "$CONF"
    start_daemon slurmd "$DIR/run/slurmd.pid" /usr/sbin/slurmd -f "$CONF"
    if ! wait_for "$TIMEOUT" "the node to be idle" node_idle; then
        sinfo -N -l >&2 || true
        tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
        die "the node did not become idle within $TIMEOUT s"
    fi
    say "up in $((SECONDS - start)) s: $(sinfo -h -o '%P %D %c %m %T' | tr '\n' ';') SLURM_CONF=$CONF"
}

# ---------------------------------------------------------------------------------------------
# down, status

down() {
    need_root
    if pid_alive "$DIR/run/slurmctld.pid"; then
        local jobs i
        jobs=$(squeue -h -o %i 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            say "cancelling $(echo "$jobs" | wc -l) job(s)"
            # shellcheck disable=SC2086 # one argument per job id
            scancel $jobs 2>/dev/null || true
        fi
        for ((i = 0; i < 40; i++)); do
            [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
            sleep 0.5
        done
    fi
    stop_pid slurmd "$DIR/run/slurmd.pid"
    stop_pid slurmctld "$DIR/run/slurmctld.pid"
    stop_pid slurmdbd "$DIR/run/slurmdbd.pid"
    stop_pid mariadbd "$DIR/run/mariadbd.pid"
    stop_pid munged "$DIR/run/munged.pid"
    if [[ -L $ETC_CONF && $(readlink "$ETC_CONF") == "$CONF" ]]; then
        rm -f "$ETC_CONF"
    fi
    say "down (state, logs and the database stay in $DIR; remove it to start afresh)"
}

status() {
    local name rc=0
    for name in munged mariadbd slurmdbd slurmctld slurmd; do
        if pid_alive "$DIR/run/$name.pid"; then
            echo "$name: running (pid $(cat "$DIR/run/$name.pid"))"
        else
            echo "$name: stopped"
            rc=3
        fi
    done
    echo "SLURM_CONF=$CONF"
    if pid_alive "$DIR/run/slurmctld.pid"; then
        sinfo || true
        squeue || true
    fi
    return $rc
}

case ${1:-} in
up) up ;;
down) down ;;
status) status ;;
env) echo "export SLURM_CONF=$CONF" ;;
*)
    echo "usage: $0 up|down|status|env   (see the top of this file and tests/slurm/README.md)" >&2
    exit 2
    ;;
esac
