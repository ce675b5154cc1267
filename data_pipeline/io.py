"""Small file helpers shared by the corpus stages: globs, the one (zstd) line reader, JSON lines, local paths."""

from __future__ import annotations

import glob
import hashlib
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


class DamagedFileError(OSError):
    """A file that ends or decodes wrong for what it claims to be: a zstd stream cut off mid-frame, a frame
    whose content checksum does not match, bytes after the last frame that are no frame. The message says
    what, and how far the read got in the file's own bytes."""


_ZSTD_IN = 1 << 17  # compressed bytes fed at a time: at ~20x, a few MiB out


class _Counted(io.RawIOBase):
    """A raw stream that counts the bytes read through it (how far a read got, for error messages) and, when
    asked, hashes them."""

    def __init__(self, raw: IO[bytes], sha256: bool = False):
        self.raw, self.count = raw, 0
        self.sha = hashlib.sha256() if sha256 else None

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.raw.readinto(b)
        if n:
            self.count += n
            if self.sha is not None:
                self.sha.update(memoryview(b)[:n])
        return n or 0

    def close(self) -> None:
        if not self.closed:
            self.raw.close()
        super().close()


class _ZstdFrames(io.RawIOBase):
    """zstd decompression that knows where frames end: every frame is decoded to its end (and its content
    checksum, when it has one, checked by libzstd), frames follow one another to the end of the file, and a
    file that ends inside a frame raises DamagedFileError. zstandard's stream_reader stops quietly at a cut or
    after the first frame, which would pass a truncated corpus off as a shorter one."""

    def __init__(self, raw: _Counted):
        self.src = raw
        self.dctx = zstandard.ZstdDecompressor()
        self.obj = None  # the frame being decoded; None between frames
        self.pending = memoryview(b"")
        self.frames = 0
        self.error: DamagedFileError | None = None  # found, raised once what came before it is read

    def readable(self) -> bool:
        return True

    def _where(self) -> str:
        return f"at compressed byte {self.src.count:,}, frame {self.frames + 1}"

    def _fill(self) -> bool:
        """Decode more into self.pending; False at the clean end of the file (after a whole frame)."""
        while not self.pending:
            if self.error is not None:
                raise self.error
            chunk = self.src.read(_ZSTD_IN)
            if not chunk:
                if self.obj is not None:
                    raise DamagedFileError(f"zstd stream ends inside a frame (file cut short) {self._where()}")
                if not self.frames:
                    raise DamagedFileError("zstd file holds no frame (empty: cut short)")
                return False
            outs = []
            while chunk:
                if self.obj is None:
                    self.obj = self.dctx.decompressobj()
                try:
                    outs.append(self.obj.decompress(chunk))
                except zstandard.ZstdError as exc:
                    why = str(exc).removeprefix("zstd decompressor error: ")
                    # what decoded before the damage is delivered first, so a reader knows how far it got
                    self.error = DamagedFileError(f"zstd: {why} {self._where()}")
                    break
                if not self.obj.eof:
                    break
                self.frames += 1  # a whole frame (its checksum checked): what follows starts the next one
                chunk, self.obj = self.obj.unused_data, None
            self.pending = memoryview(outs[0] if len(outs) == 1 else b"".join(outs))
        return True

    def readinto(self, b) -> int:
        if not self.pending and not self._fill():
            return 0
        n = min(len(b), len(self.pending))
        b[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n

    def close(self) -> None:
        if not self.closed:
            self.src.close()
        super().close()


class InputStream:
    """A corpus file opened for reading its content: `fh` gives the (decompressed) bytes, behind a 1 MiB buffer
    with line iteration; `file_bytes` is how many of the file's own bytes were read so far and `size` its size
    (None when the file system does not say); `content_sha256()` the SHA-256 of the content read, when
    `hash_content` asked for it (of the uncompressed bytes, as synth_summary.json records them)."""

    def __init__(self, path: str | Path, hash_content: bool = False):
        path = str(path)
        if "://" in path:
            import fsspec

            raw = fsspec.open(path, "rb").open()
            size = getattr(raw, "size", None)
        else:
            raw = open(path, "rb")
            size = os.fstat(raw.fileno()).st_size
        self.path, self.size = path, size
        self.file = _Counted(raw, sha256=hash_content and not is_zstd(path))
        if is_zstd(path):
            self.content = _Counted(_ZstdFrames(self.file), sha256=hash_content)
        else:
            self.content = self.file
        self.fh = io.BufferedReader(self.content, 1 << 20)

    @property
    def file_bytes(self) -> int:
        return self.file.count

    def content_sha256(self) -> str | None:
        return self.content.sha.hexdigest() if self.content.sha is not None else None

    def close(self) -> None:
        self.fh.close()

    def __enter__(self) -> InputStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_binary_read(path: str | Path) -> IO[bytes]:
    """Open a local file or a URI (s3://, gs://, hdfs://, ... through fsspec) for reading bytes. A name ending
    in .zst is decompressed on the fly, frame after frame to the end of the file, behind a 1 MiB buffer; a
    zstd file cut short or failing its checksum raises DamagedFileError (an OSError) when the read reaches
    the damage."""
    path = str(path)
    if is_zstd(path):
        return InputStream(path).fh
    if "://" in path:
        import fsspec

        return fsspec.open(path, "rb").open()
    return open(path, "rb")


def numbered_lines(fh: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line without its newline) for every non-blank line of a binary stream. Bytes, not
    text, so invalid UTF-8 can be reported per line."""
    for n, line in enumerate(fh, 1):
        line = line.rstrip(b"\r\n")
        if line.strip():
            yield n, line


def iter_lines(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """numbered_lines of a (zstd) file: the line reader of the corpus stages outside prepare (the tokenizer, the
    question loaders). A damaged file raises DamagedFileError naming it and the last line read whole."""
    n = 0
    try:
        with open_binary_read(path) as fh:
            for n, line in numbered_lines(fh):
                yield n, line
    except DamagedFileError as exc:
        raise DamagedFileError(f"{path}: {exc} (after line {n:,}); replace the file (an interrupted copy?)") from None


def dumps(obj: dict) -> str:
    """The one JSON encoding of a record: compact, UTF-8 Chinese, stable key order as given."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
