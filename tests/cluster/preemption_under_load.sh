#!/usr/bin/env bash
# tests/integration/test_launch_cluster.py::test_slurm_preemption_requeue_resume N times in a row (default 10) while two
# CPU burners keep both cores of a small CI machine busy; stops at the first failure and prints how many passed.
# Each run is a fresh pytest session: its own demo data and its own Slurm cluster, as in CI.
#   usage: tests/cluster/preemption_under_load.sh [N]      (root, after tests/ci_setup.sh; PYTHON=... to pick one)
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
N=${1:-10}
PY=${PYTHON:-$ROOT/.venv/bin/python}
# the test's subprocesses (cbt-llm, the sbatch job, torchrun) import this checkout even when the venv's
# editable install points at another one
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"

BURNERS=()
stop_burners() { for p in "${BURNERS[@]}"; do kill "$p" 2>/dev/null; done; }
trap stop_burners EXIT
trap 'exit 130' INT TERM
for _ in 1 2; do
  python3 -c 'while True: pass' &
  BURNERS+=($!)
done
echo "load: CPU burners ${BURNERS[*]} on $(nproc) core(s)"

passed=0
t0=$(date +%s)
for i in $(seq "$N"); do
  t=$(date +%s)
  if "$PY" -m pytest -q -p no:cacheprovider -x tests/integration/test_launch_cluster.py \
      -k test_slurm_preemption_requeue_resume; then
    passed=$((passed + 1))
    echo "run $i/$N: passed in $(($(date +%s) - t)) s"
  else
    echo "run $i/$N: FAILED after $(($(date +%s) - t)) s"
    break
  fi
done
echo "preemption under load: $passed/$N passed in a row, $(($(date +%s) - t0)) s"
[ "$passed" -eq "$N" ]
