"""Fast in-process tests of the trainer's pieces: packing mask, loss, loader order, DeepSpeed JSON, MFU, configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cbt_llm.cli import main as cli_main
from cbt_llm.core.config import TrainConfig, load_config
from cbt_llm.core.errors import ConfigError
from tests.fixtures.paths import ROOT
from tests.fixtures.train import make_shards
from train.data import RankLoader, load_manifest, rank_shards, read_rows, steps_per_epoch
from train.ds_config import build_ds_config, merge_user_ds_config, resolve_ds_config
from train.metrics import flops_per_token, mfu, peak_flops
from train.model import label_count, masked_ce_sum, random_model_config


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("shards"))


def _tiny_model(attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = random_model_config(load_config().model, 96, 64, 0, 0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation=attn).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_examples_do_not_attend_to_each_other(attn):
    """position_ids restarting at 0 and no attention mask => each example's logits equal running it alone."""
    model = _tiny_model(attn)
    a, b = torch.randint(3, 96, (1, 9)), torch.randint(3, 96, (1, 7))
    packed = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(9), torch.arange(7)])[None]
    with torch.no_grad():
        out = model(input_ids=packed, position_ids=pos, use_cache=False).logits
        alone_a = model(input_ids=a, position_ids=torch.arange(9)[None], use_cache=False).logits
        alone_b = model(input_ids=b, position_ids=torch.arange(7)[None], use_cache=False).logits
        # a plain causal row (positions 0..15) must differ: the test would pass vacuously otherwise
        causal = model(input_ids=packed, position_ids=torch.arange(16)[None], use_cache=False).logits
    torch.testing.assert_close(out[:, :9], alone_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 9:], alone_b, atol=1e-5, rtol=1e-5)
    assert (causal[:, 9:] - alone_b).abs().max() > 1e-3


def test_packing_probe_flags_a_model_that_ignores_restarted_positions():
    """The start-up probe the engine runs: passes for transformers' masking, catches a model that leaks."""
    from train.model import packing_isolation

    model = _tiny_model()
    ids = torch.randint(3, 96, (1, 20))
    good = lambda i, p: model(input_ids=i, position_ids=p, use_cache=False).logits  # noqa: E731
    leaky = lambda i, p: model(input_ids=i, position_ids=torch.arange(i.shape[1])[None], use_cache=False).logits  # noqa: E731
    leak, contrast = packing_isolation(good, ids, 10)
    assert leak < 1e-4 < 1e-2 < contrast
    leak, contrast = packing_isolation(leaky, ids, 10)
    assert leak > 0.1 * contrast


def test_loss_is_sum_over_label_tokens_and_skips_example_starts():
    logits = torch.randn(1, 6, 10)
    labels = torch.tensor([[-100, 4, 5, 7, 8, 9]])
    pos = torch.tensor([[0, 1, 2, 0, 1, 2]])  # token 3 starts a new example: never a target
    s, n = masked_ce_sum(logits, labels, pos)
    assert n == 4 == label_count(labels, pos)
    logp = torch.log_softmax(logits[0], -1)
    expect = -(logp[0, 4] + logp[1, 5] + logp[3, 8] + logp[4, 9])
    assert s.item() == pytest.approx(expect.item(), rel=1e-6)


def test_loader_order_is_deterministic_resumable_and_covers_each_row_once(shards):
    m = load_manifest(shards)
    spe, dropped = steps_per_epoch(m, 2, 1, 2)
    assert (spe, dropped) == (4, 0)
    rows = read_rows(shards, rank_shards(m, "train", 0, 2), 0)
    assert len(rows) == 8 and rows.keys[0].startswith("train/part-00000")

    def make():
        return RankLoader(rows, micro_batch_size=1, grad_accum=2, seed=7, rank=0, steps_per_epoch=spe, pad_token_id=0)

    ld = make()
    seq = [ld.next_step()[1] for _ in range(8)]
    epoch0 = [k for step in seq[:4] for k in step]
    assert sorted(epoch0) == sorted(rows.keys)  # every row exactly once in an epoch
    assert seq[:4] != seq[4:]  # a new permutation each epoch
    resumed = make()
    resumed.load_state_dict({"epoch": 0, "step_in_epoch": 3})
    assert [resumed.next_step()[1] for _ in range(5)] == seq[3:]
    other_seed = RankLoader(rows, micro_batch_size=1, grad_accum=2, seed=8, rank=0, steps_per_epoch=spe, pad_token_id=0)
    assert [other_seed.next_step()[1] for _ in range(4)] != seq[:4]


def test_collate_pads_at_the_end_without_labels(shards):
    m = load_manifest(shards)
    rows = read_rows(shards, rank_shards(m, "train", 1, 2), 0)
    ld = RankLoader(rows, micro_batch_size=4, grad_accum=1, seed=0, rank=1, steps_per_epoch=2, pad_token_id=0)
    (mb,), _ = ld.next_step()
    lens = [len(rows.row(i)[0]) for i in ld.order(0)[:4]]
    assert mb["input_ids"].shape == (4, max(lens))
    assert mb["real_tokens"] == sum(lens)
    for j, n in enumerate(lens):
        assert (mb["labels"][j, n:] == -100).all() and (mb["position_ids"][j, n : n + 1] == 0).all()


def test_uneven_shards_leave_rows_out_and_bad_shard_count_fails(shards):
    m = json.loads((shards / "manifest.json").read_text())
    m["splits"]["train"]["shards"][1]["rows"] = 3  # rank 1 owns shards 1 and 3: 7 rows
    assert steps_per_epoch(m, 2, 1, 2) == (3, 16 - 1 - 12)
    with pytest.raises(ConfigError, match="multiple of world_size 3"):
        steps_per_epoch(m, 3, 1, 1)


def test_ds_config_is_derived_from_the_typed_config():
    tc = TrainConfig(micro_batch_size=2, grad_accum=4, grad_clip=0.5, zero_stage=3, lr=3e-4)
    ds = build_ds_config(tc, torch.bfloat16, "cuda", world_size=8)
    assert ds["train_batch_size"] == 64 and ds["gradient_accumulation_steps"] == 4
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and ds["zero_optimization"]["stage"] == 3
    assert ds["optimizer"]["params"]["lr"] == 3e-4 and ds["optimizer"]["params"]["torch_adam"] is False
    cpu = build_ds_config(TrainConfig(zero_stage=2, offload_optimizer=False), torch.float32, "cpu", 2)
    assert cpu["optimizer"]["params"]["torch_adam"] is True and not cpu["bf16"]["enabled"]
    gpu_torch = build_ds_config(TrainConfig(optimizer="torch"), torch.bfloat16, "cuda", 1)
    assert gpu_torch["optimizer"]["params"]["torch_adam"] is True
    offload = build_ds_config(TrainConfig(optimizer="torch", offload_optimizer=True), torch.bfloat16, "cuda", 1)
    assert offload["optimizer"]["params"]["torch_adam"] is False  # offload needs DeepSpeed's CPU Adam
    with pytest.raises(ConfigError, match="train.offload_params needs train.zero_stage=3"):
        build_ds_config(TrainConfig(zero_stage=2, offload_params=True), torch.float32, "cpu", 2)


def test_user_ds_json_is_checked_and_completed(tmp_path):
    tc = TrainConfig(micro_batch_size=2, grad_accum=4)
    derived = build_ds_config(tc, torch.float32, "cpu", 2)
    user = {
        "train_micro_batch_size_per_gpu": "auto",
        "zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 5},
    }
    merged = merge_user_ds_config(user, derived)
    assert merged["train_micro_batch_size_per_gpu"] == 2 and merged["gradient_accumulation_steps"] == 4
    assert merged["zero_optimization"]["stage3_prefetch_bucket_size"] == 5
    with pytest.raises(ConfigError) as err:
        merge_user_ds_config({"gradient_accumulation_steps": 8}, derived)
    msg = str(err.value)
    assert "\n" not in msg and "gradient_accumulation_steps" in msg and "train.grad_accum" in msg
    with pytest.raises(ConfigError, match="zero_optimization.stage"):
        merge_user_ds_config({"zero_optimization": {"stage": 2}}, derived)
    with pytest.raises(ConfigError, match="scheduler"):
        merge_user_ds_config({"scheduler": {"type": "WarmupLR"}}, derived)
    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"bf16": {"enabled": True}}))
    with pytest.raises(ConfigError, match="bf16.enabled.*model.precision"):
        resolve_ds_config(TrainConfig(deepspeed_config=str(p)), torch.float32, "cpu", 2)
    with pytest.raises(ConfigError, match="not found"):
        resolve_ds_config(TrainConfig(deepspeed_config=str(tmp_path / "nope.json")), torch.float32, "cpu", 2)


def test_mfu_table_and_flops_convention():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12  # the longest matching name wins
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops(None) is None and peak_flops("Some New Accelerator") is None
    full = flops_per_token(1000, 1000, False, 2, 4, 16, 64)
    assert full == 6 * 1000 + 12 * 2 * 4 * 16 * 64
    lora = flops_per_token(1000, 10, True, 2, 4, 16, 64)
    assert lora == 4 * 990 + 6 * 10 + 12 * 2 * 4 * 16 * 64
    assert mfu(1000.0, full, None) is None
    assert mfu(1000.0, full, 1e12) == pytest.approx(1000 * full / 1e12)


def test_every_shipped_config_loads():
    files = sorted((ROOT / "configs").rglob("*.yaml"))
    assert any(f.parent.name == "train" for f in files), "configs/train/*.yaml missing"
    for f in files:
        cfg = load_config(f)
        first = f.read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("#"), f"{f}: first line must be the command that runs it"
        if f.parent.name == "train":
            assert "cbt-llm) train --config" in first and cfg.model.init == "pretrained" and cfg.model.name_or_path


def test_train_cli_fails_early_with_one_line(tmp_path, capsys):
    assert cli_main(["train", f"train.data_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.data_dir" in err and "cbt-llm prepare" in err
    assert cli_main(["train", "train.zero_stag=3"]) == 2
    assert "did you mean 'train.zero_stage'" in capsys.readouterr().err


def test_export_refuses_an_all_zero_adapter(tmp_path, monkeypatch):
    """A LoRA checkpoint whose lora_B are all zero (never trained) must not be exported as if it were useful."""
    import train.export as export

    run = tmp_path / "run"
    (run / "checkpoints" / "step-0000001").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step-0000001")
    (run / "checkpoints" / "step-0000001" / "trainer_state.json").write_text(
        json.dumps({"step": 1, "lora": True, "base_model": "unused", "tokenizer": "unused"})
    )
    (run / "config.yaml").write_text("model: {init: random, lora: {enabled: true}}\n")
    sd = {
        "base_model.model.x.lora_A.default.weight": torch.ones(2, 2),
        "base_model.model.x.lora_B.default.weight": torch.zeros(2, 2),
    }
    monkeypatch.setattr(export, "_gather_state_dict", lambda d, t: sd)
    with pytest.raises(ConfigError, match="adapter is a no-op"):
        export.run_export(run, tmp_path / "out")
    monkeypatch.setattr(export, "_gather_state_dict", lambda d, t: {"model.w": torch.ones(1)})
    with pytest.raises(ConfigError, match="holds no LoRA weights"):
        export.run_export(run, tmp_path / "out")


def test_padded_shards_count_only_real_tokens(tmp_path):
    """packing=false rows are padded to seq_len: tokens/s and packing efficiency must not count the padding."""
    out = make_shards(tmp_path / "padded", packing=False, rows_per_shard=2, val_rows=2)
    m = load_manifest(out)
    rows = read_rows(out, m["splits"]["train"]["shards"], 0)
    assert all(rows.offsets[i + 1] - rows.offsets[i] == 64 for i in range(len(rows)))
    for i in range(len(rows)):
        ids, labels, _ = rows.row(i)
        real = int(rows.real_len[i])
        assert 0 < real < 64 and labels[real - 1] == 2 and (labels[real:] == -100).all() and (ids[real:] == 0).all()


def test_training_refuses_shards_made_with_another_tokenizer(tmp_path):
    """The manifest records the tokenizer's content hash; a tokenizer that changed since prepare is refused."""
    import json as _json

    from cbt_llm.core.errors import ConfigError
    from tests.fixtures.train import make_shards

    data = make_shards(tmp_path / "data", rows_per_shard=2, train_shards=2, val_rows=1, seq_len=32)
    tok = load_manifest(data)["tokenizer"]["name_or_path"]
    from transformers import AutoTokenizer

    assert load_manifest(data, tokenizer=AutoTokenizer.from_pretrained(tok))["seq_len"] == 32
    m = _json.loads((data / "manifest.json").read_text())
    m["tokenizer"]["hash"] = "0" * 16
    (data / "manifest.json").write_text(_json.dumps(m))
    with pytest.raises(ConfigError, match="tokenizer mismatch"):
        load_manifest(data, tokenizer=AutoTokenizer.from_pretrained(tok))


def test_liger_is_logged_and_ignored_without_cuda():
    from train.model import apply_liger

    assert apply_liger("qwen2", "cpu") == "liger: off (needs CUDA)"


def test_train_dry_run_prints_batch_arithmetic(tmp_path, capsys):
    from cbt_llm.cli import main

    data = make_shards(tmp_path / "data", rows_per_shard=6, train_shards=2, val_rows=1, seq_len=64)
    assert main(["train", "--dry-run", f"train.data_dir={data}", "data.world_size=2", "train.grad_accum=3"]) == 0
    out = capsys.readouterr().out
    assert "world_size 2 x micro_batch_size 1 x grad_accum 3 = 6 packed rows per optimizer step" in out
    assert (
        "tokens per step: <= 384" in out and "steps per epoch: 2 (0 rows left out)" in out
    )  # 6 rows per rank, 3 per step
