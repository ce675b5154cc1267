"""The Ray launcher (launch/ray_job.py): Ray Train's TorchTrainer (V2) on a local Ray head on loopback.

Slow tests start `ray start --head --block` in its own process group under a short temp dir and stop exactly
that process group in a fixture finalizer, even when a test fails (no `ray stop`, which would stop every Ray
on the machine). The job's driver connects to the head's GCS address: `ray job submit` needs the dashboard's
job server, which needs `ray[default]` (aiohttp & co.); that test skips when it is not installed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.launch_fixtures import build_demo_data

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(Path(__file__).parent))
from test_launch_cluster import _cli, _metrics  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1")
    env.pop("CBT_LLM_FAULT", None)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    """The demo's path at its smallest: 300 template records -> tokenizer -> 2 train shards of seq_len 256."""
    return build_demo_data(tmp_path_factory.mktemp("ray_demo"), _cli, _env(), seq_len=256)

# ---- fast ----------------------------------------------------------------------------------------------------

def test_resume_must_be_auto(capsys):
    """Restored workers continue from train.run_dir, so another train.resume is refused up front (exit 2)."""
    from launch.ray_job import main

    assert main(["--config", "configs/demo-cpu.yaml", "train.resume=never"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.resume=auto" in err


def test_run_train_off_the_main_thread_installs_no_signal_handlers(tmp_path):
    """Ray Train V2 runs the train function in a thread, where signal.signal raises: the loop must not call it
    there (the config error below comes after the point where handlers would be installed)."""
    import signal

    from cbt_llm.config import ConfigError, load_config
    from train.engine import run_train

    cfg = load_config(None, [f"train.data_dir={tmp_path / 'none'}", f"train.run_dir={tmp_path / 'run'}"])
    before = signal.getsignal(signal.SIGUSR1)
    seen = {}

    def body():
        try:
            run_train(cfg)
        except Exception as exc:  # noqa: BLE001 - what matters is which exception
            seen["exc"] = exc

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert isinstance(seen["exc"], ConfigError) and "manifest.json" in str(seen["exc"])
    assert signal.getsignal(signal.SIGUSR1) == before


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on 127.0.0.1 (2 CPUs, no dashboard unless ray[default] is installed); yields (gcs, dashboard)."""
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's unix socket paths must stay short
    port, dash = _free_port(), _free_port()
    try:
        import aiohttp  # noqa: F401

        dash_args = ["--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash)]
    except ImportError:
        dash, dash_args = None, ["--include-dashboard", "false"]
    log = open(Path(tmp) / "head.log", "w")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--temp-dir", tmp, "--num-cpus", "2", "--disable-usage-stats", *dash_args],
        env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            r = subprocess.run([str(BIN / "ray"), "status", "--address", f"127.0.0.1:{port}"], env=_env(),
                               capture_output=True, text=True, timeout=60)
            if r.returncode == 0:
                break
            if head.poll() is not None or time.time() > deadline:
                pytest.fail(f"Ray head did not start:\n{(Path(tmp) / 'head.log').read_text()[-3000:]}")
            time.sleep(2)
        yield f"127.0.0.1:{port}", (f"http://127.0.0.1:{dash}" if dash else None)
    finally:
        # --block: on SIGTERM the head stops the processes it started; then the rest of its own group
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()


def _job(gcs: str, data: Path, run: Path, *extra: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    args = ["--config", "configs/demo-cpu.yaml", "launch.cpu=true", f"train.data_dir={data}", f"train.run_dir={run}",
            "train.max_steps=6", "train.log_every=2", "train.eval_every=0", "train.save_every=3",
            "wandb.mode=disabled", *extra]
    return subprocess.run([sys.executable, "-m", "launch.ray_job", *args], cwd=ROOT,
                          env=_env(RAY_ADDRESS=gcs, **(env_extra or {})), capture_output=True, text=True, timeout=480)


@pytest.mark.slow
def test_ray_job_trains_and_reports_checkpoint(ray_head, demo_data, tmp_path):
    gcs, _ = ray_head
    run = tmp_path / "run"
    r = _job(gcs, demo_data, run)
    assert r.returncode == 0, r.stderr[-4000:]
    facts = json.loads((run / "launch" / "ray_job.json").read_text())
    assert facts["exit_code"] == 0 and facts["world_size"] == 2 and facts["steps"] == 6
    assert facts["resumed_from"] is None
    losses = [m["train/loss"] for m in _metrics(run) if "train/loss" in m]
    assert len(losses) == 3 and losses[-1] < losses[0]
    # the final checkpoint was handed to Ray Train and copied under launch.ray.storage_path
    ray_ckpt = Path(facts["ray_checkpoint"])
    assert ray_ckpt == run / "ray" / "cbt-llm-demo" / "step-0000006" and (ray_ckpt / "trainer_state.json").is_file()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000006"


@pytest.mark.slow
def test_ray_job_restores_after_killed_worker(ray_head, demo_data, tmp_path):
    """Rank 1 is SIGKILLed after step 4: Ray restarts the group, which resumes from step 3 and finishes."""
    gcs, _ = ray_head
    run = tmp_path / "run"
    r = _job(gcs, demo_data, run, "launch.ray.max_failures=1", env_extra={"CBT_LLM_FAULT": "after_step@4:1"})
    assert r.returncode == 0, r.stderr[-4000:]
    assert (run / "ray_fault_used").read_text() == "after_step@4:1"  # the fault did fire
    facts = json.loads((run / "launch" / "ray_job.json").read_text())
    assert facts["exit_code"] == 0 and facts["steps"] == 6 and facts["resumed_from"] == "step-0000003"
    steps = [m["step"] for m in _metrics(run) if "train/loss" in m]
    assert steps[-1] == 6


@pytest.mark.slow
def test_ray_job_exits_non_zero_when_training_fails(ray_head, demo_data, tmp_path):
    """No restarts allowed and a worker dies: the driver exits 1 with one error line, the failure recorded."""
    gcs, _ = ray_head
    run = tmp_path / "run"
    r = _job(gcs, demo_data, run, "launch.ray.max_failures=0", "train.max_steps=4",
             env_extra={"CBT_LLM_FAULT": "after_step@1:1"})
    assert r.returncode == 1, r.stderr[-4000:]
    facts = json.loads((run / "launch" / "ray_job.json").read_text())
    assert facts["exit_code"] == 1 and "Ray training failed" in facts["error"]
    assert not (run / "train_summary.json").exists()


@pytest.mark.slow
def test_cbt_llm_launch_ray_submits_job(ray_head, demo_data, tmp_path):
    """`cbt-llm launch ray` -> `ray job submit` to the dashboard's job server (needs ray[default])."""
    _, dash = ray_head
    if dash is None:
        pytest.skip("ray[default] (aiohttp, the dashboard's job server) is not installed: `ray job submit` cannot run")
    run = tmp_path / "run"
    r = subprocess.run([str(BIN / "cbt-llm"), "launch", "ray", "--config", "configs/demo-cpu.yaml", "launch.cpu=true",
                        f"launch.ray.address={dash}", f"train.data_dir={demo_data}", f"train.run_dir={run}",
                        "train.max_steps=4", "train.log_every=2", "train.eval_every=0", "train.save_every=0",
                        "wandb.mode=disabled"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=480)
    assert r.returncode == 0, r.stderr[-4000:]
    launched = json.loads((run / "launch" / "ray.json").read_text())
    assert launched["exit_code"] == 0 and launched["ray_address"] == dash
    assert json.loads((run / "train_summary.json").read_text())["steps"] == 4
