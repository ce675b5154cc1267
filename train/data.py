"""Per-rank reader of the packed shards written by `cbt-llm prepare` (contract: data_pipeline/shards.py).

Each rank reads only its own train shards (shard i belongs to rank i % world_size), so no rank tokenizes or
broadcasts data. The order inside an epoch is a permutation seeded by (seed, epoch, rank): the loader's whole
position is (epoch, step_in_epoch), which is what goes into a checkpoint. The rows come from the Parquet files
(read_rows) or, under Ray Train, from this worker's Ray Data stream of the same files (rows_from_batches):
both give the same PackedRows, so the order and the resume state are the same under every launcher.

Preference shards (train.objective=dpo; data_pipeline/shards.py) are read with their example_ids too
(PAIR_COLUMNS): each row holds pairs, "<id>/chosen" then "<id>/rejected", as adjacent sequences, and `pairs`
counts them per row; collate then adds each sequence's span and, once train.reference has attached them, the
reference log-probabilities.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cbt_llm.core.errors import ConfigError

# load_manifest is not used here: train's modules and tests import the contract's reader through this module
from data_pipeline.shards import IGNORE, load_manifest, rank_shards  # noqa: F401


@dataclass
class PackedRows:
    """Rows kept as flat int32 arrays plus offsets: compact, and a row is a cheap slice."""

    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    offsets: np.ndarray  # row i is [offsets[i], offsets[i+1])
    real_len: np.ndarray  # non-padding tokens per row (= row length when packed)
    keys: list[str]  # "shard_path:row" identifies a row across ranks and runs
    len_sq: np.ndarray | None = None  # per row: sum of squared example lengths (computed once, from the rows)
    pairs: np.ndarray | None = None  # preference rows only: pairs per row (sequences 2k, 2k+1 of a row)
    ref: np.ndarray | None = None  # (sequences, 2) float64 reference [logp, avg] in row order (train.reference)

    def __post_init__(self):
        if self.len_sq is None:  # rows never change, so the attention count of each is worked out once here
            bounds = zip(self.offsets[:-1], self.offsets[1:], self.real_len)
            self.len_sq = np.array([example_len_sq(self.position_ids[a:b], int(n)) for a, b, n in bounds], np.int64)
        self.seq_offsets = None if self.pairs is None else np.concatenate([[0], np.cumsum(2 * self.pairs)])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.input_ids[a:b], self.labels[a:b], self.position_ids[a:b]


TOKEN_COLUMNS = ("input_ids", "labels", "position_ids")
PAIR_COLUMNS = (*TOKEN_COLUMNS, "example_ids")  # preference shards: the pairs are found from the example ids


def columns_for(objective: str) -> tuple[str, ...]:
    """The shard columns a run of train.objective reads."""
    return PAIR_COLUMNS if objective == "dpo" else TOKEN_COLUMNS


def _flat(col) -> tuple[np.ndarray, np.ndarray]:
    col = col.combine_chunks()
    offsets = col.offsets.to_numpy().astype(np.int64)
    values = col.values.to_numpy(zero_copy_only=False).astype(np.int64)
    return values[offsets[0] : offsets[-1]], offsets - offsets[0]


class _RowsBuilder:
    """Appends Arrow tables of the token columns, shard after shard, and assembles one PackedRows."""

    def __init__(self):
        self.ids, self.lab, self.pos, self.offs, self.keys, self.base = [], [], [], [np.zeros(1, np.int64)], [], 0
        self.pairs: list[int] | None = None

    def add(self, t, shard_path: str, first_row: int) -> None:
        ids, off = _flat(t["input_ids"])
        lab, off2 = _flat(t["labels"])
        pos, off3 = _flat(t["position_ids"])
        if not (np.array_equal(off, off2) and np.array_equal(off, off3)):
            raise ConfigError(f"shard '{shard_path}': input_ids/labels/position_ids row lengths differ")
        self.ids.append(ids), self.lab.append(lab), self.pos.append(pos)
        self.offs.append(off[1:] + self.base)
        self.base += len(ids)
        self.keys += [f"{shard_path}:{r}" for r in range(first_row, first_row + t.num_rows)]
        if "example_ids" in t.column_names:
            self.pairs = self.pairs or []
            for r, ids in enumerate(t["example_ids"].to_pylist()):
                self.pairs.append(_pairs_of(ids or [], f"{shard_path}:{first_row + r}"))

    def build(self, pad_token_id: int) -> PackedRows:
        input_ids = np.concatenate(self.ids) if self.ids else np.zeros(0, np.int64)
        labels = np.concatenate(self.lab) if self.lab else np.zeros(0, np.int64)
        offsets = np.concatenate(self.offs)
        # padding = trailing pad tokens that carry no label; only padded (packing=false) rows have any
        real = np.empty(len(offsets) - 1, np.int64)
        for i in range(len(real)):
            a, b = offsets[i], offsets[i + 1]
            useful = np.nonzero((input_ids[a:b] != pad_token_id) | (labels[a:b] != IGNORE))[0]
            real[i] = useful[-1] + 1 if len(useful) else 0
        pos = np.concatenate(self.pos) if self.pos else labels.copy()
        pairs = None if self.pairs is None else np.array(self.pairs, np.int64)
        rows = PackedRows(input_ids, labels, pos, offsets, real, self.keys, pairs=pairs)
        if pairs is not None:
            for i in range(len(rows)):
                sequence_spans(rows, i)  # every sequence of every pair is there and has label tokens
        return rows


def _pairs_of(ids: list[str], where: str) -> int:
    """Pairs in one preference row: its example ids must be "<id>/chosen", "<id>/rejected", ...
    (data_pipeline/shards.py)."""
    ok = len(ids) % 2 == 0 and all(
        c.endswith("/chosen") and r.endswith("/rejected") and c[: -len("/chosen")] == r[: -len("/rejected")]
        for c, r in zip(ids[::2], ids[1::2])
    )
    if not ok or not ids:
        raise ConfigError(
            f"row {where}: example_ids {ids[:4]} are not consecutive '<id>/chosen', '<id>/rejected' pairs: not "
            "preference shards; prepare with data.format=preference or set train.objective=sft"
        )
    return len(ids) // 2


def sequence_spans(rows: PackedRows, i: int) -> list[tuple[int, int]]:
    """[start, end) of each sequence (chosen, rejected, chosen, ...) of preference row i, from where its positions
    restart at 0; padding after them is not a sequence. Raises ConfigError when the row has fewer sequences than
    its example_ids say or a sequence has no label token."""
    _, labels, pos = rows.row(i)
    n = 2 * int(rows.pairs[i])
    starts = np.flatnonzero(pos == 0).tolist()
    if not starts or starts[0] != 0 or len(starts) < n:
        raise ConfigError(f"row {rows.keys[i]}: {len(starts)} sequences by position_ids, example_ids name {n}")
    ends = starts[1:] + [len(pos)]
    spans = list(zip(starts[:n], ends[:n]))
    for a, b in spans:
        if not (labels[a + 1 : b] != IGNORE).any():
            raise ConfigError(f"row {rows.keys[i]}: a sequence has no label tokens (an empty answer); re-run prepare")
    return spans


def read_rows(
    data_dir: str | Path, shards: list[dict], pad_token_id: int, columns: tuple[str, ...] = TOKEN_COLUMNS
) -> PackedRows:
    """Load the given shards into one PackedRows; a shard whose row count disagrees with the manifest fails.
    columns=PAIR_COLUMNS reads preference shards (their pairs per row from example_ids)."""
    b = _RowsBuilder()
    for s in shards:
        path = Path(data_dir) / s["path"]
        if not path.is_file():
            raise ConfigError(f"shard '{path}' listed in manifest.json is missing; re-run `cbt-llm prepare`")
        try:  # pages that carry a CRC are checked against it (shards.py's docstring)
            t = pq.read_table(path, columns=list(columns), page_checksum_verification=True)
        except (OSError, pa.ArrowException) as exc:
            why = " ".join(str(exc).split())[:160]
            raise ConfigError(f"shard '{path}' cannot be read ({why}): corrupt; re-run `cbt-llm prepare`") from None
        if t.num_rows != s["rows"]:
            raise ConfigError(f"shard '{path}' has {t.num_rows} rows, manifest says {s['rows']}; re-run prepare")
        b.add(t, s["path"], 0)
    return b.build(pad_token_id)


def rows_from_batches(batches: Iterable, shards: list[dict], pad_token_id: int) -> PackedRows:
    """PackedRows from a stream of Arrow tables: the token columns (and example_ids for preference shards) plus
    `path`, the shard file each row came from (Ray Data's `include_paths`). The stream must deliver exactly
    `shards`, each whole and in that order, with the manifest's row counts: then rows, order and keys are those of
    read_rows, so the loader's order and its resume state do not depend on how the rows arrived. Anything else is
    a one-line ConfigError."""
    want = [s["path"] for s in shards]
    of_file: dict[str, str] = {}  # path as the stream names it -> manifest path (resolved once per file)

    def shard_of(p: str) -> str:
        if p not in of_file:
            hits = [w for w in want if p == w or p.endswith("/" + w)]
            if not hits:
                raise ConfigError(f"got rows of '{p}', which is not one of this rank's shards {want}")
            of_file[p] = max(hits, key=len)
        return of_file[p]

    b, seen, current = _RowsBuilder(), {}, None
    for t in batches:
        paths = t.column("path").to_pylist()
        start = 0
        while start < len(paths):
            end = start
            while end < len(paths) and paths[end] == paths[start]:
                end += 1
            shard = shard_of(paths[start])
            if shard != current and shard in seen:
                raise ConfigError(
                    f"rows of shard '{shard}' arrived after another shard began: the stream is not in "
                    "file order (Ray Data needs preserve_order)"
                )
            current = shard
            b.add(t.slice(start, end - start), shard, seen.get(shard, 0))
            seen[shard] = seen.get(shard, 0) + end - start
            start = end
    got = [(p, n) for p, n in seen.items()]
    if got != [(s["path"], s["rows"]) for s in shards]:
        raise ConfigError(
            f"the stream delivered shards (path, rows) {got}, expected "
            f"{[(s['path'], s['rows']) for s in shards]}; re-run `cbt-llm prepare`"
        )
    return b.build(pad_token_id)


def collate(rows: PackedRows, idx: list[int], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Stack rows, padding at the end to the longest. No attention mask: position_ids mark the examples.

    Padding sits after every real token, so under causal attention no real token can see it; its labels are
    -100 and its positions restart at 0, so it forms its own tiny 'example'.
    """
    parts = [rows.row(i) for i in idx]
    width = max(len(p[0]) for p in parts)
    ids = np.full((len(idx), width), pad_token_id, np.int64)
    lab = np.full((len(idx), width), IGNORE, np.int64)
    pos = np.tile(np.arange(width, dtype=np.int64), (len(idx), 1))
    for j, (a, b, c) in enumerate(parts):
        n = len(a)
        ids[j, :n], lab[j, :n], pos[j, :n] = a, b, c
        pos[j, n:] = np.arange(width - n)
    batch = {
        "input_ids": torch.from_numpy(ids),
        "labels": torch.from_numpy(lab),
        "position_ids": torch.from_numpy(pos),
        "real_tokens": int(rows.real_len[idx].sum()),
        "attn_len_sq": int(rows.len_sq[idx].sum()),
    }
    if rows.pairs is not None:
        batch.update(_pair_layout(rows, idx, width))
    return batch


def _pair_layout(rows: PackedRows, idx: list[int], width: int) -> dict:
    """The sequences of a preference batch, on the host: target_seq[j, t] is the sequence (numbered over the
    batch, chosen 2k, rejected 2k+1) whose label token t+1 of row j is, -1 where position t+1 is no target (the
    rule of masked_ce_sum: not a label, or the start of a sequence); seq_tokens counts each sequence's targets;
    ref holds the reference [logp, avg] of each sequence when attached (train.reference)."""
    target_seq = np.full((len(idx), width - 1), -1, np.int64)
    k = 0
    for j, i in enumerate(idx):
        _, labels, _ = rows.row(i)
        for a, b in sequence_spans(rows, i):
            target_seq[j, a : b - 1] = np.where(labels[a + 1 : b] != IGNORE, k, -1)
            k += 1
    out = {
        "pairs": k // 2,
        "target_seq": torch.from_numpy(target_seq),
        "seq_tokens": torch.from_numpy(np.bincount(target_seq[target_seq >= 0], minlength=k).astype(np.float64)),
    }
    if rows.ref is not None:
        out["ref"] = torch.from_numpy(
            np.concatenate([rows.ref[rows.seq_offsets[i] : rows.seq_offsets[i + 1]] for i in idx])
        )
    return out


def example_len_sq(position_ids: np.ndarray, real_len: int) -> int:
    """Sum of squared lengths of the examples in one row's first `real_len` tokens (each starts where its
    position restarts at 0): what attention costs when every example attends only to itself."""
    starts = np.flatnonzero(position_ids[:real_len] == 0)
    if real_len and (not len(starts) or starts[0] != 0):
        starts = np.concatenate([[0], starts])
    lengths = np.diff(np.append(starts, real_len))
    return int((lengths.astype(np.int64) ** 2).sum())


class RankLoader:
    """Deterministic, resumable stream of optimizer steps for one rank.

    Every rank runs the same number of steps per epoch (the smallest rank's rows // rows per step, computed
    from the manifest alone, so no collective is needed); a rank's extra rows are left out and counted.
    """

    def __init__(
        self,
        rows: PackedRows,
        *,
        micro_batch_size: int,
        grad_accum: int,
        seed: int,
        rank: int,
        steps_per_epoch: int,
        pad_token_id: int,
    ):
        self.rows, self.mb, self.ga, self.seed, self.rank = rows, micro_batch_size, grad_accum, seed, rank
        self.steps_per_epoch, self.pad = steps_per_epoch, pad_token_id
        self.epoch, self.step_in_epoch = 0, 0
        self._order: np.ndarray | None = None

    def order(self, epoch: int) -> np.ndarray:
        """Row indices of this rank for `epoch`, in training order (a pure function of seed, epoch, rank)."""
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        return rng.permutation(len(self.rows))[: self.steps_per_epoch * self.mb * self.ga]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self._order = None

    def next_step(self) -> tuple[list[dict], list[str]]:
        """The micro-batches of the next optimizer step and the keys of the rows in them; advances the position."""
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch, self.step_in_epoch, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = self.order(self.epoch)
        per_step = self.mb * self.ga
        chunk = self._order[self.step_in_epoch * per_step : (self.step_in_epoch + 1) * per_step].tolist()
        self.step_in_epoch += 1
        micro = [collate(self.rows, chunk[k * self.mb : (k + 1) * self.mb], self.pad) for k in range(self.ga)]
        return micro, [self.rows.keys[i] for i in chunk]


def steps_per_epoch(manifest: dict, world: int, micro_batch_size: int, grad_accum: int) -> tuple[int, int]:
    """(optimizer steps per epoch, train rows left out per epoch), from the manifest's row counts."""
    per_rank = [sum(s["rows"] for s in rank_shards(manifest, "train", r, world)) for r in range(world)]
    per_step = micro_batch_size * grad_accum
    steps = min(per_rank) // per_step
    if steps == 0:
        raise ConfigError(
            f"rank rows {per_rank} < micro_batch_size*grad_accum = {per_step}: lower train.micro_batch_size "
            "or train.grad_accum, or prepare more data"
        )
    return steps, sum(per_rank) - steps * per_step * world


def rows_per_micro_batch(tc, seq_len: int) -> int:
    """train.micro_batch_size, or train.tokens_per_micro_batch // seq_len when that token budget is set."""
    if not tc.tokens_per_micro_batch:
        return tc.micro_batch_size
    if tc.micro_batch_size != 1:
        raise ConfigError(
            "set train.tokens_per_micro_batch or train.micro_batch_size, not both; "
            "set train.micro_batch_size=1 to use the token budget"
        )
    if tc.tokens_per_micro_batch < seq_len:
        raise ConfigError(
            f"train.tokens_per_micro_batch={tc.tokens_per_micro_batch} holds no whole row of the "
            f"shards' seq_len {seq_len}; set it to a multiple of {seq_len}"
        )
    return tc.tokens_per_micro_batch // seq_len
