"""Read inputs: globs and URIs -> files -> blocks of raw records (bytes) with their line numbers (Ray tasks).

A file that cannot be read to its end as what it claims to be is damaged: unreadable, a zstd stream cut off
inside a frame or failing its content checksum, a JSONL file whose last line stops without a newline in the
middle of a record, a Parquet file pyarrow cannot read, or a synth shard that differs from what its folder's
synth_summary.json recorded (size, record count, SHA-256 of the content). The reader does not raise for it
(a Ray task's exception reaches the driver as a traceback): the file's blocks end with one row whose
pre_reason is INPUT_ERROR, its detail the reason and its raw a JSON of how far the read got, and the driver
stops or quarantines the file (data.on_input_error). The checks ride along the one read the pipeline makes
anyway (the content hash only where a summary records one), so clean input costs next to nothing, and they
work wherever the file is read, local or through fsspec.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.io import DamagedFileError, InputStream, expand_inputs, is_zstd, open_binary_read

_READ_LINES = 2048  # records per block out of the file reader (data.ray_read_lines)
INPUT_ERROR = "input_error"  # pre_reason of the row a damaged file's blocks end with (never a record reject)
SYNTH_SUMMARY = "synth_summary.json"  # data_pipeline.synth.template.SUMMARY_NAME: what synth wrote, per file


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


class _Mismatch(Exception):
    """The file read to its end but is not what it should be (a check of the reader's own)."""


def _json_array_blocks(data: bytes, file_idx: int, lines: int) -> Iterator[pa.Table]:
    """A JSON list's elements; a list that does not parse is a damaged file, since every record in it is lost
    (a list cut short by an interrupted copy reads as one that never closes)."""
    try:
        items = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise _Mismatch(f"is not UTF-8 ({exc.reason} at byte {exc.start}); every record in it would be lost") from None
    except json.JSONDecodeError as exc:
        raise _Mismatch(
            f"is not one whole JSON list ({exc.msg} at line {exc.lineno} column {exc.colno} of {len(data):,} bytes): "
            "cut short or damaged"
        ) from None
    if not isinstance(items, list):
        items = [items]
    for start in range(0, len(items), lines):
        chunk = items[start : start + lines]
        raws = [json.dumps(o, ensure_ascii=False).encode() for o in chunk]
        yield _raw_table(file_idx, list(range(start + 1, start + 1 + len(chunk))), raws)


def _jsonl_blocks(fh, file_idx: int, lines: int, progress: dict) -> Iterator[pa.Table]:
    nums: list[int] = []
    raws: list[bytes] = []
    line, n, records = b"", 0, 0
    try:
        for n, line in enumerate(fh, 1):
            rec = line.rstrip(b"\r\n")
            if rec.strip():
                nums.append(n)
                raws.append(rec)
                if len(nums) >= lines:
                    records += len(nums)
                    yield _raw_table(file_idx, nums, raws)
                    nums, raws = [], []
    finally:  # how far the read got, also when it stops at damage
        progress["lines"], progress["records"] = n, records + len(nums)
    if nums:
        yield _raw_table(file_idx, nums, raws)
    if line.strip() and not line.endswith(b"\n"):
        try:  # a last line without a newline is fine when it is a whole record
            json.loads(line)
        except ValueError:
            raise _Mismatch(
                f"the last line ({n}) stops without a newline in the middle of a record (file cut short)"
            ) from None


def _damage_table(file_idx: int, reason: str, progress: dict, stream: InputStream | None, size=None) -> pa.Table:
    how = {
        "lines": progress["lines"],
        "bytes_read": stream.file_bytes if stream is not None else None,
        "bytes": stream.size if stream is not None else size,
    }
    reason = " ".join(reason.split())  # one line, whatever the library said
    return _raw_table(file_idx, [progress["lines"]], [json.dumps(how).encode()], [(INPUT_ERROR, reason)])


def _parquet_file(path: str, file_idx: int, block_lines: int, progress: dict) -> Iterator[pa.Table]:
    """A Parquet input, read through a seekable handle (pyarrow reads its footer first)."""
    with open_binary_read(path) as fh:
        for t in _parquet_blocks(fh, file_idx, block_lines):
            progress["lines"] += t.num_rows
            yield t


def iter_file(
    path: str, file_idx: int, block_lines: int = _READ_LINES, expect: dict | None = None
) -> Iterator[pa.Table]:
    """Yield blocks of raw records (bytes) with 1-based line numbers (element / row numbers for JSON arrays
    and Parquet). Bytes, not text, so invalid UTF-8 is reported per line instead of failing the file.

    `expect` ({records, content_sha256} from synth_summary.json, or None) is checked at the end of the file.
    A damaged file (module docstring) ends with one INPUT_ERROR row instead of raising."""
    progress = {"lines": 0, "records": 0}
    stream = None
    want_sha = (expect or {}).get("content_sha256") or ""
    try:
        if _kind_of(path, b"") == "parquet":  # by its name
            yield from _parquet_file(path, file_idx, block_lines, progress)
            return
        stream = InputStream(path, hash_content=bool(want_sha))
        fh = stream.fh
        # the kind is sniffed from the first bytes of uncompressed files only; a .zst goes by its name
        head = fh.peek(4096)[:4096] if not is_zstd(path) else b""
        kind = _kind_of(path, head)
        if kind == "json_array":
            yield from _json_array_blocks(fh.read(), file_idx, block_lines)
            return
        yield from _jsonl_blocks(fh, file_idx, block_lines, progress)
        if expect:
            want = expect.get("records")
            if want is not None and progress["records"] != want:
                raise _Mismatch(
                    f"holds {progress['records']:,} records, {SYNTH_SUMMARY} says {want:,} (file cut short or changed)"
                )
            if want_sha and stream.content_sha256() != want_sha:
                raise _Mismatch(
                    f"content differs from the SHA-256 in {SYNTH_SUMMARY} ({want_sha[:12]}...): changed or corrupt"
                )
    except (_Mismatch, DamagedFileError) as exc:
        yield _damage_table(file_idx, str(exc), progress, stream)
    except Exception as exc:  # anything else reading this one file (OSError, pyarrow, fsspec): about the file
        size = os.path.getsize(path) if stream is None and "://" not in path and os.path.isfile(path) else None
        yield _damage_table(file_idx, f"cannot be read: {type(exc).__name__}: {exc}", progress, stream, size)
    finally:
        if stream is not None:
            stream.close()


def read_files(batch: dict[str, np.ndarray], lines: int = _READ_LINES) -> Iterator[pa.Table]:
    """Ray Data map_batches function: one row {path, file_idx, records, content_sha256} in (records -1 and an
    empty hash when there is nothing to check), that file's raw record blocks of `lines` records out."""
    for path, idx, records, sha in zip(batch["path"], batch["file_idx"], batch["records"], batch["content_sha256"]):
        records, sha = int(records), str(sha)
        expect = {"records": records if records >= 0 else None, "content_sha256": sha} if records >= 0 or sha else None
        yield from iter_file(str(path), int(idx), lines, expect)


def damage_of(table: pa.Table) -> dict | None:
    """The damage an INPUT_ERROR row of a raw block records ({reason, lines_read, bytes_read, bytes}), else None."""
    pre = table.column("pre_reason").to_pylist()
    if INPUT_ERROR not in pre:
        return None
    i = pre.index(INPUT_ERROR)
    return damage_record(table.column("pre_detail")[i].as_py(), table.column("raw")[i].as_py())


def damage_record(reason: str, raw: bytes | str) -> dict:
    how = json.loads(raw)
    return {"reason": reason, "lines_read": how["lines"], "bytes_read": how["bytes_read"], "bytes": how["bytes"]}


def check_file(path: str, expect: dict | None) -> dict | None:
    """Read a whole file as the pipeline would and return its damage (damage_of), or None when it is whole.
    For quarantine: finds every damaged file in one pass, records discarded."""
    for table in iter_file(path, 0, _READ_LINES, expect):
        if (dmg := damage_of(table)) is not None:
            return dmg
    return None


def synth_expectations(files: list[str]) -> dict[str, dict]:
    """{path: {records, bytes, content_sha256}} for every input a synth_summary.json beside it lists (synth's
    record of each shard it wrote: size, records or sessions, SHA-256 of the uncompressed content). Files
    without one are not checked against anything. Raises nothing: an unreadable summary is noted and skipped."""
    by_dir: dict[str, list[str]] = {}
    for f in files:
        by_dir.setdefault(f.rsplit("/", 1)[0] if "://" in f else str(Path(f).parent), []).append(f)
    out: dict[str, dict] = {}
    for folder, members in by_dir.items():
        summary_path = f"{folder}/{SYNTH_SUMMARY}"
        try:
            if "://" in folder:
                import fsspec

                fs, where = fsspec.core.url_to_fs(summary_path)
                if not fs.exists(where):
                    continue
                summary = json.loads(fs.cat_file(where))
            else:
                if not os.path.isfile(summary_path):
                    continue
                summary = json.loads(Path(summary_path).read_bytes())
            listed = {f["file"]: f for f in summary.get("files", [])}
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            print(f"note: {summary_path} is unreadable ({exc}); its files are read unchecked", flush=True)
            continue
        for f in members:
            entry = listed.get(f.rsplit("/", 1)[-1])
            if entry is not None and isinstance(entry.get("content_sha256"), str):
                records = entry.get("records", entry.get("sessions"))
                out[f] = {"records": records, "bytes": entry.get("bytes"), "content_sha256": entry["content_sha256"]}
    return out


def size_damage(files: list[str], expect: dict[str, dict]) -> dict[str, dict]:
    """{path: damage} for the listed files whose size differs from synth_summary.json's (a stat each, on the
    driver, before any reading: a cut or grown file fails here in no time)."""
    out = {}
    for f in files:
        want = expect.get(f, {}).get("bytes")
        if want is None:
            continue
        if "://" in f:
            import fsspec

            fs, where = fsspec.core.url_to_fs(f)
            size = fs.size(where)
        else:
            size = os.path.getsize(f)
        if size is not None and size != want:
            out[f] = {
                "reason": f"is {size:,} bytes, {SYNTH_SUMMARY} says {want:,} (file cut short or changed)",
                "lines_read": 0,
                "bytes_read": 0,
                "bytes": size,
            }
    return out
