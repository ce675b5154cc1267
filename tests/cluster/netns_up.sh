#!/usr/bin/env bash
# Idempotent: two simulated hosts on this machine. Network namespaces cbt-h0 and cbt-h1, each with a veth pair
# on bridge cbt-br0 in the root namespace, addresses $NETNS_NET.10 / .11 (bridge .1), loopback up, no default
# route (nothing can leave the machine). Writes a hosts file per host under $CBT_CLUSTER_DIR/netns/ naming
# h0, h1 and the bridge (cbt-root); run things on a host with `on_host I CMD...` from common.sh, which gives
# the process the host's name and hosts file (else gloo resolves every host to 127.0.0.1).
# Record the PID of anything started on a host in $CBT_CLUSTER_DIR/netns/pids/*.pid; netns_down.sh stops it.
#
# With --slurm, also a two-node Slurm cluster on them: munged and slurmctld in the root namespace (slurmctld
# under its own host name cbt-root, bound to the bridge address only: NoCtldInAddrAny), one slurmd per host.
# Prints `export SLURM_CONF=...` for the client commands, which work from the root namespace.
set -euo pipefail
. "$(dirname "$0")/common.sh"
SLURM=""
[ "${1:-}" = "--slurm" ] && SLURM=1
need_root_tools ip nsenter unshare mount hostname
[ -z "$SLURM" ] || need_root_tools munged slurmctld slurmd sbatch scontrol sinfo runuser
mkdir -p "$NETNS_DIR/pids"
hosts="127.0.0.1 localhost
$NETNS_NET.1 cbt-root"
for i in $(seq 0 $((NETNS_HOSTS - 1))); do hosts="$hosts
$(netns_addr "$i") h$i"; done

if ! ip link show "$NETNS_BRIDGE" >/dev/null 2>&1; then ip link add "$NETNS_BRIDGE" type bridge stp_state 0 forward_delay 0; fi
ip addr replace "$NETNS_NET.1/24" dev "$NETNS_BRIDGE"
ip link set "$NETNS_BRIDGE" up
for i in $(seq 0 $((NETNS_HOSTS - 1))); do
  ns=cbt-h$i veth=cbt-h$i-v
  [ -e "/var/run/netns/$ns" ] || ip netns add "$ns"
  if ! ip link show "$veth" >/dev/null 2>&1; then
    ip link add "$veth" type veth peer name eth0 netns "$ns"
  fi
  ip link set "$veth" master "$NETNS_BRIDGE" up
  ip -n "$ns" link set lo up
  ip -n "$ns" addr replace "$(netns_addr "$i")/24" dev eth0
  ip -n "$ns" link set eth0 up
  printf '%s\n' "$hosts" > "$NETNS_DIR/hosts.h$i"
done
# ready when every host's eth0 is up and its bridge port forwards (no STP: no learning delay)
up() {
  for i in $(seq 0 $((NETNS_HOSTS - 1))); do
    ip -n "cbt-h$i" -o link show eth0 | grep -q 'state UP' || return 1
    ip -o link show "cbt-h$i-v" | grep -q 'state UP' || return 1
  done
}
wait_for 10 up || die "veth links did not come up; see \`ip -d link show master $NETNS_BRIDGE\`"
last=$((NETNS_HOSTS - 1))
echo "cluster: hosts $(for i in $(seq 0 $last); do printf 'h%s=%s ' "$i" "$(netns_addr "$i")"; done)on $NETNS_BRIDGE; state in $NETNS_DIR"

[ -n "$SLURM" ] || exit 0

# ---- two-node Slurm --------------------------------------------------------------------------------------
# Its own ports and state (under netns/), so a single-node cluster from slurm_up.sh can run at the same time.
SLURMCTLD_PORT=${CBT_SLURM2_CTLD_PORT:-16827}
SLURMD_PORT=${CBT_SLURM2_SLURMD_PORT:-16828}
CLUSTER_DIR="$NETNS_DIR"  # start_daemon/start_munge keep their PIDs in netns/pids, which netns_down.sh stops
CTL=cbt-root
NODE_MEM=4096  # MiB declared per node; nothing enforces it here (no cgroup task plugin), it only sizes jobs
mkdir -p "$CLUSTER_DIR/ctld" "$CLUSTER_DIR/spool"
start_munge
CONF="$CLUSTER_DIR/slurm.conf"
nodes=$(for i in $(seq 0 $last); do printf 'h%s,' "$i"; done); nodes=${nodes%,}
{
  cat <<CONF
# two-node CI cluster on network namespaces, written by tests/cluster/netns_up.sh --slurm
ClusterName=cbtci2
SlurmctldHost=$CTL($NETNS_NET.1)
$(slurm_conf_common)
DefMemPerCPU=$NODE_MEM
CONF
  # one CPU per simulated host: both share this machine's cores
  for i in $(seq 0 $last); do echo "NodeName=h$i NodeAddr=$(netns_addr "$i") CPUs=1 RealMemory=$NODE_MEM State=UNKNOWN"; done
  echo "PartitionName=ci Nodes=$nodes Default=YES MaxTime=INFINITE State=UP"
} > "$CONF.new"
mv "$CONF.new" "$CONF"
export SLURM_CONF="$CONF"
# slurmctld only runs where the host name is SlurmctldHost: the root namespace's network, its own UTS name
printf '%s\n' "$hosts" > "$NETNS_DIR/hosts.ctl"
start_daemon slurmctld unshare --mount --uts \
  sh -c 'mount --bind "$0" /etc/hosts && hostname "$1" && shift && exec "$@"' "$NETNS_DIR/hosts.ctl" "$CTL" \
  slurmctld -D -i -f "$CONF"
wait_for 15 scontrol ping || die "slurmctld did not answer; see $CLUSTER_DIR/logs/slurmctld.log"
for i in $(seq 0 $last); do
  on_host_argv "$i"
  start_daemon "slurmd-h$i" "${ON_HOST[@]}" slurmd -D -f "$CONF" -N "h$i"
done
ready() { [ "$(sinfo -h -N -o '%T' | grep -cE '^(idle|mixed|allocated)')" = "$NETNS_HOSTS" ]; }
wait_for 20 ready || die "nodes did not become idle; see $CLUSTER_DIR/logs/slurmd-h*.log"
echo "export SLURM_CONF=$CONF"
