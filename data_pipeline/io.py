"""Small file helpers shared by the corpus stages: globs, the one (zstd) line reader, JSON lines, local paths."""

from __future__ import annotations

import glob
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

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


def is_zstd(path: str | Path) -> bool:
    return str(path).lower().endswith(".zst")


def open_binary_read(path: str | Path) -> IO[bytes]:
    """Open a local file or a URI (s3://, gs://, hdfs://, ... through fsspec) for reading bytes. A name ending
    in .zst is decompressed on the fly, behind a 1 MiB buffer: zstd's stream reader has no line iteration of
    its own, and the buffer gives it one."""
    path = str(path)
    if "://" in path:
        import fsspec

        raw = fsspec.open(path, "rb").open()
    else:
        raw = open(path, "rb")
    if is_zstd(path):
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True), 1 << 20)
    return raw


def numbered_lines(fh: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line without its newline) for every non-blank line of a binary stream. Bytes, not
    text, so invalid UTF-8 can be reported per line."""
    for n, line in enumerate(fh, 1):
        line = line.rstrip(b"\r\n")
        if line.strip():
            yield n, line


def iter_lines(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """numbered_lines of a (zstd) file: the one line reader of the corpus stages (prepare reads through it too)."""
    with open_binary_read(path) as fh:
        yield from numbered_lines(fh)


def dumps(obj: dict) -> str:
    """The one JSON encoding of a record: compact, UTF-8 Chinese, stable key order as given."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
