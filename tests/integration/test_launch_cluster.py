"""`cbt-llm launch slurm` end to end on CPU, on a real single-node Slurm cluster (tests/cluster/slurm_up.sh) with
preemption -> checkpoint -> requeue -> automatic resume -> completion. (`cbt-llm launch deepspeed` on one node is
tests/integration/test_train_e2e.py's LoRA run; on two nodes, tests/integration/test_launch_multinode.py.)

Slow (each test trains a tiny model with 2 gloo ranks). The Slurm tests need root and Debian's slurm-wlm and
munge (tests/ci_setup.sh installs them) and skip with the reason otherwise; the cluster is torn down by a
fixture finalizer even when a test fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.paths import ROOT
from tests.fixtures.train import free_port

BIN = Path(sys.executable).parent
CLUSTER = ROOT / "tests" / "cluster"
pytestmark = pytest.mark.slow


def _env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    env.pop("WANDB_MODE", None)  # the test's config decides
    env.update(extra)
    return env


def _cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "cbt-llm"), *args], cwd=ROOT, env=env or _env(), capture_output=True, text=True, timeout=timeout
    )


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


# ---- Slurm -------------------------------------------------------------------------------------------------


def _slurm_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root to run munged/slurmctld/slurmd"
    missing = [t for t in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "runuser") if not shutil.which(t)]
    return f"not installed: {', '.join(missing)} (run tests/ci_setup.sh)" if missing else None


@pytest.fixture(scope="module")
def slurm(request, tmp_path_factory):
    """A single-node Slurm cluster for this module; stopped (by PID) when the module ends, pass or fail. Its
    state folder (daemon logs, spool) is kept when a test of the module failed, and its path printed."""
    why = _slurm_missing()
    if why:
        pytest.skip(f"Slurm tests skipped: {why}")
    import tempfile

    # not under pytest's 0700 tmp folder: munged runs as user `munge` and must reach its key and socket
    state = Path(tempfile.mkdtemp(prefix="cbt-llm-slurm-"))
    state.chmod(0o755)
    env = _env(CBT_CLUSTER_DIR=str(state), SLURM_CONF=str(state / "slurm.conf"))
    failed_before = request.session.testsfailed
    try:
        up = subprocess.run(["bash", str(CLUSTER / "slurm_up.sh")], env=env, capture_output=True, text=True, timeout=60)
        assert up.returncode == 0, f"slurm_up.sh failed:\n{up.stdout}\n{up.stderr}"
        yield env
    finally:
        subprocess.run(["bash", str(CLUSTER / "slurm_down.sh")], env=env, capture_output=True, timeout=60)
        if request.session.testsfailed > failed_before:
            print(f"\nSlurm tests failed: the cluster's logs are kept in {state / 'logs'}", file=sys.stderr)
        else:
            shutil.rmtree(state, ignore_errors=True)


def _daemon_logs(env: dict, lines: int = 60) -> str:
    """The last lines of slurmctld's and slurmd's logs, for a failed assertion: why a job ended as it did is
    often only there (launch failures, requeue decisions), and the state folder is gone once the module ends."""
    logs = Path(env["CBT_CLUSTER_DIR"]) / "logs"
    parts = []
    for p in sorted(logs.glob("*.file.log")):  # slurm.conf's log files (the daemons' stdout logs repeat them)
        tail = p.read_text(errors="replace").splitlines()[-lines:]
        if tail:
            parts.append(f"--- {p.name} (last {len(tail)} lines)\n" + "\n".join(tail))
    return "\n".join(parts)


def _job(env: dict, job: str) -> dict:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], env=env, capture_output=True, text=True).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def _wait(pred, timeout: float, what: str, step: float = 0.5, env: dict | None = None):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = pred()
        if v:
            return v
        time.sleep(step)
    logs = f"\n{_daemon_logs(env)}" if env else ""
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{logs}")


def _submit(env: dict, run: Path, data: Path, *overrides: str) -> str:
    r = _cli(
        "launch",
        "slurm",
        "--config",
        "configs/demo-cpu.yaml",
        "launch.cpu=true",
        f"launch.slurm.rdzv_port={free_port()}",
        f"train.data_dir={data}",
        f"train.run_dir={run}",
        *overrides,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    job = json.loads((run / "launch" / "slurm.json").read_text())["job_id"]
    assert job and job.isdigit()
    return job


_MB, _GA = 4, 2  # the preemption run's micro-batch size, and the demo config's grad_accum: one epoch is 17 steps


def test_slurm_preemption_requeue_resume(slurm, demo_data, tmp_path):
    """USR1 to the batch script mid-training -> checkpoint -> requeue -> resume -> completion; each row once."""
    run = tmp_path / "run"
    job = _submit(
        slurm,
        run,
        demo_data,
        "train.max_steps=0",
        "train.epochs=1",
        f"train.micro_batch_size={_MB}",
        "train.record_order=true",
        "train.log_every=5",
        "train.eval_every=0",
        "train.save_every=0",
        "wandb.mode=offline",
    )
    order0 = run / "order" / "rank0.jsonl"
    lines = lambda: order0.read_text().count("\n") if order0.exists() else 0  # noqa: E731
    _wait(lambda: lines() >= 6, 240, "6 training steps of the first run", env=slurm)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, check=True)
    # Slurm holds a requeued job until BeginTime (~2 min); start it now instead of waiting that out
    # (seen as Restarts=1 in any state: under load the requeued job may already be running again)
    info = _wait(
        lambda: (lambda j: j if j.get("Restarts") == "1" else None)(_job(slurm, job)),
        120,
        "the job to be requeued",
        env=slurm,
    )
    assert info["Requeue"] == "1"
    if info.get("JobState") == "PENDING":
        # ...but not within the second of the requeue: the requeue revoked the job's credentials on slurmd
        # as of that second (whole seconds), and slurmd refuses a launch credential that is not newer: "error:
        # Job N already killed, do not launch batch job", then slurmctld "Killing non-startable batch JobId=N:
        # Job credential revoked" and the job ends FAILED without its script running. Slurm's ~2 min BeginTime
        # after a requeue is there to avoid this (job_mgr.c batch_requeue_fini), so only this shortcut can hit
        # it, never the rendered script. It hit whenever the scheduler (a pass every ~3 s) came round in that
        # same second: 11 of 40 bare requeues on an idle machine. `info` was read after the requeue, so from the
        # next second on a launch credential is newer (0 of 40 failed with this wait).
        after = int(time.time())
        while int(time.time()) <= after:
            time.sleep(0.05)
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm, check=False)
    final = _wait(
        lambda: (lambda j: j if j.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED") else None)(_job(slurm, job)),
        300,
        "the requeued job to finish",
        env=slurm,
    )
    log = (run / "slurm" / f"cbt-llm-demo-{job}.out").read_text()
    assert final["JobState"] == "COMPLETED", f"{final}\n{log[-3000:]}\n{_daemon_logs(slurm)}"
    assert "got SIGUSR1" in log and "requeueing job" in log and f"job {job} restart 1" in log
    # logs per job, restart and node
    assert (run / "slurm" / f"cbt-llm-demo-{job}-r0-node0.log").is_file()
    assert (run / "slurm" / f"cbt-llm-demo-{job}-r1-node0.log").is_file()

    summary = json.loads((run / "train_summary.json").read_text())
    man = json.loads((demo_data / "manifest.json").read_text())
    rows_per_rank = min(sum(s["rows"] for s in man["splits"]["train"]["shards"][r::2]) for r in range(2))
    total = rows_per_rank // (_MB * _GA)
    assert summary["steps"] == total
    resumed_at = int(summary["resumed_from"].split("-")[-1])
    assert 6 <= resumed_at < total
    # every step exactly once across both runs, and every row of the epoch exactly once per rank
    for rank in range(2):
        recs = [json.loads(ln) for ln in (run / "order" / f"rank{rank}.jsonl").read_text().splitlines()]
        assert sorted(r["step"] for r in recs) == list(range(1, total + 1))
        rows = [k for r in recs for k in r["rows"]]
        assert len(rows) == len(set(rows)) == total * _MB * _GA
    # one W&B run: the id kept in the run folder, both offline segments carry it
    run_id = (run / "wandb_run_id").read_text().strip()
    segments = sorted(p.name for p in (run / "wandb").glob("offline-run-*"))
    assert len(segments) == 2 and all(s.endswith(run_id) for s in segments)
    losses = [m["train/loss"] for m in _metrics(run) if "train/loss" in m]
    assert losses[-1] < losses[0]


def test_slurm_dead_rank_fails_job_without_hang(slurm, demo_data, tmp_path):
    """SIGKILL of one training process: the job ends FAILED (no requeue) within a bounded time, no hang."""
    run = tmp_path / "run"
    env = dict(slurm, CBT_LLM_FAULT="after_step@3:1")  # rank 1 SIGKILLs itself after step 3
    job = _submit(
        env,
        run,
        demo_data,
        "train.max_steps=30",
        "train.eval_every=0",
        "wandb.mode=disabled",
        "train.collective_timeout_s=30",
    )
    final = _wait(
        lambda: (lambda j: j if j.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED") else None)(_job(slurm, job)),
        240,
        "the job to fail",
        env=slurm,
    )
    assert final["JobState"] == "FAILED" and final["Restarts"] == "0", f"{final}\n{_daemon_logs(slurm)}"
    assert not (run / "requeue.json").exists()
    assert "requeueing" not in (run / "slurm" / f"cbt-llm-demo-{job}.out").read_text()
