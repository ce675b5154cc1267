"""Config section of the crisis guard that every path showing model text to a person goes through (serve, chat,
eval's sessions, synth api): its learned layer, an optional generative safety model, and `cbt-llm guard train`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cbt_llm.core.config.base import Section


class ModelTierConfig(Section):
    """An optional generative safety model (Qwen3Guard-Gen, Llama Guard 3) asked after the other layers found
    nothing (cbt_llm/inference/safety_model.py); it flags suicide and self-harm and violence against others only,
    it can only add flags, and its failure or timeout is counted while the other layers' verdict stands."""

    kind: Literal["none", "endpoint", "local"] = Field(
        "none",
        description="none, endpoint (an OpenAI-compatible server, e.g. vLLM) or local (a model folder, loaded once).",
    )
    base_url: str = Field("", description="endpoint: the server's base URL, e.g. http://127.0.0.1:8001/v1.")
    model: str = Field(
        "", description="endpoint: the model name the server serves; local: the model folder (never downloaded)."
    )
    api_key_env: str = Field(
        "", description="endpoint: environment variable that holds the key, sent as a Bearer header (empty: none)."
    )
    timeout_s: float = Field(
        5.0,
        gt=0,
        description="How long one verdict may take before it counts as a failure (endpoint: each of connect, send "
        "and read; local: the generation).",
    )
    format: Literal["qwen3guard", "llamaguard"] = Field(
        "qwen3guard",
        description="How its reply is written: Qwen3Guard-Gen's 'Safety: ...' and 'Categories: ...' lines, or "
        "Llama Guard 3's 'safe' / 'unsafe' and S-codes.",
    )


class GuardTrainConfig(Section):
    """`cbt-llm guard train`: the learned layer trained on the shipped labelled set and a platform's own."""

    inputs: list[str] = Field(
        default_factory=list, description="More labelled JSONL files merged into the shipped set (--input)."
    )
    out_dir: str = Field("", description="Where user.npz and reply.npz go (empty: runs/<run_name>/guard).")
    target_recall: float = Field(
        0.95,
        gt=0,
        le=1,
        description="Crisis recall the user-turn threshold is chosen for, on held-out authors of the training set.",
    )
    reply_target_recall: float = Field(
        0.97,
        gt=0,
        le=1,
        description="Share of unsafe replies the reply threshold is chosen to stop, on held-out "
        "authors: higher than for user turns, since an unsafe reply shown is worse than a safe one replaced.",
    )
    shipped_data: bool = Field(True, description="Train on the shipped labelled set too (false: the inputs alone).")
    pattern_keep: float = Field(
        0.999,
        gt=0,
        le=1,
        description="Share of the crisis lines the patterns and the learned layer catch together, on held-out "
        "authors, that must still be caught when a non-acute pattern match (not a method, plan, intent, "
        "preparation or attempt) stands only with the learned layer's corroboration; sets that floor.",
    )
    acute_weight: float = Field(
        3.0,
        ge=1,
        description="Weight of user lines of an acute construct (method, intent, plan, preparatory, attempt) "
        "in the risk model's loss: they rank above other crises, so a threshold set for overall recall misses fewer.",
    )


class GuardConfig(Section):
    """The crisis guard: patterns always; the learned layer on by default; a model tier when configured."""

    learned: bool = Field(
        True, description="The learned layer (character n-gram classifiers) on user turns and replies."
    )
    corroborate: bool = Field(
        True,
        description="A non-acute pattern match stands only when the learned layer gives it at least the floor "
        "recorded in user.npz (acute matches always stand); false: every pattern match flags on its own.",
    )
    model_dir: str = Field(
        "", description="Folder with user.npz and reply.npz from `cbt-llm guard train` (empty: the shipped ones)."
    )
    model_tier: ModelTierConfig = Field(default_factory=ModelTierConfig)
    train: GuardTrainConfig = Field(default_factory=GuardTrainConfig)
