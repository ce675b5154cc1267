"""Config sections of corpus building: `synth template` (synth) and `synth api` (api, with its agents loop)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from cbt_llm.core.config.base import Section

# The flaws of `synth template --pairs`' rejected answers (data_pipeline/synth/pairs.py) and their default mix.
PairFlaw = Literal["missing_part", "order", "no_empathy", "no_crisis_support", "unsafe"]
DEFAULT_PAIR_FLAWS: dict[str, float] = {
    "missing_part": 0.25,
    "order": 0.2,
    "no_empathy": 0.2,
    "no_crisis_support": 0.2,
    "unsafe": 0.15,
}
# synth.flawed_fraction: the flaws a template corpus record may carry (pairs.py CORPUS_FLAWS) and their default mix,
# chosen so that a flawed_fraction of 0.5 gives parts in canonical order 0.65 of the time (PsyQA's human answers: 0.64).
FlawedFlaw = Literal["missing_part", "order", "no_empathy"]
DEFAULT_FLAWED_MIX: dict[str, float] = {"missing_part": 0.3, "order": 0.4, "no_empathy": 0.3}


class SynthConfig(Section):
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
    pairs: bool = Field(
        False,
        description="Generate preference pairs (prepare's data.format: preference; num_records counts pairs): a "
        "five-part answer against a flawed one to the same question (data_pipeline/synth/pairs.py).",
    )
    pair_flaws: dict[PairFlaw, float] = Field(
        default_factory=lambda: dict(DEFAULT_PAIR_FLAWS),
        description="Pairs: the mix of flaws in the rejected answers, flaw -> weight (normalised; flaws left out "
        "are not drawn): missing_part, order, no_empathy, no_crisis_support (on crisis questions), unsafe.",
    )

    flawed_fraction: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Records (not sessions or pairs): the share whose answer is flawed, as real counselling data is "
        "(PsyQA's human answers cover 3.95 of the 5 parts, in canonical order 0.64 of the time): one flaw of "
        "synth.flawed_mix, made as --pairs makes its rejected answers; meta.flaw names it. Drawn per record from "
        "its own digest, so the questions are those of the unflawed corpus; 0 (the default) changes nothing.",
    )
    flawed_mix: dict[FlawedFlaw, float] = Field(
        default_factory=lambda: dict(DEFAULT_FLAWED_MIX),
        description="flawed_fraction: the mix of flaws, flaw -> weight (normalised): missing_part (one part left out; "
        "never empathy on a crisis question, which holds its crisis support), order (the parts in another order), "
        "no_empathy (the empathy part dropped, strategy first; non-crisis questions only).",
    )

    @field_validator("pair_flaws", "flawed_mix")
    @classmethod
    def _mix(cls, v: dict[str, float]) -> dict[str, float]:
        if any(w < 0 for w in v.values()) or sum(v.values()) <= 0:
            raise ValueError("weights must be >= 0 with a positive sum")
        return v

    @model_validator(mode="after")
    def _flawed_records_only(self) -> SynthConfig:
        if self.flawed_fraction and (self.sessions or self.pairs):
            kind = "sessions" if self.sessions else "pairs"
            raise ValueError(f"flawed_fraction applies to single-turn records, not synth.{kind}; set it to 0")
        return self


class AgentsConfig(Section):
    """`synth api --agents`: draft -> critique against the eval judge's CBT rubric -> revise, until the rubric
    total reaches `threshold` or `max_rounds` critiques were made (data_pipeline/synth/agents.py)."""

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
        "revise-v1", description="Version of the revision prompt (cbt_llm/domain/prompts.py REVISE_PROMPTS)."
    )
    pair_margin: float = Field(
        2.0,
        ge=0.0,
        description="pairs.jsonl: the kept draft against each lower-scored draft of the same question whose rubric "
        "total is at least this much lower (on cbt's 0-18).",
    )


class ApiSynthConfig(Section):
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
        description="Version of the CBT prompt (see cbt_llm/domain/prompts.py; v2 names the national line of "
        "cbt_llm/domain/crisis_hotlines.json).",
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
        "(data_pipeline/synth/sessions.py) at api.seed; with api.input each question seeds one session.",
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
