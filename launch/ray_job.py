"""The Ray cluster job: `python -m launch.ray_job --config <file> [overrides]`, the entrypoint that
`cbt-llm launch ray` submits with `ray job submit` (see launch/examples/ray-job-8gpu.sh).

Ray Train's TorchTrainer (V2 API) starts one worker per training process and initialises the torch process
group itself (gloo on CPU, nccl on GPU); each worker then runs the same `run_train` loop as every other
launcher, which finds RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT already set and an
initialised group that DeepSpeed reuses. So what trains under Ray is exactly `cbt-llm train` with that config.

Failures: when a worker dies, Ray tears the worker group down and starts a new one (up to
launch.ray.max_failures times); `train.resume: auto` makes the new group continue from the latest checkpoint
in train.run_dir, which must therefore be on storage every node sees (as for Slurm). The final checkpoint is
also reported through `ray.train.report`, so it is registered under launch.ray.storage_path.
The job exits 1 when training fails for good, so `ray job submit` (and `cbt-llm launch ray`) fail too.

Data: each worker reads only its own packed Parquet shards from the manifest (train.data.rank_shards), as
under every other launcher; the shards are not fed through Ray Data (`get_dataset_shard`), because the
training loop in train/ owns its data order and resume state.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from cbt_llm.config import Config, ConfigError, load_config
from cbt_llm.report import print_summary, write_metrics
from launch.render import procs_per_node, ray_storage_path, world_size

# Environment a worker needs from the submitting side. Ray workers inherit the raylet's environment, not the
# driver's, so these are carried in the train loop config and set in each worker.
_FORWARD_ENV = ("TORCH_EXTENSIONS_DIR", "OMP_NUM_THREADS", "CBT_LLM_FAULT", "GLOO_SOCKET_IFNAME",
                "NCCL_SOCKET_IFNAME", "HF_HOME", "HF_HUB_OFFLINE")
_FAULT_USED = "ray_fault_used"  # marker in run_dir: the test fault fires on the first attempt only


def _train_worker(loop: dict) -> None:
    """One Ray Train worker: run `run_train` with this worker's rank; raise when it does not finish."""
    import ray.train

    # the config's relative paths (data_dir, run_dir) are relative to the submit folder, a shared file system
    os.chdir(loop["cwd"])
    if loop["cwd"] not in sys.path:
        sys.path.insert(0, loop["cwd"])
    os.environ.update(loop["env"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    # Ray's torch backend sets these too (and MASTER_ADDR/PORT); set them here so nothing depends on that
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(ctx.get_world_size()), LOCAL_RANK=str(ctx.get_local_rank()))
    cfg = Config.model_validate(loop["config"])
    run_dir = Path(cfg.train.run_dir)

    fault = os.environ.get("CBT_LLM_FAULT", "")
    if fault:
        marker = run_dir / _FAULT_USED
        if marker.exists():
            os.environ.pop("CBT_LLM_FAULT")  # a restarted group must not die at the same step again
        elif rank == int(fault.partition(":")[2] or 0):
            run_dir.mkdir(parents=True, exist_ok=True)
            marker.write_text(fault)

    import train.engine as engine

    rc = engine.run_train(cfg)
    if rc != 0:
        raise RuntimeError(f"rank {rank}: training exited with code {rc}")

    from train import checkpoint as ckpt

    summary_path = run_dir / "train_summary.json"
    metrics = {}
    if rank == 0 and summary_path.is_file():
        metrics = {k: v for k, v in json.loads(summary_path.read_text()).items() if isinstance(v, (int, float))}
    tag = ckpt.latest_tag(run_dir / "checkpoints")
    checkpoint = None
    if rank == 0 and tag:
        # only rank 0 hands over the folder: ZeRO-3 shards of all ranks already sit in it on shared storage
        checkpoint = ray.train.Checkpoint.from_directory(str((run_dir / "checkpoints" / tag).resolve()))
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=tag or None)


def run_ray(cfg: Config) -> dict:
    """Run the configured training as a Ray Train TorchTrainer on the current Ray cluster; returns facts for
    the summary. Raises RuntimeError (one line) when training failed after launch.ray.max_failures restarts."""
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")  # the V2 API (the default since Ray 2.50; explicit here)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(".torch_extensions").resolve()))
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    rc = cfg.launch.ray
    world = world_size(cfg)
    storage = str(Path(ray_storage_path(cfg)).resolve())
    loop = {"config": cfg.model_dump(mode="json"), "cwd": os.getcwd(),
            "env": {k: os.environ[k] for k in _FORWARD_ENV if k in os.environ}}
    if cfg.launch.cpu:
        loop["env"].setdefault("OMP_NUM_THREADS", "1")  # CPU ranks share the cores: one thread each
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config=loop,
        torch_config=TorchConfig(backend="gloo" if cfg.launch.cpu else "nccl", timeout_s=cfg.train.collective_timeout_s),
        scaling_config=ScalingConfig(num_workers=world, use_gpu=not cfg.launch.cpu,
                                     resources_per_worker={"CPU": rc.cpus_per_worker}),
        run_config=RunConfig(name=f"cbt-llm-{cfg.run_name}", storage_path=storage,
                             failure_config=FailureConfig(max_failures=rc.max_failures)),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # TrainingFailedError: restarts exhausted, or a non-retryable error
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RuntimeError(f"Ray training failed after up to {rc.max_failures} restart(s): {first}") from exc
    facts = {"world_size": world, "procs_per_node": procs_per_node(cfg), "max_failures": rc.max_failures,
             "storage_path": storage, "ray_checkpoint": result.checkpoint.path if result.checkpoint else None}
    summary = Path(cfg.train.run_dir) / "train_summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        facts.update(steps=s.get("steps"), resumed_from=s.get("resumed_from"),
                     first_train_loss=s.get("first_train_loss"), last_train_loss=s.get("last_train_loss"))
    return facts


def main(argv: list[str] | None = None) -> int:
    """Entry point of the Ray job: load and check the config, train, write <run_dir>/launch/ray_job.json."""
    ap = argparse.ArgumentParser(prog="python -m launch.ray_job", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None, help="run config YAML (as for `cbt-llm train`)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100")
    args = ap.parse_args(argv)
    t0 = time.time()
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.train.resume != "auto":
            raise ConfigError(f"train.resume is '{cfg.train.resume}'; a Ray job restores failed workers from "
                              "train.run_dir's latest checkpoint, so set train.resume=auto")
        from launch.preflight import preflight

        preflight(cfg, "ray")
        facts = run_ray(cfg)
        rc = 0
    except (ConfigError, RuntimeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        facts, rc = {"error": str(exc).splitlines()[0]}, 1
        if isinstance(exc, ConfigError) or "cfg" not in locals():
            return 2 if isinstance(exc, ConfigError) else 1
    facts.update(exit_code=rc, seconds=round(time.time() - t0, 1))
    print_summary("cbt-llm ray job", facts, file=sys.stderr)
    write_metrics(Path(cfg.train.run_dir) / "launch" / "ray_job.json", facts)
    return rc


if __name__ == "__main__":
    sys.exit(main())
