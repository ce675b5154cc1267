"""The root of the typed config tree: every section, the paths derived from run_name, and the world-size rule.

Every default lives here, in the type. A shipped YAML only states what differs from these defaults.
Unknown keys are errors that name the nearest valid key, so a typo never silently falls back to a default.

Paths: one run folder, `runs/<run_name>/`. A path field left empty is derived in one place
(`Config._derive_paths`), each from the stage that writes what it reads, so the stages agree by construction:

    synth.out_dir     runs/<run_name>/corpus           api.out_dir       runs/<run_name>/corpus-api
    tokenizer.input   <synth.out_dir>/*.jsonl*         tokenizer.out_dir runs/<run_name>/tokenizer
    data.inputs       [<synth.out_dir>/*.jsonl*]       data.out_dir      runs/<run_name>/data
    data.tokenizer    <tokenizer.out_dir>              train.data_dir    <data.out_dir>
    train.run_dir     runs/<run_name>/train            eval.out_dir      runs/<run_name>/eval
    eval.data_dir     <data.out_dir>                   pairs.out         runs/<run_name>/model-pairs/pairs.jsonl
    pairs.questions   <data.out_dir>/heldout.jsonl

A path that is set wins. So train.data_dir differs from data.out_dir only when it is set on purpose (train
reads shards prepared elsewhere), and `cbt-llm train --dry-run` says which folder it reads.

World size: data.world_size is what prepare sizes the shards for (a multiple of it) and what `cbt-llm launch`
starts by default; the launcher's WORLD_SIZE is the truth at run time. `check_world_size` is the one rule
both apply: the launcher's world size must divide the train shards.
"""

from __future__ import annotations

import hashlib
import json

import yaml
from pydantic import Field, field_validator, model_validator

from cbt_llm.core.config.base import Section
from cbt_llm.core.config.data import DataConfig, TokenizerConfig
from cbt_llm.core.config.eval import EvalConfig
from cbt_llm.core.config.guard import GuardConfig
from cbt_llm.core.config.launch import LaunchConfig
from cbt_llm.core.config.model import ModelConfig
from cbt_llm.core.config.pairs import PairsConfig
from cbt_llm.core.config.serve import ServeConfig
from cbt_llm.core.config.synth import ApiSynthConfig, SynthConfig
from cbt_llm.core.config.train import TrainConfig, WandbConfig
from cbt_llm.core.errors import ConfigError


class Config(Section):
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
    serve: ServeConfig = Field(default_factory=ServeConfig)
    guard: GuardConfig = Field(default_factory=GuardConfig)
    pairs: PairsConfig = Field(default_factory=PairsConfig)

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
        self.guard.train.out_dir = self.guard.train.out_dir or f"{run}/guard"
        self.pairs.out = self.pairs.out or f"{run}/model-pairs/pairs.jsonl"
        self.pairs.questions = self.pairs.questions or f"{d.out_dir}/heldout.jsonl"
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
