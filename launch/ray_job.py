"""The Ray cluster job: `cbt-llm launch ray --entrypoint --config <file> [overrides]`, what `cbt-llm launch ray`
submits with `ray job submit` (see launch/examples/ray-job-8gpu.sh).

Ray Train's TorchTrainer (V2 API) starts one worker per training process and initialises the torch process
group itself (gloo on CPU, nccl on GPU); each worker then runs the same `run_train` loop as every other
launcher, which finds RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT already set and an
initialised group that DeepSpeed reuses. Two hooks of run_train hand data and checkpoints to Ray:

Data: the trainer gets the manifest's train split as a Ray Data dataset (`datasets={"train": ...}`), and each
worker takes its part with `ray.train.get_dataset_shard("train")` and streams it (`iter_batches`, whole
blocks, Arrow) into the loop's compact row arrays. Which rows a worker gets must not change when Ray restores
a failed group, or a resumed run would see some rows twice and skip others. Ray's default split,
`streaming_split(equal=True)`, does not promise that: its OutputSplitter hands each block to whichever worker
has the fewest rows so far, so the assignment follows block boundaries, which depend on the read parallelism
(derived from the cluster's CPUs) and on block-size splitting; it also cuts the split to equal row counts.
So `RankShards`, our DataConfig, gives worker r a stream over exactly the shards that rank r reads under every
other launcher (shard i -> rank i % world, data_pipeline.shards.rank_shards), read in file order (`preserve_order`);
the worker checks that it got exactly those shards with the manifest's row counts (train.data.rows_from_batches).
The trade-off: the worker keeps its own part of the tokens in memory (1/world of the split, as under every
launcher, never a full copy), because the loop's seeded per-epoch permutation and its (epoch, step) resume
state need random access; in return the order, the steps per epoch and the losses are those of
`cbt-llm train` under torchrun or deepspeed, and a restored group resumes at the exact row. A bounded-memory
stream would need a windowed shuffle and a different order than the other launchers. The validation rows
(small) are still read by every rank from train.data_dir.

Checkpoints: every checkpoint the loop saves (every train.save_every steps and at the end) is reported with
`ray.train.report` from every rank, each rank uploading the files it wrote itself (its ZeRO shards and RNG
state; rank 0 also the shared files and trainer_state.json) into one folder under launch.ray.storage_path,
which Ray merges; it keeps the newest train.keep_last. Each rank then waits until Ray has committed the
checkpoint (Ray collects reports when it polls the workers, and a report still queued in a worker that dies is
lost). So the storage path is the source of truth and train.run_dir may be node-local (only the driver's
summary reads it, on the head node). Ray Data's read tasks need a CPU each beyond the workers' reservation; the
driver warns when the cluster has none to spare (the workers would wait for rows). When a worker dies, Ray tears
the worker group down and starts a new one (up to launch.ray.max_failures times); each new worker loads
`ray.train.get_checkpoint()`, the last checkpoint registered in storage. A job with no checkpoint in storage
starts as `train.resume: auto` says (the latest checkpoint in train.run_dir, if any). A job submitted again with
the same storage path and run name continues from storage too. The job exits 1 when training fails for good, so
`ray job submit` (and `cbt-llm launch ray`) fail too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

from cbt_llm.core.config import Config
from cbt_llm.core.errors import ConfigError
from cbt_llm.core.report import print_summary, write_metrics
from launch.render import procs_per_node, ray_storage_path, world_size

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")  # the V2 API (the default since Ray 2.50; explicit here)
from ray.train import DataConfig  # noqa: E402  (after the line above: it picks the API on import)

# Environment a worker needs from the submitting side. Ray workers inherit the raylet's environment, not the
# driver's, so these are carried in the train loop config and set in each worker.
_FORWARD_ENV = (
    "TORCH_EXTENSIONS_DIR",
    "OMP_NUM_THREADS",
    "CBT_LLM_FAULT",
    "GLOO_SOCKET_IFNAME",
    "NCCL_SOCKET_IFNAME",
    "HF_HOME",
    "HF_HUB_OFFLINE",
)
_FAULT_USED = "ray_fault_used"  # marker in run_dir: the test fault fires on the first attempt only
_ATTEMPTS = "ray_attempts.jsonl"  # in <run_dir>/launch: one line per worker-group start, what it resumed from
# files of one rank in a DeepSpeed checkpoint folder ({bf16_}zero_pp_rank_<r>_mp_rank_00_*.pt) and ours
# (rng-rank<r>.pt); every other file (trainer_state.json, mp_rank_00_model_states.pt, ...) is rank 0's
_RANK_FILE = re.compile(r"(?:zero_pp_rank_|rng-rank)(\d+)[_.]")


def file_rank(name: str) -> int:
    """The rank that wrote this file of a checkpoint folder, the one that uploads it to Ray's storage."""
    m = _RANK_FILE.search(name)
    return int(m.group(1)) if m else 0


class RankShards(DataConfig):
    """Worker r streams the train shards of rank r, in manifest order (see the module docstring for why not
    `streaming_split`)."""

    def __init__(self, files_per_rank: list[list[str]], columns: tuple[str, ...] | None = None):
        super().__init__(datasets_to_split=["train"])
        self.files_per_rank = files_per_rank
        self.columns = columns

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        if "train" not in datasets:
            return super().configure(datasets, world_size, worker_handles, worker_node_ids, **kwargs)
        if len(self.files_per_rank) != world_size:
            raise ValueError(f"{len(self.files_per_rank)} shard lists for {world_size} Ray Train workers")
        out = []
        for files in self.files_per_rank:
            ds = _read(files, self.columns)
            options = self._resolve_execution_options("train")
            options.preserve_order = True
            ds.context.execution_options = options
            ds.context.enable_progress_bars = False  # one bar per worker per read, interleaved in the job log
            out.append({"train": ds.iterator()})
        return out


def _read(files: list[str], columns: tuple[str, ...] | None = None):
    """A lazy Ray Data read of packed shards: the token columns (`columns`; default train.data.TOKEN_COLUMNS, and
    example_ids for preference shards: train.data.columns_for) and `path`, the file each row came from.

    One map task per file over the list of paths (launch/ray_read.py), not `ray.data.read_parquet`: Ray 2.60's
    Parquet datasource (V2) runs a file-listing operator, a pool of footer-reading actors (one Python process
    each) and the read tasks, three rounds of process starts for a worker's one or two shards; on a 2-core
    machine that costs 13-15 s per worker each time a worker group starts, the two workers' reads one after the
    other. The shards' names come from the manifest, so there is nothing to list, and the rows must stay whole
    shards in file order anyway (RankShards sets preserve_order)."""
    import ray.data

    from launch.ray_read import read_shard_batches
    from train.data import TOKEN_COLUMNS

    paths = ray.data.from_items([{"path": f} for f in files], override_num_blocks=max(1, len(files)))
    return paths.map_batches(
        read_shard_batches, batch_size=1, batch_format="pyarrow", fn_kwargs={"columns": list(columns or TOKEN_COLUMNS)}
    )


def _check_cpus(world: int, cpus_per_worker: float) -> None:
    """Warn when the workers would hold every CPU: Ray Data's read tasks each need one,
    and without one the workers wait for their rows forever. A warning, not an error: an autoscaling cluster
    may add the CPUs later."""
    import ray

    have, need = ray.cluster_resources().get("CPU", 0), world * cpus_per_worker + 1
    if have < need:
        print(
            f"warning: the Ray cluster has {have:g} CPUs; {world} workers x launch.ray.cpus_per_worker="
            f"{cpus_per_worker:g} plus 1 for Ray Data's reads need {need:g}: the job waits until the cluster has "
            "them (lower launch.ray.cpus_per_worker or add CPUs)",
            file=sys.stderr,
            flush=True,
        )


def _train_rows(shards: list[dict], pad_token_id: int):
    """run_train's train_rows hook: this worker's rows from its Ray Data stream (the same rows as read_rows)."""
    import ray.train

    from train.data import rows_from_batches

    it = ray.train.get_dataset_shard("train")
    return rows_from_batches(it.iter_batches(batch_size=None, batch_format="pyarrow"), shards, pad_token_id)


def _report_checkpoint(rank: int, run_dir: Path):
    """run_train's on_checkpoint hook: upload this rank's files of the finished checkpoint folder and report it.

    Every rank calls ray.train.report for every checkpoint (Ray needs the same number of calls on each rank);
    all ranks name the same folder, so Ray merges their files there and registers the checkpoint once it has
    collected every rank's report. Ray collects reports when it polls the workers (every 2 s by default), and a
    report still queued in a worker that dies is lost, so each rank then waits until the checkpoint is
    committed: a crash right after a checkpoint restores from it, not from the one before. Hard links stage
    just this rank's files without copying them.
    """
    import ray.train

    def report(folder: Path, state: dict) -> None:
        staging = run_dir / f".ray-upload-rank{rank}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for f in folder.iterdir():
            if f.is_file() and file_rank(f.name) == rank:
                try:
                    os.link(f, staging / f.name)
                except OSError:  # another file system, or no hard links there
                    shutil.copy2(f, staging / f.name)
        try:
            ray.train.report(
                {"step": state["step"], "epoch": state["epoch"]},
                checkpoint=ray.train.Checkpoint.from_directory(str(staging)),
                checkpoint_dir_name=folder.name,
            )
            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    return report


def _train_worker(loop: dict) -> None:
    """One Ray Train worker: run `run_train` with this worker's rank; raise when it does not finish."""
    import ray.train

    # the config's relative paths (data_dir, run_dir) are relative to the submit folder, a shared file system.
    # Imports need no sys.path edit: to unpickle this function the worker already imported launch.ray_job, so
    # this checkout's packages, train among them, are importable there: from the install, or from the folder the
    # driver ran in, which Ray puts on every worker's sys.path (the job's py_driver_sys_path).
    os.chdir(loop["cwd"])
    os.environ.update(loop["env"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    # Ray's torch backend sets these too (and MASTER_ADDR/PORT); set them here so nothing depends on that
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(ctx.get_world_size()), LOCAL_RANK=str(ctx.get_local_rank()))
    config = loop["config"]
    run_dir = Path(config["train"]["run_dir"])

    fault = os.environ.get("CBT_LLM_FAULT", "")
    if fault:
        marker = run_dir / _FAULT_USED
        if marker.exists():
            os.environ.pop("CBT_LLM_FAULT")  # a restarted group must not die at the same step again
        elif rank == int(fault.partition(":")[2] or 0):
            run_dir.mkdir(parents=True, exist_ok=True)
            marker.write_text(fault)

    import train.recipe as recipe

    checkpoint = ray.train.get_checkpoint()  # the last one registered in storage, on every rank alike
    if rank == 0:
        (run_dir / "launch").mkdir(parents=True, exist_ok=True)
        with (run_dir / "launch" / _ATTEMPTS).open("a") as f:
            f.write(json.dumps({"time": time.time(), "restored_from": checkpoint.path if checkpoint else None}) + "\n")
    if checkpoint is None:
        rc = recipe.run_train(
            Config.model_validate(config), train_rows=_train_rows, on_checkpoint=_report_checkpoint(rank, run_dir)
        )
    else:
        # a local or shared storage path is used in place; a remote one (s3://...) is downloaded first
        with checkpoint.as_directory() as folder:
            cfg = Config.model_validate({**config, "train": {**config["train"], "resume": str(folder)}})
            rc = recipe.run_train(cfg, train_rows=_train_rows, on_checkpoint=_report_checkpoint(rank, run_dir))
    if rc != 0:
        raise RuntimeError(f"rank {rank}: training exited with code {rc}")


def _storage(cfg: Config) -> str:
    """launch.ray.storage_path as Ray Train wants it: a URI as is, a local path absolute."""
    path = ray_storage_path(cfg)
    return path if "://" in path else str(Path(path).resolve())


def run_ray(cfg: Config) -> dict:
    """Run the configured training as a Ray Train TorchTrainer on the current Ray cluster; returns facts for
    the summary. Raises RuntimeError (one line) when training failed after launch.ray.max_failures restarts."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(".torch_extensions").resolve()))
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from data_pipeline.shards import load_manifest, rank_shards
    from train.data import columns_for

    rc = cfg.launch.ray
    world = world_size(cfg)
    storage = _storage(cfg)
    manifest = load_manifest(cfg.train.data_dir)
    data_dir = Path(cfg.train.data_dir).resolve()
    files_per_rank = [
        [str(data_dir / s["path"]) for s in rank_shards(manifest, "train", r, world)] for r in range(world)
    ]
    columns = columns_for(cfg.train.objective)
    train_ds = _read([str(data_dir / s["path"]) for s in manifest["splits"]["train"]["shards"]], columns)
    _check_cpus(world, rc.cpus_per_worker)
    loop = {
        "config": cfg.model_dump(mode="json"),
        "cwd": os.getcwd(),
        "env": {k: os.environ[k] for k in _FORWARD_ENV if k in os.environ},
    }
    if cfg.launch.cpu:
        loop["env"].setdefault("OMP_NUM_THREADS", "1")  # CPU ranks share the cores: one thread each
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config=loop,
        torch_config=TorchConfig(
            backend="gloo" if cfg.launch.cpu else "nccl", timeout_s=cfg.train.collective_timeout_s
        ),
        scaling_config=ScalingConfig(
            num_workers=world, use_gpu=not cfg.launch.cpu, resources_per_worker={"CPU": rc.cpus_per_worker}
        ),
        datasets={"train": train_ds},
        dataset_config=RankShards(files_per_rank, columns),
        run_config=RunConfig(
            name=f"cbt-llm-{cfg.run_name}",
            storage_path=storage,
            failure_config=FailureConfig(max_failures=rc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_last),
        ),
    )
    attempts = Path(cfg.train.run_dir) / "launch" / _ATTEMPTS
    attempts.unlink(missing_ok=True)
    try:
        result = trainer.fit()
    except Exception as exc:  # TrainingFailedError: restarts exhausted, or a non-retryable error
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RuntimeError(f"Ray training failed after up to {rc.max_failures} restart(s): {first}") from exc
    facts = {
        "world_size": world,
        "procs_per_node": procs_per_node(cfg),
        "max_failures": rc.max_failures,
        "storage_path": storage,
        "ray_checkpoint": result.checkpoint.path if result.checkpoint else None,
        "ray_checkpoints": [c.path for c, _ in result.best_checkpoints or []],
    }
    if attempts.is_file():
        facts["restored_from"] = [json.loads(line)["restored_from"] for line in attempts.read_text().splitlines()]
    summary = Path(cfg.train.run_dir) / "train_summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        facts.update(
            steps=s.get("steps"),
            resumed_from=s.get("resumed_from"),
            first_train_loss=s.get("first_train_loss"),
            last_train_loss=s.get("last_train_loss"),
            rows_left_out_per_epoch=s.get("rows_left_out_per_epoch"),
        )
    return facts


def run_job(cfg: Config) -> int:
    """The Ray job itself, what `ray job submit` starts on the cluster (`cbt-llm launch ray --entrypoint`): check
    the config, train, write <run_dir>/launch/ray_job.json; returns the exit code (1 when training failed for
    good). A config it refuses raises ConfigError before any work."""
    t0 = time.time()
    if cfg.train.resume != "auto":
        raise ConfigError(
            f"train.resume is '{cfg.train.resume}'; a Ray job starts from the last checkpoint in "
            "launch.ray.storage_path or, when there is none, train.run_dir's: set train.resume=auto"
        )
    try:
        from launch.preflight import preflight

        preflight(cfg, "ray")
        facts = run_ray(cfg)
        rc = 0
    except (RuntimeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        facts, rc = {"error": str(exc).splitlines()[0]}, 1
    facts.update(exit_code=rc, seconds=round(time.time() - t0, 1))
    print_summary("cbt-llm ray job", facts, file=sys.stderr)
    write_metrics(Path(cfg.train.run_dir) / "launch" / "ray_job.json", facts)
    return rc
