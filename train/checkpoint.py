"""Checkpoints: a DeepSpeed checkpoint per step folder, our trainer_state.json in it, `latest` written last.

Layout: run_dir/checkpoints/step-0000040/{DeepSpeed files, trainer_state.json, rng-rank<r>.pt}
        run_dir/checkpoints/latest   (the tag; the same file name DeepSpeed itself reads)
A crash at any moment leaves `latest` naming a complete folder: the new folder becomes visible only after all
ranks have written it and trainer_state.json (the completion marker) is on disk. Old folders are pruned after.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from cbt_llm.core.fileio import write_text_atomic

STATE_FILE = "trainer_state.json"


def tag_for(step: int) -> str:
    return f"step-{step:07d}"


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Step folders that hold a trainer_state.json, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and (p / STATE_FILE).is_file())


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag in `latest` if its folder is complete, else the newest complete folder, else None."""
    pointer = ckpt_dir / "latest"
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if (ckpt_dir / tag / STATE_FILE).is_file():
            return tag
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def save(engine, ckpt_dir: Path, step: int, state: dict, *, rank: int, keep_last: int, barrier, fault=None) -> str:
    """Save on every rank; rank 0 then writes trainer_state.json, flips `latest` and prunes old folders."""
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
    torch.save(rng_state(), ckpt_dir / tag / f"rng-rank{rank}.pt")
    if fault:
        fault("in_save", step)
    barrier()  # every rank's shards are on disk before the folder is declared complete
    if rank == 0:
        write_text_atomic(ckpt_dir / tag / STATE_FILE, json.dumps(state, indent=2))
        write_text_atomic(ckpt_dir / "latest", tag)
        for old in complete_tags(ckpt_dir)[:-keep_last]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
        # folders without a state file are leftovers of a crashed save; they never become `latest`
        for p in ckpt_dir.iterdir():
            if p.is_dir() and not (p / STATE_FILE).exists() and p.name != tag:
                shutil.rmtree(p, ignore_errors=True)
    barrier()
    return tag


def load(engine, ckpt_dir: Path, tag: str, rank: int) -> dict:
    """Load model, optimizer, scheduler and this rank's RNG; return trainer_state.json."""
    path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    rng_file = ckpt_dir / tag / f"rng-rank{rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((ckpt_dir / tag / STATE_FILE).read_text())
