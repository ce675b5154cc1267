"""Generation for `cbt-llm eval` (issue 10, item 3): answer every question greedily, token-batched, data parallel.

    prompts       prompt_messages() builds the conversation training used (data_pipeline.formats): the system turn,
                  then build_user_message(question, description); the tokenizer's own chat template renders it
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

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cbt_llm.config import ConfigError
from data_pipeline.shards import is_local_path
from data_pipeline.tokenizer import IM_END, build_user_message, load_tokenizer

EXPORT_FILE = "export.json"
BACKENDS = ("auto", "transformers", "vllm")
DTYPES = ("auto", "float32", "bfloat16", "float16")
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


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
    """The conversation to answer, exactly as training built it (data_pipeline.formats): the system turn (there
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


def exported_system_prompt(path: str | Path) -> str | None:
    """The system prompt a model exported by `cbt-llm export` was trained with (export.json), or None when the
    folder has no export.json or it does not record one (an export made before it did, or a base model)."""
    meta = Path(path) / EXPORT_FILE
    if not meta.is_file():
        return None
    value = json.loads(meta.read_text(encoding="utf-8")).get("system_prompt")
    return value if isinstance(value, str) else None


def _note(message: str) -> None:
    """One line to stderr from rank 0 only (the caller may run this on every rank of a torchrun job)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"eval: {message}", file=sys.stderr, flush=True)


# ---- model folders -------------------------------------------------------------------------------------------


@dataclass
class ModelSource:
    """What to load: base weights (a folder or Hugging Face id), an optional LoRA adapter folder, and where the
    tokenizer is (the adapter folder when `cbt-llm export` saved one there, else the base)."""

    base: str
    adapter: str = ""
    tokenizer: str = ""

    @property
    def name(self) -> str:
        base = Path(self.base).name if Path(self.base).exists() else self.base
        return f"{base}+{Path(self.adapter).name}" if self.adapter else base


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"'{path}' is not readable JSON ({exc.__class__.__name__})") from None


def _check_base(path: str, what: str) -> None:
    """A local base must be a model folder; a Hugging Face id is checked when it loads."""
    p = Path(path)
    if not p.exists():
        if is_local_path(path):
            raise ConfigError(f"{what}: '{path}' not found; pass an exported folder or a Hugging Face id")
        return
    if not (p / "config.json").is_file():
        raise ConfigError(
            f"{what}: '{path}' is not a model folder (no config.json); pass an exported folder or a Hugging Face id"
        )


def _check_adapter(adapter: str, what: str) -> None:
    if not (Path(adapter) / "adapter_config.json").is_file():
        state = "not found" if not Path(adapter).exists() else "is not a LoRA adapter folder (no adapter_config.json)"
        raise ConfigError(f"{what}: '{adapter}' {state}; pass the folder `cbt-llm export` wrote for a LoRA run")


def resolve_model(path: str, adapter: str = "", field: str = "model") -> ModelSource:
    """Check the folders and say what to load; raises ConfigError naming `{field}.path` or `{field}.adapter`."""
    if not path:
        raise ConfigError(f"{field}.path: empty; pass an exported folder (`cbt-llm export`) or a Hugging Face id")
    p = Path(path)
    if not adapter and (p / "adapter_config.json").is_file() and not (p / "config.json").is_file():
        # an exported LoRA adapter on its own: its config names the base it was trained on
        base = _read_json(p / "adapter_config.json").get("base_model_name_or_path") or ""
        if not base:
            raise ConfigError(f"{field}.path: adapter '{path}' names no base_model_name_or_path; set {field}.adapter")
        _check_base(base, f"{field}.path (base_model_name_or_path of the adapter '{path}')")
        adapter, path = path, base
    else:
        _check_base(path, f"{field}.path")
        if adapter:
            _check_adapter(adapter, f"{field}.adapter")
    has_own_tokenizer = adapter and (Path(adapter) / "tokenizer_config.json").is_file()
    return ModelSource(base=path, adapter=adapter, tokenizer=adapter if has_own_tokenizer else path)


def load_chat_tokenizer(source: ModelSource, field: str = "model"):
    """The tokenizer with its chat template, padding on the left; ConfigError naming the field otherwise."""
    try:
        tok = load_tokenizer(source.tokenizer)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise ConfigError(f"{field}.path: {first}") from None
    tok.padding_side = "left"
    return tok


def stop_token_ids(tokenizer, config_eos: int | list[int] | None = None) -> list[int]:
    """Token ids that end an answer: the tokenizer's eos, <|im_end|> when the vocabulary has it (a base model's
    eos is <|endoftext|> while its chat turns end with <|im_end|>), and the model's generation_config eos ids."""
    ids = [tokenizer.eos_token_id, tokenizer.get_vocab().get(IM_END)]
    ids += config_eos if isinstance(config_eos, list) else [config_eos]
    return sorted({int(i) for i in ids if i is not None})


def _config_eos(base: str) -> int | list[int] | None:
    """generation_config.json's eos_token_id of a local model folder (None for a Hub id or no file)."""
    path = Path(base) / "generation_config.json"
    return _read_json(path).get("eos_token_id") if path.is_file() else None


def _chat_ids(tokenizer, prompt: Prompt) -> list[int]:
    """The prompt's token ids as the chat template renders them, ending with the assistant turn's opening; the
    template's text is tokenized without added special tokens, as prepare tokenized training text."""
    return list(tokenizer.apply_chat_template(prompt.messages, add_generation_prompt=True, return_dict=False))


# ---- transformers ------------------------------------------------------------------------------------------------


def _torch_dtype(dtype: str, device: str):
    import torch

    if dtype not in DTYPES:
        raise ConfigError(f"dtype: '{dtype}' is not one of {', '.join(DTYPES)}")
    if dtype == "auto":
        # bf16 where the card does it; on CPU float32, which is faster there than bf16 and exact
        cuda = device.startswith("cuda")
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, dtype)


def check_vocab(tokenizer, model, source: ModelSource, field: str) -> None:
    """A tokenizer with ids the model has no embedding for is another model's tokenizer: it would answer garbage
    (or index out of range), so it fails here, before any question, with one line."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ConfigError(
            f"{field}.path: the tokenizer in '{source.tokenizer or source.base}' has {len(tokenizer)} tokens but the "
            f"model has {rows} embeddings: tokenizer and model do not match; pass the folder `cbt-llm export` wrote "
            f"(it carries the training tokenizer)"
        )


class HFGenerator:
    """Greedy generation with transformers in this process, on CPU or one CUDA device."""

    backend = "transformers"
    batches_internally = False
    # ZeRO-3 across ranks: every forward is collective, so ranks step together until all are done (transformers'
    # synced_gpus), and generate_all gives every rank the same number of generate calls
    synced_gpus = False

    def __init__(
        self,
        path: str,
        *,
        adapter: str = "",
        device: str = "cpu",
        dtype: str = "auto",
        trust_remote_code: bool = False,
        field: str = "model",
    ):
        from transformers import AutoModelForCausalLM

        source = resolve_model(path, adapter, field)
        self.tokenizer = load_chat_tokenizer(source, field)
        self.name, self.device = source.name, device
        try:
            model = AutoModelForCausalLM.from_pretrained(
                source.base, dtype=_torch_dtype(dtype, device), trust_remote_code=trust_remote_code
            )
        except OSError as exc:
            raise ConfigError(f"{field}.path: cannot load '{source.base}': {str(exc).splitlines()[0]}") from None
        if source.adapter:
            from peft import PeftModel

            # merged once here: the same function as base + adapter, without LoRA's extra matmuls on every token
            model = PeftModel.from_pretrained(model, source.adapter).merge_and_unload()
        check_vocab(self.tokenizer, model, source, field)
        self.model = model.to(device).eval()
        self.stop_ids = stop_token_ids(self.tokenizer, model.generation_config.eos_token_id)
        self.pad_id = self.tokenizer.pad_token_id

    @classmethod
    def around(cls, model, tokenizer, *, device: str, name: str, synced_gpus: bool = False) -> HFGenerator:
        """A generator over a model already in memory, e.g. the one being trained (train.gen_eval_every); the
        tokenizer pads on the left (load_chat_tokenizer)."""
        self = cls.__new__(cls)
        self.model, self.tokenizer, self.name, self.device = model, tokenizer, name, device
        self.stop_ids = stop_token_ids(tokenizer, model.generation_config.eos_token_id)
        self.pad_id, self.synced_gpus = tokenizer.pad_token_id, synced_gpus
        return self

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """The token ids the model is given for `prompt`."""
        return _chat_ids(self.tokenizer, prompt)

    def decoding_config(self, max_new_tokens: int):
        from transformers import GenerationConfig

        # every field that could change greedy decoding is set: unset ones are filled from the model's
        # generation_config.json (transformers >= 5), which for chat models carries sampling defaults and penalties
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            min_new_tokens=0,
            do_sample=False,
            num_beams=1,
            temperature=1.0,
            top_k=50,
            top_p=1.0,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
        )

    def generate_ids(self, prompt_ids: list[list[int]], max_new_tokens: int) -> list[tuple[list[int], str]]:
        """Greedy continuations of a batch of prompts, left padded: (new token ids up to and including the stop
        token, finish) per prompt."""
        import torch

        batch = self.tokenizer.pad({"input_ids": prompt_ids}, padding=True, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            out = self.model.generate(
                **batch, generation_config=self.decoding_config(max_new_tokens), synced_gpus=self.synced_gpus
            )
        new = out[:, batch["input_ids"].shape[1] :].tolist()
        return [cut_at_stop(row, self.stop_ids) for row in new]

    def generate_batch(
        self, prompts: list[Prompt], max_new_tokens: int, prompt_ids: list[list[int]] | None = None
    ) -> list[Generation]:
        """Answer `prompts` as one batch; `prompt_ids` (from prompt_ids()) saves tokenizing them again."""
        ids = prompt_ids if prompt_ids is not None else [self.prompt_ids(p) for p in prompts]
        outs = self.generate_ids(ids, max_new_tokens)
        return [
            Generation(p.id, self.tokenizer.decode(toks, skip_special_tokens=True).strip(), len(x), len(toks), fin)
            for p, x, (toks, fin) in zip(prompts, ids, outs)
        ]


def cut_at_stop(tokens: list[int], stop_ids: list[int]) -> tuple[list[int], str]:
    """A generated row up to and including its first stop token (padding follows it in a batch)."""
    stops = set(stop_ids)
    for k, t in enumerate(tokens):
        if t in stops:
            return tokens[: k + 1], "stop"
    return tokens, "length"


# ---- vLLM ----------------------------------------------------------------------------------------------------------


@dataclass
class GreedyParams:
    """The fields of vllm.SamplingParams this module sets, for an injected engine when vLLM is not installed."""

    max_tokens: int
    stop_token_ids: list[int] = field(default_factory=list)
    temperature: float = 0.0
    repetition_penalty: float = 1.0
    skip_special_tokens: bool = True
    seed: int = 0


@dataclass
class LoraSpec:
    """The fields of vllm.lora.request.LoRARequest, for an injected engine when vLLM is not installed."""

    lora_name: str
    lora_int_id: int
    lora_path: str


def _sampling_params(max_tokens: int, stop_ids: list[int]):
    kwargs = asdict(GreedyParams(max_tokens, list(stop_ids)))
    try:
        from vllm import SamplingParams
    except ImportError:
        return GreedyParams(**kwargs)
    return SamplingParams(**kwargs)


def _lora_request(adapter: str):
    try:
        from vllm.lora.request import LoRARequest
    except ImportError:
        return LoraSpec("adapter", 1, adapter)
    return LoRARequest("adapter", 1, adapter)


class VllmGenerator:
    """Greedy generation with vLLM's offline engine: the same prompt ids and stop tokens as HFGenerator."""

    backend = "vllm"
    batches_internally = True  # vLLM schedules its own batches: give it every prompt at once

    def __init__(
        self,
        path: str,
        *,
        adapter: str = "",
        dtype: str = "auto",
        engine=None,
        trust_remote_code: bool = False,
        field: str = "model",
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
    ):
        if dtype not in DTYPES:
            raise ConfigError(f"dtype: '{dtype}' is not one of {', '.join(DTYPES)}")
        source = resolve_model(path, adapter, field)
        self.tokenizer = load_chat_tokenizer(source, field)
        self.name = source.name
        self.stop_ids = stop_token_ids(self.tokenizer, _config_eos(source.base))
        self.lora = _lora_request(source.adapter) if source.adapter else None
        if engine is None:
            engine = _vllm_engine(
                source,
                dtype,
                trust_remote_code,
                gpu_memory_utilization=gpu_memory_utilization,
                max_model_len=max_model_len,
            )
        self.engine = engine

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """The token ids the engine is given for `prompt` (the same as HFGenerator's)."""
        return _chat_ids(self.tokenizer, prompt)

    def generate_batch(
        self, prompts: list[Prompt], max_new_tokens: int, prompt_ids: list[list[int]] | None = None
    ) -> list[Generation]:
        """Answer `prompts` (any number: vLLM batches them itself); outputs come back in prompt order."""
        ids = prompt_ids if prompt_ids is not None else [self.prompt_ids(p) for p in prompts]
        # token ids, not text: vLLM would otherwise tokenize the rendered template again, maybe differently
        requests = [{"prompt_token_ids": x} for x in ids]
        params = _sampling_params(max_new_tokens, self.stop_ids)
        outs = self.engine.generate(requests, params, lora_request=self.lora)
        return [_from_request_output(p, o) for p, o in zip(prompts, outs)]


def _vllm_engine(source: ModelSource, dtype: str, trust_remote_code: bool, **kwargs):
    from vllm import LLM

    if source.adapter:
        rank = int(_read_json(Path(source.adapter) / "adapter_config.json").get("r", 16))
        # vLLM accepts only these max_lora_rank values; the adapter's own rank may lie between them
        kwargs.update(enable_lora=True, max_lora_rank=next((r for r in VLLM_LORA_RANKS if r >= rank), rank))
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return LLM(
        model=source.base,
        tokenizer=source.tokenizer,
        dtype=dtype,
        seed=0,
        trust_remote_code=trust_remote_code,
        **kwargs,
    )


def _from_request_output(prompt: Prompt, out) -> Generation:
    """vLLM's RequestOutput -> Generation; its token_ids hold the stop token, as HFGenerator counts it."""
    best = out.outputs[0]
    finish = "length" if best.finish_reason == "length" else "stop"
    return Generation(prompt.id, best.text.strip(), len(out.prompt_token_ids), len(best.token_ids), finish)


# ---- choosing and running ------------------------------------------------------------------------------------------


def _vllm_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def choose_backend(requested: str) -> str:
    """The backend to use: "auto" -> "vllm" when vLLM is installed and CUDA is available, else "transformers"; an
    explicit choice is kept, and "vllm" without vLLM installed is a ConfigError naming eval.backend. Says which
    and why on stderr."""
    import torch

    if requested not in BACKENDS:
        raise ConfigError(f"eval.backend: '{requested}' is not one of {', '.join(BACKENDS)}")
    has_vllm, cuda = _vllm_importable(), torch.cuda.is_available()
    if requested == "vllm" and not has_vllm:
        raise ConfigError(
            "eval.backend: vllm is not installed (pip install vllm on a CUDA machine); "
            "use eval.backend=transformers or auto"
        )
    if requested != "auto":
        _note(f"backend {requested} (as requested)")
        return requested
    chosen = "vllm" if has_vllm and cuda else "transformers"
    why = "vLLM installed and CUDA available" if chosen == "vllm" else ("no CUDA" if not cuda else "vLLM not installed")
    _note(f"backend {chosen} (auto: {why})")
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
