"""`cbt-llm prepare`: corpus files -> validated, split, templated, tokenized, masked, packed Parquet shards.

The flow, one way:

    Ray Data                                            driver (ordered stream, bounded memory)
    read files -> parse + validate -> tokenize + mask -> dedup -> window of pack_window examples
    (tasks, one per file)  (tasks)    (actor pool)         -> pack (data.packer)  -> spool
                                                        end: spool -> shards (multiple of world_size),
                                                             rejects/, manifest.json, metrics

Ray Data runs with preserve_order, so the driver sees records in (file, line) order whatever the
parallelism: the first copy of a duplicate is the one kept, windows hold the same examples on every run and
shards are byte-identical on a re-run. The heavy per-record work (JSON, schema, chat template, tokenizer)
runs in Ray workers; the driver only does set look-ups, packing arithmetic and Parquet writes.

The output folder (see notes in README "Shards"): train/ and validation/ Parquet shards, rejects/ and
manifest.json. Shards are written to a staging folder and moved in; manifest.json is replaced last, so a
reader that goes through load_manifest() never sees a half-written set.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

from cbt_llm.config import Config, ConfigError, DataConfig
from cbt_llm.report import print_summary, write_metrics
from data_pipeline.formats import REASONS, Example, RecordError, split_of, to_examples
from data_pipeline.io import expand_inputs
from data_pipeline.packing import (
    IGNORE_INDEX,
    Rows,
    build_packed_rows,
    build_padded_rows,
    pack,
    packing_efficiency,
)

MANIFEST_SCHEMA_VERSION = 1
SPLITS = ("train", "validation")
RAW_KEEP_CHARS = 1000  # how much of a bad record the rejects file keeps
_READ_CHUNK = 2048  # lines per block out of the file reader
_ROWS_PER_SHARD = 16_384  # default shard size when data.num_shards is 0
_RAY_BLOCK_BYTES = 8 << 20  # Ray Data's target block size (see _configure_ray_data)
_SHARD_ROW_GROUP = 1024  # rows per Parquet row group in a shard, and per read of the spool when writing one
_AF_UNIX_BUDGET = 40  # Ray appends ~65 chars of session/socket path to _temp_dir; sockets max out at 107

ROW_SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("position_ids", pa.list_(pa.int32())),
        ("num_examples", pa.int32()),
        ("example_ids", pa.list_(pa.string())),
    ]
)
# Fixed writer settings: part of what makes a re-run byte-identical.
_PARQUET_KW = dict(compression="zstd", compression_level=3, use_dictionary=["example_ids"], write_statistics=False)


class PrepareError(RuntimeError):
    """A prepare run that must stop (bad record under --strict, empty output): one line for the user."""


class ManifestError(ConfigError):
    """Shards that cannot be used as given (missing, corrupt, or made with another tokenizer)."""


# ---------------------------------------------------------------------------------------------------------
# inputs


def resolve_inputs(patterns: list[str]) -> list[str]:
    """Local globs -> sorted absolute paths; URIs (s3://, gs://, hdfs://, ...) are globbed through fsspec.

    Raises FileNotFoundError naming the pattern that matched nothing.
    """
    files: list[str] = []
    for pat in patterns:
        if "://" in pat and not pat.startswith("file://"):
            import fsspec

            fs, path = fsspec.core.url_to_fs(pat)
            hits = sorted(fs.glob(path)) if any(c in path for c in "*?[") else ([path] if fs.exists(path) else [])
            if not hits:
                raise FileNotFoundError(f"data.inputs: '{pat}' matches no file; check the URI and credentials")
            files.extend(fs.unstrip_protocol(h) for h in hits)
        else:
            files.extend(os.path.abspath(p) for p in expand_inputs(pat.removeprefix("file://")))
    return list(dict.fromkeys(files))


def _open(path: str):
    if "://" in path:
        import fsspec

        return fsspec.open(path, "rb").open()
    return open(path, "rb")


def _kind_of(path: str, head: bytes) -> str:
    name = path.lower()
    if name.endswith(".parquet") or name.endswith(".pq"):
        return "parquet"
    if name.endswith((".jsonl", ".jsonl.zst")):
        return "jsonl"  # even when its first record happens to be a (bad) JSON list
    if name.endswith((".json", ".json.zst")) or head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        return "json_array"
    return "jsonl"


def _raw_table(file_idx: int, lines: list[int], raws: list[bytes], pre: list[tuple[str, str]] | None = None) -> pa.Table:
    n = len(lines)
    pre = pre or [("", "")] * n
    return pa.table(
        {
            "file_idx": pa.array([file_idx] * n, pa.int32()),
            "line": pa.array(lines, pa.int64()),
            "raw": pa.array(raws, pa.binary()),
            "pre_reason": pa.array([p[0] for p in pre], pa.string()),
            "pre_detail": pa.array([p[1] for p in pre], pa.string()),
        }
    )


def _iter_file(path: str, file_idx: int) -> Iterator[pa.Table]:
    """Yield blocks of raw records (bytes) with 1-based line numbers (element / row numbers for JSON arrays
    and Parquet). Bytes, not text, so invalid UTF-8 is reported per line instead of failing the file."""
    import zstandard

    with _open(path) as fh:
        stream = zstandard.ZstdDecompressor().stream_reader(fh) if path.lower().endswith(".zst") else fh
        head = stream.peek(4096)[:4096] if hasattr(stream, "peek") else b""
        kind = _kind_of(path, head)
        if kind == "parquet":
            pf = pq.ParquetFile(fh)
            row = 0
            for batch in pf.iter_batches(batch_size=_READ_CHUNK):
                objs = batch.to_pylist()
                # a null column in Parquet means the field is absent, as in JSON
                raws = [json.dumps({k: v for k, v in o.items() if v is not None}, ensure_ascii=False).encode() for o in objs]
                yield _raw_table(file_idx, list(range(row + 1, row + 1 + len(objs))), raws)
                row += len(objs)
            return
        if kind == "json_array":
            data = stream.read()
            try:
                items = json.loads(data.decode("utf-8-sig"))
            except UnicodeDecodeError as exc:
                yield _raw_table(file_idx, [0], [data[:RAW_KEEP_CHARS]], [("invalid_utf8", f"file is not UTF-8 ({exc.reason} at byte {exc.start})")])
                return
            except json.JSONDecodeError as exc:
                yield _raw_table(file_idx, [exc.lineno], [data[:RAW_KEEP_CHARS]], [("malformed_json", f"file is not one JSON list ({exc.msg} at line {exc.lineno} column {exc.colno})")])
                return
            if not isinstance(items, list):
                items = [items]
            for start in range(0, len(items), _READ_CHUNK):
                chunk = items[start : start + _READ_CHUNK]
                raws = [json.dumps(o, ensure_ascii=False).encode() for o in chunk]
                yield _raw_table(file_idx, list(range(start + 1, start + 1 + len(chunk))), raws)
            return
        lines: list[int] = []
        raws: list[bytes] = []
        # zstd's stream reader has no line iteration of its own
        buffered = io.BufferedReader(stream, 1 << 20) if path.lower().endswith(".zst") else stream
        for n, line in enumerate(buffered, 1):
            line = line.rstrip(b"\r\n")
            if not line.strip():
                continue
            lines.append(n)
            raws.append(line)
            if len(lines) >= _READ_CHUNK:
                yield _raw_table(file_idx, lines, raws)
                lines, raws = [], []
        if lines:
            yield _raw_table(file_idx, lines, raws)


def _read_files(batch: dict[str, np.ndarray]) -> Iterator[pa.Table]:
    for path, idx in zip(batch["path"], batch["file_idx"]):
        yield from _iter_file(str(path), int(idx))


# ---------------------------------------------------------------------------------------------------------
# parse + validate (Ray tasks)

_PARSED_FIELDS = [
    ("ok", pa.bool_()),
    ("file_idx", pa.int32()),
    ("line", pa.int64()),
    ("sub", pa.int32()),
    ("reason", pa.string()),
    ("detail", pa.string()),
    ("raw", pa.string()),
    ("example_id", pa.string()),
    ("split", pa.string()),
    ("chash", pa.int64()),
    ("messages", pa.string()),
]


class _Parse:
    """Raw bytes -> one row per example (ok) or per bad record / bad answer (not ok, with reason)."""

    def __init__(self, fmt: str, system_prompt: str, max_chars: int, val_fraction: float, seed: int, stems: list[str]):
        self.fmt, self.system_prompt, self.max_chars = fmt, system_prompt, max_chars
        self.val_fraction, self.seed, self.stems = val_fraction, seed, stems

    def __call__(self, table: pa.Table) -> pa.Table:
        cols: dict[str, list] = {name: [] for name, _ in _PARSED_FIELDS}

        def add(ok, fidx, line, sub, reason="", detail="", raw="", ex: Example | None = None, split="", chash=0):
            for k, v in (("ok", ok), ("file_idx", fidx), ("line", line), ("sub", sub), ("reason", reason), ("detail", detail), ("raw", raw)):
                cols[k].append(v)
            cols["example_id"].append(ex.example_id if ex else "")
            cols["split"].append(split)
            cols["chash"].append(chash)
            cols["messages"].append(json.dumps(ex.messages, ensure_ascii=False) if ex else "")

        d = table.to_pydict()
        for fidx, line, raw, pre_r, pre_d in zip(d["file_idx"], d["line"], d["raw"], d["pre_reason"], d["pre_detail"]):
            short = raw[: RAW_KEEP_CHARS * 4].decode("utf-8", errors="replace")[:RAW_KEEP_CHARS]
            if pre_r:
                add(False, fidx, line, 0, pre_r, pre_d, short)
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                add(False, fidx, line, 0, "invalid_utf8", f"{exc.reason} at byte {exc.start}", short)
                continue
            try:
                obj = json.loads(text.lstrip("\ufeff"))
            except json.JSONDecodeError as exc:
                add(False, fidx, line, 0, "malformed_json", f"{exc.msg} at column {exc.colno}", short)
                continue
            try:
                results = to_examples(obj, self.fmt, self.system_prompt, f"{self.stems[fidx]}:{line}")
            except RecordError as err:
                add(False, fidx, line, 0, err.reason, err.detail, short)
                continue
            for sub, res in enumerate(results):
                if isinstance(res, RecordError):
                    add(False, fidx, line, sub, res.reason, res.detail, short)
                    continue
                chars = res.chars(self.system_prompt)
                if chars > self.max_chars:
                    add(False, fidx, line, sub, "too_long", f"{chars} characters > data.max_chars {self.max_chars}", short)
                    continue
                add(True, fidx, line, sub, ex=res, split=split_of(res.question, self.val_fraction, self.seed), chash=res.content_hash())
        return pa.table({name: pa.array(cols[name], typ) for name, typ in _PARSED_FIELDS})


# ---------------------------------------------------------------------------------------------------------
# template + tokenize + mask (Ray actors: the tokenizer is loaded once per actor)


def label_spans(text: str, messages: list[dict[str, str]], end_token: str) -> list[tuple[int, int]]:
    """Character spans of the learned text in a rendered conversation: each assistant answer plus the end
    token right after it. Messages are located in order, so text repeated in an earlier turn is skipped."""
    spans = []
    cursor = 0
    for m in messages:
        pos = text.find(m["content"], cursor)
        if pos < 0:
            raise ValueError(f"chat template changed a {m['role']} message; cannot locate it to build the label mask")
        end = pos + len(m["content"])
        cursor = end
        if m["role"] == "assistant":
            if end_token and text.startswith(end_token, end):
                end += len(end_token)
                cursor = end
            spans.append((pos, end))
    return spans


def tokenize_conversation(tok, messages: list[dict[str, str]], end_token: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one conversation; labels are -100 everywhere but the assistant answers and
    their end tokens. Tokenizes the whole rendered text at once (so ids match what the model sees at
    inference) and masks by character offsets."""
    ids, labels = _tokenize_many(tok, [messages], end_token)
    return ids[0], labels[0]


def _tokenize_many(tok, conversations: list[list[dict]], end_token: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    texts = [tok.apply_chat_template(m, tokenize=False) for m in conversations]
    # the Rust tokenizer directly: transformers' per-encoding conversion cost ~20% more and adds nothing here
    backend = tok.backend_tokenizer
    backend.no_truncation()
    backend.no_padding()
    encodings = backend.encode_batch(texts, add_special_tokens=False)
    out_ids, out_labels = [], []
    for text, msgs, enc in zip(texts, conversations, encodings):
        ids = np.asarray(enc.ids, dtype=np.int32)
        starts = np.fromiter((o[0] for o in enc.offsets), dtype=np.int64, count=len(ids))
        learn = np.zeros(len(ids), dtype=bool)
        for s, e in label_spans(text, msgs, end_token):
            learn |= (starts >= s) & (starts < e)
        out_ids.append(ids)
        out_labels.append(np.where(learn, ids, IGNORE_INDEX).astype(np.int32))
    return out_ids, out_labels


def _list_array(arrays: list[np.ndarray]) -> pa.Array:
    lens = np.fromiter((len(a) for a in arrays), dtype=np.int32, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lens, out=offsets[1:])
    values = np.concatenate(arrays).astype(np.int32) if arrays else np.zeros(0, np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int32()))


class _Tokenize:
    """Ray Data actor: render the chat template, tokenize, mask prompts, apply the overlong policy."""

    def __init__(self, tokenizer: str, seq_len: int, overlong: str, end_token: str):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # Ray already runs one actor per core
        from data_pipeline.tokenizer import load_tokenizer

        # by name, not by value: a pickled tokenizer would ride in the object store, which Ray warns
        # makes actor restarts fragile; the driver checked the same path loads.
        self.tok = load_tokenizer(tokenizer)
        self.seq_len, self.overlong, self.end_token = seq_len, overlong, end_token

    def __call__(self, table: pa.Table) -> pa.Table:
        d = table.to_pydict()
        n = table.num_rows
        ok_idx = [i for i in range(n) if d["ok"][i]]
        ids_all: list[np.ndarray] = [np.zeros(0, np.int32)] * n
        lab_all: list[np.ndarray] = [np.zeros(0, np.int32)] * n
        truncated = [False] * n
        if ok_idx:
            ids, labs = _tokenize_many(self.tok, [json.loads(d["messages"][i]) for i in ok_idx], self.end_token)
            for i, a, b in zip(ok_idx, ids, labs):
                if len(a) > self.seq_len:
                    if self.overlong == "reject":
                        self._reject(d, i, "overlong", f"{len(a)} tokens > data.seq_len {self.seq_len}")
                        continue
                    a, b = a[: self.seq_len], b[: self.seq_len]
                    if not (b != IGNORE_INDEX).any():
                        self._reject(d, i, "prompt_overlong", f"prompt fills all {self.seq_len} tokens")
                        continue
                    truncated[i] = True
                ids_all[i], lab_all[i] = a, b
        out = {name: pa.array(d[name], typ) for name, typ in _PARSED_FIELDS if name != "messages"}
        out["input_ids"] = _list_array(ids_all)
        out["labels"] = _list_array(lab_all)
        out["truncated"] = pa.array(truncated, pa.bool_())
        return pa.table(out)

    @staticmethod
    def _reject(d: dict, i: int, reason: str, detail: str) -> None:
        d["ok"][i] = False
        d["reason"][i] = reason
        d["detail"][i] = f"{d['example_id'][i]}: {detail}"
        d["raw"][i] = d["messages"][i][:RAW_KEEP_CHARS]


# ---------------------------------------------------------------------------------------------------------
# Ray session


def _short_ray_dir(out_dir: Path) -> Path:
    """Ray's temp dir inside the output folder when the path is short enough for AF_UNIX sockets."""
    d = (out_dir / ".ray").resolve()
    if len(str(d)) <= _AF_UNIX_BUDGET:
        return d
    tag = hashlib.sha1(str(d).encode()).hexdigest()[:8]
    return Path(tempfile.gettempdir()) / f"cbtray-{tag}"


def init_ray(address: str | None, temp_dir: Path | None = None, object_store_mb: int = 1024) -> tuple[bool, float]:
    """Start an embedded local Ray (no dashboard, quiet workers) or connect to `address` / $RAY_ADDRESS.

    Returns (started_here, seconds). A session that is already up (tests, notebooks) is reused as is.
    """
    import ray

    if ray.is_initialized():
        return False, 0.0
    # Ray 2.60 turns token auth on by default; the embedded session is local-only.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = address or os.environ.get("RAY_ADDRESS") or None
    t0 = time.perf_counter()
    if address:
        # ship this project's code to the cluster's workers; its dependencies must be installed there
        import cbt_llm
        import data_pipeline

        mods = [str(Path(m.__file__).parent) for m in (cbt_llm, data_pipeline)]
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, runtime_env={"py_modules": mods})
    else:
        kw: dict[str, Any] = {}
        if temp_dir is not None:
            temp_dir.mkdir(parents=True, exist_ok=True)
            kw["_temp_dir"] = str(temp_dir)
        ray.init(
            num_cpus=os.cpu_count() or 1,
            # Ray's default store is 30% of RAM, and a streaming read fills whatever it is given: a fixed
            # store keeps prepare's footprint independent of corpus size
            object_store_memory=object_store_mb * 2**20,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
            **kw,
        )
    return True, time.perf_counter() - t0


def _configure_ray_data() -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True  # determinism: the driver sees (file, line) order
    # Ray's default 128 MiB blocks hold a whole input file's parsed records at 25k records per file, and an
    # ordered stream releases a block only when the task that makes it ends: with them the driver saw its
    # first record after every record was parsed and tokenized, the whole corpus waiting in the object
    # store (spilled to disk past 1 GiB, with spill/restore workers of ~700 MiB). Small blocks keep the
    # stream flowing; what the driver sees, in order, is the same.
    ctx.target_max_block_size = _RAY_BLOCK_BYTES
    ctx.enable_progress_bars = False  # our own tqdm counts records; Ray's bars interleave badly in logs
    from ray.util.debug import log_once

    log_once("ray_data_progress_manager_disabled")  # marks Ray's "progress bars disabled" warning as shown
    for name in ("ray.data", "ray"):
        logging.getLogger(name).setLevel(logging.WARNING)


# ---------------------------------------------------------------------------------------------------------
# driver side: dedup, windows, packing, spool, shards


class _FirstSeen:
    """Exact-duplicate index: content hash -> where the kept (first) copy came from, (file_idx << 40) | line.

    16 bytes per kept example in two sorted NumPy arrays, where a dict of Python ints costs ~115 (84 for the
    dict and its value, measured, plus the key's int): at 5M examples 80 MB instead of ~575 MB. New entries go to a small dict first and are merged into the arrays
    every `chunk` entries (a linear merge, so the cost stays proportional to the examples added). An entry is
    never replaced, so a hash always answers with its first copy.
    """

    def __init__(self, chunk: int = 1 << 16):
        self.chunk = chunk
        self.keys = np.zeros(0, np.int64)
        self.vals = np.zeros(0, np.int64)
        self.recent: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.keys) + len(self.recent)

    def lookup_merged(self, hashes: np.ndarray) -> np.ndarray:
        """The first-copy location of each hash among the merged entries, -1 where absent (one batch at a time:
        a vectorised search instead of one per example)."""
        hashes = np.asarray(hashes, np.int64)
        found = np.full(len(hashes), -1, np.int64)
        if len(self.keys) and len(hashes):
            pos = np.minimum(np.searchsorted(self.keys, hashes), len(self.keys) - 1)
            hit = self.keys[pos] == hashes
            found[hit] = self.vals[pos[hit]]
        return found

    def get(self, h: int, merged: int = -1) -> int | None:
        """Where the first copy of h is; `merged` is lookup_merged's answer for h, when the caller has it."""
        if merged >= 0:
            return merged
        return self.recent.get(h)

    def add(self, h: int, where: int) -> None:
        self.recent[h] = where

    def merge_if_full(self) -> None:
        """Merge the recent entries into the sorted arrays once there are `chunk` of them; call it between
        batches only (lookup_merged answers for the arrays as they were when it ran)."""
        if len(self.recent) < self.chunk:
            return
        keys = np.fromiter(self.recent.keys(), np.int64, len(self.recent))
        vals = np.fromiter(self.recent.values(), np.int64, len(self.recent))
        order = np.argsort(keys)
        keys, vals = keys[order], vals[order]
        at = np.searchsorted(self.keys, keys)
        self.keys = np.insert(self.keys, at, keys)
        self.vals = np.insert(self.vals, at, vals)
        self.recent = {}


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


class _SplitPacker:
    """Collects one split's examples in windows, packs (or pads) each window, appends rows to a spool file."""

    def __init__(self, name: str, dc: DataConfig, pad_token_id: int, spool: Path):
        self.name, self.dc, self.pad = name, dc, pad_token_id
        self.spool_path = spool
        self.writer: pq.ParquetWriter | None = None
        self.ids: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.eids: list[str] = []
        self.examples = self.rows = self.tokens = self.label_tokens = 0
        self.pack_s = 0.0  # driver time spent choosing bins (prepare_metrics.json: pack_s)

    def add(self, ids: np.ndarray, labels: np.ndarray, eid: str) -> None:
        self.ids.append(ids)
        self.labels.append(labels)
        self.eids.append(eid)
        if len(self.ids) >= self.dc.pack_window:
            self.flush()

    def flush(self) -> None:
        if not self.ids:
            return
        if self.dc.packing:
            t0 = time.perf_counter()
            bins = pack([len(a) for a in self.ids], self.dc.seq_len, self.dc.packer)
            self.pack_s += time.perf_counter() - t0
            rows = build_packed_rows(self.ids, self.labels, self.eids, bins)
        else:
            rows = build_padded_rows(self.ids, self.labels, self.eids, self.dc.seq_len, self.pad)
        if self.writer is None:
            self.writer = pq.ParquetWriter(str(self.spool_path), ROW_SCHEMA, compression="none")
        self.writer.write_table(_rows_table(rows))
        self.examples += len(self.ids)
        self.rows += rows.num_rows
        self.tokens += rows.real_tokens
        self.label_tokens += rows.label_tokens
        self.ids, self.labels, self.eids = [], [], []

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()


def _shard_sizes(rows: int, shards: int) -> list[int]:
    """Rows per shard, differing by at most one; the extra rows go to the first shards, so with rank r
    reading shards r, r+W, r+2W, ... ranks differ by at most one row."""
    base, extra = divmod(rows, shards)
    return [base + (1 if i < extra else 0) for i in range(shards)]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_shards(spool: Path, out: Path, split: str, num_shards: int, pad_token_id: int, packing: bool) -> list[dict]:
    """Cut the spool into num_shards contiguous shards; returns their manifest entries.

    Streams: the spool is read and each shard written one row group (_SHARD_ROW_GROUP rows) at a time, so
    memory is one row group whatever the split's size (the validation split is one shard of 2% of the
    corpus). Each row group is written as its own table of exactly that many rows, which gives the same
    bytes as one write_table(shard, row_group_size=_SHARD_ROW_GROUP).
    """
    (out / split).mkdir(parents=True, exist_ok=True)
    # pre_buffer off: with it (pyarrow's default) iter_batches reads the whole spool into memory before the
    # first batch, ~800 MB for a 750 MB spool (1M records make ~2 GB)
    spool_file = pq.ParquetFile(str(spool), pre_buffer=False) if spool.exists() else None
    total = spool_file.metadata.num_rows if spool_file else 0
    # the spool's schema as read back (lists of "element"), not ROW_SCHEMA ("item"): shards have always
    # carried the read-back one, and it is part of their bytes
    schema = spool_file.schema_arrow if spool_file else ROW_SCHEMA
    sizes = _shard_sizes(total, num_shards)
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
        rel = f"{split}/part-{k:05d}-of-{num_shards:05d}.parquet"
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
                    pads = int(((id_values == pad_token_id) & (lab_np == IGNORE_INDEX)).sum())
                stats["rows"] += table.num_rows
                stats["examples"] += int(pa.compute.sum(table.column("num_examples")).as_py() or 0)
                stats["tokens"] += int(len(id_values) - pads)
                stats["label_tokens"] += int((lab_np != IGNORE_INDEX).sum())
        entries.append({"path": rel, **stats, "sha256": _sha256(out / rel)})
    return entries


def _data_config_hash(dc: DataConfig) -> str:
    """Hash of everything in data: that changes the shards (out_dir is where they go and the object store size
    is how much memory Ray gets, not what the shards hold)."""
    obj = dc.model_dump(mode="json")
    obj.pop("out_dir", None)
    obj.pop("ray_object_store_mb", None)
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def _swap_into_place(staging: Path, out: Path) -> None:
    """Move staging's train/, validation/, rejects/ into out, then manifest.json last (the commit point)."""
    (out / "manifest.json").unlink(missing_ok=True)  # readers now see "no data" rather than a mix
    old = staging / "_old"
    old.mkdir(exist_ok=True)
    for name in ("train", "validation", "rejects"):
        if (out / name).exists():
            os.replace(out / name, old / name)
        if (staging / name).exists():
            os.replace(staging / name, out / name)
    os.replace(staging / "manifest.json", out / "manifest.json")


def run_prepare(cfg: Config, strict: bool = False, ray_address: str | None = None) -> dict:
    """`cbt-llm prepare`: see the module docstring. Returns the manifest dict.

    Raises FileNotFoundError / ConfigError before starting Ray when inputs, tokenizer or sizes are wrong,
    and PrepareError on the first bad record under `strict`.
    """
    from tqdm import tqdm

    from data_pipeline.tokenizer import IM_END, load_tokenizer, tokenizer_hash

    dc = cfg.data
    t_start = time.perf_counter()
    # --- fail early, before any expensive work
    if dc.num_shards and dc.num_shards % dc.world_size:
        raise ConfigError(
            f"data.num_shards={dc.num_shards} is not a multiple of data.world_size={dc.world_size}; "
            f"use {dc.world_size * max(1, dc.num_shards // dc.world_size)} or 0 (automatic)"
        )
    files = resolve_inputs(dc.inputs)
    tok = load_tokenizer(dc.tokenizer)
    tok_hash = tokenizer_hash(tok)
    end_token = IM_END if IM_END in tok.get_vocab() else (tok.eos_token or "")
    pad_id = int(tok.pad_token_id)

    out = Path(dc.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "rejects").mkdir(parents=True)
    ray_dir = _short_ray_dir(out)

    started, ray_s = init_ray(ray_address, ray_dir, dc.ray_object_store_mb)
    t_ray_ready = time.perf_counter()
    import ray

    try:
        _configure_ray_data()
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        stems = [Path(f).name for f in files]
        ds = ray.data.from_items([{"path": f, "file_idx": i} for i, f in enumerate(files)], override_num_blocks=len(files))
        ds = ds.map_batches(_read_files, batch_size=1, batch_format="numpy")
        # an instance, not a class: Ray runs it as tasks, fused with the file reads
        ds = ds.map_batches(
            _Parse(dc.format, dc.system_prompt, dc.max_chars, dc.val_fraction, dc.seed, stems),
            batch_size=512,
            batch_format="pyarrow",
        )
        with warnings.catch_warnings():  # max_restarts has no named parameter yet in Ray 2.60
            warnings.simplefilter("ignore", DeprecationWarning)
            # Ray fuses the read and parse steps into these actors, so the pool may use every core
            ds = ds.map_batches(
                _Tokenize,
                fn_constructor_args=(dc.tokenizer, dc.seq_len, dc.overlong, end_token),
                batch_size=256,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cpus),
                # a restarted actor could not recover its fused constructor args anyway (ray-project/ray#53727),
                # and a crash should fail the run loudly rather than retry forever
                max_restarts=0,
            )

        packers = {s: _SplitPacker(s, dc, pad_id, staging / f"spool-{s}.parquet") for s in SPLITS}
        seen = _FirstSeen()  # content hash -> (file_idx << 40 | line) of the copy that was kept
        counts: dict[str, Any] = {"read": 0, "kept": 0, "truncated": 0}
        rejected: dict[str, int] = {}
        rejects_fh = open(staging / "rejects" / "rejects-00000.jsonl", "w", encoding="utf-8", newline="\n")
        bar = tqdm(desc="prepare", unit="rec", mininterval=1.0, smoothing=0.1)
        t_first = None

        def reject(fidx: int, line: int, sub: int, reason: str, detail: str, raw: str) -> None:
            rejected[reason] = rejected.get(reason, 0) + 1
            rec = {"source_file": files[fidx], "line": int(line), "sub": int(sub), "reason": reason, "detail": detail, "raw": raw}
            rejects_fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            if strict:
                where = f"{files[fidx]}:{line}" + (f" (answer {sub})" if sub else "")
                raise PrepareError(f"--strict: bad record at {where}: {reason}: {detail}")

        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
                if t_first is None:
                    t_first = time.perf_counter()
                d = batch.select(["ok", "file_idx", "line", "sub", "reason", "detail", "raw", "example_id", "split", "chash", "truncated"]).to_pydict()
                ids_col = batch.column("input_ids").combine_chunks()
                lab_col = batch.column("labels").combine_chunks()
                ids_vals, lab_vals = ids_col.values.to_numpy(), lab_col.values.to_numpy()
                offs = ids_col.offsets.to_numpy()
                merged = seen.lookup_merged(batch.column("chash").to_numpy(zero_copy_only=False))
                new_records = 0
                for i in range(batch.num_rows):
                    fidx, line, sub = d["file_idx"][i], d["line"][i], d["sub"][i]
                    if sub == 0:
                        new_records += 1
                    if not d["ok"][i]:
                        reject(fidx, line, sub, d["reason"][i], d["detail"][i], d["raw"][i])
                        continue
                    h = d["chash"][i]
                    first = seen.get(h, int(merged[i]))
                    if first is not None:
                        reject(fidx, line, sub, "duplicate", f"{d['example_id'][i]}: same conversation as {files[first >> 40]}:{first & ((1 << 40) - 1)}", "")
                        continue
                    seen.add(h, (fidx << 40) | line)
                    counts["kept"] += 1
                    counts["truncated"] += int(d["truncated"][i])
                    s, e = offs[i], offs[i + 1]
                    # copies, not views: a view keeps the whole batch alive until its window is packed, and
                    # the validation window (2% of examples) would pin every batch it has seen
                    packers[d["split"][i]].add(ids_vals[s:e].copy(), lab_vals[s:e].copy(), d["example_id"][i])
                seen.merge_if_full()
                counts["read"] += new_records
                bar.update(new_records)
                bar.set_postfix(kept=counts["kept"], rejected=sum(rejected.values()), refresh=False)
        finally:
            bar.close()
            rejects_fh.close()
        for p in packers.values():
            p.close()
        t_stream = time.perf_counter()

        if packers["train"].rows == 0:
            raise PrepareError(f"no training rows: {counts['read']} records read, {sum(rejected.values())} rejected; see {out}/rejects/ after fixing the input")
        train_rows = packers["train"].rows
        if train_rows < dc.world_size:
            raise PrepareError(f"only {train_rows} training rows for data.world_size={dc.world_size}: every rank needs at least one; add data or lower world_size")
        num_shards = dc.num_shards or dc.world_size * max(1, -(-train_rows // (dc.world_size * _ROWS_PER_SHARD)))
        if num_shards > train_rows:  # never write empty shards
            asked, num_shards = num_shards, dc.world_size * (train_rows // dc.world_size)
            print(f"note: data.num_shards={asked} > {train_rows} train rows; writing {num_shards} shards", flush=True)
        shards = {"train": _write_shards(packers["train"].spool_path, staging, "train", num_shards, pad_id, dc.packing)}
        shards["validation"] = (
            _write_shards(packers["validation"].spool_path, staging, "validation", 1, pad_id, dc.packing) if packers["validation"].rows else []
        )
        for p in packers.values():
            p.spool_path.unlink(missing_ok=True)

        rank_rows = [sum(e["rows"] for e in shards["train"][r :: dc.world_size]) for r in range(dc.world_size)]
        eff = {s: round(packing_efficiency(packers[s].tokens, packers[s].rows, dc.seq_len), 6) for s in SPLITS}
        manifest = {
            "schema_version": MANIFEST_SCHEMA_VERSION,
            "seq_len": dc.seq_len,
            "packing": dc.packing,
            "packer": dc.packer if dc.packing else None,
            "pad_token_id": pad_id,
            "tokenizer": {"name_or_path": dc.tokenizer, "hash": tok_hash},
            "config_hash": _data_config_hash(dc),
            "system_prompt": dc.system_prompt,
            "format": dc.format,
            "inputs": [{"path": f, "bytes": os.path.getsize(f) if "://" not in f else None} for f in files],
            "counts": {
                "read": counts["read"],
                "kept": counts["kept"],
                "rejected": dict(sorted(rejected.items())),
                "rejected_total": sum(rejected.values()),
                "truncated": counts["truncated"],
                "examples": {s: packers[s].examples for s in SPLITS},
                "rows": {s: packers[s].rows for s in SPLITS},
                "tokens": {s: packers[s].tokens for s in SPLITS},
                "label_tokens": {s: packers[s].label_tokens for s in SPLITS},
            },
            "packing_efficiency": eff,
            "world_size": dc.world_size,
            # rank r reads train shards r, r+W, r+2W, ...; rows per rank differ by at most one
            "rows_per_rank": rank_rows,
            "rows_uneven": train_rows % dc.world_size,
            "splits": {s: {"shards": shards[s]} for s in SPLITS},
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        _swap_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if started:
            ray.shutdown()
            shutil.rmtree(ray_dir, ignore_errors=True)

    t_end = time.perf_counter()
    stream_s = max(1e-9, t_stream - t_ray_ready)  # processing only; Ray start-up is reported on its own
    total_tokens = sum(manifest["counts"]["tokens"].values())
    metrics = {
        "records_read": counts["read"],
        "examples_kept": counts["kept"],
        "rejected": manifest["counts"]["rejected_total"],
        **{f"rejected.{k}": v for k, v in sorted(rejected.items())},
        "truncated": counts["truncated"],
        "rows.train": manifest["counts"]["rows"]["train"],
        "rows.validation": manifest["counts"]["rows"]["validation"],
        "train_shards": len(shards["train"]),
        "rows_uneven(train % world_size)": manifest["rows_uneven"],
        "tokens": total_tokens,
        "label_tokens": sum(manifest["counts"]["label_tokens"].values()),
        "packing_efficiency.train": eff["train"],
        "packing_efficiency.validation": eff["validation"],
        "records/s": counts["read"] / stream_s,
        "tokens/s": total_tokens / stream_s,
        "ray_startup_s": round(ray_s, 3),
        "pack_s": round(sum(p.pack_s for p in packers.values()), 3),
        "seconds": round(t_end - t_start, 3),
        "out_dir": str(out),
    }
    write_metrics(out / "prepare_metrics.json", metrics)
    print_summary("prepare", metrics)
    if manifest["rows_uneven"]:
        print(
            f"note: {train_rows} train rows do not divide by world_size {dc.world_size}; rows per rank {rank_rows} "
            "(nothing dropped; the trainer evens them out)",
            flush=True,
        )
    return manifest


# ---------------------------------------------------------------------------------------------------------
# reading the output (training calls this)


def load_manifest(out_dir: str | Path, tokenizer=None, verify_checksums: bool = False) -> dict:
    """Read and check out_dir/manifest.json: schema version, every shard present with its size; with
    `tokenizer` (a tokenizer object or a path/id), refuse when its content hash differs from the one the
    shards were made with. `verify_checksums` re-hashes every shard (slow on big data).

    Raises ManifestError (a ConfigError: one line naming the problem and the fix).
    """
    out = Path(out_dir)
    path = out / "manifest.json"
    if not path.is_file():
        raise ManifestError(f"no manifest.json in '{out}'; run `cbt-llm prepare` first (or fix data.out_dir)")
    try:
        man = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc.msg}); re-run `cbt-llm prepare`") from None
    for key in ("schema_version", "seq_len", "pad_token_id", "tokenizer", "splits", "counts"):
        if key not in man:
            raise ManifestError(f"{path}: missing '{key}'; re-run `cbt-llm prepare`")
    if man["schema_version"] != MANIFEST_SCHEMA_VERSION:
        raise ManifestError(
            f"{path}: schema_version {man['schema_version']}, this code reads {MANIFEST_SCHEMA_VERSION}; re-run `cbt-llm prepare`"
        )
    for split, info in man["splits"].items():
        for sh in info.get("shards", []):
            p = out / sh["path"]
            if not p.is_file():
                raise ManifestError(f"{path}: shard '{sh['path']}' is missing; re-run `cbt-llm prepare`")
            if verify_checksums and _sha256(p) != sh["sha256"]:
                raise ManifestError(f"shard '{p}' does not match its sha256 in the manifest (changed or corrupt); re-run `cbt-llm prepare`")
    if tokenizer is not None:
        from data_pipeline.tokenizer import load_tokenizer, tokenizer_hash

        tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
        got = tokenizer_hash(tok)
        want = man["tokenizer"]["hash"]
        if got != want:
            raise ManifestError(
                f"tokenizer mismatch: shards in '{out}' were made with '{man['tokenizer']['name_or_path']}' (hash {want}), "
                f"the given tokenizer has hash {got}; use that tokenizer or re-run `cbt-llm prepare` with this one"
            )
        if tok.pad_token_id is not None and int(tok.pad_token_id) != int(man["pad_token_id"]):
            raise ManifestError(f"pad_token_id {tok.pad_token_id} differs from the manifest's {man['pad_token_id']}; re-run `cbt-llm prepare`")
    return man
