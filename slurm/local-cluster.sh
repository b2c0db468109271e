#!/bin/bash
# Starts (or stops) a one-node SLURM cluster on loopback for tests: munged, slurmctld and
# slurmd as root with a private configuration under $1 (default /tmp/csaq-slurm).
#   slurm/local-cluster.sh start [DIR]   -> prints "export SLURM_CONF=DIR/slurm.conf"
#   slurm/local-cluster.sh stop [DIR]
# Needs Debian's slurmctld, slurmd, slurm-client and munge (scripts/install-deps.sh installs them).
set -euo pipefail
action=${1:?start or stop}
dir=${2:-/tmp/csaq-slurm}
host=$(hostname -s)

stop() {
  for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid"; do
    [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  [ -f "$dir/munged.started" ] && pkill -x munged 2>/dev/null && rm -f "$dir/munged.started"
  sleep 1
}

if [ "$action" = stop ]; then
  stop
  exit 0
fi

mkdir -p "$dir/state" "$dir/spool" /run/munge
if ! pgrep -x munged > /dev/null; then
  [ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null
  chmod 0400 /etc/munge/munge.key
  munged --force
  touch "$dir/munged.started"
fi
cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
cat > "$dir/slurm.conf" <<CONF
ClusterName=csaq-test
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
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
stop
slurmctld -c -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 60); do
  sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)' && break
  sleep 0.5
done
sinfo -h -o %T | grep -qE '^(idle|mixed|allocated)' || { echo "local-cluster: the node did not come up; see $dir/*.log" >&2; exit 1; }
echo "export SLURM_CONF=$SLURM_CONF"
