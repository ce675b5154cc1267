"""What a generator is given and gives back: a prompt (the conversation before the assistant turn, as training
built it), a generation, the token-budget batch plan and the cut at a stop token. Every engine shares these:
the transformers and vLLM generators, the OpenAI-endpoint client and the server."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cbt_llm.domain.chat_format import build_user_message


@dataclass
class Prompt:
    """One question to answer: its id and the conversation before the assistant turn."""

    id: str
    messages: list[dict]


@dataclass
class Generation:
    """One answer. new_tokens counts the stop token when there is one; finish is "stop" (a stop token was made),
    "length" (max_new_tokens was reached first) or "error" (an endpoint that failed this question: `error` says
    why, and the answer is counted as failed, never scored)."""

    id: str
    text: str
    prompt_tokens: int
    new_tokens: int
    finish: str
    error: str = ""


def prompt_messages(question: str, description: str, system_prompt: str) -> list[dict]:
    """The conversation to answer, exactly as training built it (data_pipeline.sources.formats): the system turn (there
    even when empty, as prepare writes it), then the user turn."""
    return [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": build_user_message(question, description)},
    ]


def plan_batches(prompt_lengths: list[int], max_new_tokens: int, batch_tokens: int) -> list[list[int]]:
    """Batches of prompt indices, longest prompts first (stable for equal lengths), each within the token budget
    len(batch) * (longest prompt + max_new_tokens) <= batch_tokens; a prompt over the budget alone gets a batch of
    its own. Longest first: the batch most likely to run out of memory runs first, not after an hour."""
    if max_new_tokens < 1 or batch_tokens < 1:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) and batch_tokens ({batch_tokens}) must be >= 1")
    order = sorted(range(len(prompt_lengths)), key=lambda i: -prompt_lengths[i])
    batches: list[list[int]] = []
    for i in order:
        # the first of a batch is its longest, since lengths only fall from there
        if batches and (len(batches[-1]) + 1) * (prompt_lengths[batches[-1][0]] + max_new_tokens) <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def cut_at_stop(tokens: list[int], stop_ids: list[int]) -> tuple[list[int], str]:
    """A generated row up to and including its first stop token (padding follows it in a batch)."""
    stops = set(stop_ids)
    for k, t in enumerate(tokens):
        if t in stops:
            return tokens[: k + 1], "stop"
    return tokens, "length"


def sample_seed(seed: int, prompt_id: str, k: int | None = None) -> int:
    """The sampler's seed for one prompt (and, where each answer is its own request, its k-th answer): a 63-bit
    BLAKE2b digest of (seed, prompt id[, k]), so sampled answers repeat run after run whatever else is asked."""
    key = f"{seed}\x00{prompt_id}" + ("" if k is None else f"\x00{k}")
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big") >> 1
