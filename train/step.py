"""One optimizer step and the validation loss: forward, the label-token loss sum, backward.

The loss of a step is sum(cross-entropy over label tokens) / (label tokens of the whole step, all ranks and
micro-batches), not a mean of per-micro-batch means. The count is known on the host before the forward pass
(train.model.label_count), so it is all-reduced once per step and nothing waits for the GPU in between.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from train import attention
from train.data import IGNORE, collate
from train.model import label_count, masked_ce_sum


def chunked_lm_loss_supported(model) -> bool:
    """Whether the model's forward takes `logits_to_keep` (transformers' own models do; some remote-code models
    do not, and then the loss takes the full-logits path)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _ce_chunk(h: torch.Tensor, target: torch.Tensor, head) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(head(h).float(), target, ignore_index=IGNORE, reduction="sum")


class _FrozenHead:
    """A frozen output layer under ZeRO-3 as a plain function of a gathered copy of its weights.

    Calling the module itself inside a chunk's recomputation would see its partitioned (empty) weight: ZeRO-3
    gathers a frozen module's weights for its forward pass but not again for a recomputation in backward. The
    head needs no gradient of its own (LoRA), so one read-only gather per loss is enough; the copy lives until
    the backward pass is done (vocab x hidden, ~1 GB in bf16 at 7B, a quarter of one row's fp32 logits)."""

    def __init__(self, head: torch.nn.Module):
        import deepspeed

        params = list(head.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            self.weight = head.weight.detach().clone()
            self.bias = head.bias.detach().clone() if getattr(head, "bias", None) is not None else None

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(h, self.weight, self.bias)


def _head_function(head: torch.nn.Module):
    partitioned = any(hasattr(p, "ds_id") for p in head.parameters())
    frozen = not any(p.requires_grad for p in head.parameters())
    return _FrozenHead(head) if partitioned and frozen else head


def chunked_ce_sum(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    labels: torch.Tensor,
    position_ids: torch.Tensor,
    chunk_tokens: int,
    positions: int = 0,
) -> torch.Tensor:
    """masked_ce_sum computed from the last hidden state, `chunk_tokens` positions at a time. Each chunk's logits
    are recomputed in backward (activation checkpointing), so at most one chunk of fp32 logits exists at once
    instead of tokens x vocab of them (2.5 GB per 4k-token row at Qwen's 152k vocabulary).

    Under ZeRO-3 every call of `head` gathers its weight collectively, so every rank must make the same number
    of calls whatever its rows' lengths: the loop covers `positions` positions (the most any rank can have),
    chunks past this batch's end being empty."""
    target = labels[:, 1:].clone()
    target[position_ids[:, 1:] == 0] = IGNORE  # a position that starts a packed example belongs to another one
    h = hidden[:, :-1].reshape(-1, hidden.size(-1))
    t = target.reshape(-1)
    fn = _head_function(head)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for a in range(0, max(positions, h.size(0)), chunk_tokens):
        total = total + checkpoint(_ce_chunk, h[a : a + chunk_tokens], t[a : a + chunk_tokens], fn, use_reentrant=False)
    return total


def forward(engine, batch: dict, chunk_tokens: int = 0):
    """The model's forward pass over a collated batch (host tensors): (its output, position_ids on the device).
    With sdpa_varlen the example boundaries are found here, on the host, once per batch, instead of in every
    layer (which would wait for the GPU each time). chunk_tokens > 0: the model returns only its last hidden
    state (and the logits of one position), for a loss computed from it in chunks."""
    dev = engine.device
    pos = batch["position_ids"].to(dev)
    extra = {}
    if getattr(engine.module.config, "_attn_implementation", None) == attention.NAME:
        extra = attention.boundaries(batch["position_ids"])
        extra["cu_seq_lens_q"] = extra["cu_seq_lens_k"] = extra["cu_seq_lens_q"].to(dev, non_blocking=True)
    only_hidden = {"logits_to_keep": 1, "output_hidden_states": True} if chunk_tokens else {}
    out = engine(input_ids=batch["input_ids"].to(dev), position_ids=pos, use_cache=False, **extra, **only_hidden)
    return out, pos


def loss_sum(engine, batch: dict, chunk_tokens: int = 0, chunk_positions: int = 0) -> torch.Tensor:
    """Forward a collated batch (host tensors) and return its label-token cross-entropy sum, on the device (its
    count comes from label_count on the host). chunk_tokens > 0: chunked_ce_sum computes it from the last hidden
    state, over chunk_positions positions (micro_batch_size x seq_len: the same on every rank)."""
    labels = batch["labels"].to(engine.device)
    out, pos = forward(engine, batch, chunk_tokens)
    if chunk_tokens:
        head = engine.module.get_output_embeddings()
        return chunked_ce_sum(out.hidden_states[-1], head, labels, pos, chunk_tokens, chunk_positions)
    return masked_ce_sum(out.logits, labels, pos, count=False)[0]


@dataclass
class StepResult:
    """What one optimizer step did on this rank: the loss sum stays on the device; the rest is host arithmetic."""

    loss_sum: torch.Tensor
    label_tokens: float
    real_tokens: float
    rows: float
    attn_len_sq: float  # sum of squared example lengths (the attention work, see train.metrics)

    @classmethod
    def of(cls, loss_sum: torch.Tensor, label_tokens: float, micro: list[dict], **extra):
        """The result of a step over `micro`: its host counts summed from the collated micro-batches."""
        return cls(
            loss_sum,
            float(label_tokens),
            float(sum(m["real_tokens"] for m in micro)),
            float(sum(m["input_ids"].shape[0] for m in micro)),
            float(sum(m["attn_len_sq"] for m in micro)),
            **extra,
        )


def loss_scale(engine, count: float, world: int) -> float:
    """What a rank's loss sum is multiplied by before backward, `count` being its share of the step's divisor
    (label tokens, pairs): DeepSpeed averages gradients over ranks, so world / (global count) makes the update
    that of sum / global count. The count is all-reduced once per step."""
    total = torch.tensor([float(count)]).to(engine.device)
    dist.all_reduce(total)
    return world / max(total.item(), 1.0)


def validation_batches(rows, *, rank: int, world: int, micro_batch_size: int, pad_token_id: int, max_rows: int):
    """(idx, batch) for each validation forward pass of this rank: its rows (row i on rank i % world, the first
    `max_rows` rows; 0: all) collated `micro_batch_size` at a time. Every rank gets the same number of batches
    (ZeRO-3 gathers weights collectively); a rank without a row left gets row 0 with idx empty, to drop."""
    n = min(len(rows), max_rows) if max_rows else len(rows)
    mine = list(range(rank, n, world))
    for b in range(math.ceil(math.ceil(n / world) / micro_batch_size)):
        idx = mine[b * micro_batch_size : (b + 1) * micro_batch_size]
        yield idx, collate(rows, idx or [0], pad_token_id)


def train_step(engine, micro: list[dict], *, world: int, chunk_tokens: int, chunk_positions: int) -> StepResult:
    """Forward and backward over the micro-batches of one optimizer step, then the update."""
    counts = [label_count(m["labels"], m["position_ids"]) for m in micro]
    scale = loss_scale(engine, sum(counts), world)
    total = torch.zeros((), dtype=torch.float64, device=engine.device)
    for m in micro:
        s = loss_sum(engine, m, chunk_tokens, chunk_positions)
        engine.backward(s * scale, scale_wrt_gas=False)
        # step() on every micro-batch: DeepSpeed counts micro-steps itself and only updates the weights (and
        # zeroes the gradients) at its gradient_accumulation_steps boundary; skipping calls would break its count
        engine.step()
        total += s.detach().double()
    return StepResult.of(total, sum(counts), micro)


@torch.no_grad()
def validation_loss(
    engine,
    rows,
    *,
    rank: int,
    world: int,
    micro_batch_size: int,
    pad_token_id: int,
    max_rows: int,
    chunk_tokens: int = 0,
    chunk_positions: int = 0,
) -> float:
    """Loss on the validation split's packed rows (row i on rank i % world), summed over label tokens / global
    count: the number the loss curve shows beside train/loss (not a generation-based evaluation).

    Every rank runs the same number of forward passes (ZeRO-3 gathers weights collectively); a rank without
    a row left runs row 0 and drops its result.
    """
    loss, count = torch.zeros((), dtype=torch.float64, device=engine.device), 0
    engine.eval()
    for idx, batch in validation_batches(
        rows, rank=rank, world=world, micro_batch_size=micro_batch_size, pad_token_id=pad_token_id, max_rows=max_rows
    ):
        s = loss_sum(engine, batch, chunk_tokens, chunk_positions)
        if idx:
            loss += s.detach().double()
            count += label_count(batch["labels"], batch["position_ids"])
    engine.train()
    total = torch.cat([loss.view(1), torch.tensor([float(count)], dtype=torch.float64).to(engine.device)])
    dist.all_reduce(total)
    return float(total[0] / max(total[1], 1))
