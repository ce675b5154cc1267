"""The state of one training run, shared by the recipe (train.recipe) and the periodic work of its loop
(train.periodic): what start-up resolved once (ranks, shards, batch arithmetic, precision, attention, optimizer)
and the facts about the model and the machine that the log lines and the summary report.

It lives below both so that neither has to import the other.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cbt_llm.core.config import Config
from train.dpo import Preference
from train.faults import fault_hook
from train.metrics import FlopsCount, MetricsLogger
from train.optim import OptimizerChoice


@dataclass
class RunFacts:
    """What start-up found out about the tokenizer, the model and the device; each field is filled by the set-up
    step that resolves it, before the loop starts, and the summary reports them."""

    vocab: int = 0  # the tokenizer's length (the vocabulary of a model.init=random base)
    eos: int | None = None  # the tokenizer's eos token id
    base_model: str = ""  # where the base weights load from: model.name_or_path, or the random base written once
    activation_checkpointing: str = ""  # what was recomputed in backward, as the log line says it
    params_total: int = 0
    params_trainable: int = 0
    loss_chunk_tokens: int = 0  # positions per chunk of the chunked loss; 0: the full-logits loss
    flops: FlopsCount | None = None  # FLOPs of a step's real work, for MFU
    peak: float | None = None  # the device's peak FLOP/s; None (CPU, a device not in the table): no MFU
    master_dtype: str | None = None  # dtype of the optimizer's fp32 master copy under ZeRO; None without one
    master_numel_this_rank: int | None = None  # its elements on this rank (a partition, not a full copy)
    attn_kernel: str = ""  # what the attention implementation runs on this device
    reference: str | None = None  # train.objective=dpo, full fine-tuning: the reference store's folder
    reference_reused: bool | None = None  # whether that store was there already (same model, dtype, shards)


@dataclass
class Run:
    """Everything the loop needs, resolved once by the recipe's config check and completed by its set-up."""

    cfg: Config
    rank: int
    world: int
    local_rank: int
    device_type: str
    manifest: dict
    steps_per_epoch: int
    rows_left_out: int
    total_steps: int
    pad_id: int
    tok_path: str
    dtype: torch.dtype
    attn: str
    optimizer: OptimizerChoice
    run_dir: Path = field(init=False)
    on_checkpoint: Callable[[Path, dict], None] | None = None
    gen_eval: Callable[..., dict] | None = None
    facts: RunFacts = field(default_factory=RunFacts)
    start_step: int = 0
    resumed_from: str | None = None
    logger: MetricsLogger | None = None
    ds_config: dict = field(default_factory=dict)
    hf_ds_config: Any = None  # transformers' HfDeepSpeedConfig under ZeRO-3: it must outlive model loading
    pref: Preference | None = None  # train.objective=dpo: the preference loss and its reference (train.dpo)

    def __post_init__(self):
        self.run_dir = Path(self.cfg.train.run_dir)
        self.is_main = self.rank == 0
        self.fault = fault_hook(self.rank)
        if self.cfg.train.objective == "dpo":
            self.pref = Preference(self.cfg.train.dpo, self.cfg.model.lora.enabled)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    def loss_chunking(self) -> dict:
        """The chunked-loss arguments of train.step's train_step and validation_loss (the same on every rank)."""
        return {
            "chunk_tokens": self.facts.loss_chunk_tokens,
            "chunk_positions": self.cfg.train.micro_batch_size * self.manifest["seq_len"],
        }

    def say(self, *parts) -> None:
        if self.is_main:
            print(*parts, file=sys.stderr, flush=True)
