#!/usr/bin/env bash
# A real Slurm cluster on this one host, for the tests and for trying the launchers:
# four emulated nodes node1..node4 (one slurmd each, `slurmd -N nodeK`), one partition, and
# accounting (slurmdbd + a private MariaDB) so that `sacct` works: submitit asks it about jobs
# that died without a result. As root on Debian 12; installs what is missing.
#
#   bash tools/local_slurm.sh start|stop|status
#
# State, logs and the database live in $MUSCLE_SLURM_STATE (default /var/tmp/muscle-slurm);
# `stop` shuts the daemons down and removes it. Writes /etc/slurm/slurm.conf and
# /etc/slurm/slurmdbd.conf, and adds node1..node4 to /etc/hosts (the nodes' address).
set -euo pipefail
STATE=${MUSCLE_SLURM_STATE:-/var/tmp/muscle-slurm}
NODES=4
CLUSTER=muscle
DB_PORT=16306
DBD_PORT=16819
CTLD_PORT=16817
NODE_PORT0=17001
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf

say() { echo "local_slurm: $*"; }
die() { echo "local_slurm: error: $*" >&2; exit 1; }

install() {
  local missing=0
  for cmd in slurmctld slurmd sbatch munged slurmdbd mariadbd; do
    command -v "$cmd" >/dev/null || missing=1
  done
  [ "$missing" = 0 ] && return
  say "installing slurmctld slurmd slurm-client munge slurmdbd mariadb-server"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
    slurmctld slurmd slurm-client munge slurmdbd mariadb-server >/dev/null
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local limit=$1 what=$2
  shift 2
  for _ in $(seq $((limit * 5))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  die "$what did not come up in ${limit}s (logs in $STATE)"
}

start_munge() {
  if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
  [ -s /etc/munge/munge.key ] || runuser -u munge -- mungekey --create >/dev/null
  mkdir -p /run/munge && chown munge:munge /run/munge
  runuser -u munge -- munged
  wait_for 10 munged sh -c 'munge -n </dev/null | unmunge'
}

start_db() {
  local sock=$STATE/mysql.sock
  if [ ! -d "$STATE/mysql" ]; then
    mariadb-install-db --user=root --datadir="$STATE/mysql" --skip-test-db \
      --auth-root-authentication-method=socket >"$STATE/mariadb-install.log" 2>&1 \
      || die "mariadb-install-db failed (see $STATE/mariadb-install.log)"
  fi
  mariadbd --user=root --datadir="$STATE/mysql" --socket="$sock" --bind-address=127.0.0.1 \
    --port=$DB_PORT --pid-file="$STATE/mariadb.pid" --log-error="$STATE/mariadb.log" \
    >"$STATE/mariadb.out" 2>&1 &
  wait_for 30 MariaDB mariadb --socket="$sock" -e 'select 1'
  mariadb --socket="$sock" -e "
    create database if not exists slurm_acct_db;
    create user if not exists 'slurm'@'127.0.0.1' identified by 'slurm';
    grant all on slurm_acct_db.* to 'slurm'@'127.0.0.1';"
}

write_configs() {
  local cpus mem
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / NODES ))
  mkdir -p /etc/slurm
  cat >"$DBD_CONF" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
LogFile=$STATE/slurmdbd.log
PidFile=$STATE/slurmdbd.pid
EOF
  chmod 600 "$DBD_CONF"
  cat >"$CONF" <<EOF
# Written by tools/local_slurm.sh: $NODES emulated nodes on this host.
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=root
SlurmctldPort=$CTLD_PORT
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.%n.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=30
MinJobAge=300
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
JobAcctGatherType=jobacct_gather/none
NodeName=node[1-$NODES] NodeHostname=localhost NodeAddr=127.0.0.1 Port=$NODE_PORT0-$((NODE_PORT0 + NODES - 1)) CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  local names
  names=$(seq -f "node%g" -s " " 1 $NODES)
  grep -q " node1 " /etc/hosts || echo "127.0.0.1 $names " >>/etc/hosts
}

all_idle() {
  local states
  states=$(sinfo -h -N -o %T 2>/dev/null | sort -u | tr '\n' ' ')
  [ "$states" = "idle " ]
}

start() {
  [ "$(id -u)" = 0 ] || die "run as root (it starts system daemons)"
  if all_idle; then say "already running: $(sinfo -h -o '%D nodes %T')"; return; fi
  install
  mkdir -p "$STATE/ctld" "$STATE/spool"
  write_configs
  start_munge
  start_db
  slurmdbd
  wait_for 30 slurmdbd sacctmgr -n list cluster
  sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true
  slurmctld
  wait_for 30 slurmctld scontrol ping
  for k in $(seq 1 $NODES); do slurmd -N "node$k"; done
  wait_for 30 "the nodes" all_idle
  say "up: $(sinfo -h -o '%D nodes %T, partition %P'); state in $STATE"
}

stop_pid() {  # stop_pid FILE: TERM the daemon, wait for it to go
  [ -f "$1" ] || return 0
  local pid
  pid=$(cat "$1")
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
  kill -9 "$pid" 2>/dev/null || true
}

stop() {
  scancel --quiet --user=root 2>/dev/null || true
  for f in "$STATE"/slurmd.*.pid "$STATE/slurmctld.pid" "$STATE/slurmdbd.pid" \
           "$STATE/mariadb.pid"; do
    stop_pid "$f"
  done
  rm -rf "$STATE"
  say "stopped"
}

status() {
  if scontrol ping >/dev/null 2>&1; then
    sinfo -N -o "%N %T %c"
  else
    say "not running"
    return 1
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
