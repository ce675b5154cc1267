# Shared by the tests/cluster scripts: where state lives and how daemons are started and stopped by PID.
# Everything lives under $CBT_CLUSTER_DIR (default /tmp/cbt-llm-cluster); nothing is installed system-wide.
CLUSTER_DIR=${CBT_CLUSTER_DIR:-/tmp/cbt-llm-cluster}
SLURMCTLD_PORT=${CBT_SLURMCTLD_PORT:-16817}
SLURMD_PORT=${CBT_SLURMD_PORT:-16818}

die() { echo "cluster: $*" >&2; exit 1; }

need_root_tools() {
  [ "$(id -u)" = 0 ] || die "needs root (run tests as root, or skip the Slurm tests)"
  for t in "$@"; do command -v "$t" >/dev/null 2>&1 || die "'$t' not installed; run tests/ci_setup.sh"; done
}

# start_daemon NAME CMD...: run CMD in the background, its PID in $CLUSTER_DIR/pids/NAME.pid, its output in logs/
start_daemon() {
  local name=$1; shift
  mkdir -p "$CLUSTER_DIR/pids" "$CLUSTER_DIR/logs"
  if pid_alive "$name"; then return 0; fi
  setsid "$@" >"$CLUSTER_DIR/logs/$name.log" 2>&1 < /dev/null &
  echo $! > "$CLUSTER_DIR/pids/$name.pid"
}

pid_alive() {
  local f="$CLUSTER_DIR/pids/$1.pid"
  [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null
}

# running PID: the process exists and has not exited. An exited daemon stays a zombie until PID 1 reaps it
# (setsid left it no other parent), and a container's PID 1 may take seconds to; `kill -0` still succeeds then.
running() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }  # the state letter follows the command name in parentheses
  [ "${stat%% *}" != Z ]
}

# stop_daemon NAME: TERM the recorded PID (and its process group: setsid made it a leader), KILL after 5 s
stop_daemon() {
  local f="$CLUSTER_DIR/pids/$1.pid" pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 50); do running "$pid" || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

# wait_for SECONDS CMD...: poll CMD every 0.2 s
wait_for() {
  local t=$1; shift
  local n=$((t * 5))
  for _ in $(seq "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  return 1
}

start_munge() {
  local m="$CLUSTER_DIR/munge"
  mkdir -p "$m"
  if [ ! -f "$m/munge.key" ]; then
    dd if=/dev/urandom of="$m/munge.key" bs=1 count=1024 status=none
  fi
  chown -R munge:munge "$m"; chmod 0700 "$m"; chmod 0400 "$m/munge.key"
  # --force: the state folder sits under /tmp, which munged would otherwise refuse as world-writable
  start_daemon munged runuser -u munge -- munged --foreground --force --key-file="$m/munge.key" \
    --socket="$m/munge.socket" --pid-file="$m/munged.pid" --seed-file="$m/munged.seed" --log-file="$m/munged.log"
  wait_for 10 test -S "$m/munge.socket" || die "munged did not start; see $m/munged.log"
}

# ---- two simulated hosts (netns_up.sh / netns_down.sh) ----------------------------------------------------
# Hosts h0..h(N-1) are network namespaces cbt-h<i> at $NETNS_NET.(10+i), joined by a bridge at $NETNS_NET.1.
NETNS_NET=${CBT_NETNS_NET:-10.123.45}
NETNS_HOSTS=${CBT_NETNS_HOSTS:-2}
NETNS_BRIDGE=${CBT_NETNS_BRIDGE:-cbt-br0}
NETNS_DIR="$CLUSTER_DIR/netns"

netns_addr() { echo "$NETNS_NET.$((10 + $1))"; }

# on_host I CMD...: run CMD "on" host h<I>: its network namespace, its own host name and hosts file. Not
# `ip netns exec`: that remounts /sys, and slurmd then cannot find its cgroups.
on_host() {
  on_host_argv "$1"; shift
  "${ON_HOST[@]}" "$@"
}

# on_host_argv I: set the array ON_HOST to the command prefix on_host uses, for start_daemon NAME "${ON_HOST[@]}" CMD...
on_host_argv() {
  ON_HOST=(nsenter --net="/var/run/netns/cbt-h$1" unshare --mount --uts
    sh -c 'mount --bind "$0" /etc/hosts && hostname "$1" && shift && exec "$@"' "$NETNS_DIR/hosts.h$1" "h$1")
}

# The slurm.conf settings both CI clusters share (single-node and two-namespace); each script adds its own
# ClusterName, SlurmctldHost, memory default and node lines around them.
slurm_conf_common() {
  cat <<CONF
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$SLURMCTLD_PORT
SlurmdPort=$SLURMD_PORT
CommunicationParameters=NoCtldInAddrAny
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$CLUSTER_DIR/munge/munge.socket
StateSaveLocation=$CLUSTER_DIR/ctld
SlurmdSpoolDir=$CLUSTER_DIR/spool/%n
SlurmctldPidFile=$CLUSTER_DIR/slurmctld.pid
SlurmdPidFile=$CLUSTER_DIR/slurmd-%n.pid
SlurmctldLogFile=$CLUSTER_DIR/logs/slurmctld.file.log
SlurmdLogFile=$CLUSTER_DIR/logs/slurmd-%n.file.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MinJobAge=300
SchedulerType=sched/builtin
CONF
}
