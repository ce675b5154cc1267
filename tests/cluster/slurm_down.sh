#!/usr/bin/env bash
# Idempotent: stop what slurm_up.sh started, by PID (jobs first, then slurmd, slurmctld, munged).
set -uo pipefail
. "$(dirname "$0")/common.sh"
export SLURM_CONF="$CLUSTER_DIR/slurm.conf"
if pid_alive slurmctld; then scancel --full --quiet --user=root >/dev/null 2>&1 || true; fi
stop_daemon slurmd
stop_daemon slurmctld
stop_daemon munged
echo "cluster: stopped"
