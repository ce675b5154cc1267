"""Config sections of `cbt-llm train`: the training loop and DeepSpeed (train), and W&B (wandb)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from cbt_llm.core.config.base import Section


class DeepSpeedTuning(Section):
    """DeepSpeed ZeRO communication knobs (zero_optimization keys); null / 0 leaves DeepSpeed's own default."""

    overlap_comm: bool | None = Field(
        None, description="Overlap gradient reduction with backward (DeepSpeed's default: on for ZeRO-3, off for 2)."
    )
    contiguous_gradients: bool | None = Field(
        None, description="Copy gradients into one contiguous buffer as they are produced (less fragmentation)."
    )
    reduce_bucket_size: int = Field(
        0, ge=0, description="Elements reduced at a time (DeepSpeed's default 5e8); larger = fewer, bigger calls."
    )
    allgather_bucket_size: int = Field(0, ge=0, description="ZeRO-2: elements all-gathered at a time (default 5e8).")
    prefetch_bucket_size: int = Field(
        0, ge=0, description="ZeRO-3: elements of upcoming layers' weights fetched ahead (default 5e7)."
    )
    param_persistence_threshold: int = Field(
        0, ge=0, description="ZeRO-3: parameters smaller than this stay whole on every rank (default 1e5)."
    )
    max_live_parameters: int = Field(0, ge=0, description="ZeRO-3: gathered elements kept at once (default 1e9).")


class DpoConfig(Section):
    """train.objective=dpo: the preference loss (TRL's definitions; README, "Train")."""

    loss: Literal["sigmoid", "ipo", "simpo", "orpo"] = Field(
        "sigmoid",
        description="sigmoid = DPO, ipo = IPO (both against a reference model); simpo = SimPO and orpo = ORPO "
        "(reference-free).",
    )
    beta: float = Field(
        0.1, gt=0, description="DPO/IPO/SimPO temperature (rewards are beta x the log-probability ratios)."
    )
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO's target reward margin.")
    orpo_lambda: float = Field(0.1, ge=0, description="ORPO: weight of the odds-ratio term beside the chosen NLL.")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="sigmoid only: the share of pairs assumed mislabelled (conservative DPO)."
    )

    @model_validator(mode="after")
    def _smoothing_is_sigmoid_only(self):
        if self.label_smoothing and self.loss != "sigmoid":
            raise ValueError(f"train.dpo.label_smoothing applies to loss=sigmoid only, not {self.loss}; set it to 0")
        return self


class TrainConfig(Section):
    """`cbt-llm train`: the DeepSpeed training loop (the DeepSpeed JSON is derived from these fields)."""

    data_dir: str = Field(
        "",
        description="Folder written by `cbt-llm prepare` (has manifest.json; empty: data.out_dir). Set it only to "
        "train on shards prepared elsewhere.",
    )
    run_dir: str = Field(
        "", description="Checkpoints, metrics.jsonl, loss.png, W&B files (empty: runs/<run_name>/train)."
    )
    seed: int = Field(0, description="Seeds the model init, the data order (per epoch and rank) and dropout.")
    objective: Literal["sft", "dpo"] = Field(
        "sft",
        description="sft: cross-entropy on the answers; dpo: preference optimisation on pairs (train.dpo.loss) from "
        "shards prepared with data.format=preference.",
    )
    dpo: DpoConfig = Field(default_factory=lambda: DpoConfig())
    epochs: int = Field(1, ge=1, description="Passes over the train split (ignored when max_steps > 0).")
    max_steps: int = Field(0, ge=0, description="Optimizer steps to run (0: epochs x steps per epoch).")
    micro_batch_size: int = Field(1, ge=1, description="Packed rows per rank per forward pass.")
    tokens_per_micro_batch: int = Field(
        0,
        ge=0,
        description="Token budget per rank per forward pass; sets micro_batch_size = tokens_per_micro_batch // "
        "the shards' seq_len (0: use micro_batch_size). Set one of the two. `train --dry-run` shows the result.",
    )
    loss_chunk_tokens: int = Field(
        1024,
        ge=0,
        description="Cross-entropy from the last hidden state in chunks of this many tokens, each chunk's logits "
        "recomputed in backward, so the full (tokens x vocab) fp32 logits never exist (0: one full-logits pass).",
    )
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine decays to lr * min_lr_ratio.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    adam_eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0, description="Clip the global grad norm to this (0: off).")
    zero_stage: Literal[2, 3] = Field(3, description="DeepSpeed ZeRO stage.")
    offload_optimizer: bool = Field(False, description="ZeRO-Offload optimizer states to CPU memory.")
    optimizer: Literal["auto", "torch", "deepspeed"] = Field(
        "auto",
        description="AdamW implementation: deepspeed = DeepSpeed's fused CUDA Adam (compiled; the Dockerfile "
        "prebuilds it, elsewhere the first run JIT-compiles it with nvcc); torch = torch.optim.AdamW handed to "
        "DeepSpeed (fused=True on CUDA, foreach on CPU; nothing to compile); auto = deepspeed on CUDA when its op "
        "is prebuilt, else torch. With offload_optimizer DeepSpeed's CPU Adam is always used. The choice is logged "
        "and kept in train_summary.json.",
    )
    offload_params: bool = Field(False, description="Offload parameters to CPU (ZeRO-3 only).")
    ds: DeepSpeedTuning = Field(default_factory=lambda: DeepSpeedTuning())
    deepspeed_config: str = Field(
        "", description="Optional user DeepSpeed JSON; checked against these fields, 'auto' values filled in."
    )
    log_every: int = Field(10, ge=1, description="Log metrics every N optimizer steps.")
    eval_every: int = Field(500, ge=0, description="Validation loss every N steps (0: only at the end).")
    eval_max_rows: int = Field(0, ge=0, description="Evaluate on at most this many validation rows (0: all).")
    gen_eval_every: int = Field(
        0,
        ge=0,
        description="Generation eval every N steps and at the end: the model being trained answers the `eval:` "
        "section's questions (eval.limit, eval.max_new_tokens) and gen/<metric> is logged, scored as `cbt-llm eval` "
        "scores (0: off).",
    )
    save_every: int = Field(
        500, ge=0, description="Checkpoint every N steps (0: only at the end and on SIGTERM/SIGUSR1)."
    )
    keep_last: int = Field(2, ge=1, description="Keep the newest K checkpoints.")
    save_final: bool = Field(True, description="Checkpoint at the end of training (false: benchmarks).")
    resume: str = Field(
        "auto", description="'auto' (latest checkpoint in run_dir if any), 'never', or a checkpoint folder."
    )
    collective_timeout_s: int = Field(
        600, ge=10, description="A collective waiting longer than this fails the job (a dead rank cannot hang it)."
    )
    requeue_exit_code: int = Field(85, ge=1, le=255, description="Exit code after a SIGTERM/SIGUSR1 checkpoint.")
    profile_steps: int = Field(
        0,
        ge=0,
        description="Profile this many optimizer steps (after 2 warm-up steps) with torch.profiler; "
        "rank 0 writes the top operators to run_dir/profile.txt.",
    )
    record_order: bool = Field(False, description="Write the rows each rank saw per step to run_dir/order/ (tests).")
    verify_shards: Literal["size", "sample", "full"] = Field(
        "size",
        description="Before the first step (and in `cbt-llm launch`'s preflight) every shard a rank reads must be a "
        "whole Parquet file with the manifest's row count (footers only, always); full also checks every shard's "
        "SHA-256 against manifest.json, sample one shard in eight (at least one per rank), size none.",
    )


class WandbConfig(Section):
    """Weights & Biases logging from rank 0 (the same numbers go to run_dir/metrics.jsonl)."""

    mode: Literal["online", "offline", "disabled"] = Field(
        "offline", description="W&B mode; the WANDB_MODE environment variable wins when set."
    )
    project: str = Field("cbt-llm", description="W&B project.")
    entity: str = Field("", description="W&B team or user (empty: your default).")
    tags: list[str] = Field(default_factory=list, description="Run tags.")
