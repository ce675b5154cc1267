"""One-GPU runs of `cbt-llm train` (skipped without CUDA; bench/gpu_checks.sh runs them on a lent GPU).

Full fine-tuning under ZeRO-2 and LoRA under ZeRO-3, each through torchrun with nccl, bf16 and the attention
that `model.attn: auto` picks there (flash-attn when installed, else sdpa_varlen on torch's varlen kernel).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.fixtures.paths import ROOT
from tests.fixtures.train import make_shards

BIN = Path(sys.executable).parent
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.timeout(600),
]


def _train(data: Path, run_dir: Path, *overrides: str) -> dict:
    env = dict(
        os.environ,
        WANDB_MODE="disabled",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
    )
    cmd = [
        str(BIN / "torchrun"),
        "--standalone",
        "--nproc_per_node",
        "1",
        "-m",
        "cbt_llm.cli",
        "train",
        "model.init=random",
        "model.hidden_size=256",
        "model.num_layers=2",
        "model.num_heads=4",
        "model.num_kv_heads=2",
        "model.intermediate_size=512",
        f"train.data_dir={data}",
        f"train.run_dir={run_dir}",
        "train.epochs=3",
        "train.log_every=2",
        "train.resume=never",
        "train.optimizer=torch",
        *overrides,
    ]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-6000:]
    assert "attention: " in p.stderr
    return json.loads((run_dir / "train_summary.json").read_text())


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_shards(
        tmp_path_factory.mktemp("gpu") / "data",
        rows_per_shard=8,
        train_shards=1,
        val_rows=2,
        seq_len=1024,
        lengths=(20, 120, 30, 400),
    )


@pytest.mark.parametrize("mode", ["full-zero2", "lora-zero3"])
def test_train_on_one_gpu(data, tmp_path, mode):
    extra = (
        ["train.zero_stage=2", "train.lr=1e-3"]
        if mode == "full-zero2"
        else [
            "train.zero_stage=3",
            "model.lora.enabled=true",
            "model.lora.r=8",
            "model.lora.dropout=0.0",
            "train.lr=1e-2",
        ]
    )
    s = _train(data, tmp_path / mode, *extra)
    assert s["dtype"] == "bfloat16" and s["steps"] == 24 and s["lora"] == (mode == "lora-zero3")
    import importlib.util

    want = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa_varlen"
    assert s["attn"] == want
    if want == "sdpa_varlen":
        assert s["attn_kernel"] == "torch varlen flash kernel"
    assert s["last_train_loss"] < s["first_train_loss"] - 0.5, (s["first_train_loss"], s["last_train_loss"])
    assert s["mfu"] is not None and 0 < s["mfu"] < 1 and s["peak_mem_gib"] > 0
    # torch's fused AdamW handed to DeepSpeed; ZeRO keeps an fp32 master copy of the bf16 weights for it
    assert s["optimizer"].startswith("torch AdamW (fused)") and s["master_weights_dtype"] == "float32"
    assert s["loss_chunk_tokens"] == 1024
    assert Path(s["checkpoint"]).is_dir()
