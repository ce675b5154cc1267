"""Honest training metrics: real-token throughput, MFU from a peak-FLOPs table, W&B + metrics.jsonl on rank 0.

FLOPs (the PaLM / nanoGPT convention, forward + backward, no recomputation counted), for a step whose real
(non-padding) tokens form examples of lengths l_i:
    full fine-tuning:  6 N x sum(l_i) + 12 L H d_head x sum(l_i^2)
    LoRA:              (4 N_frozen + 6 N_trainable) x sum(l_i) + 12 L H d_head x sum(l_i^2)
LoRA still runs the forward (2 N) and the backward through every frozen weight to reach earlier adapters
(2 N), but skips the frozen weights' own gradient matmuls (the third 2 N). L layers, H query heads. Attention
is counted per example: a packed row of short examples does attention work proportional to the sum of their
squared lengths (each attends only to itself), not to seq_len^2, so the common `12 L H d_head T` per token with
T = seq_len would overstate the FLOPs (and MFU) of packed rows. The same count is used whatever the kernel
does (a block-masked kernel that computes the whole row still only does sum(l_i^2) of useful work); causal
masking is not halved, as in the convention. Padding tokens count nothing. Embedding parameters are included
in N (a small overcount at 7B).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# dense bf16 tensor-core peak per device, FLOP/s (vendor datasheets, no sparsity)
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "H800": 989e12,
    "H20": 148e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "A6000": 155e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


def peak_flops(device_name: str | None) -> float | None:
    """Peak FLOP/s of a device by name (longest table key contained in the name); None when unknown or CPU."""
    if not device_name:
        return None
    hits = [k for k in PEAK_BF16_FLOPS if k.lower() in device_name.lower()]
    return PEAK_BF16_FLOPS[max(hits, key=len)] if hits else None


def flops_per_token(
    n_total: int, n_trainable: int, lora: bool, layers: int, heads: int, head_dim: int, seq_len: int
) -> float:
    """Training FLOPs per token of an unpacked sequence of seq_len tokens (see the module docstring); with
    seq_len=0, the dense (matmul with weights) part alone."""
    attn = 12 * layers * heads * head_dim * seq_len
    if lora:
        return 4 * (n_total - n_trainable) + 6 * n_trainable + attn
    return 6 * n_total + attn


@dataclass(frozen=True)
class FlopsCount:
    """FLOPs of real work from what a step actually held: real tokens and the sum of squared example lengths."""

    dense_per_token: float  # flops_per_token(..., seq_len=0)
    attn_per_len_sq: float  # 12 L H d_head

    @classmethod
    def for_model(cls, n_total: int, n_trainable: int, lora: bool, layers: int, heads: int, head_dim: int):
        return cls(
            flops_per_token(n_total, n_trainable, lora, layers, heads, head_dim, 0), 12.0 * layers * heads * head_dim
        )

    def flops(self, real_tokens: float, len_sq: float) -> float:
        return self.dense_per_token * real_tokens + self.attn_per_len_sq * len_sq


def mfu(tokens_per_s_per_device: float, fpt: float, peak: float | None) -> float | None:
    return None if not peak else tokens_per_s_per_device * fpt / peak


class LogWindow:
    """This rank's sums over one logging window (the loss on the device, counts on the host, so nothing waits for
    the GPU between log points); `metrics` all-reduces them into the window's numbers."""

    def __init__(self, device):
        self.device = device
        self.restart()

    def restart(self) -> None:
        import torch

        self.loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self.host = [0.0, 0.0, 0.0, 0.0]  # label tokens, real tokens, rows, sum of squared example lengths
        self.t0 = time.perf_counter()

    def add(self, step) -> None:
        """Add one train.step.StepResult."""
        self.loss += step.loss_sum
        for j, v in enumerate((step.label_tokens, step.real_tokens, step.rows, step.attn_len_sq)):
            self.host[j] += v

    def metrics(self, *, world: int, seq_len: int, flops: FlopsCount, peak: float | None) -> dict[str, Any]:
        """Loss, real tokens/s, MFU (FLOPs from the window's own example lengths) and packing efficiency; a
        collective: every rank calls it at the same step."""
        import torch
        import torch.distributed as dist

        window = torch.cat([self.loss.view(1), torch.tensor(self.host, dtype=torch.float64).to(self.device)])
        dist.all_reduce(window)
        loss, labels, real, rows, len_sq = window.cpu().tolist()
        elapsed = time.perf_counter() - self.t0
        flops_per_s_per_device = flops.flops(real, len_sq) / elapsed / world
        return {
            "train/loss": loss / max(labels, 1),
            "perf/tokens": int(real),
            "perf/tokens_per_s": real / elapsed,
            "perf/tokens_per_s_per_device": real / elapsed / world,
            "perf/mfu": flops_per_s_per_device / peak if peak else None,
            "perf/packing_efficiency": real / max(rows * seq_len, 1),
        }


def _wandb_value(value: Any) -> Any:
    """A list of row dicts (e.g. gen/samples, answers of the generation eval) is a W&B table; the rest as is."""
    if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
        import wandb

        columns = list(value[0])
        return wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in value])
    return value


class MetricsLogger:
    """Rank 0 writes metrics.jsonl and W&B; every other rank gets the same object doing nothing."""

    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        wandb_cfg=None,
        run_name: str = "",
        config: dict | None = None,
        resume_step: int | None = None,
    ):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.run = None
        self.wandb_id: str | None = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            # a resumed run replays the steps after its checkpoint: drop their old lines so the file is one history
            kept = [
                ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        mode = os.environ.get("WANDB_MODE") or (wandb_cfg.mode if wandb_cfg else "disabled")
        if mode != "disabled":
            import wandb

            id_file = Path(run_dir) / "wandb_run_id"
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
            self.run = wandb.init(
                project=wandb_cfg.project,
                entity=wandb_cfg.entity or None,
                name=run_name or None,
                tags=wandb_cfg.tags or None,
                id=run_id,
                resume="allow",
                dir=str(run_dir),
                mode=mode,
                config=config,
            )
            self.wandb_id = run_id

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """One line of metrics for `step` (None values mean 'not measurable here', e.g. MFU on CPU)."""
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.run is not None:
            # W&B ignores steps at or below one it already has (after a resume); metrics.jsonl is the full record
            self.run.log({k: _wandb_value(v) for k, v in metrics.items() if v is not None}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            for k, v in values.items():
                self.run.summary[k] = v

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def plot_loss(metrics_path: Path, out_png: Path) -> None:
    """train/loss and eval/loss against step, as a PNG (Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("train/loss", "eval/loss"):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o" if key == "eval/loss" else None, label=key)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / label token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
