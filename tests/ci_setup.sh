#!/usr/bin/env bash
# Idempotent: install the system tools the launcher tests need (Slurm, munge, iproute2, util-linux) when missing.
# Run as root (CI is root). Without root it only reports what is missing; those tests then skip.
set -euo pipefail
need=()
command -v slurmctld >/dev/null 2>&1 || need+=(slurm-wlm)
command -v munged    >/dev/null 2>&1 || need+=(munge)
command -v ip        >/dev/null 2>&1 || need+=(iproute2)
command -v nsenter   >/dev/null 2>&1 || need+=(util-linux)
command -v bridge    >/dev/null 2>&1 || need+=(iproute2)
if [ ${#need[@]} -eq 0 ]; then
  echo "ci_setup: slurm-wlm, munge, iproute2, util-linux already installed"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "ci_setup: not root; missing ${need[*]} (the Slurm/netns tests will skip)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# --no-install-recommends keeps it to the daemons and clients; policy-rc.d stops the packages' own
# postinst from starting munge/slurm services we start ourselves (by PID) in tests/cluster/.
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
echo "ci_setup: installed ${need[*]}"
