#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for the tests and for trying cluster sweeps:
#   scripts/local_slurm.sh start    # installs slurm-wlm and munge if missing (root, apt-get), writes
#                                   # /etc/slurm/slurm.conf for this host, starts munged, slurmctld, slurmd
#                                   # and waits until sinfo shows the node idle; harmless when already up
#   scripts/local_slurm.sh status   # sinfo; exit 0 when the node answers, 3 when the cluster is down
#   scripts/local_slurm.sh stop     # stops the daemons this script started (by their pid files)
# It is a real Slurm (sbatch, squeue, scontrol, job arrays, time and memory limits) without cgroups, so it
# also runs in a container: processes are tracked by parentage (proctrack/linuxproc), memory limits by
# polling (jobacct_gather/linux with OverMemoryKill), and without slurmdbd (no sacct) the end of every job
# is logged by jobcomp/filetxt to $QLOAD_SLURM_LOGS/jobcomp.log. It never overwrites a slurm.conf it did not write.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by qload scripts/local_slurm.sh"
LOGS=${QLOAD_SLURM_LOGS:-/var/log/slurm}
SPOOL=/var/spool/qload-slurm
MUNGE_PID=/run/munge/munged.pid
CTLD_PID=/run/qload-slurmctld.pid
SLURMD_PID=/run/qload-slurmd.pid
PARTITION=${QLOAD_SLURM_PARTITION:-debug}

say() { echo "local_slurm: $*" >&2; }
die() { say "$*"; exit 1; }
alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_missing() {
  local missing=()
  for cmd in munged slurmctld slurmd sbatch; do command -v "$cmd" >/dev/null || missing+=("$cmd"); done
  ((${#missing[@]} == 0)) && return
  [[ $(id -u) == 0 ]] || die "missing ${missing[*]}; run as root to install slurm-wlm and munge with apt-get"
  say "installing slurm-wlm and munge (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

write_conf() {
  if [[ -f $CONF ]] && ! head -1 "$CONF" | grep -qF "$MARK"; then
    die "$CONF exists and was not written by this script; not touching a real cluster's config"
  fi
  local host node
  host=$(hostname -s)
  # this host's real CPUs and memory, as slurmd itself detects them (NodeName=... CPUs=... RealMemory=...)
  node=$(slurmd -C | head -1)
  [[ $node == NodeName=* ]] || die "slurmd -C did not describe this host: $node"
  mkdir -p "$LOGS" "$SPOOL/ctld" "$SPOOL/d" /etc/slurm
  cat >"$CONF.tmp" <<EOF
$MARK; scripts/local_slurm.sh stop, then remove it
ClusterName=qload-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/d
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
# no cgroups (containers): processes tracked by parentage, memory by polling
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=1
JobAcctGatherParams=OverMemoryKill
# memory is a consumable resource, so that --mem is a limit Slurm enforces
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
# no slurmdbd: how each job ended goes to a log that the sweep reads when a job could not record itself
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOGS/jobcomp.log
MinJobAge=600
KillWait=10
InactiveLimit=0
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$CONF.tmp" "$CONF"
}

node_state() { sinfo -h -N -o %T 2>/dev/null | head -1; }

start() {
  install_missing
  if alive "$CTLD_PID" && alive "$SLURMD_PID" && [[ $(node_state) == idle* || $(node_state) == mixed* || $(node_state) == alloc* ]]; then
    say "already running: $(sinfo -h -o '%P %D %T %C')"
    return
  fi
  write_conf
  local t0=$SECONDS
  if ! alive "$MUNGE_PID"; then
    [[ -s /etc/munge/munge.key ]] || { mungekey --create --force 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; }
    chown munge:munge /etc/munge/munge.key 2>/dev/null || true
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    if id munge >/dev/null 2>&1; then runuser -u munge -- munged; else munged --force; fi
  fi
  munge -n | unmunge >/dev/null || die "munge does not work: see /var/log/munge/munged.log"
  alive "$CTLD_PID" || slurmctld
  alive "$SLURMD_PID" || slurmd
  for _ in $(seq 120); do
    case $(node_state) in
      idle*) say "up in $((SECONDS - t0)) s: $(sinfo -h -o 'partition %P, %D node(s), %c CPUs, %m MB, %T')"; return ;;
      down* | drain*) scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null || true ;;
    esac
    sleep 1
  done
  die "the node did not become idle in 120 s: $(sinfo -h -N 2>&1 | head -3); see $LOGS/slurmctld.log and $LOGS/slurmd.log"
}

stop_pid() {  # name, pid file: SIGTERM the daemon, wait up to 30 s, then SIGKILL
  local name=$1 file=$2 pid
  alive "$file" || return 0
  pid=$(cat "$file")
  kill "$pid"
  for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || { say "stopped $name ($pid)"; rm -f "$file"; return 0; }; sleep 0.5; done
  say "$name ($pid) did not stop in 30 s; SIGKILL"
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$file"
}

stop() {
  if alive "$CTLD_PID"; then
    scancel --quiet --user="$(id -un)" 2>/dev/null || true  # our jobs; a stopped cluster runs none
  fi
  stop_pid slurmd "$SLURMD_PID"
  stop_pid slurmctld "$CTLD_PID"
  stop_pid munged "$MUNGE_PID"
}

status() {
  if alive "$CTLD_PID" && sinfo >/dev/null 2>&1; then
    sinfo
    return 0
  fi
  say "not running"
  return 3
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
