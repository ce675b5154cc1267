"""What the benches share about running our trainer as a subprocess: the PYTHONPATH it needs and its throughput
read back from metrics.jsonl."""

from __future__ import annotations

import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pythonpath() -> str:
    """The repo first, then whatever PYTHONPATH already holds (the GPU image adds carried wheels there)."""
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)


def log_windows(run_dir: Path) -> list[dict]:
    """The run's perf log windows after the first, which holds start-up and warm-up (a one-window run keeps it)."""
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in rows if "perf/tokens" in r]
    return windows[1:] or windows


def tokens_and_seconds(windows: list[dict]) -> tuple[int, float]:
    """Real tokens and wall seconds of the windows: a window's wall time (everything between two log points, not
    only forward and backward) is its tokens over its tokens per second."""
    return sum(r["perf/tokens"] for r in windows), sum(r["perf/tokens"] / r["perf/tokens_per_s"] for r in windows)
