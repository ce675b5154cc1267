"""The launcher tests' shared demo data: the demo's own path at small size (tests/conftest.py: demo_data)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEMO_CFG = "configs/demo-cpu.yaml"


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.pop("WANDB_MODE", None)
    return subprocess.run([str(BIN / "cbt-llm"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def build_demo_data(d: Path, seq_len: int) -> Path:
    """synth template (300 records) -> tokenizer train -> prepare into 2 train shards; returns the data folder."""
    steps = [
        [
            "synth",
            "template",
            "--config",
            DEMO_CFG,
            "--num-records",
            "300",
            "--num-shards",
            "1",
            "--workers",
            "1",
            "--out",
            str(d / "corpus"),
        ],
        [
            "tokenizer",
            "train",
            "--config",
            DEMO_CFG,
            "--input",
            str(d / "corpus" / "*.jsonl*"),
            "--vocab-size",
            "3000",
            "--out",
            str(d / "tokenizer"),
        ],
        [
            "prepare",
            "--config",
            DEMO_CFG,
            "--out",
            str(d / "data"),
            "--tokenizer",
            str(d / "tokenizer"),
            f"data.inputs=[{d / 'corpus'}/*.jsonl*]",
            f"data.seq_len={seq_len}",
            "data.world_size=2",
            "data.val_fraction=0.05",
        ],
    ]
    for s in steps:
        r = _cli(*s)
        assert r.returncode == 0, f"{s[:2]} failed:\n{r.stderr[-3000:]}"
    man = json.loads((d / "data" / "manifest.json").read_text())
    assert len(man["splits"]["train"]["shards"]) == 2
    return d / "data"
