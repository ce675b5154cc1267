"""The one typed config tree, one module per section, loaded from YAML with dotted CLI overrides.

Every default lives in the types. A shipped YAML only states what differs from these defaults. Unknown keys are
errors that name the nearest valid key, so a typo never silently falls back to a default. The paths left empty
are derived from run_name in one place (root.Config); load.load_config reads YAML, flags and overrides.
"""

from cbt_llm.core.config.data import DataConfig, NearDupConfig, QualityConfig, TokenizerConfig
from cbt_llm.core.config.eval import (
    BertScoreConfig,
    EvalConfig,
    EvalModelConfig,
    JudgeConfig,
    SessionClientConfig,
    SessionsConfig,
)
from cbt_llm.core.config.guard import GuardConfig, GuardTrainConfig, ModelTierConfig
from cbt_llm.core.config.launch import LaunchConfig, RayLaunchConfig, SlurmConfig
from cbt_llm.core.config.load import load_config, parse_overrides
from cbt_llm.core.config.model import LoraConfig, ModelConfig
from cbt_llm.core.config.pairs import PairsConfig, PairsJudgeConfig
from cbt_llm.core.config.root import Config, check_world_size
from cbt_llm.core.config.serve import ServeConfig
from cbt_llm.core.config.synth import AgentsConfig, ApiSynthConfig, SynthConfig
from cbt_llm.core.config.train import DeepSpeedTuning, TrainConfig, WandbConfig
from cbt_llm.core.errors import ConfigError

__all__ = [
    "AgentsConfig",
    "ApiSynthConfig",
    "BertScoreConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DeepSpeedTuning",
    "EvalConfig",
    "EvalModelConfig",
    "GuardConfig",
    "GuardTrainConfig",
    "JudgeConfig",
    "LaunchConfig",
    "LoraConfig",
    "ModelConfig",
    "ModelTierConfig",
    "NearDupConfig",
    "PairsConfig",
    "PairsJudgeConfig",
    "QualityConfig",
    "RayLaunchConfig",
    "SessionClientConfig",
    "ServeConfig",
    "SessionsConfig",
    "SlurmConfig",
    "SynthConfig",
    "TokenizerConfig",
    "TrainConfig",
    "WandbConfig",
    "check_world_size",
    "load_config",
    "parse_overrides",
]
