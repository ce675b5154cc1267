"""One shard file of the offline generators (synth template, --pairs, --sessions): JSONL lines written in batches,
plain or zstd, under a hidden temp name that is renamed when the shard is complete, and the per-shard entry of
synth_summary.json (size and content hash, the way prepare checks the files)."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import zstandard

ZSTD_LEVEL = 3


class ShardWriter:
    """The lines of shard job["shard"] (a shard_jobs job), `batch` at a time, so memory stays flat:

        with ShardWriter(job, progress, batch=2048) as shard:
            for rec in ...:
                shard.add(encode(rec))
        return shard.result(crisis=..., ...)

    progress(n) is called after each batch with its line count. On an exception the temp file is left behind
    (the next run's stale-file sweep removes it) and the final name is never written."""

    def __init__(self, job: dict, progress: Callable[[int], None] | None, batch: int):
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        self.job = job
        self.final = Path(job["path"])
        # leading dot + suffix: a downstream glob such as *.jsonl* never picks up a half-written shard
        self.tmp = self.final.with_name(f".{self.final.name}.inprogress")
        self.progress = progress
        self.batch_size = batch
        self.batch: list[str] = []
        self.sha = hashlib.sha256()
        self.jsonl_bytes = 0

    def __enter__(self) -> ShardWriter:
        raw = open(self.tmp, "wb")
        # a content checksum ends the frame: a reader (data_pipeline.io) tells a corrupt shard from a good one
        self.out = (
            zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True).stream_writer(raw, closefd=True)
            if self.job["compress"] == "zstd"
            else raw
        )
        return self

    def add(self, line: str) -> None:
        self.batch.append(line)
        if len(self.batch) == self.batch_size:
            self._write()

    def _write(self) -> None:
        data = ("\n".join(self.batch) + "\n").encode()
        self.jsonl_bytes += len(data)
        self.sha.update(data)
        self.out.write(data)
        if self.progress:
            self.progress(len(self.batch))
        self.batch.clear()

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and self.batch:
                self._write()
        finally:
            self.out.close()
        if exc_type is None:
            os.replace(self.tmp, self.final)

    def result(self, *, unit: str = "records", jsonl_bytes: bool = False, **stats) -> dict:
        """The shard's entry in synth_summary.json's files: where it is, `unit` (its line count), its size (and,
        with jsonl_bytes, the uncompressed size), the content hash, then the generator's `stats` and the times."""
        return {
            "shard": self.job["shard"],
            "file": self.final.name,
            "first_index": self.job["start"],
            unit: self.job["stop"] - self.job["start"],
            "bytes": self.final.stat().st_size,
            **({"jsonl_bytes": self.jsonl_bytes} if jsonl_bytes else {}),
            "content_sha256": self.sha.hexdigest(),  # of the uncompressed JSONL, so none and zstd runs compare
            **stats,
            "seconds": time.perf_counter() - self.t0,
            "cpu_seconds": time.process_time() - self.c0,
        }
