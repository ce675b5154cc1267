"""Spool and write shards on the driver: windows of examples are packed (or padded) into rows, rows appended to a
spool file per split, and at the end the spool is cut into shards (ROW_SCHEMA, data_pipeline/shards.py) in a
staging folder that is then moved into place. Beside them, the questions as evaluation needs them (QuestionFiles):
the validation split's source text (and, for preference pairs, the validation pairs) and the train split's
question fingerprints.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

from cbt_llm.core.config import DataConfig
from data_pipeline.packing import Rows, build_packed_rows, build_padded_rows, build_pair_rows, pack
from data_pipeline.shards import (
    HELDOUT_FILE,
    HELDOUT_PAIRS_FILE,
    IGNORE,
    MANIFEST_FILE,
    ROW_SCHEMA,
    TRAIN_QUESTIONS_FILE,
    sha256_file,
    shard_path,
)

_SHARD_ROW_GROUP = 1024  # rows per Parquet row group in a shard, and per read of the spool when writing one
# Fixed writer settings: part of what makes a re-run byte-identical.
# page CRCs: a page that changed on disk fails its read (every reader verifies them) instead of decoding to other tokens
_PARQUET_KW = dict(
    compression="zstd",
    compression_level=3,
    use_dictionary=["example_ids"],
    write_statistics=False,
    write_page_checksum=True,
)


def _rows_table(rows: Rows) -> pa.Table:
    off = pa.array(rows.offsets.astype(np.int32))
    return pa.table(
        {
            "input_ids": pa.ListArray.from_arrays(off, pa.array(rows.input_ids, pa.int32())),
            "labels": pa.ListArray.from_arrays(off, pa.array(rows.labels, pa.int32())),
            "position_ids": pa.ListArray.from_arrays(off, pa.array(rows.position_ids, pa.int32())),
            "num_examples": pa.array(rows.num_examples, pa.int32()),
            "example_ids": pa.array(rows.example_ids, pa.list_(pa.string())),
        },
        schema=ROW_SCHEMA,
    )


class SplitPacker:
    """Collects one split's examples in windows, packs (or pads) each window, appends rows to a spool file.

    Under data.format preference an item is a pair (its two sequences back to back, `cut` the chosen one's
    length): the packer places whole pairs, and each row keeps a pair's sequences adjacent, chosen first
    (packing.build_pair_rows); `examples` counts pairs."""

    def __init__(self, name: str, dc: DataConfig, pad_token_id: int, spool: Path):
        self.name, self.dc, self.pad = name, dc, pad_token_id
        self.spool_path = spool
        self.writer: pq.ParquetWriter | None = None
        self.ids: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.eids: list[str] = []
        self.cuts: list[int] | None = [] if dc.format == "preference" else None
        self.examples = self.rows = self.tokens = self.label_tokens = 0
        self.pack_s = 0.0  # driver time spent choosing bins (prepare_metrics.json: pack_s)

    def add(self, ids: np.ndarray, labels: np.ndarray, eid: str, cut: int = 0) -> None:
        self.ids.append(ids)
        self.labels.append(labels)
        self.eids.append(eid)
        if self.cuts is not None:
            self.cuts.append(cut)
        if len(self.ids) >= self.dc.pack_window:
            self.flush()

    def flush(self) -> None:
        if not self.ids:
            return
        if self.dc.packing:
            t0 = time.perf_counter()
            bins = pack([len(a) for a in self.ids], self.dc.seq_len, self.dc.packer)
            self.pack_s += time.perf_counter() - t0
            if self.cuts is not None:
                rows = build_pair_rows(self.ids, self.labels, self.eids, self.cuts, bins)
            else:
                rows = build_packed_rows(self.ids, self.labels, self.eids, bins)
        elif self.cuts is not None:
            bins = [[k] for k in range(len(self.ids))]
            rows = build_pair_rows(self.ids, self.labels, self.eids, self.cuts, bins, self.dc.seq_len, self.pad)
        else:
            rows = build_padded_rows(self.ids, self.labels, self.eids, self.dc.seq_len, self.pad)
        if self.writer is None:
            # a scratch file read once: no compression, dictionary or statistics (the dictionary attempt on
            # every token column would be most of the driver's write time); the shards cut from it are unchanged
            # page CRCs: the spool goes to disk between the packing stage and the shard writer, which checks
            # them (write_shards), so a page that changed on the way fails there, never reaches a shard
            self.writer = pq.ParquetWriter(
                str(self.spool_path),
                ROW_SCHEMA,
                compression="none",
                use_dictionary=False,
                write_statistics=False,
                write_page_checksum=True,
            )
        self.writer.write_table(_rows_table(rows))
        self.examples += len(self.ids)
        self.rows += rows.num_rows
        self.tokens += rows.real_tokens
        self.label_tokens += rows.label_tokens
        self.ids, self.labels, self.eids = [], [], []
        if self.cuts is not None:
            self.cuts = []

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()


class QuestionFiles:
    """heldout.jsonl (each kept validation example's source text, in input order) and train_questions.u64 (the
    sorted, distinct fingerprints of the kept train examples' questions), as data_pipeline/shards.py describes.

    The fingerprints are gathered in NumPy chunks and made distinct every `chunk` of them: 8 bytes per train
    question on the driver, not a Python int each.
    """

    def __init__(self, folder: Path, chunk: int = 1 << 20, pairs: bool = False):
        self.folder, self.chunk = folder, chunk
        self.heldout = open(folder / HELDOUT_FILE, "w", encoding="utf-8", newline="\n")
        self.heldout_records = 0
        # preference pairs: the validation pairs as text too (heldout_pairs.jsonl)
        self.pairs = open(folder / HELDOUT_PAIRS_FILE, "w", encoding="utf-8", newline="\n") if pairs else None
        self.pair_records = 0
        self.pending: list[int] = []
        self.hashes = np.zeros(0, np.int64)

    def add_heldout(self, line: str) -> None:
        self.heldout.write(line + "\n")
        self.heldout_records += 1

    def add_heldout_pair(self, line: str) -> None:
        self.pairs.write(line + "\n")
        self.pair_records += 1

    def close_files(self) -> None:
        self.heldout.close()
        if self.pairs is not None:
            self.pairs.close()

    def add_train(self, qhash: int) -> None:
        self.pending.append(qhash)
        if len(self.pending) >= self.chunk:
            self._merge()

    def _merge(self) -> None:
        self.hashes = np.unique(np.concatenate([self.hashes, np.asarray(self.pending, np.int64)]))
        self.pending = []

    def close(self) -> dict[str, dict]:
        """Write train_questions.u64; returns the manifest entries of the files (heldout_pairs only for pairs)."""
        self.close_files()
        self._merge()
        self.hashes.astype("<i8").tofile(self.folder / TRAIN_QUESTIONS_FILE)
        pairs = {}
        if self.pairs is not None:
            pairs["heldout_pairs"] = {
                "path": HELDOUT_PAIRS_FILE,
                "records": self.pair_records,
                "sha256": sha256_file(self.folder / HELDOUT_PAIRS_FILE),
            }
        return {
            "heldout": {
                "path": HELDOUT_FILE,
                "records": self.heldout_records,
                "sha256": sha256_file(self.folder / HELDOUT_FILE),
            },
            "train_questions": {
                "path": TRAIN_QUESTIONS_FILE,
                "questions": int(len(self.hashes)),
                "sha256": sha256_file(self.folder / TRAIN_QUESTIONS_FILE),
            },
            **pairs,
        }


def shard_sizes(rows: int, shards: int) -> list[int]:
    """Rows per shard, differing by at most one; the extra rows go to the first shards, so with rank r
    reading shards r, r+W, r+2W, ... ranks differ by at most one row."""
    base, extra = divmod(rows, shards)
    return [base + (1 if i < extra else 0) for i in range(shards)]


def write_shards(spool: Path, out: Path, split: str, num_shards: int, pad_token_id: int, packing: bool) -> list[dict]:
    """Cut the spool into num_shards contiguous shards; returns their manifest entries.

    Streams: the spool is read and each shard written one row group (_SHARD_ROW_GROUP rows) at a time, so
    memory is one row group whatever the split's size (the validation split is one shard of 2% of the
    corpus). Each row group is written as its own table of exactly that many rows, which gives the same
    bytes as one write_table(shard, row_group_size=_SHARD_ROW_GROUP).
    """
    (out / split).mkdir(parents=True, exist_ok=True)
    # pre_buffer off: with it (pyarrow's default) iter_batches reads the whole spool into memory before the
    # first batch, ~800 MB for a 750 MB spool (1M records make ~2 GB)
    spool_file = (
        pq.ParquetFile(str(spool), pre_buffer=False, page_checksum_verification=True) if spool.exists() else None
    )
    total = spool_file.metadata.num_rows if spool_file else 0
    # the spool's schema as read back (lists of "element"), not ROW_SCHEMA ("item"): shards have always
    # carried the read-back one, and it is part of their bytes
    schema = spool_file.schema_arrow if spool_file else ROW_SCHEMA
    sizes = shard_sizes(total, num_shards)
    entries = []
    batches = spool_file.iter_batches(batch_size=_SHARD_ROW_GROUP) if total else iter(())
    pending: pa.Table | None = None

    def take(n: int) -> pa.Table:
        """The next n rows of the spool as one contiguous table."""
        nonlocal pending
        parts: list[pa.Table] = []
        while n > 0:
            if pending is None or pending.num_rows == 0:
                pending = pa.Table.from_batches([next(batches)])
            k = min(n, pending.num_rows)
            parts.append(pending.slice(0, k))
            pending = pending.slice(k)
            n -= k
        return pa.concat_tables(parts).combine_chunks()

    for k, size in enumerate(sizes):
        rel = shard_path(split, k, num_shards)
        stats = {"rows": 0, "examples": 0, "tokens": 0, "label_tokens": 0}
        with pq.ParquetWriter(str(out / rel), schema if size else ROW_SCHEMA, **_PARQUET_KW) as writer:
            if size == 0:
                writer.write_table(ROW_SCHEMA.empty_table(), row_group_size=_SHARD_ROW_GROUP)
            for start in range(0, size, _SHARD_ROW_GROUP):
                table = take(min(_SHARD_ROW_GROUP, size - start))
                writer.write_table(table, row_group_size=_SHARD_ROW_GROUP)
                id_values = pa.compute.list_flatten(table.column("input_ids")).to_numpy()
                lab_np = pa.compute.list_flatten(table.column("labels")).to_numpy()
                pads = 0
                if not packing:
                    # padding is pad_token_id with label -100; a chat-template prompt never contains the pad token
                    pads = int(((id_values == pad_token_id) & (lab_np == IGNORE)).sum())
                stats["rows"] += table.num_rows
                stats["examples"] += int(pa.compute.sum(table.column("num_examples")).as_py() or 0)
                stats["tokens"] += int(len(id_values) - pads)
                stats["label_tokens"] += int((lab_np != IGNORE).sum())
        entries.append({"path": rel, **stats, "sha256": sha256_file(out / rel)})
    return entries


def swap_into_place(staging: Path, out: Path) -> None:
    """Move staging's train/, validation/, rejects/ and question files into out, then manifest.json last (the
    commit point)."""
    (out / MANIFEST_FILE).unlink(missing_ok=True)  # readers now see "no data" rather than a mix
    old = staging / "_old"
    old.mkdir(exist_ok=True)
    for name in ("train", "validation", "rejects", HELDOUT_FILE, HELDOUT_PAIRS_FILE, TRAIN_QUESTIONS_FILE):
        if (out / name).exists():
            os.replace(out / name, old / name)
        if (staging / name).exists():
            os.replace(staging / name, out / name)
    os.replace(staging / MANIFEST_FILE, out / MANIFEST_FILE)
