"""Answer every prompt greedily, token-batched and data parallel: `cbt-llm eval` (its questions and its sessions'
model turns) and train's generation eval (evaluation/intrain.py) share it.

    prompts       prompt_messages() builds the conversation training used (data_pipeline.sources.formats): the
                  system turn, then build_user_message(question, description); the tokenizer's own chat template
                  renders it
    batching      plan_batches() sorts questions by prompt length and cuts batches by a token budget
                  (len(batch) * (longest prompt + max_new_tokens) <= batch_tokens), so padding stays small and the
                  memory of the largest batch is known before it runs. The plan depends on the questions alone,
                  never on the number of ranks: rank r runs batches r, r + world, ..., and greedy output from any
                  number of ranks is the same text, token for token
    backends      HFGenerator (transformers in-process, CPU or CUDA; left padding + attention mask) and
                  VllmGenerator (vLLM's offline LLM, when it is installed and CUDA is there). Both are given the same
                  prompt token ids and the same stop tokens, and decode greedily
    decoding      greedy, repetition penalty 1.0, no n-gram blocking: a model's generation_config.json (Qwen's ships
                  temperature 0.7 and repetition_penalty 1.05) cannot change it. Stops on the tokenizer's eos,
                  on <|im_end|> when it is a token, and on the model's generation_config eos ids; a Generation's
                  new_tokens counts the stop token, and finish says "stop" or "length"

A model is an exported folder (`cbt-llm export`: full, merged, or a LoRA adapter whose adapter_config.json names its
base), a base model folder or Hugging Face id, optionally with a LoRA adapter folder on top. Bad paths fail with one
line naming the config field (`field`), before any weights load.
"""

from __future__ import annotations

import os
import sys
import time

from cbt_llm.core.errors import ConfigError
from cbt_llm.inference.hf import HFGenerator
from cbt_llm.inference.models import note
from cbt_llm.inference.prompt import Generation, Prompt, plan_batches
from cbt_llm.inference.vllm import VllmGenerator, vllm_importable

BACKENDS = ("auto", "transformers", "vllm")


def choose_backend(requested: str) -> str:
    """The backend to use: "auto" -> "vllm" when vLLM is installed and CUDA is available, else "transformers"; an
    explicit choice is kept, and "vllm" without vLLM installed is a ConfigError naming eval.backend. Says which
    and why on stderr."""
    import torch

    if requested not in BACKENDS:
        raise ConfigError(f"eval.backend: '{requested}' is not one of {', '.join(BACKENDS)}")
    has_vllm, cuda = vllm_importable(), torch.cuda.is_available()
    if requested == "vllm" and not has_vllm:
        raise ConfigError(
            "eval.backend: vllm is not installed (pip install vllm on a CUDA machine); "
            "use eval.backend=transformers or auto"
        )
    if requested != "auto":
        note(f"backend {requested} (as requested)")
        return requested
    chosen = "vllm" if has_vllm and cuda else "transformers"
    why = "vLLM installed and CUDA available" if chosen == "vllm" else ("no CUDA" if not cuda else "vLLM not installed")
    note(f"backend {chosen} (auto: {why})")
    return chosen


def load_generator(
    path: str,
    *,
    adapter: str = "",
    backend: str = "auto",
    device: str | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    field: str = "model",
) -> HFGenerator | VllmGenerator:
    """The generator for `backend` (see choose_backend). device=None: this rank's CUDA device (LOCAL_RANK) when
    CUDA is available, else the CPU; vLLM places itself."""
    import torch

    chosen = choose_backend(backend)
    if chosen == "vllm":
        return VllmGenerator(path, adapter=adapter, dtype=dtype, trust_remote_code=trust_remote_code, field=field)
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    return HFGenerator(
        path, adapter=adapter, device=device, dtype=dtype, trust_remote_code=trust_remote_code, field=field
    )


def _run_share(generator, prompts, ids, calls, max_new_tokens, bar) -> list[tuple[int, Generation]]:
    done = []
    for batch in calls:
        if batch is None:  # a lockstep filler (generate_all)
            generator.generate_batch([prompts[0]], max_new_tokens, [ids[0]])
            continue
        gens = generator.generate_batch([prompts[i] for i in batch], max_new_tokens, [ids[i] for i in batch])
        done += list(zip(batch, gens))
        bar.update(len(batch))
    return done


def generate_all(
    generator,
    prompts: list[Prompt],
    *,
    max_new_tokens: int = 512,
    batch_tokens: int = 16384,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> tuple[list[Generation] | None, dict]:
    """Answer every prompt, rank `rank` of `world_size` taking batches rank, rank + world_size, ... of one plan
    (plan_batches) over all prompts; with world_size > 1 the caller has initialised torch.distributed, and the
    answers are gathered to rank 0. Returns (answers in prompt order on rank 0, None elsewhere; stats). The stats,
    on every rank, are over all ranks: questions, prompt_tokens, new_tokens, seconds (the slowest rank's),
    tokens_per_s (new tokens per wall second), batches (generate_batch calls), backend."""
    from tqdm import tqdm

    ids = [generator.prompt_ids(p) for p in prompts]
    plan = plan_batches([len(x) for x in ids], max_new_tokens, batch_tokens)
    mine = plan[rank::world_size]
    calls = [[i for b in mine for i in b]] if generator.batches_internally and mine else mine
    if getattr(generator, "synced_gpus", False) and plan:
        # lockstep ranks (ZeRO-3): a rank with fewer batches repeats the first one, its answers thrown away
        calls = calls + [None] * (-(-len(plan) // world_size) - len(calls))
    bar = tqdm(
        total=sum(len(b) for b in calls if b is not None),
        desc=f"eval: generating (rank 0 of {world_size})" if world_size > 1 else "eval: generating",
        unit="q",
        leave=False,
        file=sys.stderr,
        disable=None if progress and rank == 0 else True,  # None: off when stderr is not a terminal
    )
    t0 = time.perf_counter()
    done = _run_share(generator, prompts, ids, calls, max_new_tokens, bar)
    seconds = time.perf_counter() - t0
    bar.close()
    real_calls = sum(b is not None for b in calls)
    gens, stats = _assemble(_gather((done, seconds, real_calls), world_size), len(prompts), generator.backend)
    return (gens if rank == 0 else None), stats


def _gather(share, world_size: int) -> list:
    if world_size == 1:
        return [share]
    import torch.distributed as dist

    shares = [None] * world_size
    dist.all_gather_object(shares, share)
    return shares


def _assemble(shares: list, n: int, backend: str) -> tuple[list[Generation], dict]:
    out: list[Generation | None] = [None] * n
    for done, _, _ in shares:
        for i, gen in done:
            out[i] = gen
    seconds = max(s for _, s, _ in shares)
    new = sum(g.new_tokens for g in out)
    stats = {
        "questions": n,
        "prompt_tokens": sum(g.prompt_tokens for g in out),
        "new_tokens": new,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(new / seconds, 1) if seconds > 0 else None,
        "batches": sum(c for _, _, c in shares),
        "backend": backend,
    }
    return out, stats
