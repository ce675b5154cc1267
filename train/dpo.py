"""train.objective=dpo: preference optimisation on packed pairs (the DPO family), under ZeRO-3, full or LoRA.

A preference row (data_pipeline/shards.py) holds pairs as adjacent sequences, chosen then rejected, position_ids
restarting at 0 at each, so packing keeps them apart exactly as it keeps SFT examples apart. One forward pass
over a packed micro-batch gives every token's log-probability; summed per sequence (train.data's `target_seq`
says which sequence each label token is in) they give, per sequence s,
    logp(s) = sum of the log-probabilities of its label tokens,   avg(s) = logp(s) / its label tokens,
and from them the loss of each pair (TRL's definitions; c = chosen, r = rejected, ref = the reference model's):
    sigmoid  h = beta ((logp_c - ref_c) - (logp_r - ref_r)),  -(1 - eps) logsigmoid(h) - eps logsigmoid(-h)
    ipo      h = (avg_c - avgref_c) - (avg_r - avgref_r),     (h - 1 / (2 beta))^2
    simpo    -logsigmoid(beta (avg_c - avg_r) - simpo_gamma)                                 (no reference)
    orpo     -avg_c + orpo_lambda * -logsigmoid(log_odds),
             log_odds = (avg_c - log1p(-exp(avg_c))) - (avg_r - log1p(-exp(avg_r)))         (no reference)
The step's loss is the sum over its pairs divided by the pairs of the whole step (all ranks, all micro-batches),
as SFT divides by the global label-token count: the pair count is known on the host, all-reduced once per step.

The reference (sigmoid, ipo), one model in memory either way: under LoRA the same model with its adapters
disabled (a no-grad forward per micro-batch; with model.lora.init_adapter the SFT adapter is merged into the
base first, so adapters-off is the SFT model); under full fine-tuning the values train.reference computed with
the starting model before the first step, carried by each batch (`ref`).

Metrics use TRL's names: rewards/chosen and rewards/rejected (beta x the log-probability ratio the loss uses;
for the reference-free losses beta x avg, orpo_lambda x avg for ORPO, as TRL's CPO and ORPO trainers),
rewards/margins, rewards/accuracies (chosen reward above rejected), logps/chosen, logps/rejected (what the loss
uses: summed for sigmoid, per-token means for the others); eval/ the same on the validation split.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cbt_llm.core.errors import ConfigError
from data_pipeline.shards import objective_of
from train.data import IGNORE
from train.metrics import LogWindow
from train.step import StepResult, _head_function, forward, loss_scale, validation_batches

REFERENCE_FREE = ("simpo", "orpo")
# per-pair sums a step and the log window carry (rewards/margins is their difference of the first two)
STATS = ("pairs", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected")


def check_objective(objective: str, manifest: dict, data_dir) -> None:
    """Refuse shards prepared for another objective (one line naming train.objective and the data folder)."""
    want = "preference" if objective == "dpo" else "sft"
    got = objective_of(manifest)
    if got != want:
        other = "sft" if objective == "dpo" else "dpo"
        fix = "prepare with data.format=preference" if objective == "dpo" else "prepare with an SFT data.format"
        raise ConfigError(
            f"train.objective={objective} needs {want} shards, but {data_dir}/manifest.json says objective "
            f"'{got}' (format '{manifest.get('format', '?')}'): {fix}, or set train.objective={other}"
        )


def reference_mode(dc, lora: bool) -> str:
    """How the run gets its reference: none (simpo, orpo), adapters_off (LoRA), precomputed (full)."""
    if dc.loss in REFERENCE_FREE:
        return "none"
    return "adapters_off" if lora else "precomputed"


# ---- log-probabilities of the sequences of a packed batch ----------------------------------------------------


def _logp_chunk(h: torch.Tensor, target: torch.Tensor, head) -> torch.Tensor:
    return -F.cross_entropy(head(h).float(), target, ignore_index=IGNORE, reduction="none")


def token_logps(out, engine, target: torch.Tensor, chunk_tokens: int, positions: int) -> torch.Tensor:
    """log p(target) at every position of the flattened (rows x (width-1)) batch, 0 where target is IGNORE.
    chunk_tokens > 0: from the last hidden state, chunk by chunk, each chunk's logits recomputed in backward
    (train.step.chunked_ce_sum's scheme, the same number of head calls on every rank under ZeRO-3)."""
    if not chunk_tokens:
        logits = out.logits[:, :-1].float()
        return -F.cross_entropy(logits.reshape(-1, logits.size(-1)), target, ignore_index=IGNORE, reduction="none")
    hidden = out.hidden_states[-1]
    h = hidden[:, :-1].reshape(-1, hidden.size(-1))
    fn = _head_function(engine.module.get_output_embeddings())
    parts = [
        checkpoint(_logp_chunk, h[a : a + chunk_tokens], target[a : a + chunk_tokens], fn, use_reentrant=False)
        for a in range(0, max(positions, h.size(0)), chunk_tokens)
    ]
    return torch.cat(parts)[: h.size(0)]


def sequence_logps(engine, batch: dict, chunk_tokens: int = 0, chunk_positions: int = 0) -> torch.Tensor:
    """logp(s) of every sequence of a collated preference batch (chosen 2k, rejected 2k+1), on the device."""
    dev = engine.device
    seq = batch["target_seq"]
    n = int(batch["seq_tokens"].numel())
    target = batch["labels"][:, 1:].clone()
    target[seq < 0] = IGNORE  # the masked_ce_sum rule: not a label, or a sequence's first token
    bins = seq.reshape(-1).clone()
    bins[bins < 0] = n  # one spare bin collects the (zero) log-probabilities of the positions that are no target
    out, _ = forward(engine, batch, chunk_tokens)
    tok = token_logps(out, engine, target.reshape(-1).to(dev), chunk_tokens, chunk_positions)
    return torch.zeros(n + 1, dtype=tok.dtype, device=dev).index_add(0, bins.to(dev), tok)[:n]


# ---- the losses -------------------------------------------------------------------------------------------------


def pair_losses(logp: torch.Tensor, tokens: torch.Tensor, ref: torch.Tensor | None, dc) -> tuple[torch.Tensor, dict]:
    """The loss of every pair (float64) and its metrics (detached), from the sequences' logp and label-token
    counts and, for sigmoid and ipo, the reference's [logp, avg] per sequence (see the module docstring)."""
    logp = logp.double()
    avg = logp / tokens.to(logp.device).double()
    lc, lr, ac, ar = logp[0::2], logp[1::2], avg[0::2], avg[1::2]
    if dc.loss in ("sigmoid", "ipo"):
        if ref is None:
            raise ValueError(f"train.dpo.loss={dc.loss} needs reference log-probabilities")
        ref = ref.to(logp.device).double()
    if dc.loss == "sigmoid":
        rc, rr = dc.beta * (lc - ref[0::2, 0]), dc.beta * (lr - ref[1::2, 0])
        h = rc - rr
        eps = dc.label_smoothing
        loss = -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)
        shown = (lc, lr)
    elif dc.loss == "ipo":
        dc_, dr_ = ac - ref[0::2, 1], ar - ref[1::2, 1]
        loss = (dc_ - dr_ - 1 / (2 * dc.beta)) ** 2
        rc, rr, shown = dc.beta * dc_, dc.beta * dr_, (ac, ar)
    elif dc.loss == "simpo":
        loss = -F.logsigmoid(dc.beta * (ac - ar) - dc.simpo_gamma)
        rc, rr, shown = dc.beta * ac, dc.beta * ar, (ac, ar)
    elif dc.loss == "orpo":
        log_odds = (ac - torch.log1p(-torch.exp(ac))) - (ar - torch.log1p(-torch.exp(ar)))
        loss = -ac + dc.orpo_lambda * -F.logsigmoid(log_odds)
        rc, rr, shown = dc.orpo_lambda * ac, dc.orpo_lambda * ar, (ac, ar)
    else:
        raise ValueError(f"unknown train.dpo.loss '{dc.loss}'")
    rc, rr = rc.detach(), rr.detach()
    metrics = {
        "rewards/chosen": rc,
        "rewards/rejected": rr,
        "rewards/accuracies": (rc > rr).double(),
        "logps/chosen": shown[0].detach(),
        "logps/rejected": shown[1].detach(),
    }
    return loss, metrics


def stat_sums(metrics: dict, pairs: int, device) -> torch.Tensor:
    """The STATS vector of a batch: its pair count and the sums of its pairs' metrics (float64, on the device)."""
    parts = [torch.full((1,), float(pairs), dtype=torch.float64, device=device)]
    parts += [metrics[k].sum().view(1) for k in STATS[1:]]
    return torch.cat(parts)


def stats_to_metrics(loss: float, stats: list[float], prefix: str = "") -> dict:
    """Means over the pairs of summed STATS (and the loss sum): TRL's metric names, under `prefix`."""
    pairs = max(stats[0], 1.0)
    m = {k: v / pairs for k, v in zip(STATS[1:], stats[1:])}
    m["rewards/margins"] = m["rewards/chosen"] - m["rewards/rejected"]
    order = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"]
    order += ["logps/chosen", "logps/rejected"]
    return {f"{prefix}loss": loss / pairs, **{f"{prefix}{k}": m[k] for k in order}}


# ---- the step, the validation and the log window -----------------------------------------------------------------


@dataclass
class DpoStepResult(StepResult):
    """A preference step: `label_tokens` holds its pairs (what the window's loss divides by), `stats` the sums of
    its pairs' metrics (STATS, on the device)."""

    stats: torch.Tensor | None = None


class Preference:
    """The objective of a train.objective=dpo run: its loss (train.dpo) and where its reference comes from."""

    def __init__(self, dc, lora: bool):
        self.dc = dc
        self.reference = reference_mode(dc, lora)

    def describe(self) -> str:
        how = {
            "none": "none (reference-free)",
            "adapters_off": "the model with its LoRA adapters disabled",
            "precomputed": "the starting model's log-probabilities, computed before the first step",
        }[self.reference]
        beta = {"orpo": f"orpo_lambda {self.dc.orpo_lambda}"}.get(self.dc.loss, f"beta {self.dc.beta}")
        return f"dpo loss {self.dc.loss} ({beta}) | reference: {how}"

    def reference_of(self, engine, batch: dict, chunk_tokens: int, chunk_positions: int) -> torch.Tensor | None:
        """[logp, avg] of the reference model for each sequence of the batch (None for simpo and orpo)."""
        if self.reference == "none":
            return None
        if self.reference == "precomputed":
            if "ref" not in batch:
                raise RuntimeError("a full fine-tuning dpo batch without reference log-probabilities (train.reference)")
            return batch["ref"]
        with torch.no_grad(), _adapters_disabled(engine.module):
            logp = sequence_logps(engine, batch, chunk_tokens, chunk_positions).double()
        return torch.stack([logp, logp / batch["seq_tokens"].to(logp.device)], 1)

    def batch_losses(self, engine, batch: dict, chunk_tokens: int, chunk_positions: int):
        ref = self.reference_of(engine, batch, chunk_tokens, chunk_positions)
        logp = sequence_logps(engine, batch, chunk_tokens, chunk_positions)
        return pair_losses(logp, batch["seq_tokens"], ref, self.dc)

    def train_step(self, engine, micro: list[dict], *, world: int, chunk_tokens: int, chunk_positions: int):
        """Forward (and the reference's), backward over the micro-batches of one optimizer step, then the update:
        the gradient is that of sum(pair losses) / (pairs of the whole step, all ranks and micro-batches)."""
        pairs = [m["pairs"] for m in micro]
        scale = loss_scale(engine, sum(pairs), world)
        total = torch.zeros((), dtype=torch.float64, device=engine.device)
        stats = torch.zeros(len(STATS), dtype=torch.float64, device=engine.device)
        for m, p in zip(micro, pairs):
            loss, metrics = self.batch_losses(engine, m, chunk_tokens, chunk_positions)
            s = loss.sum()
            engine.backward(s.float() * scale, scale_wrt_gas=False)
            engine.step()  # on every micro-batch: DeepSpeed counts them (see train.step.train_step)
            total += s.detach()
            stats += stat_sums(metrics, p, engine.device)
        return DpoStepResult.of(total, sum(pairs), micro, stats=stats)

    @torch.no_grad()
    def validation(
        self,
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
    ) -> dict:
        """eval/loss and the eval/ rewards on the validation rows (row i on rank i % world), over all pairs. Every
        rank runs the same number of forward passes (ZeRO-3); a rank without a row runs row 0 and drops it."""
        dev = engine.device
        loss, stats = (
            torch.zeros(1, dtype=torch.float64, device=dev),
            torch.zeros(len(STATS), dtype=torch.float64, device=dev),
        )
        engine.eval()
        for idx, batch in validation_batches(
            rows,
            rank=rank,
            world=world,
            micro_batch_size=micro_batch_size,
            pad_token_id=pad_token_id,
            max_rows=max_rows,
        ):
            pair_loss, metrics = self.batch_losses(engine, batch, chunk_tokens, chunk_positions)
            if idx:
                loss += pair_loss.sum()
                stats += stat_sums(metrics, batch["pairs"], dev)
        engine.train()
        total = torch.cat([loss, stats])
        dist.all_reduce(total)
        values = total.cpu().tolist()
        return stats_to_metrics(values[0], values[1:], prefix="eval/")


def _adapters_disabled(model):
    """peft's disable_adapter() context (the reference under LoRA); a model without adapters: nothing."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()


class DpoWindow(LogWindow):
    """The log window of a preference run: SFT's (train/loss is the loss sum / pairs, tokens/s, MFU) plus the
    rewards and log-probabilities of its pairs."""

    def restart(self) -> None:
        super().restart()
        self.stats = torch.zeros(len(STATS), dtype=torch.float64, device=self.device)

    def add(self, step) -> None:
        super().add(step)
        self.stats += step.stats

    def metrics(self, **kw) -> dict:
        stats = self.stats.clone()
        dist.all_reduce(stats)
        m = super().metrics(**kw)
        extra = stats_to_metrics(0.0, stats.cpu().tolist())
        extra.pop("loss")
        return {"train/loss": m.pop("train/loss"), **extra, **m}
