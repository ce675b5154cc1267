"""Config section of `cbt-llm pairs`: preference pairs from a model's own sampled answers, ranked by the offline
scorers and, when configured, an LLM judge (data_pipeline/synth/model_pairs.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cbt_llm.core.config.base import Section


class PairsJudgeConfig(Section):
    """The optional LLM judge of `cbt-llm pairs`: an OpenAI-compatible model scores every sampled answer on the
    eval judge's rubric (cbt_llm/domain/rubrics.py), the same prompt and parser as `eval.judge`; empty base_url: off."""

    base_url: str = Field("", description="OpenAI-compatible base URL ending in /v1 (empty: no judge).")
    model: str = Field("", description="The judge model name sent in each request.")
    api_key_env: str = Field("", description="Environment variable holding the judge's API key (never written).")
    rubric: Literal["cbt"] = Field("cbt", description="The rubric answers are scored on (cbt: six criteria, 0-18).")
    concurrency: int = Field(8, ge=1, le=1024, description="Judge requests in flight.")
    timeout_s: float = Field(120.0, gt=0, description="Per-request timeout in seconds.")
    max_retries: int = Field(4, ge=0, description="Client retries on 429/5xx/timeouts.")
    max_tokens: int = Field(256, ge=16, description="Longest judge reply in tokens.")


class PairsConfig(Section):
    """`cbt-llm pairs`: sample `n` answers per question from a model, rank them, write the best against the worst."""

    model: str = Field(
        "", description="The model that answers: an exported folder (`cbt-llm export`), a base folder or Hub id."
    )
    adapter: str = Field("", description="LoRA adapter folder applied on top of `model`.")
    questions: str = Field(
        "",
        description="Questions: heldout.jsonl, a PsyQA JSON or our corpus JSONL (glob allowed; empty: "
        "<data.out_dir>/heldout.jsonl).",
    )
    limit: int = Field(0, ge=0, description="Use the first N questions (0: all).")
    system_prompt: str | None = Field(
        None, description="System prompt (default: the one export.json recorded, else data.system_prompt)."
    )
    n: int = Field(4, ge=2, le=64, description="Answers sampled per question.")
    temperature: float = Field(0.8, gt=0, le=2, description="Sampling temperature.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling's top_p.")
    max_new_tokens: int = Field(512, ge=1, description="Longest answer in tokens (one cut there is not finished).")
    seed: int = Field(
        0,
        description="Sampling seed: a question's answers are seeded by (seed, question id), so a rerun or a resumed "
        "run samples the same answers.",
    )
    out: str = Field(
        "",
        description="The pairs JSONL (our pair format, prepare's data.format: preference); samples.jsonl, "
        "rejects.jsonl and summary.json go beside it (empty: runs/<run_name>/model-pairs/pairs.jsonl).",
    )
    min_margin: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="Least quality difference (0-1) between chosen and rejected of the same safety tier; a "
        "difference of tier (safe over unsafe, crisis support over none) always makes a pair.",
    )
    min_chars: int = Field(
        80, ge=1, description="Length term: a finished answer shorter than this scores chars / min_chars."
    )
    max_pairs: int = Field(
        0, ge=0, description="Most pairs per question (0: as many as the margin allows, at most n // 2)."
    )
    structure_scorer: str = Field(
        "runs/structure_scorer.npz", description="The CBT-structure scorer artifact (built on first use, ~10 s)."
    )
    backend: Literal["auto", "transformers", "vllm"] = Field(
        "auto", description="Sampling: vllm when importable on CUDA (auto), else transformers."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available, else cpu.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on a GPU that has it, float32 on CPU."
    )
    chunk: int = Field(
        16, ge=1, description="Questions sampled, scored (judged) and written together; each is written when done."
    )
    judge: PairsJudgeConfig = Field(default_factory=PairsJudgeConfig)
