"""The launcher tests' shared demo data: the demo's own path at small size."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

DEMO_CFG = "configs/demo-cpu.yaml"


def build_demo_data(d: Path, cli: Callable, env: dict, seq_len: int) -> Path:
    """synth template (300 records) -> tokenizer train -> prepare into 2 train shards; returns the data folder.

    `cli(*args, env=...)` runs `cbt-llm` and returns a CompletedProcess (each test module has its own)."""
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
        r = cli(*s, env=env)
        assert r.returncode == 0, f"{s[:2]} failed:\n{r.stderr[-3000:]}"
    man = json.loads((d / "data" / "manifest.json").read_text())
    assert len(man["splits"]["train"]["shards"]) == 2
    return d / "data"
