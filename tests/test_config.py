"""Config tree: YAML + flags + dotted overrides, unknown keys with suggestions, every shipped config loads."""

from pathlib import Path

import pytest

from cbt_llm.cli import main
from cbt_llm.config import Config, ConfigError, load_config, parse_overrides

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").rglob("*.yaml"))


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(None, ["data.seq_len=2048", "synth.compress=zstd", "data.inputs=[a.jsonl, b.jsonl]"])
    assert cfg.data.seq_len == 2048
    assert cfg.synth.compress == "zstd"
    assert cfg.data.inputs == ["a.jsonl", "b.jsonl"]
    assert cfg.synth.num_records == Config().synth.num_records  # untouched default


def test_yaml_then_flags_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("synth:\n  num_records: 10\n  seed: 3\n", encoding="utf-8")
    cfg = load_config(p, ["synth.seed=5"], {"synth": {"num_records": 20, "seed": 4}})
    assert (cfg.synth.num_records, cfg.synth.seed) == (20, 5)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("data.seqlen=5", "did you mean 'data.seq_len'"),
        ("synth.num_recrds=5", "did you mean 'synth.num_records'"),
        ("dta.seq_len=5", "did you mean 'data"),
    ],
)
def test_unknown_key_suggests_nearest(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])


def test_bad_value_names_field():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["synth.compress=gzip"])
    msg = str(exc.value)
    assert "synth.compress" in msg and "gzip" in msg and "\n" not in msg


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["data.seq_len"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_config_hash_stable_and_sensitive():
    a, b = load_config(None, ["data.seq_len=64"]), load_config(None, ["data.seq_len=64"])
    assert a.hash("data") == b.hash("data")
    assert a.hash("data") != load_config(None, ["data.seq_len=65"]).hash("data")


def test_cli_dry_run_prints_resolved_config(capsys):
    assert main(["synth", "template", "--num-records", "7", "--dry-run", "synth.seed=9"]) == 0
    out = capsys.readouterr().out
    assert "num_records: 7" in out and "seed: 9" in out


def test_cli_config_error_is_one_line_exit_2(capsys):
    assert main(["prepare", "data.seqlen=5", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "data.seq_len" in err


def test_cli_export_takes_the_run_from_config_and_run_overrides_it(tmp_path, monkeypatch):
    """`cbt-llm export --config X` exports the run X trains (train.run_dir); --run, a flag, wins over the YAML."""
    import train.export

    calls = []
    monkeypatch.setattr(train.export, "run_export", lambda run, out, **kw: calls.append((str(run), str(out), kw)))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"train:\n  run_dir: {tmp_path / 'yaml-run'}\n", encoding="utf-8")
    assert main(["export", "--config", str(cfg), "--out", str(tmp_path / "o"), "--merge-lora"]) == 0
    assert main(["export", "--config", str(cfg), "--run", str(tmp_path / "flag-run"), "--out", str(tmp_path / "o")]) == 0
    assert main(["export", "--config", str(cfg), "--out", str(tmp_path / "o"), f"train.run_dir={tmp_path / 'dotted'}"]) == 0
    assert [c[0] for c in calls] == [str(tmp_path / "yaml-run"), str(tmp_path / "flag-run"), str(tmp_path / "dotted")]
    assert calls[0][1] == str(tmp_path / "o") and calls[0][2] == {"merge_lora": True, "tag": None}


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(ROOT)) for p in SHIPPED])
def test_every_shipped_config_loads_and_names_its_command(path):
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# ") and any(c in first for c in ("cbt-llm", "make ", "deepspeed ", "torchrun ", "sbatch ")), f"{path}: first line must give the command"
    load_config(path)


def test_there_are_shipped_configs():
    assert any(p.name == "demo-cpu.yaml" for p in SHIPPED)
