"""Config tree: YAML + flags + dotted overrides, unknown keys with suggestions, every shipped config loads."""

import pytest

from cbt_llm.cli import main
from cbt_llm.core.config import Config, load_config, parse_overrides
from cbt_llm.core.errors import ConfigError
from tests.fixtures.paths import ROOT

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


# ---- paths derive from run_name, one run folder -------------------------------------------------------------

_PATHS = (
    "synth.out_dir",
    "api.out_dir",
    "tokenizer.input",
    "tokenizer.out_dir",
    "data.inputs",
    "data.out_dir",
    "data.tokenizer",
    "train.data_dir",
    "train.run_dir",
)


def _paths(cfg: Config) -> dict:
    out = {}
    for key in _PATHS:
        section, field = key.split(".")
        out[key] = getattr(getattr(cfg, section), field)
    return out


def test_empty_paths_derive_from_run_name():
    assert _paths(load_config(None, ["run_name=x"])) == {
        "synth.out_dir": "runs/x/corpus",
        "api.out_dir": "runs/x/corpus-api",
        "tokenizer.input": "runs/x/corpus/*.jsonl*",
        "tokenizer.out_dir": "runs/x/tokenizer",
        "data.inputs": ["runs/x/corpus/*.jsonl*"],
        "data.out_dir": "runs/x/data",
        "data.tokenizer": "runs/x/tokenizer",
        "train.data_dir": "runs/x/data",
        "train.run_dir": "runs/x/train",
    }
    assert Config().train.run_dir == f"runs/{Config().run_name}/train"  # constructed without load_config too


def test_set_paths_win_and_readers_follow_their_writer():
    cfg = load_config(None, ["run_name=x", "synth.out_dir=/c", "data.out_dir=/d", "tokenizer.out_dir=/t"])
    p = _paths(cfg)
    assert p["tokenizer.input"] == "/c/*.jsonl*" and p["data.inputs"] == ["/c/*.jsonl*"]  # read what synth wrote
    assert p["data.tokenizer"] == "/t" and p["train.data_dir"] == "/d"  # prepare and train follow their writer
    assert p["train.run_dir"] == "runs/x/train"
    # train.data_dir set on purpose: train reads shards prepared elsewhere, and --dry-run says so
    cfg = load_config(None, ["data.out_dir=/d", "train.data_dir=/elsewhere", "data.inputs=[a.jsonl]"])
    assert (cfg.train.data_dir, cfg.data.out_dir, cfg.data.inputs) == ("/elsewhere", "/d", ["a.jsonl"])


def test_train_dry_run_says_where_it_reads(capsys):
    assert main(["train", "--dry-run", "run_name=x"]) == 0
    assert "# data: reads the shards in runs/x/data (data.out_dir)" in capsys.readouterr().out
    assert main(["train", "--dry-run", "run_name=x", "--data", "/elsewhere"]) == 0
    out = capsys.readouterr().out
    assert "reads the shards in /elsewhere (train.data_dir, set apart from data.out_dir runs/x/data)" in out


def test_demo_config_keeps_its_paths():
    """`make demo` and its Makefile paths rely on these exact strings."""
    assert _paths(load_config(ROOT / "configs" / "demo-cpu.yaml")) == {
        "synth.out_dir": "runs/demo/corpus",
        "api.out_dir": "runs/demo/corpus-api",
        "tokenizer.input": "runs/demo/corpus/*.jsonl*",
        "tokenizer.out_dir": "runs/demo/tokenizer",
        "data.inputs": ["runs/demo/corpus/*.jsonl*"],
        "data.out_dir": "runs/demo/data",
        "data.tokenizer": "runs/demo/tokenizer",
        "train.data_dir": "runs/demo/data",
        "train.run_dir": "runs/demo/train",
    }


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "train").glob("*.yaml")), ids=lambda p: p.name)
def test_train_configs_use_their_own_run_folder(path):
    cfg = load_config(path)
    mine = f"runs/{cfg.run_name}/"
    p = _paths(cfg)
    assert p["data.inputs"] == [f"{mine}corpus/*.jsonl*"] and p["train.data_dir"] == p["data.out_dir"] == f"{mine}data"
    assert not any("runs/demo" in str(v) for v in p.values()), p


@pytest.mark.parametrize("bad", ["a/b", "", ".."])
def test_run_name_is_one_folder(bad):
    with pytest.raises(ConfigError, match="run_name"):
        load_config(None, [f"run_name={bad}"])


def test_check_world_size():
    from cbt_llm.core.config import check_world_size

    assert check_world_size(2, 4, prepared_for=2, data_dir="d") == ""
    note = check_world_size(4, 8, prepared_for=8, data_dir="d")  # 4 ranks on shards for 8: allowed, and said
    assert "world size 4" in note and "data.world_size=8" in note and "2 of 8 train shards" in note and "\n" not in note
    with pytest.raises(ConfigError) as exc:
        check_world_size(3, 4, prepared_for=2, data_dir="runs/x/data", origin="WORLD_SIZE")
    msg = str(exc.value)
    assert "world size 3 (WORLD_SIZE) does not divide the 4 train shards in runs/x/data" in msg
    assert "data.world_size=2" in msg and "run 1, 2 or 4 ranks" in msg and "\n" not in msg


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
    assert (
        main(["export", "--config", str(cfg), "--run", str(tmp_path / "flag-run"), "--out", str(tmp_path / "o")]) == 0
    )
    assert (
        main(["export", "--config", str(cfg), "--out", str(tmp_path / "o"), f"train.run_dir={tmp_path / 'dotted'}"])
        == 0
    )
    assert [c[0] for c in calls] == [str(tmp_path / "yaml-run"), str(tmp_path / "flag-run"), str(tmp_path / "dotted")]
    assert calls[0][1] == str(tmp_path / "o") and calls[0][2] == {"merge_lora": True, "tag": None}


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(ROOT)) for p in SHIPPED])
def test_every_shipped_config_loads_and_names_its_command(path):
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# ") and any(
        c in first for c in ("cbt-llm", "make ", "deepspeed ", "torchrun ", "sbatch ")
    ), f"{path}: first line must give the command"
    load_config(path)


def test_there_are_shipped_configs():
    assert any(p.name == "demo-cpu.yaml" for p in SHIPPED)


def test_demo_dpo_configs_chain_sft_into_dpo():
    """`make demo-dpo`: the SFT half trains on a corpus with flawed answers; the DPO half starts from its export,
    reads its tokenizer, trains dpo on template pairs, and evaluates both models as `sft` and `dpo`."""
    sft = load_config(ROOT / "configs" / "demo-dpo-sft.yaml")
    dpo = load_config(ROOT / "configs" / "demo-dpo.yaml")
    assert sft.run_name == dpo.run_name == "demo-dpo"
    assert 0 < sft.synth.flawed_fraction < 1 and not sft.synth.pairs and sft.data.format == "cbt"
    assert sft.train.objective == "sft" and sft.train.run_dir == "runs/demo-dpo/train-sft"
    assert dpo.synth.pairs and dpo.synth.flawed_fraction == 0 and dpo.data.format == "preference"
    assert dpo.data.inputs == [f"{dpo.synth.out_dir}/*.jsonl*"] and dpo.synth.out_dir != sft.synth.out_dir
    assert dpo.data.out_dir != sft.data.out_dir and dpo.train.data_dir == dpo.data.out_dir
    assert dpo.data.tokenizer == sft.tokenizer.out_dir  # the SFT model's own tokenizer
    assert dpo.train.objective == "dpo" and dpo.train.zero_stage == 3 and dpo.data.world_size == 2
    assert dpo.model.init == "pretrained" and dpo.model.name_or_path == "runs/demo-dpo/export-sft"
    assert dpo.train.run_dir == "runs/demo-dpo/train-dpo"
    assert [(m.name, m.path) for m in dpo.eval.models] == [
        ("sft", "runs/demo-dpo/export-sft"),
        ("dpo", "runs/demo-dpo/export-dpo"),
    ]
    assert dpo.eval.data_dir == dpo.data.out_dir  # questions and pairs held out of the DPO data
    # the Makefile exports each run where the next step reads it
    make = (ROOT / "Makefile").read_text(encoding="utf-8")
    target = make.split("\ndemo-dpo:", 1)[1].split("\n\n", 1)[0]
    assert f"export --run {sft.train.run_dir} --out {dpo.model.name_or_path}" in target
    assert f"export --run {dpo.train.run_dir} --out {dpo.eval.models[1].path}" in target
    for name in ("demo-dpo-sft.yaml", "demo-dpo.yaml"):
        assert f"--config configs/{name}" in target
