"""The one typed config tree, loaded from YAML with dotted CLI overrides.

Every default lives here, in the type. A shipped YAML only states what differs from these defaults.
Unknown keys are errors that name the nearest valid key, so a typo never silently falls back to a default.

Paths: one run folder, `runs/<run_name>/`. A path field left empty is derived in one place
(`Config._derive_paths`), each from the stage that writes what it reads, so the stages agree by construction:

    synth.out_dir     runs/<run_name>/corpus           api.out_dir       runs/<run_name>/corpus-api
    tokenizer.input   <synth.out_dir>/*.jsonl*         tokenizer.out_dir runs/<run_name>/tokenizer
    data.inputs       [<synth.out_dir>/*.jsonl*]       data.out_dir      runs/<run_name>/data
    data.tokenizer    <tokenizer.out_dir>              train.data_dir    <data.out_dir>
    train.run_dir     runs/<run_name>/train            eval.out_dir      runs/<run_name>/eval
    eval.data_dir     <data.out_dir>

A path that is set wins. So train.data_dir differs from data.out_dir only when it is set on purpose (train
reads shards prepared elsewhere), and `cbt-llm train --dry-run` says which folder it reads.

World size: data.world_size is what prepare sizes the shards for (a multiple of it) and what `cbt-llm launch`
starts by default; the launcher's WORLD_SIZE is the truth at run time. `check_world_size` is the one rule
both apply: the launcher's world size must divide the train shards.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A bad config: the message is one line naming the field and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SynthConfig(_Section):
    """`cbt-llm synth template`: the offline generator of a synthetic CBT corpus."""

    num_records: int = Field(20_000, ge=1, description="How many records to generate.")
    seed: int = Field(0, description="Seed: the same seed gives byte-identical output on any shard count.")
    out_dir: str = Field("", description="Folder the JSONL shards are written to (empty: runs/<run_name>/corpus).")
    num_shards: int = Field(
        4,
        ge=1,
        description="Number of output shards; shard k holds a contiguous range of records, so concatenating the "
        "shards gives the 1-shard output.",
    )
    compress: Literal["none", "zstd"] = Field("none", description="Write .jsonl or .jsonl.zst shards.")
    crisis_fraction: float = Field(
        0.02, ge=0.0, le=0.5, description="Fraction of questions that mention suicide or self-harm (crisis flagged)."
    )
    workers: int = Field(
        0,
        ge=0,
        description="Processes writing shards in parallel (one shard each at a time); 0: one per CPU, "
        "1: single process.",
    )
    sessions: bool = Field(
        False,
        description="Generate multi-turn counselling sessions (OpenAI-messages JSONL, one session per line; "
        "num_records counts sessions) instead of single-turn records.",
    )
    min_turns: int = Field(
        8,
        ge=8,
        le=40,
        description="Sessions: fewest turns, system prompt not counted (8: the shortest that keeps the arc in four "
        "counsellor turns); at most max_turns.",
    )
    max_turns: int = Field(24, ge=8, le=40, description="Sessions: most turns, system prompt not counted.")


class AgentsConfig(_Section):
    """`synth api --agents`: draft -> critique against the eval judge's CBT rubric -> revise, until the rubric
    total reaches `threshold` or `max_rounds` critiques were made (data_pipeline/synth_agents.py)."""

    enabled: bool = Field(False, description="Critique and revise every answer (the --agents flag).")
    critic_base_url: str = Field("", description="The critic's OpenAI-compatible base URL (empty: api.base_url).")
    critic_model: str = Field("", description="The critic model sent in its requests (empty: api.model).")
    critic_api_key_env: str = Field(
        "", description="Environment variable holding the critic endpoint's key (empty: api.api_key_env)."
    )
    rubric: Literal["cbt"] = Field("cbt", description="The judge rubric the critic scores on (cbt: total 0-18).")
    threshold: float = Field(
        16.0, description="Stop revising once a draft's rubric total reaches this (within the rubric's range)."
    )
    max_rounds: int = Field(
        3,
        ge=1,
        le=10,
        description="Most critiques per answer; every round that misses the threshold, except the last, is followed "
        "by a revision (so at most 2 x max_rounds requests per answer, retries aside). 1: score only.",
    )
    critic_max_tokens: int = Field(256, ge=16, description="Longest critic reply in tokens.")
    revise_prompt_version: str = Field(
        "revise-v1", description="Version of the revision prompt (data_pipeline/prompts.py REVISE_PROMPTS)."
    )


class ApiSynthConfig(_Section):
    """`cbt-llm synth api`: the paper's method, CBT prompt sent to an OpenAI-compatible endpoint."""

    input: str = Field("", description="PsyQA JSON file or our JSONL (glob allowed).")
    out_dir: str = Field(
        "",
        description="Folder for records.jsonl, rejects.jsonl and summary.json (empty: runs/<run_name>/corpus-api, "
        "corpus-api-sessions with api.sessions, corpus-api-agents with api.agents.enabled; not "
        "the template's corpus folder, whose *.jsonl* glob would also read rejects.jsonl).",
    )
    base_url: str = Field("http://127.0.0.1:8000/v1", description="OpenAI-compatible base URL (ends in /v1).")
    model: str = Field("", description="Model name sent in the request body.")
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="Name of the environment variable holding the API key (never the key itself)."
    )
    prompt_version: str = Field(
        "v2",
        description="Version of the CBT prompt (see data_pipeline/prompts.py; v2 names the national line of "
        "cbt_llm/crisis_hotlines.json).",
    )
    concurrency: int = Field(8, ge=1, le=1024, description="Maximum requests in flight.")
    timeout_s: float = Field(120.0, gt=0, description="Per-request timeout in seconds.")
    max_retries: int = Field(4, ge=0, description="Retries per question on 429/5xx/timeouts/invalid replies.")
    backoff_s: float = Field(1.0, ge=0, description="Base of the exponential backoff between retries, seconds.")
    max_backoff_s: float = Field(
        60.0, ge=0, description="Cap on one wait between retries, seconds (also caps a server's Retry-After)."
    )
    temperature: float = Field(0.7, ge=0, le=2)
    max_tokens: int = Field(2048, ge=16)
    limit: int = Field(0, ge=0, description="Process at most this many questions (0: all).")
    # `synth api --sessions`: a counsellor simulator (the endpoint above) and a client simulator talk
    sessions: bool = Field(
        False,
        description="Synthesise multi-turn sessions (OpenAI-messages JSONL) instead of single answers; the endpoint "
        "above plays the counsellor, the client_* endpoint the client.",
    )
    client_base_url: str = Field("", description="Sessions: the client simulator's base URL (empty: base_url).")
    client_model: str = Field("", description="Sessions: the client simulator's model (empty: model).")
    client_api_key_env: str = Field(
        "", description="Sessions: environment variable holding the client endpoint's key (empty: api_key_env)."
    )
    num_sessions: int = Field(
        100,
        ge=1,
        description="Sessions without api.input: how many, each client built from the offline generator's intake "
        "(data_pipeline/synth_sessions.py) at api.seed; with api.input each question seeds one session.",
    )
    seed: int = Field(0, description="Sessions: seed of the drawn intakes (the same seed gives the same intakes).")
    crisis_fraction: float = Field(
        0.02, ge=0.0, le=0.5, description="Sessions without api.input: share of clients who disclose suicidal thoughts."
    )
    min_turns: int = Field(
        8, ge=2, le=80, description="Sessions: a session that ends sooner (system prompt not counted) is rejected."
    )
    max_turns: int = Field(
        24,
        ge=2,
        le=80,
        description="Sessions: turn limit (system prompt not counted); a session that reaches it without the end "
        "marker stops on the last counsellor turn that fits, so no client turn is left unanswered.",
    )
    agents: AgentsConfig = Field(default_factory=AgentsConfig)


class TokenizerConfig(_Section):
    """`cbt-llm tokenizer train`: byte-level BPE trained on the corpus for the embedded demo."""

    input: str = Field("", description="Glob of corpus JSONL shards (empty: <synth.out_dir>/*.jsonl*).")
    vocab_size: int = Field(8000, ge=300, description="Vocabulary size including special tokens.")
    min_frequency: int = Field(2, ge=1)
    max_records: int = Field(200_000, ge=0, description="Train on at most this many records (0: all).")
    out_dir: str = Field("", description="Hugging Face tokenizer folder to write (empty: runs/<run_name>/tokenizer).")


class NearDupConfig(_Section):
    """prepare's near-duplicate pass: MinHash LSH over character shingles of each example's user and assistant
    turns (data_pipeline/prepare/neardup.py); the first copy in (file, line) order is kept."""

    enabled: bool = Field(False, description="Remove near-duplicates (off: shards exactly as without the pass).")
    threshold: float = Field(
        0.8, gt=0.0, lt=1.0, description="Jaccard similarity of shingle sets at which two examples are near-copies."
    )
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (signature length).")
    shingle: int = Field(5, ge=1, le=32, description="Characters per shingle (after dropping whitespace, punctuation).")


class QualityConfig(_Section):
    """prepare's quality gate: examples under a threshold go to rejects as low_quality with their score."""

    min_structure_coverage: int = Field(
        0, ge=0, le=5, description="Least CBT parts (0-5) the structure scorer must find in the answer (0: off)."
    )
    min_judge_total: float = Field(
        0.0,
        ge=0.0,
        description="Least meta.judge.total a judged record must carry (0: off; records without one pass this check).",
    )
    scorer: str = Field(
        "runs/structure_scorer.npz",
        description="The structure scorer .npz (built on first use, ~15 s), read when min_structure_coverage > 0.",
    )


class DataConfig(_Section):
    """`cbt-llm prepare`: Ray Data validates, splits, templates, tokenizes, masks, packs and writes shards."""

    inputs: list[str] = Field(default_factory=list, description="Globs or URIs (empty: [<synth.out_dir>/*.jsonl*]).")
    format: Literal["cbt", "psyqa", "alpaca", "sharegpt", "messages"] = Field(
        "cbt", description="Declared input format (messages: OpenAI-messages sessions, as synth --sessions writes)."
    )
    out_dir: str = Field(
        "", description="Output folder (train/, validation/, rejects/, manifest.json; empty: runs/<run_name>/data)."
    )
    tokenizer: str = Field("", description="Tokenizer folder or Hugging Face id (empty: <tokenizer.out_dir>).")
    system_prompt: str = Field(
        "你是一名经验丰富的心理咨询师,专长于认知行为疗法,以心理咨询师的身份回答以下问题",
        description="System prompt put in front of every conversation.",
    )
    seq_len: int = Field(1024, ge=16, description="Packed row length in tokens.")
    packing: bool = Field(True, description="Pack examples into rows (false: one padded example per row).")
    packer: Literal["best", "bfd"] = Field(
        "best",
        description="best: per window, the fewest rows of two target-fill packers and best-fit-decreasing "
        "(data_pipeline/packing.py); bfd: best-fit-decreasing alone (about 4x faster, as full only on long-tailed "
        "lengths).",
    )
    pack_window: int = Field(
        20_000, ge=1, description="Examples per packing window (the packer sees one window at a time)."
    )
    val_fraction: float = Field(0.02, ge=0.0, lt=1.0, description="Fraction of questions held out (by hash).")
    overlong: Literal["auto", "truncate", "reject", "split"] = Field(
        "auto",
        description="Policy for examples over seq_len: truncate, reject, or split on turn boundaries into pieces "
        "(data_pipeline/prepare/split.py); auto: split for format messages, truncate otherwise.",
    )
    max_chars: int = Field(20_000, ge=1, description="Records with more characters than this are rejected.")
    num_shards: int = Field(0, ge=0, description="Train shards to write (0: a multiple of world_size).")
    world_size: int = Field(
        8,
        ge=1,
        description="Training ranks the shards are sized for (their count is a multiple of it, so 8 also serves 1, 2 "
        "or 4 ranks); `cbt-llm launch` starts this many unless launch.gpus_per_node says otherwise.",
    )
    ray_object_store_mb: int = Field(
        1024,
        ge=100,
        description="Object store size of the embedded local Ray (bounds prepare's memory; not used on a cluster).",
    )
    seed: int = 0
    near_dup: NearDupConfig = Field(default_factory=NearDupConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    rows_per_shard: int = Field(
        16_384,
        ge=1,
        description="Train rows per shard when num_shards is 0: the shard count is the smallest multiple of world_size "
        "that keeps shards at or under this many rows.",
    )
    # Ray Data execution (ray_*): speed and memory of prepare, never the content of the shards
    ray_block_mb: int = Field(
        8,
        ge=1,
        description="Ray Data's target block size, MiB. Ray's default (128) holds a whole input file's records in one "
        "block and stalls the ordered stream until the corpus is in the object store; small blocks keep it flowing.",
    )
    ray_read_lines: int = Field(
        2048, ge=1, description="Input lines (or Parquet rows) per block out of the file reader."
    )
    ray_tokenize_batch: int = Field(
        1024,
        ge=1,
        description="Records per Ray Data batch sent to a prepare actor, which parses, validates, screens, "
        "tokenizes and masks them (one actor per CPU at most).",
    )


class LoraConfig(_Section):
    """LoRA adapters (peft) on the model; off means full fine-tuning."""

    enabled: bool = Field(False, description="Train LoRA adapters instead of all weights.")
    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: int = Field(32, ge=1, description="Adapter scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: list[str] | str = Field(
        "all-linear", description="Module names to adapt, or 'all-linear' (every linear layer but the LM head)."
    )


class ModelConfig(_Section):
    """`cbt-llm train`: which causal LM to train and how it is built."""

    init: Literal["pretrained", "random"] = Field(
        "pretrained", description="'pretrained': load name_or_path; 'random': a small model from the fields below."
    )
    name_or_path: str = Field("", description="Hugging Face id or local folder (init=pretrained).")
    trust_remote_code: bool = Field(False, description="Allow the model repo's own code (Baichuan2 needs it).")
    arch: str = Field("qwen2", description="model_type of the random model (init=random).")
    hidden_size: int = Field(64, ge=8, description="Random model: hidden size.")
    num_layers: int = Field(2, ge=1, description="Random model: transformer layers.")
    num_heads: int = Field(4, ge=1, description="Random model: attention heads.")
    num_kv_heads: int = Field(2, ge=1, description="Random model: key/value heads (GQA).")
    intermediate_size: int = Field(128, ge=8, description="Random model: MLP width.")
    vocab_size: int = Field(0, ge=0, description="Random model: vocabulary (0: the tokenizer's length).")
    attn: Literal["auto", "flash_attention_2", "sdpa_varlen", "sdpa", "eager"] = Field(
        "auto",
        description="Attention kernel; auto = flash_attention_2 when importable on CUDA, else sdpa_varlen (torch SDPA "
        "kernels cut at packed-example boundaries: torch's varlen flash kernel on CUDA, one SDPA call per example "
        "on CPU); sdpa = transformers' SDPA with a block-diagonal mask per packed row; remote-code models: sdpa.",
    )
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto = bf16 on GPU, fp32 on CPU.")
    activation_checkpointing: Literal["off", "full", "every_k"] = Field(
        "off",
        description="Recompute activations in backward to save memory: off; full = every decoder layer; every_k = "
        "every k-th layer (model.checkpoint_every_k), a middle ground that recomputes 1/k of the layers.",
    )
    checkpoint_every_k: int = Field(
        2, ge=1, description="activation_checkpointing=every_k: checkpoint layers 0, k, 2k, ... (1 = full)."
    )
    liger: bool = Field(
        True,
        description="Liger kernels (RoPE, RMSNorm, SwiGLU; not its loss: ours masks packed rows) when liger_kernel "
        "is installed (the gpu extra and the Docker image have it) and the device is CUDA; otherwise logged and "
        "ignored. On one H200 they made a ~1.2B full fine-tune 1.32x faster with 20% less peak memory.",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)

    @model_validator(mode="before")
    @classmethod
    def _earlier_checkpointing_name(cls, data: Any) -> Any:
        """`gradient_checkpointing: true` (the earlier field) still means activation_checkpointing: full."""
        if isinstance(data, dict) and "gradient_checkpointing" in data:
            data = dict(data)
            on = data.pop("gradient_checkpointing") in (True, 1, "true", "True")
            data.setdefault("activation_checkpointing", "full" if on else "off")
        return data


class DeepSpeedTuning(_Section):
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


class TrainConfig(_Section):
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


class WandbConfig(_Section):
    """Weights & Biases logging from rank 0 (the same numbers go to run_dir/metrics.jsonl)."""

    mode: Literal["online", "offline", "disabled"] = Field(
        "offline", description="W&B mode; the WANDB_MODE environment variable wins when set."
    )
    project: str = Field("cbt-llm", description="W&B project.")
    entity: str = Field("", description="W&B team or user (empty: your default).")
    tags: list[str] = Field(default_factory=list, description="Run tags.")


class EvalModelConfig(_Section):
    """One model of `cbt-llm eval`: a local folder (optionally with a LoRA adapter) or an OpenAI-compatible endpoint."""

    name: str = Field(..., min_length=1, description="Column name in the report (e.g. base, fine-tuned, api).")
    path: str = Field(
        "", description="Exported folder (`cbt-llm export`), a base model folder or Hugging Face id, or an adapter."
    )
    adapter: str = Field("", description="LoRA adapter folder applied on top of `path` (a base + adapter model).")
    endpoint: str = Field("", description="OpenAI-compatible base URL ending in /v1 (a served model or an API).")
    model: str = Field("", description="Endpoint: the model name sent in the request (empty: `name`).")
    api_key_env: str = Field(
        "", description="Endpoint: environment variable holding the API key (never written anywhere)."
    )
    system_prompt: str | None = Field(
        None, description="System prompt (default: the one export.json recorded, else data.system_prompt)."
    )

    @model_validator(mode="after")
    def _one_source(self) -> EvalModelConfig:
        if bool(self.path) == bool(self.endpoint):
            raise ValueError(f"model '{self.name}' needs exactly one of path (a local model) or endpoint (a URL)")
        if self.adapter and not self.path:
            raise ValueError(f"model '{self.name}': adapter needs path (the base model it applies to)")
        return self


class BertScoreConfig(_Section):
    """BERTScore F1 with a local encoder (bert-base-chinese layer 8 is the paper-comparable setting)."""

    model_path: str = Field("", description="Local encoder folder (empty: BERTScore is reported as not computed).")
    layer: int = Field(8, ge=1, description="Hidden layer whose embeddings are matched.")
    batch_size: int = Field(32, ge=1)


class JudgeConfig(_Section):
    """`cbt-llm eval` LLM judge over an OpenAI-compatible endpoint (evaluation/judge.py); empty base_url: off."""

    base_url: str = Field("", description="OpenAI-compatible base URL ending in /v1 (empty: no judge).")
    model: str = Field("", description="The judge model name sent in each request.")
    api_key_env: str = Field("", description="Environment variable holding the judge's API key (never written).")
    concurrency: int = Field(8, ge=1, le=1024, description="Judge requests in flight.")
    timeout_s: float = Field(120.0, gt=0, description="Per-request timeout in seconds.")
    max_retries: int = Field(4, ge=0, description="Client retries on 429/5xx/timeouts.")
    rubrics: list[Literal["cbt", "counselling"]] = Field(
        default_factory=lambda: ["cbt", "counselling"],
        description="cbt: six criteria, total 0-18; counselling: seven qualities rated 1-10.",
    )
    repeats: int = Field(
        1, ge=1, le=5, description="Judge each answer this many times (other seeds); 2+ reports agreement."
    )
    max_tokens: int = Field(256, ge=16, description="Longest judge reply in tokens.")


class SessionClientConfig(_Section):
    """The client simulator of `cbt-llm eval --sessions`: an OpenAI-compatible model playing the client, or the
    offline generator's scripted client lines."""

    kind: Literal["endpoint", "scripted"] = Field(
        "endpoint",
        description="endpoint: an OpenAI-compatible model plays the client; scripted: each drawn intake's client lines "
        "from `synth template --sessions`, replayed in order whatever the model says (offline: for the demo and "
        "smoke tests; it does not react, so it does not measure dialogue skill).",
    )
    base_url: str = Field("", description="OpenAI-compatible base URL ending in /v1 (required for kind: endpoint).")
    model: str = Field("", description="The client model name sent in each request.")
    api_key_env: str = Field("", description="Environment variable holding the client endpoint's key (never written).")
    max_tokens: int = Field(256, ge=16, description="Longest client turn in tokens.")


class SessionsConfig(_Section):
    """`cbt-llm eval --sessions`: each model talks with a client simulator for `turns` replies per held-out intake,
    the crisis guard around every model turn; the judge scores each transcript on the CTRS items."""

    enabled: bool = Field(False, description="Run the session evaluation too (--sessions).")
    client: SessionClientConfig = Field(default_factory=SessionClientConfig)
    num_sessions: int = Field(20, ge=1, description="Sessions per model: drawn intakes, or the first N of `intakes`.")
    turns: int = Field(
        8, ge=1, le=40, description="Model replies per session; the client speaks first, so 2 x turns messages."
    )
    seed: int = Field(
        1,
        description="Seed of the drawn intakes (synth_sessions.intake_at); held out: refused when this config's "
        "session corpus (synth or api with sessions) was drawn with the same seed.",
    )
    crisis_fraction: float = Field(
        0.1, ge=0.0, le=1.0, description="Share of drawn clients told to disclose suicidal thoughts (the guard's test)."
    )
    intakes: str = Field(
        "", description="Intakes from questions instead: a PsyQA JSON or our JSONL, one session per question."
    )
    system_prompt: str | None = Field(
        None, description="The model's system prompt in sessions (default: the session corpus's, synth_sessions)."
    )
    max_new_tokens: int = Field(256, ge=1, description="Longest model reply in tokens (greedy).")


class EvalConfig(_Section):
    """`cbt-llm eval`: answer held-out questions with several models and score them side by side."""

    models: list[EvalModelConfig] = Field(default_factory=list, description="The models compared, in column order.")
    questions: str = Field(
        "", description="Question file: heldout.jsonl, a PsyQA JSON or our corpus JSONL (empty: <data.out_dir>)."
    )
    questions_format: Literal["auto", "heldout", "psyqa", "cbt"] = Field(
        "auto", description="Format of `questions` (auto: by extension and the first record's keys)."
    )
    predictions: str = Field(
        "", description="Score this JSONL of {id, output, reference?} instead of generating (no model needed)."
    )
    data_dir: str = Field(
        "", description="Prepared data whose train split questions must not overlap (empty: data.out_dir)."
    )
    check_overlap: bool = Field(True, description="Refuse questions that are in the train split of data_dir.")
    limit: int = Field(0, ge=0, description="Evaluate on the first N questions (0: all).")
    out_dir: str = Field("", description="Output folder (empty: runs/<run_name>/eval).")
    backend: Literal["auto", "transformers", "vllm"] = Field(
        "auto", description="Local generation: vllm when importable on CUDA (auto), else transformers."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available, else cpu.")
    dtype: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU.")
    max_new_tokens: int = Field(512, ge=1, description="Longest answer in tokens (greedy decoding).")
    batch_tokens: int = Field(
        16384, ge=1, description="Generation batch budget: questions x (longest prompt + max_new_tokens)."
    )
    metrics: list[str] = Field(
        default_factory=list, description="Reference metrics to compute (empty: all; see evaluation/reference.py)."
    )
    bertscore: BertScoreConfig = Field(default_factory=BertScoreConfig)
    bootstrap_resamples: int = Field(1000, ge=0, description="Resamples for the 95% intervals (0: none).")
    seed: int = Field(0, description="Seeds the bootstrap and the choice of report examples.")
    examples: int = Field(3, ge=0, description="Example answers shown in report.md.")
    structure_scorer: str = Field(
        "runs/structure_scorer.npz", description="The CBT-structure scorer artifact (built on first use, ~10 s)."
    )
    concurrency: int = Field(8, ge=1, le=1024, description="Endpoint models: requests in flight.")
    timeout_s: float = Field(120.0, gt=0, description="Endpoint models: per-request timeout in seconds.")
    max_retries: int = Field(4, ge=0, description="Endpoint models: retries on 429/5xx/timeouts.")
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    sessions: SessionsConfig = Field(default_factory=SessionsConfig)


class SlurmConfig(_Section):
    """`cbt-llm launch slurm`: the sbatch script (one torchrun per node, c10d rendezvous, requeue on preemption)."""

    partition: str = Field("", description="#SBATCH --partition (empty: the cluster's default).")
    account: str = Field("", description="#SBATCH --account (empty: your default).")
    time: str = Field("24:00:00", description="#SBATCH --time wall-clock limit (D-HH:MM:SS or HH:MM:SS).")
    cpus_per_task: int = Field(0, ge=0, description="#SBATCH --cpus-per-task for each node's torchrun (0: omit).")
    mem: str | int = Field("", description="#SBATCH --mem per node, e.g. 480G (empty: omit; 0 = all of it).")
    grace_s: int = Field(
        120,
        ge=10,
        description="#SBATCH --signal=B:USR1@grace: seconds before the time limit that training gets to checkpoint.",
    )
    max_restarts: int = Field(
        20,
        ge=0,
        description="Requeue the job at most this many times (SLURM_RESTART_COUNT) after a checkpoint-and-exit.",
    )
    rdzv_port: int = Field(29500, ge=1024, le=65535, description="TCP port of the c10d rendezvous on the head node.")
    log_dir: str = Field(
        "", description="Folder for the job's logs, one per job, restart and node (empty: <train.run_dir>/slurm)."
    )
    container: str = Field(
        "", description="Apptainer/Singularity image (.sif) to run torchrun in, `apptainer exec --nv` (empty: none)."
    )
    extra_sbatch: list[str] = Field(
        default_factory=list, description="More #SBATCH lines, e.g. ['--qos=high', '--constraint=h100']."
    )


class RayLaunchConfig(_Section):
    """`cbt-llm launch ray`: a Ray cluster job running Ray Train's TorchTrainer (V2 API)."""

    address: str = Field(
        "", description="Ray cluster address for `ray job submit` (empty: $RAY_ADDRESS, else a local cluster)."
    )
    storage_path: str = Field("", description="Where Ray Train keeps checkpoints (empty: <train.run_dir>/ray).")
    max_failures: int = Field(
        2, ge=0, description="FailureConfig(max_failures): restarts from the last checkpoint after a worker dies."
    )
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per training worker.")


class LaunchConfig(_Section):
    """`cbt-llm launch`: how a training run reaches machines. World size = nodes x gpus_per_node."""

    nodes: int = Field(1, ge=1, description="Number of machines.")
    gpus_per_node: int = Field(
        0, ge=0, description="Training processes per machine: GPUs, or processes on CPU (0: data.world_size / nodes)."
    )
    cpu: bool = Field(False, description="Run on CPU with gloo (tests, the demo); no GPUs are requested.")
    master_addr: str = Field(
        "127.0.0.1", description="deepspeed multi-node without ssh: address of node 0 that every node can reach."
    )
    master_port: int = Field(29500, ge=1024, le=65535, description="TCP port of the rank-0 rendezvous.")
    hostfile: str = Field(
        "",
        description="deepspeed multi-node over ssh/pdsh: hostfile ('host slots=N' per line); empty: --no_ssh, "
        "one command per node.",
    )
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)
    ray: RayLaunchConfig = Field(default_factory=RayLaunchConfig)


class Config(_Section):
    """The root of the tree. Each command reads its own section."""

    run_name: str = Field(
        "run", description="Name of the run: its folder runs/<run_name>/ holds every path left empty; also W&B's name."
    )
    synth: SynthConfig = Field(default_factory=SynthConfig)
    api: ApiSynthConfig = Field(default_factory=ApiSynthConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @field_validator("run_name")
    @classmethod
    def _one_folder_name(cls, v: str) -> str:
        if not v.strip() or "/" in v or "\n" in v or v in (".", ".."):
            raise ValueError("run_name names one folder under runs/: non-empty, no '/' or newline")
        return v

    @model_validator(mode="after")
    def _derive_paths(self) -> Config:
        """Fill every empty path from run_name, each from the stage that writes it (see the module docstring)."""
        run = f"runs/{self.run_name}"
        s, t, d, tr = self.synth, self.tokenizer, self.data, self.train
        s.out_dir = s.out_dir or f"{run}/corpus"
        # sessions get their own folder: resume reads records.jsonl, which must hold one kind of line
        kind = "-sessions" if self.api.sessions else "-agents" if self.api.agents.enabled else ""
        self.api.out_dir = self.api.out_dir or f"{run}/corpus-api{kind}"
        t.input = t.input or f"{s.out_dir}/*.jsonl*"
        t.out_dir = t.out_dir or f"{run}/tokenizer"
        d.inputs = d.inputs or [f"{s.out_dir}/*.jsonl*"]
        d.out_dir = d.out_dir or f"{run}/data"
        d.tokenizer = d.tokenizer or t.out_dir
        tr.data_dir = tr.data_dir or d.out_dir
        tr.run_dir = tr.run_dir or f"{run}/train"
        self.eval.data_dir = self.eval.data_dir or d.out_dir
        self.eval.out_dir = self.eval.out_dir or f"{run}/eval"
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)

    def hash(self, section: str | None = None) -> str:
        """Content hash of the resolved config (or one section of it)."""
        obj = self.model_dump(mode="json") if section is None else getattr(self, section).model_dump(mode="json")
        return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def check_world_size(
    launcher_world: int, train_shards: int, *, prepared_for: int, data_dir: str, origin: str = "WORLD_SIZE"
) -> str:
    """The one world-size rule, applied by `cbt-llm launch` (preflight) and by the train recipe at start-up.

    The launcher's world size is the truth at run time (`origin` says where it came from: WORLD_SIZE, or
    launch.nodes x launch.gpus_per_node); `prepared_for` is the world size the shards were sized for (the
    manifest's world_size, else data.world_size). Rank r reads train shards r, r+W, r+2W, ..., so W must
    divide the shard count; it may differ from `prepared_for` when it does (e.g. 4 ranks on shards prepared
    for 8), and then the global batch differs from what `--dry-run` computed from data.world_size.

    Raises ConfigError (one line: both numbers, the world sizes that would work, the fix) when W does not
    divide the shards. Returns a one-line note for rank 0 to print when W differs from `prepared_for`, else "".
    """
    if launcher_world < 1:
        raise ConfigError(f"world size {launcher_world} ({origin}) must be at least 1")
    if train_shards % launcher_world:
        fits = [w for w in range(1, train_shards + 1) if train_shards % w == 0]
        ok = ", ".join(map(str, fits[:-1])) + (" or " if len(fits) > 1 else "") + str(fits[-1])
        raise ConfigError(
            f"world size {launcher_world} ({origin}) does not divide the {train_shards} train shards in {data_dir} "
            f"(prepared for data.world_size={prepared_for}; the shard count must be a multiple of world_size "
            f"{launcher_world}): run {ok} ranks, or re-run `cbt-llm prepare data.world_size={launcher_world}`"
        )
    if launcher_world != prepared_for:
        return (
            f"note: world size {launcher_world} ({origin}) differs from data.world_size={prepared_for} the shards "
            f"in {data_dir} were prepared for; each rank reads {train_shards // launcher_world} of "
            f"{train_shards} train shards and the global batch is {launcher_world} x micro_batch_size x grad_accum"
        )
    return ""


def _valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        full = f"{prefix}{name}"
        keys.append(full)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_valid_keys(ann, full + "."))
    return keys


def _suggest(bad: str) -> str:
    close = difflib.get_close_matches(bad, _valid_keys(Config), n=1, cutoff=0.5)
    if not close:  # try matching the last component only
        leaf = bad.rsplit(".", 1)[-1]
        leaves = {k.rsplit(".", 1)[-1]: k for k in _valid_keys(Config)}
        m = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
        close = [leaves[m[0]]] if m else []
    return f"; did you mean '{close[0]}'?" if close else ""


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """Turn ['data.seq_len=1024', 'synth.compress=zstd'] into a nested dict, values parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value (e.g. data.seq_len=1024)")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        value = yaml.safe_load(raw) if raw != "" else ""
        _set_dotted(tree, key, value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _first_error_line(err: ValidationError, source: str) -> str:
    e = err.errors()[0]
    loc = ".".join(str(x) for x in e["loc"])
    if e["type"] == "extra_forbidden":
        return f"{source}: unknown config key '{loc}'{_suggest(loc)}"
    return f"{source}: config field '{loc}': {e['msg']} (got {e.get('input')!r})"


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, extra: dict | None = None
) -> Config:
    """Load YAML (optional), merge `extra` (from CLI flags) and dotted overrides, validate.

    Raises ConfigError with one line naming the field and the fix.
    """
    tree: dict = {}
    source = "config"
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config: file '{path}' not found; pass an existing YAML (see configs/)")
        source = str(p)
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: top level must be a mapping of sections (synth:, data:, ...)")
        tree = loaded
    if extra:
        tree = _merge(tree, extra)
    if overrides:
        tree = _merge(tree, parse_overrides(overrides))
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_first_error_line(err, source)) from None
