"""End-of-run summary tables and local metric files."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from cbt_llm.core.fileio import write_text_atomic


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def summary_table(title: str, rows: dict[str, Any]) -> str:
    """A two-column text table; plain text so it reads the same in a terminal, a Slurm log or CI."""
    items = [(str(k), _fmt(v)) for k, v in rows.items()]
    kw = max([len(k) for k, _ in items] + [len(title)])
    vw = max([len(v) for _, v in items] + [5])
    line = "+" + "-" * (kw + 2) + "+" + "-" * (vw + 2) + "+"
    out = [line, f"| {title.ljust(kw + vw + 3)} |", line]
    out += [f"| {k.ljust(kw)} | {v.rjust(vw)} |" for k, v in items]
    out.append(line)
    return "\n".join(out)


def print_summary(title: str, rows: dict[str, Any], file=None) -> None:
    print(summary_table(title, rows), file=file or sys.stdout, flush=True)


def write_metrics(path: str | Path, metrics: dict[str, Any]) -> None:
    """Write a run's final metrics as JSON next to its outputs (a local copy of what W&B gets)."""
    write_text_atomic(path, json.dumps(metrics, ensure_ascii=False, indent=2, sort_keys=True) + "\n")
