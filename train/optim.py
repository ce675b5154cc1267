"""The optimizer and the learning-rate schedule.

AdamW comes from one of two places. DeepSpeed's own fused CUDA Adam is compiled: prebuilt in the Docker image,
JIT-built with nvcc (minutes) anywhere else. torch's AdamW needs no build and has a fused CUDA kernel of its own
(`fused=True`), so on CUDA without a prebuilt DeepSpeed op we hand DeepSpeed a torch AdamW as its client
optimizer; ZeRO still wraps it and gives it its partitioned fp32 master weights (`master_weights` checks that).
On CPU torch's `foreach` variant is the fast one. With optimizer offload DeepSpeed's CPU Adam is always used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cbt_llm.core.config import TrainConfig


@dataclass(frozen=True)
class OptimizerChoice:
    """What steps the weights: 'torch-fused' / 'torch-foreach' (a torch AdamW we build and hand to DeepSpeed) or
    'deepspeed' (DeepSpeed builds its own from the JSON's optimizer section)."""

    kind: str
    why: str

    @property
    def client(self) -> bool:
        return self.kind.startswith("torch")

    def describe(self) -> str:
        name = {"torch-fused": "torch AdamW (fused)", "torch-foreach": "torch AdamW (foreach)"}.get(
            self.kind, "DeepSpeed Adam (from the DeepSpeed JSON)"
        )
        return f"{name}: {self.why}"


def deepspeed_fused_adam_prebuilt() -> bool:
    """True when this DeepSpeed install carries a compiled fused Adam op (no nvcc build at start-up)."""
    try:
        from deepspeed.git_version_info import installed_ops
    except ImportError:
        return False
    return bool(installed_ops.get("fused_adam"))


def choose_optimizer(tc: TrainConfig, device_type: str, *, fused_adam_prebuilt: bool | None = None) -> OptimizerChoice:
    """train.optimizer resolved for this device (see the module docstring)."""
    torch_kind = "torch-fused" if device_type == "cuda" else "torch-foreach"
    if tc.offload_optimizer:
        return OptimizerChoice("deepspeed", "train.offload_optimizer runs DeepSpeed's CPU Adam")
    if tc.optimizer == "deepspeed":
        return OptimizerChoice("deepspeed", "train.optimizer=deepspeed")
    if tc.optimizer == "torch":
        return OptimizerChoice(torch_kind, "train.optimizer=torch")
    if device_type != "cuda":
        return OptimizerChoice(torch_kind, "auto on CPU")
    if fused_adam_prebuilt is None:
        fused_adam_prebuilt = deepspeed_fused_adam_prebuilt()
    if fused_adam_prebuilt:
        return OptimizerChoice("deepspeed", "auto on CUDA, DeepSpeed's fused Adam is prebuilt")
    return OptimizerChoice(torch_kind, "auto on CUDA, DeepSpeed's fused Adam is not prebuilt (no nvcc JIT build)")


def build_client_optimizer(choice: OptimizerChoice, params, tc: TrainConfig) -> torch.optim.Optimizer | None:
    """The torch AdamW handed to deepspeed.initialize, or None when DeepSpeed builds its own."""
    if not choice.client:
        return None
    impl = {"fused": True} if choice.kind == "torch-fused" else {"foreach": True}
    return torch.optim.AdamW(
        params, lr=tc.lr, betas=tuple(tc.adam_betas), eps=tc.adam_eps, weight_decay=tc.weight_decay, **impl
    )


def master_weights(engine) -> dict:
    """The fp32 copy the optimizer updates under ZeRO: its dtype and this rank's element count (a partition of
    the trainable parameters, not a full copy). Read from DeepSpeed's ZeRO optimizer after initialize."""
    zero = engine.optimizer
    flat = getattr(zero, "fp32_partitioned_groups_flat", None)  # ZeRO-3
    if flat is None:
        flat = getattr(zero, "single_partition_of_fp32_groups", None)  # ZeRO-1/2
    if not flat:
        return {"dtype": None, "numel_this_rank": None}
    return {"dtype": str(flat[0].dtype).replace("torch.", ""), "numel_this_rank": int(sum(t.numel() for t in flat))}


def lr_lambda(total_steps: int, warmup: int, min_ratio: float):
    """Linear warm-up, then cosine decay to lr * min_ratio; `step` = optimizer steps already taken."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f
