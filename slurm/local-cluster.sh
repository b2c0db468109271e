#!/bin/bash
# Starts (or stops) a one-node SLURM cluster on loopback for tests: its own munged, slurmctld
# and slurmd as root, with every file (munge key and socket, slurm.conf, state, logs, pids)
# under $1 (default /tmp/csaq-slurm), so it neither needs nor disturbs a system munged.
#   slurm/local-cluster.sh start [DIR]   -> prints "export SLURM_CONF=DIR/slurm.conf"
#   slurm/local-cluster.sh stop [DIR]
# Needs Debian's slurmctld, slurmd, slurm-client and munge (scripts/install-deps.sh installs them).
set -euo pipefail
action=${1:?start or stop}
dir=${2:-/tmp/csaq-slurm}
host=$(hostname -s)

# Kills the daemons this script started in $dir (and only those), then waits for them to go.
stop() {
  local pids=() pidfile pid
  for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munged.pid"; do
    [ -s "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null && pids+=("$pid")
    rm -f "$pidfile"
  done
  for _ in $(seq 50); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && return 0
    sleep 0.1
  done
}

if [ "$action" = stop ]; then
  stop
  exit 0
fi

mkdir -p "$dir/state" "$dir/spool"
chmod 0700 "$dir"
stop
[ -s "$dir/munge.key" ] || dd if=/dev/urandom of="$dir/munge.key" bs=1024 count=1 2>/dev/null
chmod 0400 "$dir/munge.key"
munged --force --socket="$dir/munge.socket" --key-file="$dir/munge.key" \
  --log-file="$dir/munged.log" --pid-file="$dir/munged.pid" --seed-file="$dir/munged.seed" 2>> "$dir/munged.err" ||
  { echo "local-cluster: munged did not start; see $dir/munged.log and $dir/munged.err" >&2; exit 1; }
for _ in $(seq 50); do
  [ -S "$dir/munge.socket" ] && break
  sleep 0.1
done
[ -S "$dir/munge.socket" ] || { echo "local-cluster: munged made no socket; see $dir/munged.log" >&2; exit 1; }
cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
cat > "$dir/slurm.conf" <<CONF
ClusterName=csaq-test
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
InactiveLimit=0
KillWait=10
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
export SLURM_CONF=$dir/slurm.conf
slurmctld -c -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 60); do
  sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)' && break
  sleep 0.5
done
sinfo -h -o %T | grep -qE '^(idle|mixed|allocated)' || { echo "local-cluster: the node did not come up; see $dir/*.log" >&2; exit 1; }
echo "export SLURM_CONF=$SLURM_CONF"
