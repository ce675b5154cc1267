"""Shards damaged between prepare and train are refused before the first step.

What must hold: a shard cut short, one with bytes after its end, one missing bytes in its middle, one whose row
count is not the manifest's, and (under train.verify_shards full or sample) one whose bytes changed at the same
size each fail train start-up with one line naming the shard and the fix (`re-run cbt-llm prepare`), and nothing
is written to the run folder; whole shards pass every mode, and shards are read with page-checksum verification.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cbt_llm.cli import main as cli_main
from data_pipeline.shards import ManifestError, load_manifest, verify_shards
from tests.fixtures.train import make_shards
from train.data import read_rows


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("verify") / "data", rows_per_shard=6, train_shards=2, val_rows=2)


def _copy(clean: Path, tmp_path: Path) -> tuple[Path, dict, Path]:
    data = tmp_path / "data"
    shutil.copytree(clean, data)
    man = json.loads((data / "manifest.json").read_text())
    return data, man, data / man["splits"]["train"]["shards"][1]["path"]


def _train_fails(data: Path, tmp_path: Path, capsys, *extra: str) -> str:
    """`cbt-llm train` on the data: exit 2 with one line, before anything is written to the run folder."""
    run = tmp_path / "run"
    capsys.readouterr()
    rc = cli_main(["train", f"train.data_dir={data}", f"train.run_dir={run}", "data.world_size=2", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and err.startswith("error: ")
    assert "re-run `cbt-llm prepare`" in err
    assert not run.exists()
    return err


def test_whole_shards_pass_every_mode(clean):
    man = load_manifest(clean)
    assert verify_shards(clean, man, "size") == 0
    assert verify_shards(clean, man, "sample", seed=3) == 1  # 3 shards: one in eight, at least one
    assert verify_shards(clean, man, "full") == 3


@pytest.mark.parametrize("fault", ["cut", "appended", "middle_lost"])
def test_a_cut_or_grown_shard_fails_train_start_up(clean, tmp_path, capsys, fault):
    data, man, shard = _copy(clean, tmp_path)
    raw = shard.read_bytes()
    damaged = {
        "cut": raw[: len(raw) // 2],
        "appended": raw + b"\x00" * 16,
        "middle_lost": raw[:4] + raw[104:],  # footer intact, row groups now reach past it
    }[fault]
    shard.write_bytes(damaged)
    with pytest.raises(ManifestError, match=str(shard)):
        verify_shards(data, man, "size")
    err = _train_fails(data, tmp_path, capsys)
    assert f"shard '{shard}'" in err
    assert ("too short" in err) if fault == "middle_lost" else ("is not a readable Parquet file" in err)


def test_a_row_count_other_than_the_manifests_fails(clean, tmp_path, capsys):
    data, man, shard = _copy(clean, tmp_path)
    man["splits"]["train"]["shards"][1]["rows"] += 1
    (data / "manifest.json").write_text(json.dumps(man))
    err = _train_fails(data, tmp_path, capsys)
    assert f"shard '{shard}' has 6 rows, manifest.json says 7" in err


def test_changed_bytes_of_the_same_size_fail_under_full(clean, tmp_path, capsys):
    data, man, shard = _copy(clean, tmp_path)
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 3] ^= 0x01  # inside page data: the footer, the size and the row count are all still right
    shard.write_bytes(bytes(raw))
    assert verify_shards(data, man, "size") == 0
    err = _train_fails(data, tmp_path, capsys, "train.verify_shards=full")
    assert f"shard '{shard}' does not match its sha256 in manifest.json" in err
    with pytest.raises(ManifestError, match="does not match its sha256"):  # the only train shard of rank 1 of 2
        verify_shards(data, man, "sample", shards=[man["splits"]["train"]["shards"][1]])


def test_shards_are_read_with_page_checksums_checked(clean, tmp_path):
    """A shard written with page CRCs (not ours: ours carry none, shards.py says why) has them checked on read."""
    data, man, shard = _copy(clean, tmp_path)
    table = pq.read_table(shard)
    pq.write_table(table, shard, write_page_checksum=True, compression="none")
    entry = dict(man["splits"]["train"]["shards"][1])
    assert len(read_rows(data, [entry], 0)) == 6
    raw = bytearray(shard.read_bytes())
    first = pq.read_metadata(shard).row_group(0).column(0).data_page_offset
    raw[first + 40] ^= 0x01  # inside the first page's values
    shard.write_bytes(bytes(raw))
    from cbt_llm.core.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"shard '{shard}' cannot be read \(.*CRC.*\)"):
        read_rows(data, [entry], 0)
