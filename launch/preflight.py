"""Checks run before a launcher script is started or submitted, so a bad run fails in seconds on the login
node rather than after hours in a queue: shards whole and tokenizer present and matching, run folder writable,
world size dividing the shards, at least one optimizer step per epoch.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from cbt_llm.core.config import Config, check_world_size
from cbt_llm.core.errors import ConfigError
from cbt_llm.core.fileio import is_local_path
from data_pipeline import shards
from data_pipeline.shards import load_manifest, verify_shards
from launch.render import procs_per_node, slurm_log_dir, world_size


def _writable(folder: str, field: str) -> None:
    p = Path(folder)
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".preflight-"):
            pass
    except OSError as exc:
        raise ConfigError(
            f"{field}: folder '{folder}' is not writable ({exc.strerror}); choose another folder"
        ) from None


def preflight(cfg: Config, launcher: str, *, check_tokenizer: bool = True) -> dict:
    """Validate the launch; returns facts for the summary. Raises ConfigError (one line: field and fix)."""
    tc = cfg.train
    g = procs_per_node(cfg)
    world = world_size(cfg)
    if cfg.model.init == "pretrained" and not cfg.model.name_or_path:
        raise ConfigError("model.name_or_path is empty; set it (e.g. Qwen/Qwen2.5-7B-Instruct) or model.init=random")
    if (
        launcher == "deepspeed"
        and cfg.launch.nodes > 1
        and cfg.launch.hostfile
        and not Path(cfg.launch.hostfile).is_file()
    ):
        raise ConfigError(
            f"launch.hostfile: '{cfg.launch.hostfile}' not found; write one 'host slots={g}' line per node"
        )

    if launcher == "ray" and tc.gen_eval_every:
        # a Ray worker runs train alone; the evaluation stage rides along only with `cbt-llm train`
        raise ConfigError(
            "train.gen_eval_every: not available in Ray jobs; set it to 0 and run `cbt-llm eval` on the checkpoints"
        )

    # every shard present (load_manifest), then the tokenizer the shards were made with, by content hash
    manifest = load_manifest(tc.data_dir)
    from train.dpo import check_objective

    check_objective(tc.objective, manifest, tc.data_dir)  # shards prepared for the run's train.objective
    # every shard whole, with the manifest's rows (and SHA-256 per train.verify_shards), before anything queues
    hashed = verify_shards(tc.data_dir, manifest, tc.verify_shards, seed=tc.seed)
    tok_path = manifest["tokenizer"]["name_or_path"]
    if check_tokenizer:
        if is_local_path(tok_path) and not Path(tok_path).exists():
            raise ConfigError(
                f"tokenizer '{tok_path}' named in {tc.data_dir}/manifest.json is missing; re-run `cbt-llm prepare`"
            )
        try:
            shards.check_tokenizer(manifest, Path(tc.data_dir), tok_path)
        except (FileNotFoundError, ValueError, OSError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(
                f"tokenizer '{tok_path}' of {tc.data_dir}/manifest.json cannot be loaded: {str(exc).splitlines()[0]}"
            ) from None
    train_shards = manifest["splits"]["train"]["shards"]
    note = check_world_size(
        world,
        len(train_shards),
        prepared_for=manifest.get("world_size", cfg.data.world_size),
        data_dir=tc.data_dir,
        origin=f"launch.nodes {cfg.launch.nodes} x {g} per node",
    )
    from train.data import rows_per_micro_batch, steps_per_epoch

    mb = rows_per_micro_batch(tc, manifest["seq_len"])
    spe, _ = steps_per_epoch(manifest, world, mb, tc.grad_accum)  # raises when it is 0
    _writable(tc.run_dir, "train.run_dir")
    if launcher == "slurm":
        _writable(slurm_log_dir(cfg), "launch.slurm.log_dir")
    facts = {
        "world_size": world,
        "nodes": cfg.launch.nodes,
        "procs_per_node": g,
        "train_shards": len(train_shards),
        "shards_verified": f"{tc.verify_shards} ({hashed} hashed)",
        "steps_per_epoch": spe,
        "tokenizer": tok_path,
        "data_dir": tc.data_dir,
        "run_dir": tc.run_dir,
    }
    if note:
        facts["note"] = note
    return facts
