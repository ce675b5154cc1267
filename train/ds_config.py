"""The DeepSpeed JSON, derived from the typed config so the two cannot disagree.

A user-supplied JSON (train.deepspeed_config) is allowed for the knobs we do not model (bucket sizes, prefetch,
...). Its values for the fields we do own must match the config, or be "auto" (then we fill them in).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cbt_llm.core.config import TrainConfig
from cbt_llm.core.errors import ConfigError


def build_ds_config(tcfg: TrainConfig, dtype: torch.dtype, device_type: str, world_size: int) -> dict:
    """The DeepSpeed config for this run (its optimizer section is DeepSpeed's own Adam: see resolve_ds_config)."""
    zero: dict = {"stage": tcfg.zero_stage, **_zero_tuning(tcfg)}
    if tcfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    if tcfg.offload_params:
        if tcfg.zero_stage != 3:
            raise ConfigError("train.offload_params needs train.zero_stage=3; set train.offload_params=false")
        zero["offload_param"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    if tcfg.zero_stage == 3:
        # no gather on save: export consolidates from every rank's ZeRO shard files (zero_to_fp32), so a 16-bit
        # full copy would only cost an all-gather of the whole model into rank 0's memory at every save
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        "train_micro_batch_size_per_gpu": tcfg.micro_batch_size,
        "gradient_accumulation_steps": tcfg.grad_accum,
        "train_batch_size": tcfg.micro_batch_size * tcfg.grad_accum * world_size,
        "gradient_clipping": tcfg.grad_clip,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": tcfg.lr,
                "betas": list(tcfg.adam_betas),
                "eps": tcfg.adam_eps,
                "weight_decay": tcfg.weight_decay,
                # DeepSpeed's fused/CPU Adam must be compiled; torch's is exact and enough on CPU
                "torch_adam": not tcfg.offload_optimizer
                and (tcfg.optimizer == "torch" or (tcfg.optimizer == "auto" and device_type != "cuda")),
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _zero_tuning(tcfg: TrainConfig) -> dict:
    """train.ds as DeepSpeed zero_optimization keys; a field left at its default (None / 0) is not written, so
    DeepSpeed's own default applies."""
    t = tcfg.ds
    keys = {
        "overlap_comm": t.overlap_comm,
        "contiguous_gradients": t.contiguous_gradients,
        "reduce_bucket_size": t.reduce_bucket_size,
        "allgather_bucket_size": t.allgather_bucket_size,
    }
    if tcfg.zero_stage == 3:
        keys.update(
            stage3_prefetch_bucket_size=t.prefetch_bucket_size,
            stage3_param_persistence_threshold=t.param_persistence_threshold,
            stage3_max_live_parameters=t.max_live_parameters,
        )
    return {k: v for k, v in keys.items() if v not in (None, 0)}


# (path in the DeepSpeed JSON, config field that owns it)
_OWNED = [
    (("train_micro_batch_size_per_gpu",), "train.micro_batch_size"),
    (("gradient_accumulation_steps",), "train.grad_accum"),
    (("train_batch_size",), "train.micro_batch_size x train.grad_accum x world_size"),
    (("gradient_clipping",), "train.grad_clip"),
    (("bf16", "enabled"), "model.precision"),
    (("fp16", "enabled"), "model.precision (fp16 is not supported; use bf16)"),
    (("zero_optimization", "stage"), "train.zero_stage"),
    (("optimizer", "params", "lr"), "train.lr"),
    (("optimizer", "params", "weight_decay"), "train.weight_decay"),
]


def _get(d: dict, path: tuple):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _set(d: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        d = d.setdefault(k, {})
    d[path[-1]] = value


def merge_user_ds_config(user: dict, derived: dict, source: str = "train.deepspeed_config") -> dict:
    """Check a user DeepSpeed JSON against the derived one; return the user JSON with 'auto' and missing
    owned values filled in. Raises ConfigError (one line) on the first disagreement."""
    out = json.loads(json.dumps(user))
    for path, owner in _OWNED:
        mine, theirs = _get(derived, path), _get(user, path)
        key = ".".join(path)
        if theirs is None or theirs == "auto":
            if mine is not None:
                _set(out, path, mine)
            continue
        if isinstance(mine, float) or isinstance(theirs, float):
            same = mine is not None and abs(float(theirs) - float(mine)) <= 1e-12 * max(1.0, abs(float(mine)))
        else:
            same = theirs == mine
        if not same:
            raise ConfigError(
                f"{source}: '{key}' is {theirs!r} but the config gives {mine!r} (from {owner}); "
                f'set it to "auto" or change {owner.split(" ")[0]}'
            )
    if "scheduler" in out:
        raise ConfigError(f"{source}: remove 'scheduler'; the LR schedule comes from train.lr and train.warmup_steps")
    return out


def resolve_ds_config(
    tcfg: TrainConfig, dtype: torch.dtype, device_type: str, world_size: int, *, client_optimizer: bool = False
) -> dict:
    """The derived config, or the user's JSON validated and completed against it. With client_optimizer (a torch
    AdamW from train.optim handed to deepspeed.initialize) the optimizer section is dropped: DeepSpeed would
    silently prefer the client's, so none is shown that does not run."""
    config = build_ds_config(tcfg, dtype, device_type, world_size)
    if tcfg.deepspeed_config:
        config = merge_user_ds_config(
            _read_user_ds_config(tcfg.deepspeed_config), config, f"train.deepspeed_config ({tcfg.deepspeed_config})"
        )
    if client_optimizer:
        config.pop("optimizer", None)
    return config


def _read_user_ds_config(path_s: str) -> dict:
    path = Path(path_s)
    if not path.is_file():
        raise ConfigError(f"train.deepspeed_config: file '{path}' not found; fix the path or leave it empty")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"train.deepspeed_config: '{path}' is not valid JSON ({exc.msg}, line {exc.lineno})"
        ) from None
