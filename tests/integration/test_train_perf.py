"""Throughput features of the trainer, checked on CPU: the optimizer choice, the chunked loss (equal to the full
loss and its gradients), micro-batches from a token budget, activation checkpointing every k-th layer, and
FLOPs / MFU counted from the real example lengths of packed rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cbt_llm.core.config import ModelConfig, TrainConfig
from cbt_llm.core.errors import ConfigError
from tests.fixtures.train import make_shards
from train.data import IGNORE, PackedRows, collate, example_len_sq, rows_per_micro_batch
from train.ds_config import resolve_ds_config
from train.metrics import FlopsCount, LogWindow, flops_per_token
from train.model import masked_ce_sum
from train.optim import build_client_optimizer, choose_optimizer
from train.step import chunked_ce_sum, chunked_lm_loss_supported


def test_optimizer_choice_by_device_and_prebuilt_op():
    auto = TrainConfig()
    assert choose_optimizer(auto, "cpu").kind == "torch-foreach"
    assert choose_optimizer(auto, "cuda", fused_adam_prebuilt=False).kind == "torch-fused"
    assert choose_optimizer(auto, "cuda", fused_adam_prebuilt=True).kind == "deepspeed"
    assert choose_optimizer(TrainConfig(optimizer="torch"), "cuda", fused_adam_prebuilt=True).kind == "torch-fused"
    assert choose_optimizer(TrainConfig(optimizer="deepspeed"), "cpu").kind == "deepspeed"
    assert choose_optimizer(TrainConfig(offload_optimizer=True), "cuda", fused_adam_prebuilt=False).kind == "deepspeed"
    assert "no nvcc JIT build" in choose_optimizer(auto, "cuda", fused_adam_prebuilt=False).describe()

    params = [torch.nn.Parameter(torch.zeros(3))]
    tc = TrainConfig(lr=3e-4, weight_decay=0.1, adam_betas=(0.9, 0.99))
    foreach = build_client_optimizer(choose_optimizer(tc, "cpu"), params, tc)
    assert isinstance(foreach, torch.optim.AdamW) and foreach.defaults["foreach"] is True
    assert foreach.defaults["lr"] == 3e-4 and foreach.defaults["betas"] == (0.9, 0.99)
    fused = build_client_optimizer(choose_optimizer(tc, "cuda", fused_adam_prebuilt=False), params, tc)
    assert fused.defaults["fused"] is True
    assert build_client_optimizer(choose_optimizer(tc, "cuda", fused_adam_prebuilt=True), params, tc) is None
    # a client optimizer steps the weights: the DeepSpeed JSON shows no optimizer that would not run
    assert "optimizer" not in resolve_ds_config(tc, torch.float32, "cpu", 2, client_optimizer=True)
    assert resolve_ds_config(tc, torch.float32, "cpu", 2)["optimizer"]["params"]["lr"] == 3e-4


def _tiny_model(vocab: int = 1000, layers: int = 2):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "qwen2",
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")


def _packed_batch(vocab: int) -> dict:
    """Two rows of 40: row 0 packs examples of 12, 20 and 8 tokens; row 1 one of 30 and 10 of padding."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (2, 40), generator=g)
    pos = torch.tensor([list(range(12)) + list(range(20)) + list(range(8)), list(range(30)) + list(range(10))])
    labels = ids.clone()
    labels[0, :5] = labels[0, 12:18] = labels[1, :9] = labels[1, 30:] = IGNORE  # prompts and padding
    return {"input_ids": ids, "position_ids": pos, "labels": labels}


def test_chunked_loss_equals_full_loss_and_gradients():
    vocab = 1000
    b = _packed_batch(vocab)
    full_model, chunk_model = _tiny_model(vocab), _tiny_model(vocab)
    assert chunked_lm_loss_supported(chunk_model)

    full = masked_ce_sum(
        full_model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits,
        b["labels"],
        b["position_ids"],
        count=False,
    )[0]
    out = chunk_model(
        input_ids=b["input_ids"], position_ids=b["position_ids"], logits_to_keep=1, output_hidden_states=True
    )
    assert out.logits.shape[1] == 1  # the full (tokens x vocab) logits were never made
    # 7-token chunks (the last one short) and 30 extra empty positions, as a rank with shorter rows would run
    chunked = chunked_ce_sum(
        out.hidden_states[-1],
        chunk_model.get_output_embeddings(),
        b["labels"],
        b["position_ids"],
        chunk_tokens=7,
        positions=2 * 39 + 30,
    )
    assert chunked.item() == pytest.approx(full.item(), rel=1e-6)
    full.backward()
    chunked.backward()
    for (name, p), q in zip(full_model.named_parameters(), chunk_model.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name


def test_micro_batch_from_a_token_budget(tmp_path, capsys):
    assert rows_per_micro_batch(TrainConfig(micro_batch_size=3), 4096) == 3
    assert rows_per_micro_batch(TrainConfig(tokens_per_micro_batch=16384), 4096) == 4
    assert rows_per_micro_batch(TrainConfig(tokens_per_micro_batch=10000), 4096) == 2  # whole rows only
    with pytest.raises(ConfigError, match="not both"):
        rows_per_micro_batch(TrainConfig(tokens_per_micro_batch=8192, micro_batch_size=2), 4096)
    with pytest.raises(ConfigError, match="no whole row"):
        rows_per_micro_batch(TrainConfig(tokens_per_micro_batch=2048), 4096)

    from cbt_llm.cli import main

    data = make_shards(tmp_path / "data", rows_per_shard=6, train_shards=2, val_rows=1, seq_len=64)
    assert (
        main(
            [
                "train",
                "--dry-run",
                f"train.data_dir={data}",
                "data.world_size=2",
                "train.grad_accum=1",
                "train.tokens_per_micro_batch=200",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    # 200 // 64 = 3 rows per micro-batch; 2 ranks x 3 = 6 rows per step; 6 rows per rank = 2 steps per epoch
    assert "micro_batch_size 3 (train.tokens_per_micro_batch 200 // seq_len 64) x grad_accum 1 = 6 packed rows" in out
    assert "tokens per micro-batch: <= 192 per rank" in out and "steps per epoch: 2 (0 rows left out)" in out


def test_activation_checkpointing_every_kth_layer():
    from transformers.modeling_layers import GradientCheckpointingLayer

    from train.model import apply_activation_checkpointing

    def flags(model):
        return [m.gradient_checkpointing for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]

    m = _tiny_model(layers=4)
    assert apply_activation_checkpointing(m, ModelConfig()) == "off" and flags(m) == [False] * 4
    assert (
        apply_activation_checkpointing(m, ModelConfig(activation_checkpointing="every_k", checkpoint_every_k=2))
        == "every_k (2 of 4 layers recomputed)"
    )
    assert flags(m) == [True, False, True, False]
    apply_activation_checkpointing(m, ModelConfig(activation_checkpointing="full"))
    assert flags(m) == [True] * 4
    # the earlier boolean name still works
    assert ModelConfig(gradient_checkpointing=True).activation_checkpointing == "full"


def _row(position_ids: list[int], pad: int) -> PackedRows:
    """One packed row whose last `pad` tokens are padding (pad id 0, no labels)."""
    n = len(position_ids)
    real = np.arange(n) < n - pad
    return PackedRows(
        np.where(real, 5, 0),
        np.where(real, 7, IGNORE),
        np.array(position_ids, np.int64),
        np.array([0, n]),
        np.array([n - pad]),
        ["r:0"],
    )


def test_flops_of_a_packed_row_count_attention_per_example(tmp_path):
    # examples of 10, 20 and 5 tokens, then 6 padding tokens (positions restart, no labels)
    pos = list(range(10)) + list(range(20)) + list(range(5)) + list(range(6))
    rows = _row(pos, pad=6)
    assert example_len_sq(np.array(pos), 35) == 10**2 + 20**2 + 5**2
    batch = collate(rows, [0], pad_token_id=0)
    assert batch["real_tokens"] == 35 and batch["attn_len_sq"] == 525

    count = FlopsCount.for_model(1000, 1000, False, layers=2, heads=4, head_dim=16)
    honest = count.flops(35, 525)
    assert honest == 6 * 1000 * 35 + 12 * 2 * 4 * 16 * 525
    # the per-token formula with T = seq_len (41) counts every token attending over the whole row
    assert flops_per_token(1000, 1000, False, 2, 4, 16, 41) * 35 > honest
    lora = FlopsCount.for_model(1000, 10, True, layers=2, heads=4, head_dim=16)
    assert lora.flops(35, 525) == (4 * 990 + 6 * 10) * 35 + 12 * 2 * 4 * 16 * 525


def test_window_mfu_uses_the_honest_count(tmp_path, monkeypatch):
    import torch.distributed as dist

    from train.step import StepResult

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        w = LogWindow(torch.device("cpu"))
        w.add(StepResult(torch.tensor(70.0, dtype=torch.float64), 35, 35, 1, 525))
        w.t0 -= 2.0  # the window took (at least) 2 s
        count = FlopsCount.for_model(1000, 1000, False, layers=2, heads=4, head_dim=16)
        m = w.metrics(world=1, seq_len=41, flops=count, peak=1e6)
        elapsed = 35 / m["perf/tokens_per_s"]
        assert m["train/loss"] == 2.0 and m["perf/packing_efficiency"] == pytest.approx(35 / 41)
        assert m["perf/mfu"] == pytest.approx(count.flops(35, 525) / elapsed / 1e6)
        assert w.metrics(world=1, seq_len=41, flops=count, peak=None)["perf/mfu"] is None  # CPU: no made-up MFU
    finally:
        dist.destroy_process_group()
