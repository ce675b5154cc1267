#!/usr/bin/env bash
# Idempotent: a single-node Slurm cluster on this machine (munged, slurmctld -D, slurmd -D), all on 127.0.0.1.
# Prints `export SLURM_CONF=...` for the client commands. Stop it with tests/cluster/slurm_down.sh.
set -euo pipefail
. "$(dirname "$0")/common.sh"
need_root_tools munged slurmctld slurmd sbatch scontrol runuser
HOST=$(hostname -s)
CPUS=$(nproc)
MEM=$(awk '/MemTotal/ {print int($2 / 1024 * 0.5)}' /proc/meminfo)
mkdir -p "$CLUSTER_DIR/ctld" "$CLUSTER_DIR/spool"
start_munge
CONF="$CLUSTER_DIR/slurm.conf"
cat > "$CONF.new" <<CONF
# single-node CI cluster written by tests/cluster/slurm_up.sh
ClusterName=cbtci
SlurmctldHost=$HOST(127.0.0.1)
$(slurm_conf_common)
DefMemPerCPU=$((MEM / CPUS))
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=ci Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
mv "$CONF.new" "$CONF"
export SLURM_CONF="$CONF"
start_daemon slurmctld slurmctld -D -i -f "$CONF"
wait_for 15 scontrol ping || die "slurmctld did not answer; see $CLUSTER_DIR/logs/slurmctld.log"
start_daemon slurmd slurmd -D -f "$CONF" -N "$HOST"
ready() { sinfo -h -N -o '%T' | grep -qE '^(idle|mixed|allocated)'; }
wait_for 20 ready || die "node did not become idle; see $CLUSTER_DIR/logs/slurmd.log"
echo "export SLURM_CONF=$CONF"
