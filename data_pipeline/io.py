"""Small file helpers shared by the corpus stages: (zstd) JSONL reading and writing, globs, atomic writes."""

from __future__ import annotations

import glob
import io
import json
import os
from pathlib import Path
from typing import IO, Iterator

import zstandard


def expand_inputs(patterns: str | list[str]) -> list[str]:
    """Expand local globs to a sorted, de-duplicated file list. Raises FileNotFoundError naming the pattern."""
    if isinstance(patterns, str):
        patterns = [patterns]
    files: list[str] = []
    for pat in patterns:
        hits = sorted(glob.glob(os.path.expanduser(pat), recursive=True))
        hits = [h for h in hits if os.path.isfile(h)]
        if not hits:
            raise FileNotFoundError(f"input '{pat}' matches no file; check the path or glob")
        files.extend(hits)
    return list(dict.fromkeys(files))


def open_text_write(path: str | Path, level: int = 3) -> IO[str]:
    """Open a text file for writing; a name ending in .zst is zstd-compressed."""
    path = str(path)
    if path.endswith(".zst"):
        raw = open(path, "wb")
        stream = zstandard.ZstdCompressor(level=level).stream_writer(raw, closefd=True)
        return io.TextIOWrapper(stream, encoding="utf-8", newline="\n")
    return open(path, "w", encoding="utf-8", newline="\n")


def open_binary_read(path: str | Path) -> IO[bytes]:
    path = str(path)
    raw = open(path, "rb")
    if path.endswith(".zst"):
        return zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
    return raw


def iter_lines(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """Yield (1-based line number, raw line bytes without newline). Bytes, so invalid UTF-8 can be reported."""
    with open_binary_read(path) as fh:
        buffered = io.BufferedReader(fh, buffer_size=1 << 20) if str(path).endswith(".zst") else fh
        for n, line in enumerate(buffered, 1):
            line = line.rstrip(b"\r\n")
            if line.strip():
                yield n, line


def iter_jsonl(path: str | Path) -> Iterator[dict]:
    """Yield parsed objects from a (zstd) JSONL file; raises on a bad line (use iter_lines to tolerate them)."""
    for _, line in iter_lines(path):
        yield json.loads(line)


def dumps(obj: dict) -> str:
    """The one JSON encoding of a record: compact, UTF-8 Chinese, stable key order as given."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
