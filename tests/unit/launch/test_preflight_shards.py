"""`cbt-llm launch` preflight checks the shards themselves, not only that they exist: a shard cut short or with
another row count than the manifest's stops the launch in one line naming the shard, before any script is
written; train.verify_shards full also compares every shard's SHA-256."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cbt_llm.cli import main
from cbt_llm.core.config import load_config
from cbt_llm.core.errors import ConfigError
from launch.preflight import preflight
from tests.fixtures.train import make_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("preflight") / "data", rows_per_shard=4, train_shards=4)


def _cfg(data: Path, run: Path, *extra: str):
    return load_config("configs/demo-cpu.yaml", [f"train.data_dir={data}", f"train.run_dir={run}", *extra])


def _damaged(shards: Path, tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "data"
    shutil.copytree(shards, data)
    return data, data / "train" / "part-00002-of-00004.parquet"


def test_preflight_reports_how_shards_were_verified(shards, tmp_path):
    facts = preflight(_cfg(shards, tmp_path / "run"), "deepspeed", check_tokenizer=False)
    assert facts["shards_verified"] == "size (0 hashed)"
    facts = preflight(_cfg(shards, tmp_path / "run", "train.verify_shards=full"), "deepspeed", check_tokenizer=False)
    assert facts["shards_verified"] == "full (5 hashed)"


def test_preflight_refuses_a_cut_shard_before_writing_a_script(shards, tmp_path, capsys):
    data, shard = _damaged(shards, tmp_path)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(
        ConfigError, match=rf"shard '{shard}' is not a readable Parquet file .*re-run `cbt-llm prepare`"
    ):
        preflight(_cfg(data, tmp_path / "run"), "deepspeed", check_tokenizer=False)
    rc = main(
        [
            "launch",
            "slurm",
            "--config",
            "configs/demo-cpu.yaml",
            f"train.data_dir={data}",
            f"train.run_dir={tmp_path / 'run'}",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and f"shard '{shard}'" in err
    assert not (tmp_path / "run" / "launch").exists()


def test_preflight_checks_row_counts_and_under_full_the_bytes(shards, tmp_path):
    data, shard = _damaged(shards, tmp_path)
    man = json.loads((data / "manifest.json").read_text())
    man["splits"]["train"]["shards"][2]["rows"] = 3
    (data / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ConfigError, match=rf"shard '{shard}' has 4 rows, manifest.json says 3"):
        preflight(_cfg(data, tmp_path / "run"), "deepspeed", check_tokenizer=False)
    man["splits"]["train"]["shards"][2]["rows"] = 4
    man["splits"]["train"]["shards"][2]["sha256"] = "0" * 64  # as if the bytes had changed at the same size
    (data / "manifest.json").write_text(json.dumps(man))
    preflight(_cfg(data, tmp_path / "run"), "deepspeed", check_tokenizer=False)  # size: not hashed
    with pytest.raises(ConfigError, match=rf"shard '{shard}' does not match its sha256"):
        preflight(_cfg(data, tmp_path / "run", "train.verify_shards=full"), "deepspeed", check_tokenizer=False)
