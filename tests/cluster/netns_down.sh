#!/usr/bin/env bash
# Idempotent: undo netns_up.sh [--slurm]. Stops the Slurm jobs, what was started on the hosts and the daemons
# (the PIDs recorded under netns/pids/, then
# any process still inside a cbt-h* namespace, which only these tests put there), then deletes the
# namespaces, their veth pairs and the bridge.
set -uo pipefail
. "$(dirname "$0")/common.sh"
CLUSTER_DIR="$NETNS_DIR"
if pid_alive slurmctld; then
  SLURM_CONF="$NETNS_DIR/slurm.conf" scancel --full --quiet --user=root >/dev/null 2>&1 || true
fi
# what tests started on the hosts first, then the daemons: slurmd, slurmctld, munged last (the others use it)
if [ -d "$NETNS_DIR/pids" ]; then
  for f in "$NETNS_DIR"/pids/*.pid; do
    [ -e "$f" ] || continue
    name=$(basename "$f" .pid)
    case $name in slurmd-*|slurmctld|munged) continue ;; esac
    stop_daemon "$name"
  done
  for f in "$NETNS_DIR"/pids/slurmd-*.pid; do [ -e "$f" ] && stop_daemon "$(basename "$f" .pid)"; done
  stop_daemon slurmctld
  stop_daemon munged
fi
for i in $(seq 0 $((NETNS_HOSTS - 1))); do
  ns=cbt-h$i
  if [ -e "/var/run/netns/$ns" ]; then
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  fi
  # deleting the namespace deletes eth0 and with it the peer; this covers a half-made pair
  ip link del "cbt-h$i-v" 2>/dev/null || true
done
ip link del "$NETNS_BRIDGE" 2>/dev/null || true
echo "cluster: hosts stopped"
