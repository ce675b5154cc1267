"""The reference log-probabilities of a full fine-tuning preference run (train.objective=dpo, loss sigmoid or ipo),
computed once, before the first step, so that training holds one model.

One distributed pass of the starting model over every train and validation sequence (each rank its own train
shards, validation row i on rank i % world, in lockstep: under ZeRO-3 every forward pass is collective) writes,
beside the shards (the layout data_pipeline/shards.py describes):

    <data_dir>/reference/<key>/train/part-....parquet   one per shard, one row per shard row:
                                                        ref_logps, ref_avg list<float64>, one value per sequence
    <data_dir>/reference/<key>/validation/part-....parquet
    <data_dir>/reference/<key>/reference.json           {model, model_hash, dtype, shards {path: sha256}, created}

<key> is a hash of the model's content hash (config.json and its weight files), the training dtype and the shards'
SHA-256s (the manifest's), so a later run from the same starting model on the same shards reuses the folder
(resume, another run) and any other model, precision or data computes its own. The folder appears whole or not at
all: the ranks write into a hidden partial folder that rank 0 renames once every file and reference.json is there.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from cbt_llm.core.errors import ConfigError
from train.data import PackedRows, collate

REFERENCE_DIR = "reference"
REFERENCE_FILE = "reference.json"
_WEIGHTS = ("*.safetensors", "*.bin", "*.pt")


def model_folder(name_or_path: str) -> Path:
    """The local folder of a model: the path itself, or the Hugging Face cache snapshot of a hub id."""
    p = Path(name_or_path)
    if p.is_dir():
        return p
    from transformers.utils import cached_file

    return Path(cached_file(name_or_path, "config.json")).parent


def model_hash(name_or_path: str) -> str:
    """SHA-256 over the model's config.json and weight files (names and bytes, in name order)."""
    folder = model_folder(name_or_path)
    files = sorted({f for pat in ("config.json", *_WEIGHTS) for f in folder.glob(pat) if f.is_file()})
    if not any(f.name != "config.json" for f in files):
        raise ConfigError(f"model '{name_or_path}': no weight files in {folder} to hash for the reference")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def shard_digests(manifest: dict) -> dict[str, str]:
    """{shard path: sha256} of the train and validation shards, as the manifest lists them."""
    return {
        s["path"]: s.get("sha256", "")
        for split in ("train", "validation")
        for s in manifest["splits"].get(split, {}).get("shards", [])
    }


def reference_key(model_sha: str, dtype: str, shards: dict[str, str]) -> str:
    blob = json.dumps({"model_hash": model_sha, "dtype": dtype, "shards": shards}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _valid(folder: Path, meta: dict) -> bool:
    """A complete reference folder for exactly this model, dtype and shards."""
    try:
        got = json.loads((folder / REFERENCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    same = all(got.get(k) == meta[k] for k in ("model_hash", "dtype", "shards"))
    return same and all((folder / p).is_file() for p in meta["shards"])


def _rows_by_shard(rows: PackedRows) -> dict[str, list[int]]:
    """Row indices of each shard, in row order (a row's key is "<shard path>:<row>")."""
    out: dict[str, list[int]] = {}
    for i, key in enumerate(rows.keys):
        out.setdefault(key.rpartition(":")[0], []).append(i)
    return out


def _write(path: Path, values: list[np.ndarray]) -> None:
    """One shard's reference: a row per shard row, ref_logps and ref_avg per sequence."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lst = pa.list_(pa.float64())
    table = pa.table(
        {
            "ref_logps": pa.array([v[:, 0].tolist() for v in values], lst),
            "ref_avg": pa.array([v[:, 1].tolist() for v in values], lst),
        }
    )
    pq.write_table(table, path)


def _compute(
    engine, rows: PackedRows, mine: list[int], batches: int, mb: int, pad: int, logps
) -> dict[int, np.ndarray]:
    """{row index: (sequences, 2) [logp, avg]} of this rank's rows `mine`, in `batches` lockstep forward passes."""
    out: dict[int, np.ndarray] = {}
    for b in range(batches):
        idx = mine[b * mb : (b + 1) * mb]
        batch = collate(rows, idx or [0], pad)
        with torch.no_grad():
            lp = logps(batch).double().cpu()
        if not idx:
            continue
        avg = lp / batch["seq_tokens"]
        both = torch.stack([lp, avg], 1).numpy()
        k = 0
        for i in idx:
            n = 2 * int(rows.pairs[i])
            out[i] = both[k : k + n]
            k += n
    return out


def _lockstep_batches(n_mine: int, mb: int, device) -> int:
    t = torch.tensor([float(math.ceil(n_mine / mb))], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def ensure_reference(
    engine,
    rows: PackedRows,
    val_rows: PackedRows,
    *,
    data_dir: str | Path,
    manifest: dict,
    model: str,
    dtype: str,
    rank: int,
    world: int,
    micro_batch_size: int,
    pad_token_id: int,
    logps: Callable[[dict], torch.Tensor],
    say: Callable[..., None] = print,
) -> tuple[Path, bool]:
    """Attach the reference [logp, avg] of every sequence to `rows` (this rank's train rows) and `val_rows`,
    computing and writing the store first unless it holds them for this model; every rank calls it (collective).
    `logps(batch)` is the model's per-sequence log-probabilities (train.dpo.sequence_logps on the engine).
    Returns (the store's folder, whether it was reused)."""
    box = [None]
    if rank == 0:
        t0 = time.perf_counter()
        box = [{"model": model, "model_hash": model_hash(model), "dtype": dtype, "shards": shard_digests(manifest)}]
        box[0]["hash_s"] = round(time.perf_counter() - t0, 2)
    dist.broadcast_object_list(box, src=0)
    meta = box[0]
    hash_s = meta.pop("hash_s")
    root = Path(data_dir) / REFERENCE_DIR
    folder = root / reference_key(meta["model_hash"], dtype, meta["shards"])
    valid = [_valid(folder, meta) if rank == 0 else None]
    dist.broadcast_object_list(valid, src=0)
    reused = bool(valid[0])
    if not reused:
        t0 = time.perf_counter()
        _build(engine, rows, val_rows, folder, meta, rank, world, micro_batch_size, pad_token_id, logps)
        say(
            f"reference: computed the log-probabilities of {model} (hash {meta['model_hash'][:12]}, {hash_s} s) "
            f"in {time.perf_counter() - t0:.1f} s -> {folder}"
        )
    else:
        say(f"reference: reusing {folder} (model {model}, hash {meta['model_hash'][:12]}, {hash_s} s)")
    attach(folder, rows)
    attach(folder, val_rows)
    return folder, reused


def _build(engine, rows, val_rows, folder: Path, meta: dict, rank, world, mb, pad, logps) -> None:
    partial = folder.parent / f".{folder.name}.partial"
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    engine.eval()
    train_mine = list(range(len(rows)))
    train = _compute(engine, rows, train_mine, _lockstep_batches(len(rows), mb, engine.device), mb, pad, logps)
    val_mine = list(range(rank, len(val_rows), world))
    val = _compute(engine, val_rows, val_mine, _lockstep_batches(len(val_mine), mb, engine.device), mb, pad, logps)
    engine.train()
    for shard, idx in _rows_by_shard(rows).items():
        _write(partial / shard, [train[i] for i in idx])
    gathered: list = [None] * world
    dist.all_gather_object(gathered, val)
    if rank == 0:
        every = {i: v for part in gathered for i, v in part.items()}
        for shard, idx in _rows_by_shard(val_rows).items():
            _write(partial / shard, [every[i] for i in idx])
    dist.barrier()
    if rank == 0:
        missing = [p for p in meta["shards"] if not (partial / p).is_file()]
        if missing:
            raise RuntimeError(f"reference: no values written for shards {missing[:3]}")
        created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        (partial / REFERENCE_FILE).write_text(json.dumps({**meta, "created": created}, indent=2), encoding="utf-8")
        shutil.rmtree(folder, ignore_errors=True)  # an incomplete or mismatched folder of the same key
        partial.rename(folder)
    dist.barrier()


def attach(folder: Path, rows: PackedRows) -> None:
    """Set rows.ref from the store: each shard's values, checked against the rows' sequences."""
    if not len(rows):
        rows.ref = np.zeros((0, 2))
        return
    parts = []
    for shard, idx in _rows_by_shard(rows).items():
        t = pq.read_table(Path(folder) / shard)
        logp, avg = t["ref_logps"].to_pylist(), t["ref_avg"].to_pylist()
        if len(logp) != len(idx):
            raise ConfigError(
                f"reference {folder}/{shard}: {len(logp)} rows, the shard has {len(idx)}; delete {folder}"
            )
        for r, i in enumerate(idx):
            if len(logp[r]) != 2 * int(rows.pairs[i]):
                raise ConfigError(
                    f"reference {folder}/{shard} row {r}: {len(logp[r])} values for {2 * rows.pairs[i]} sequences"
                )
            parts.append(np.stack([np.asarray(logp[r]), np.asarray(avg[r])], 1))
    order = [i for idx in _rows_by_shard(rows).values() for i in idx]
    if order != list(range(len(rows))):
        raise RuntimeError("rows are not grouped by shard in shard order")
    rows.ref = np.concatenate(parts).astype(np.float64)
