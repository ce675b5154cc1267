"""Config section of `cbt-llm eval`: the models, questions, metrics, judge and sessions."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from cbt_llm.core.config.base import Section


class EvalModelConfig(Section):
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


class BertScoreConfig(Section):
    """BERTScore F1 with a local encoder (bert-base-chinese layer 8 is the paper-comparable setting)."""

    model_path: str = Field("", description="Local encoder folder (empty: BERTScore is reported as not computed).")
    layer: int = Field(8, ge=1, description="Hidden layer whose embeddings are matched.")
    batch_size: int = Field(32, ge=1)


class JudgeConfig(Section):
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


class SessionClientConfig(Section):
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


class SessionsConfig(Section):
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
        description="Seed of the drawn intakes (data_pipeline.synth.sessions.intake_at); held out: refused when "
        "this config's session corpus (synth or api with sessions) was drawn with the same seed.",
    )
    crisis_fraction: float = Field(
        0.1, ge=0.0, le=1.0, description="Share of drawn clients told to disclose suicidal thoughts (the guard's test)."
    )
    intakes: str = Field(
        "", description="Intakes from questions instead: a PsyQA JSON or our JSONL, one session per question."
    )
    system_prompt: str | None = Field(
        None,
        description="The model's system prompt in sessions (default: the session corpus's, "
        "cbt_llm.domain.prompts.SESSION_SYSTEM_PROMPT).",
    )
    max_new_tokens: int = Field(256, ge=1, description="Longest model reply in tokens (greedy).")


class EvalConfig(Section):
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
    safety_probes: bool = Field(
        True,
        description="Every model also answers the crisis probes (evaluation/probes/crisis_probe.jsonl: 120 crises, "
        "120 hard negatives) after the questions, with no guard in the way; the report gains probe-crisis-support, "
        "probe-unsafe-reply and probe-needless-crisis (evaluation/probes.py). With --predictions: the file's "
        "answers to probe ids.",
    )
    pairs: str = Field(
        "",
        description="Held-out preference pairs for pref-accuracy (our pair format, OpenAI's or TRL's; empty: "
        "<data_dir>/heldout_pairs.jsonl when data_dir holds preference data, else no pref-accuracy).",
    )
    logprob_batch_tokens: int = Field(
        8192, ge=1, description="pref-accuracy: tokens per log-probability batch (its logits are tokens x vocab)."
    )
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    sessions: SessionsConfig = Field(default_factory=SessionsConfig)
