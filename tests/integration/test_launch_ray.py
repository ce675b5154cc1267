"""The Ray launcher (launch/ray_job.py): Ray Train's TorchTrainer (V2) on a local Ray head on loopback.

Slow tests start `ray start --head --block` (with the dashboard's job server, from ray[default]) in its own
process group under a short temp dir and stop exactly that process group in a fixture finalizer, even when a
test fails (no `ray stop`, which would stop every Ray on the machine). Jobs reach the head the ways users do:
`cbt-llm launch ray` with RAY_ADDRESS, `ray job submit --address http://<dashboard>`, and the driver
`cbt-llm launch ray --entrypoint` run against the GCS address.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.fixtures.paths import ROOT
from tests.fixtures.train import free_port

BIN = Path(sys.executable).parent
from test_launch_cluster import _metrics  # noqa: E402


def _env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1")
    # Ray Train's controller polls its workers every 2 s (default), and each rank waits for that poll to commit
    # every checkpoint it reports (launch/ray_job.py, _report_checkpoint): poll more often here. Ray passes it
    # on from the driver to the controller; the head has it too, for jobs that `ray job submit` starts.
    env.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # each worker group also starts a PreemptionWatcher actor (one more Python process on 2 busy cores) that only
    # watches for nodes being drained, which a one-node test cluster never is
    env.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    env.pop("CBT_LLM_FAULT", None)
    env.update(extra)
    return env


# ---- fast ----------------------------------------------------------------------------------------------------


def test_resume_must_be_auto(capsys):
    """Restored workers continue from train.run_dir, so another train.resume is refused up front (exit 2)."""
    from cbt_llm.cli import main

    assert main(["launch", "ray", "--entrypoint", "--config", "configs/demo-cpu.yaml", "train.resume=never"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.resume=auto" in err


def test_run_train_off_the_main_thread_installs_no_signal_handlers(tmp_path):
    """Ray Train V2 runs the train function in a thread, where signal.signal raises: the loop must not call it
    there (the config error below comes after the point where handlers would be installed)."""
    import signal

    from cbt_llm.core.config import load_config
    from cbt_llm.core.errors import ConfigError
    from train.recipe import run_train

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


def _shards(d: Path) -> list[dict]:
    """Two tiny packed shards (3 and 2 rows) as prepare writes them, and their manifest entries."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (d / "train").mkdir()
    shards = []
    for i, n in enumerate((3, 2)):
        ids = [[10 * i + r + 1] * (r + 2) for r in range(n)]
        pq.write_table(
            pa.table({"input_ids": ids, "labels": ids, "position_ids": [list(range(len(x))) for x in ids]}),
            d / f"train/shard-{i}.parquet",
        )
        shards.append({"path": f"train/shard-{i}.parquet", "rows": n})
    return shards


def _stream(d: Path, shards: list[dict], order: list[tuple[int, int, int]]) -> list:
    """Arrow batches as Ray Data yields them with include_paths: (shard, first row, rows) each, path absolute."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = []
    for i, a, n in order:
        t = pq.read_table(d / shards[i]["path"]).slice(a, n)
        out.append(t.append_column("path", pa.array([str(d / shards[i]["path"])] * n)))
    return out


def test_rows_from_a_ray_data_stream_are_read_rows(tmp_path):
    """Batches cut anywhere, even across shards, give read_rows' rows and keys; a stream that is not exactly
    this rank's shards in file order is refused with one line."""
    import numpy as np

    from cbt_llm.core.errors import ConfigError
    from train.data import read_rows, rows_from_batches

    shards = _shards(tmp_path)
    ref = read_rows(tmp_path, shards, 0)
    got = rows_from_batches(_stream(tmp_path, shards, [(0, 0, 2), (0, 2, 1), (1, 0, 2)]), shards, 0)
    assert (
        got.keys
        == ref.keys
        == [
            "train/shard-0.parquet:0",
            "train/shard-0.parquet:1",
            "train/shard-0.parquet:2",
            "train/shard-1.parquet:0",
            "train/shard-1.parquet:1",
        ]
    )
    for f in ("input_ids", "labels", "position_ids", "offsets", "real_len"):
        assert np.array_equal(getattr(got, f), getattr(ref, f)), f
    bad = {
        "expected": [(0, 0, 3)],  # a shard missing
        "after another shard began": [(0, 0, 1), (1, 0, 2), (0, 1, 2)],  # interleaved
        "not one of this rank's shards": [(0, 0, 3), (1, 0, 2)],  # checked against shard 0 only
    }
    for msg, order in bad.items():
        want = shards[:1] if "this rank" in msg else shards
        with pytest.raises(ConfigError, match=msg) as e:
            rows_from_batches(_stream(tmp_path, shards, order), want, 0)
        assert "\n" not in str(e.value)


def test_checkpoint_files_are_uploaded_by_the_rank_that_wrote_them():
    from launch.ray_job import file_rank

    assert [
        file_rank(n)
        for n in (
            "zero_pp_rank_1_mp_rank_00_model_states.pt",
            "bf16_zero_pp_rank_12_mp_rank_00_optim_states.pt",
            "rng-rank3.pt",
            "mp_rank_00_model_states.pt",
            "trainer_state.json",
        )
    ] == [1, 12, 3, 0, 0]


def test_a_read_streams_each_shard_whole_in_file_order_with_its_path(tmp_path, monkeypatch):
    """The read task's function (launch.ray_read.read_shard_batches, what each Ray Data read task runs): every
    row of each named shard, the files in the order given, in pieces of at most READ_BATCH_ROWS rows, each
    row with the path it came from, so rows_from_batches rebuilds read_rows' rows exactly."""
    import numpy as np
    import pyarrow as pa

    from launch import ray_read
    from train.data import TOKEN_COLUMNS, read_rows, rows_from_batches

    shards = _shards(tmp_path)
    paths = [str(tmp_path / s["path"]) for s in reversed(shards)]
    monkeypatch.setattr(ray_read, "READ_BATCH_ROWS", 2)  # shard 0 has 3 rows: two pieces
    pieces = list(ray_read.read_shard_batches(pa.table({"path": paths}), list(TOKEN_COLUMNS)))
    assert [(t.column("path")[0].as_py(), t.num_rows) for t in pieces] == [(paths[0], 2), (paths[1], 2), (paths[1], 1)]
    assert all(t.column_names == ["input_ids", "labels", "position_ids", "path"] for t in pieces)
    got = rows_from_batches(pieces, list(reversed(shards)), 0)
    ref = read_rows(tmp_path, list(reversed(shards)), 0)
    assert got.keys == ref.keys
    for f in ("input_ids", "labels", "position_ids", "offsets", "real_len"):
        assert np.array_equal(getattr(got, f), getattr(ref, f)), f


def test_a_preference_stream_carries_its_pairs(tmp_path):
    """train.objective=dpo: the read task also streams example_ids, and rows_from_batches gives read_rows' pairs."""
    import numpy as np
    import pyarrow as pa

    from launch import ray_read
    from tests.fixtures.tiny import make_preference_shards
    from train.data import PAIR_COLUMNS, columns_for, load_manifest, read_rows, rows_from_batches

    data = make_preference_shards(tmp_path / "pref", rows_per_shard=3, train_shards=2, val_rows=1)
    shards = load_manifest(data)["splits"]["train"]["shards"]
    paths = pa.table({"path": [str(data / s["path"]) for s in shards]})
    assert columns_for("dpo") == PAIR_COLUMNS
    got = rows_from_batches(ray_read.read_shard_batches(paths, list(columns_for("dpo"))), shards, 0)
    ref = read_rows(data, shards, 0, PAIR_COLUMNS)
    assert got.keys == ref.keys and np.array_equal(got.pairs, ref.pairs) and ref.pairs.sum() > len(ref)


def _http_json(url: str, body: dict | None = None) -> dict:
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def _wait_until_jobs_run(dash: str, head: subprocess.Popen, log: Path) -> None:
    """Until a job runs on the head: GCS, raylet, the job server and the node's agent that starts jobs are all up
    (`ray job list` answers earlier, while submissions still fail with "No available agent"). Submitted over the
    job server's REST API (what `ray job submit` calls): each `ray job submit` would first import Ray (seconds of
    a busy 2-core machine's time) and sleep 2 s between tries."""
    deadline = time.time() + 300  # under load (a parallel suite) the job agent has taken over 2 min to start
    job, last = None, ""
    while time.time() < deadline and head.poll() is None:
        try:
            if job is None:  # refused (the dashboard is not up yet) or HTTP 500 (no agent yet) until then
                job = _http_json(f"{dash}/api/jobs/", {"entrypoint": "true"})["submission_id"]
            status = _http_json(f"{dash}/api/jobs/{job}")["status"]
            if status == "SUCCEEDED":
                return
            if status in ("FAILED", "STOPPED"):
                job, last = None, f"job `true` {status}"
        except (OSError, ValueError) as exc:  # URLError and HTTPError are OSErrors; ValueError: a reply not JSON
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.5)
    pytest.fail(f"Ray head did not start:\n{log.read_text()[-3000:]}\nlast job submission: {last}")


def _running(p) -> bool:
    """Still running: an exited process stays a zombie until its parent reaps it (`ray start` polls its children;
    orphaned Ray workers wait for this machine's init), and that can take longer than the wait below."""
    import psutil

    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _stop_group(head: subprocess.Popen) -> None:
    """Stop the head's process group: `ray start --block` ignores SIGTERM (it only watches its children), so
    signal the whole group (GCS, raylet, dashboard; the raylet stops its workers), give its processes up to 3 s to
    exit, then kill what is left."""
    import psutil

    try:
        procs = psutil.Process(head.pid).children(recursive=True)
        os.killpg(head.pid, signal.SIGTERM)
        deadline = time.time() + 3
        while time.time() < deadline and any(map(_running, procs)):
            time.sleep(0.1)
        os.killpg(head.pid, signal.SIGKILL)
    except (ProcessLookupError, psutil.NoSuchProcess):
        pass


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head on 127.0.0.1 with its dashboard (the job server); yields (gcs address, dashboard URL).

    4 logical CPUs on this 2-core machine: 2 for the training workers and room for Ray Data's read tasks, which
    each ask for one CPU (with only 2 the workers would wait for their rows forever: see _check_cpus)."""
    tmp = tmp_path_factory.mktemp("ray")  # Ray's unix socket paths must stay short (under ~107 characters)
    if len(str(tmp)) > 40:
        tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    port, dash, agent = free_port(), free_port(), free_port()
    log = open(tmp / "head.log", "w")
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(port),
            "--temp-dir",
            str(tmp),
            "--num-cpus",
            "4",
            "--disable-usage-stats",
            "--include-dashboard",
            "true",
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dash),
            # not the fixed default (52365): a second Ray on the machine (another test run) would hold it, and
            # this node's job agent would never start
            "--dashboard-agent-listen-port",
            str(agent),
        ],
        env=_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_until_jobs_run(f"http://127.0.0.1:{dash}", head, tmp / "head.log")
        yield f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}"
    finally:
        _stop_group(head)
        head.wait(timeout=30)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


# one epoch is 8 steps of 8 x 2 rows per rank (141 rows per rank, 13 left out); 10 steps cross into epoch 1.
# A step's time here is mostly fixed cost (ZeRO-3 gathers, gloo round trips), not rows: the loop timed about 1 s
# a step with 8-row micro-batches as with 4-row ones, so an epoch of 8 steps takes half the time of 17. Saves at
# 4, 8 and 10 (the last).
_STEPS, _SPE, _MB, _GA, _SAVE = 10, 8, 8, 2, 4
_KILL_AFTER = 6  # the restore test's fault: 2 steps past the checkpoint at 4, which the restored group redoes


def _tag(step: int) -> str:
    return f"step-{step:07d}"


def _args(data: Path, run: Path, *extra: str) -> list[str]:
    return [
        "--config",
        "configs/demo-cpu.yaml",
        "launch.cpu=true",
        f"train.data_dir={data}",
        f"train.run_dir={run}",
        f"train.max_steps={_STEPS}",
        f"train.micro_batch_size={_MB}",
        f"train.grad_accum={_GA}",
        "train.log_every=1",
        "train.eval_every=0",
        f"train.save_every={_SAVE}",
        "train.record_order=true",
        "wandb.mode=disabled",
        *extra,
    ]


def _job(gcs: str, data: Path, run: Path, *extra: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """The driver run directly against the head's GCS address (as the job server runs it)."""
    return subprocess.run(
        [sys.executable, "-m", "cbt_llm.cli", "launch", "ray", "--entrypoint", *_args(data, run, *extra)],
        cwd=ROOT,
        env=_env(RAY_ADDRESS=gcs, **(env_extra or {})),
        capture_output=True,
        text=True,
        timeout=480,
    )


def _by_step(run: Path, key: str = "train/loss") -> dict[int, float]:
    return {m["step"]: m[key] for m in _metrics(run) if key in m}  # a resumed run's later line wins


def _order(run: Path, rank: int) -> dict[int, dict]:
    lines = (run / "order" / f"rank{rank}.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}  # a resumed run's later line wins


@pytest.fixture(scope="module")
def ray_run(ray_head, demo_data, tmp_path_factory) -> Path:
    """The uninterrupted run, submitted as users do: `cbt-llm launch ray` -> `ray job submit` to $RAY_ADDRESS."""
    _, dash = ray_head
    run = tmp_path_factory.mktemp("ray_run") / "run"
    t0 = time.time()
    r = subprocess.run(
        [str(BIN / "cbt-llm"), "launch", "ray", *_args(demo_data, run)],
        cwd=ROOT,
        env=_env(RAY_ADDRESS=dash),
        capture_output=True,
        text=True,
        timeout=480,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    print(f"ray_run: {time.time() - t0:.0f} s")
    return run


@pytest.mark.slow
def test_ray_job_submitted_with_cbt_llm_launch_trains(ray_head, ray_run):
    _, dash = ray_head
    launched = json.loads((ray_run / "launch" / "ray.json").read_text())
    assert launched["exit_code"] == 0 and launched["ray_address"] == dash
    facts = json.loads((ray_run / "launch" / "ray_job.json").read_text())
    assert facts["exit_code"] == 0 and facts["world_size"] == 2 and facts["steps"] == _STEPS
    assert facts["resumed_from"] is None and facts["restored_from"] == [None]
    losses = _by_step(ray_run)
    # it learns: the loss falls by over half a nat within the run (not compared at the last step: on the template-v3
    # demo corpus the tiny model's loss falls 8.03 -> 6.48 over steps 1-9, then spikes at step 10, where warm-up
    # reaches the demo's peak rate of 1e-2; the restore test below checks every step's value against this run)
    assert sorted(losses) == list(range(1, _STEPS + 1)) and min(losses.values()) < losses[1] - 0.5, losses


@pytest.mark.slow
def test_ray_workers_get_their_rows_from_ray_data_once_per_epoch(ray_run, demo_data):
    """Each worker trains on exactly the rows, in exactly the order, that the loop gives that rank under every
    other launcher (read_rows + RankLoader): every row of an epoch once across workers, except the ones the
    manifest arithmetic leaves out; the same number of steps on every rank."""
    from cbt_llm.core.config import load_config
    from train.data import RankLoader, load_manifest, rank_shards, read_rows, steps_per_epoch

    m = load_manifest(demo_data)
    spe, left_out = steps_per_epoch(m, 2, _MB, _GA)
    assert (spe, left_out) == (_SPE, 26)
    seed = load_config("configs/demo-cpu.yaml", []).train.seed
    summary = json.loads((ray_run / "train_summary.json").read_text())
    assert summary["rows_left_out_per_epoch"] == left_out
    all_rows = {f"{s['path']}:{i}" for s in m["splits"]["train"]["shards"] for i in range(s["rows"])}
    epoch0 = []
    for rank in (0, 1):
        got = _order(ray_run, rank)
        assert sorted(got) == list(range(1, _STEPS + 1))
        loader = RankLoader(
            read_rows(demo_data, rank_shards(m, "train", rank, 2), 0),
            micro_batch_size=_MB,
            grad_accum=_GA,
            seed=seed,
            rank=rank,
            steps_per_epoch=spe,
            pad_token_id=0,
        )
        for step in range(1, _STEPS + 1):
            _, keys = loader.next_step()
            assert got[step]["rows"] == keys, (rank, step)
            assert got[step]["epoch"] == loader.epoch == (step - 1) // spe
        own = {s["path"] for s in rank_shards(m, "train", rank, 2)}
        epoch0 += [k for s in range(1, spe + 1) for k in got[s]["rows"]]
        assert all(k.rpartition(":")[0] in own for s in got.values() for k in s["rows"])
    assert len(epoch0) == len(set(epoch0)) == len(all_rows) - left_out and set(epoch0) <= all_rows


@pytest.mark.slow
def test_ray_every_checkpoint_lands_in_storage_path(ray_run):
    """Every saved checkpoint is reported to Ray, each rank uploading its own ZeRO shards and RNG state into one
    folder under launch.ray.storage_path; Ray keeps the newest train.keep_last (2) there."""
    facts = json.loads((ray_run / "launch" / "ray_job.json").read_text())
    storage = ray_run / "ray" / "cbt-llm-demo"
    assert facts["storage_path"] == str(ray_run / "ray")
    kept = [_tag(2 * _SAVE), _tag(_STEPS)]
    assert facts["ray_checkpoints"] == [str(storage / t) for t in kept]
    assert facts["ray_checkpoint"] == str(storage / _tag(_STEPS))
    assert sorted(p.name for p in storage.glob("step-*")) == kept  # the first save (step 4) pruned
    for tag in kept:
        names = {p.name for p in (storage / tag).iterdir()}
        assert names == {p.name for p in (ray_run / "checkpoints" / tag).iterdir()}
        assert {"trainer_state.json", "rng-rank0.pt", "rng-rank1.pt"} <= names
        assert {n for n in names if n.startswith("zero_pp_rank_1_")} and {
            n for n in names if n.startswith("zero_pp_rank_0_")
        }
        assert json.loads((storage / tag / "trainer_state.json").read_text())["step"] == int(tag[5:])
    assert not list(ray_run.glob(".ray-upload-*"))  # the staging folders are gone


@pytest.mark.slow
def test_ray_job_restores_killed_worker_from_storage_path(ray_head, demo_data, ray_run, tmp_path):
    """Rank 1 is SIGKILLed after step 6: Ray starts a new worker group, which loads the last checkpoint it
    registered under storage_path (step 4) and finishes; the steps after the restore see the same rows and give
    the same losses as the uninterrupted run."""
    gcs, _ = ray_head
    run = tmp_path / "run"
    fault = f"after_step@{_KILL_AFTER}:1"
    r = _job(gcs, demo_data, run, "launch.ray.max_failures=1", env_extra={"CBT_LLM_FAULT": fault})
    assert r.returncode == 0, r.stderr[-4000:]
    assert (run / "ray_fault_used").read_text() == fault  # the fault did fire
    facts = json.loads((run / "launch" / "ray_job.json").read_text())
    storage = run / "ray" / "cbt-llm-demo"
    assert facts["exit_code"] == 0 and facts["steps"] == _STEPS and facts["resumed_from"] == _tag(_SAVE)
    assert facts["restored_from"] == [None, str(storage / _tag(_SAVE))]
    assert f"resumed from {storage / _tag(_SAVE)} at step {_SAVE}" in r.stdout + r.stderr
    assert Path(facts["ray_checkpoint"]) == storage / _tag(_STEPS)
    ref, got = _by_step(ray_run), _by_step(run)
    assert sorted(got) == list(range(1, _STEPS + 1))
    for step in range(_SAVE + 1, _STEPS + 1):  # computed after the restore
        assert got[step] == pytest.approx(ref[step], abs=1e-5), (step, got[step], ref[step])
    for rank in (0, 1):
        assert _order(run, rank) == _order(ray_run, rank)


@pytest.mark.slow
def test_ray_job_submit_exits_non_zero_when_training_fails(ray_head, demo_data, tmp_path):
    """No restarts allowed and a worker dies: the job's driver exits 1 with one error line, so `ray job submit`
    (what `cbt-llm launch ray` runs) exits non-zero too."""
    _, dash = ray_head
    run = tmp_path / "run"
    env_json = json.dumps({"env_vars": {"CBT_LLM_FAULT": "after_step@1:1"}})  # the job's own environment
    entry = shlex.join(
        [
            "python",
            "-m",
            "cbt_llm.cli",
            "launch",
            "ray",
            "--entrypoint",
            *_args(demo_data, run, "launch.ray.max_failures=0", "train.max_steps=3"),
        ]
    )
    r = subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            dash,
            "--runtime-env-json",
            env_json,
            "--",
            "bash",
            "-c",
            f"cd {shlex.quote(str(ROOT))} && {entry}",
        ],  # as the rendered script does
        env=_env(),
        capture_output=True,
        text=True,
        timeout=480,
    )
    assert r.returncode != 0, r.stdout[-4000:]
    assert "failed" in (r.stdout + r.stderr).lower()
    facts = json.loads((run / "launch" / "ray_job.json").read_text())
    assert facts["exit_code"] == 1 and "Ray training failed" in facts["error"]
    assert not (run / "train_summary.json").exists()


# ---- prepare on the cluster (issue 15) ------------------------------------------------------------------------


def _worker_node(gcs: str, tmp: Path) -> subprocess.Popen:
    """A second Ray node (2 CPUs) joined to the head, in its own process group; every port it would otherwise
    take by default is made free-random, since the head on this machine already holds the defaults."""
    ports = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port"]
    ports += ["--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"]
    args = [str(BIN / "ray"), "start", "--address", gcs, "--block", "--num-cpus", "2", "--disable-usage-stats"]
    args += ["--node-ip-address", "127.0.0.1"] + [x for p in ports for x in (p, str(free_port()))]
    log = open(tmp / "worker.log", "w")
    return subprocess.Popen(args, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _alive_nodes(dash: str) -> int:
    r = subprocess.run(
        [str(BIN / "ray"), "list", "nodes", "--address", dash, "--filter", "state=ALIVE", "--format", "json"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    return len(json.loads(r.stdout)) if r.returncode == 0 else 0


@pytest.mark.slow
def test_prepare_through_ray_address_writes_the_local_runs_shards(ray_head, demo_data, tmp_path):
    """`cbt-llm prepare --ray-address` on a two-node cluster (the head and a worker node joined to it) writes
    byte for byte what the demo data's embedded local Ray wrote: shards, rejects, question files and manifest.
    The project's code reaches the cluster's workers through the runtime env (ray_session.init_ray)."""
    gcs, dash = ray_head
    worker = _worker_node(gcs, tmp_path)
    try:
        deadline, starts = time.time() + 240, 1
        while _alive_nodes(dash) < 2:
            if worker.poll() is not None and starts < 3 and time.time() < deadline:
                # `ray start` gives a joining node a fixed 30 s to register with the head's GCS (ray/_private/
                # node.py) and exits when a busy machine needs longer: start it again, as an operator would
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(worker.pid, signal.SIGKILL)  # whatever the failed start left in its group
                worker, starts = _worker_node(gcs, tmp_path), starts + 1
            assert worker.poll() is None and time.time() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(1)
        d = demo_data.parent  # the demo's corpus and tokenizer, prepared as tests/fixtures/launch.py does
        out = tmp_path / "data"
        r = subprocess.run(
            [str(BIN / "cbt-llm"), "prepare", "--config", "configs/demo-cpu.yaml", "--out", str(out)]
            + ["--tokenizer", str(d / "tokenizer"), f"data.inputs=[{d / 'corpus'}/*.jsonl*]", "data.seq_len=256"]
            + ["data.world_size=2", "data.val_fraction=0.05", "--ray-address", gcs],
            cwd=ROOT,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr[-4000:]
    finally:
        _stop_group(worker)
        worker.wait(timeout=30)

    def files(folder: Path) -> dict[str, bytes]:
        return {
            str(p.relative_to(folder)): p.read_bytes()
            for p in folder.rglob("*")
            if p.is_file() and p.name != "prepare_metrics.json"
        }

    local, cluster = files(demo_data), files(out)
    assert sorted(cluster) == sorted(local) and any(k.startswith("train/") for k in local)
    assert json.loads(cluster.pop("manifest.json")) == json.loads(local.pop("manifest.json"))
    assert cluster == local


# ---- the dpo objective: the recipe is shared, so one launcher runs it end to end -------------------


@pytest.mark.slow
def test_ray_job_trains_the_dpo_objective(ray_head, tmp_path):
    """A Ray job of train.objective=dpo, full fine-tuning, sigmoid: Ray Data streams the preference shards with their
    example_ids, the workers compute the reference store beside the shards before the first step (at step 1 the
    policy is its reference: loss log 2, rewards 0), train, log TRL's metrics and land their checkpoint in storage."""
    from tests.fixtures.tiny import make_preference_shards, write_chat_tokenizer

    gcs, _ = ray_head
    tok = write_chat_tokenizer(tmp_path / "tok")
    data = make_preference_shards(tmp_path / "data", rows_per_shard=2, train_shards=2, val_rows=2, tokenizer_dir=tok)
    run = tmp_path / "run"
    args = ["--config", "configs/demo-cpu.yaml", "launch.cpu=true", f"train.data_dir={data}", f"train.run_dir={run}"]
    args += ["train.objective=dpo", "train.max_steps=3", "train.micro_batch_size=1", "train.grad_accum=2"]
    args += ["train.warmup_steps=0", "train.log_every=1", "train.eval_every=0", "train.save_every=0"]
    args += ["wandb.mode=disabled"]
    r = subprocess.run(
        [sys.executable, "-m", "cbt_llm.cli", "launch", "ray", "--entrypoint", *args],
        cwd=ROOT,
        env=_env(RAY_ADDRESS=gcs),
        capture_output=True,
        text=True,
        timeout=480,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    facts = json.loads((run / "launch" / "ray_job.json").read_text())
    assert facts["exit_code"] == 0 and facts["steps"] == 3 and facts["world_size"] == 2
    assert Path(facts["ray_checkpoint"]).name == _tag(3)
    rows = _metrics(run)
    step1 = [m for m in rows if m["step"] == 1][0]
    assert step1["train/loss"] == pytest.approx(0.6931471805599453, abs=1e-6)
    assert step1["rewards/chosen"] == pytest.approx(0, abs=1e-6) == step1["rewards/margins"]
    last = {k: v for m in rows if m["step"] == 3 for k, v in m.items()}  # the step's line and the final eval's
    assert last["rewards/margins"] > 0 and last["train/loss"] < step1["train/loss"]
    assert last["eval/rewards/margins"] > 0 and "eval/rewards/accuracies" in last
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["objective"] == "dpo" and summary["reference"] == "precomputed"
    store = Path(summary["reference_store"])
    assert store.parent == data / "reference" and (store / "reference.json").is_file()
