"""The log-probability a model gives an answer: what `cbt-llm eval`'s preference accuracy compares (the chosen answer
of a held-out pair against the rejected one, evaluation/preference.py), the same rule for every model.

    tokens     the conversation (the prompt's turns, then the answer as the assistant turn) rendered with the
               tokenizer's own chat template and tokenized as one text, exactly as prepare encodes a training
               sequence (data_pipeline/prepare/encode.py: chat_renderer, the whole text at once, no added special
               tokens); the scored tokens are those that start inside the answer or its end token (<|im_end|> when
               the vocabulary has it, else the tokenizer's eos): prepare's labels, the tokens DPO trains on
    score      the sum of the scored tokens' log-probabilities (each predicted from everything before it) and their
               count; mean() is the per-token mean, so a longer answer is not penalised for its length
    batching   sequences sorted longest first and cut by a token budget (len(batch) x longest <= batch_tokens), right
               padded; rank r of `world_size` scores batches r, r + world_size, ... of one plan and rank 0 gathers,
               as generate_all shares generation, so any number of ranks gives the same numbers

Memory: a batch holds its logits, batch_tokens x vocabulary floats (8192 x 152k in bf16 is about 2.5 GB), so the
budget is smaller than generation's.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from cbt_llm.domain.chat_format import chat_renderer, label_spans
from cbt_llm.inference.tokenizer import end_token_of


@dataclass
class AnswerLogprob:
    """One answer's scored tokens: the sum of their log-probabilities and how many there are."""

    logp: float
    tokens: int

    @property
    def mean(self) -> float:
        return self.logp / self.tokens if self.tokens else float("-inf")


def encode_answer(tokenizer, messages: list[dict], answer: str, render=None, end_token: str | None = None):
    """(token ids, scored mask) of `messages` + `answer` as the assistant turn, encoded as prepare encodes it: the
    rendered text tokenized at once, the mask True on the tokens that start inside the answer or its end token.
    Raises ValueError when the template changes a message so it cannot be found (prepare rejects it too)."""
    render = render or chat_renderer(tokenizer)
    end_token = end_token_of(tokenizer) if end_token is None else end_token
    conv = [*messages, {"role": "assistant", "content": answer}]
    text = render(conv)
    ((lo, hi),) = label_spans(text, conv, end_token, learn_from=len(conv) - 1)
    enc = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    return list(enc.ids), [lo <= start < hi for start, _ in enc.offsets]


def plan(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Batches of indices, longest first (stable), each len(batch) x its longest <= batch_tokens (a sequence over
    the budget alone gets a batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _score_batch(model, encoded: list[tuple[list[int], list[bool]]], pad_id: int, device) -> list[AnswerLogprob]:
    import torch

    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(encoded), width), dtype=torch.long)
    scored = torch.zeros((len(encoded), width), dtype=torch.bool)
    for r, (x, m) in enumerate(encoded):
        ids[r, : len(x)] = torch.tensor(x)
        attn[r, : len(x)] = 1
        scored[r, : len(m)] = torch.tensor(m)
    ids, attn, scored = ids.to(device), attn.to(device), scored.to(device)
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
        target = scored[:, 1:]  # token t is predicted by the logits at t - 1
        rows = target.nonzero(as_tuple=True)[0]
        picked = logits[:, :-1][target].float()  # only the scored positions go to float32
        lp = torch.log_softmax(picked, dim=-1).gather(1, ids[:, 1:][target].unsqueeze(1)).squeeze(1)
        sums = torch.zeros(len(encoded), dtype=torch.float64, device=lp.device).index_add_(0, rows, lp.double())
        counts = target.sum(dim=1)
    return [AnswerLogprob(float(s), int(c)) for s, c in zip(sums.tolist(), counts.tolist())]


def answer_logprobs(
    model,
    tokenizer,
    items: list[tuple[list[dict], str]],
    *,
    device="cpu",
    batch_tokens: int = 8192,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    desc: str = "log-probs",
) -> list[AnswerLogprob] | None:
    """The log-probability `model` gives each (messages, answer) of `items` (see the module docstring), in item
    order on rank 0 (None on the other ranks); with world_size > 1 the caller has initialised torch.distributed.
    An item whose answer cannot be located in its rendered text raises ValueError."""
    from tqdm import tqdm

    render, end = chat_renderer(tokenizer), end_token_of(tokenizer)
    encoded = [encode_answer(tokenizer, msgs, answer, render, end) for msgs, answer in items]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    mine = plan([len(ids) for ids, _ in encoded], batch_tokens)[rank::world_size]
    done: list[tuple[int, AnswerLogprob]] = []
    bar = tqdm(
        total=sum(map(len, mine)), desc=desc, unit="seq", leave=False, file=sys.stderr,
        disable=None if progress and rank == 0 else True,
    )  # fmt: skip
    was_training = model.training
    model.eval()
    try:
        for batch in mine:
            done += zip(batch, _score_batch(model, [encoded[i] for i in batch], pad, device))
            bar.update(len(batch))
    finally:
        model.train(was_training)
        bar.close()
    if world_size > 1:
        import torch.distributed as dist

        shares: list = [None] * world_size
        dist.all_gather_object(shares, done)
        done = [x for share in shares for x in share]
    if rank != 0:
        return None
    out: list[AnswerLogprob | None] = [None] * len(items)
    for i, r in done:
        out[i] = r
    return out
