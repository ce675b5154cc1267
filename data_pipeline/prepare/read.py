"""Read inputs: globs and URIs -> files -> blocks of raw records (bytes) with their line numbers (Ray tasks)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.io import expand_inputs, is_zstd, numbered_lines, open_binary_read
from data_pipeline.prepare.parse import RAW_KEEP_CHARS

_READ_LINES = 2048  # records per block out of the file reader (data.ray_read_lines)


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


def _kind_of(path: str, head: bytes) -> str:
    name = path.lower()
    if name.endswith(".parquet") or name.endswith(".pq"):
        return "parquet"
    if name.endswith((".jsonl", ".jsonl.zst")):
        return "jsonl"  # even when its first record happens to be a (bad) JSON list
    if name.endswith((".json", ".json.zst")) or head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        return "json_array"
    return "jsonl"


def _raw_table(
    file_idx: int, lines: list[int], raws: list[bytes], pre: list[tuple[str, str]] | None = None
) -> pa.Table:
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


def _parquet_blocks(fh, file_idx: int, lines: int) -> Iterator[pa.Table]:
    pf = pq.ParquetFile(fh)
    row = 0
    for batch in pf.iter_batches(batch_size=lines):
        objs = batch.to_pylist()
        # a null column in Parquet means the field is absent, as in JSON
        raws = [json.dumps({k: v for k, v in o.items() if v is not None}, ensure_ascii=False).encode() for o in objs]
        yield _raw_table(file_idx, list(range(row + 1, row + 1 + len(objs))), raws)
        row += len(objs)


def _json_array_blocks(data: bytes, file_idx: int, lines: int) -> Iterator[pa.Table]:
    try:
        items = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        yield _raw_table(
            file_idx,
            [0],
            [data[:RAW_KEEP_CHARS]],
            [("invalid_utf8", f"file is not UTF-8 ({exc.reason} at byte {exc.start})")],
        )
        return
    except json.JSONDecodeError as exc:
        yield _raw_table(
            file_idx,
            [exc.lineno],
            [data[:RAW_KEEP_CHARS]],
            [("malformed_json", f"file is not one JSON list ({exc.msg} at line {exc.lineno} column {exc.colno})")],
        )
        return
    if not isinstance(items, list):
        items = [items]
    for start in range(0, len(items), lines):
        chunk = items[start : start + lines]
        raws = [json.dumps(o, ensure_ascii=False).encode() for o in chunk]
        yield _raw_table(file_idx, list(range(start + 1, start + 1 + len(chunk))), raws)


def iter_file(path: str, file_idx: int, block_lines: int = _READ_LINES) -> Iterator[pa.Table]:
    """Yield blocks of raw records (bytes) with 1-based line numbers (element / row numbers for JSON arrays
    and Parquet). Bytes, not text, so invalid UTF-8 is reported per line instead of failing the file."""
    with open_binary_read(path) as fh:
        # the kind is sniffed from the first bytes of uncompressed files only; a .zst goes by its name
        head = fh.peek(4096)[:4096] if not is_zstd(path) and hasattr(fh, "peek") else b""
        kind = _kind_of(path, head)
        if kind == "parquet":
            yield from _parquet_blocks(fh, file_idx, block_lines)
        elif kind == "json_array":
            yield from _json_array_blocks(fh.read(), file_idx, block_lines)
        else:
            lines: list[int] = []
            raws: list[bytes] = []
            for n, line in numbered_lines(fh):
                lines.append(n)
                raws.append(line)
                if len(lines) >= block_lines:
                    yield _raw_table(file_idx, lines, raws)
                    lines, raws = [], []
            if lines:
                yield _raw_table(file_idx, lines, raws)


def read_files(batch: dict[str, np.ndarray], lines: int = _READ_LINES) -> Iterator[pa.Table]:
    """Ray Data map_batches function: one row {path, file_idx} in, that file's raw record blocks of `lines`
    records out."""
    for path, idx in zip(batch["path"], batch["file_idx"]):
        yield from iter_file(str(path), int(idx), lines)
