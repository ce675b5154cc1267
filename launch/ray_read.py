"""The Ray Data read task of a Ray job's train shards (launch/ray_job.py `_read`).

A module of its own that imports pyarrow only: each read task imports the module its function lives in, and
launch.ray_job (Ray Train) or train.data (torch) cost a read task 6-8 s of imports on a busy 2-core machine.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

# Rows per Arrow table a read task yields: a shard streams out in pieces of this size, so a read holds one
# piece of a (possibly large) shard at a time, not the file
READ_BATCH_ROWS = 1024


def read_shard_batches(paths: pa.Table, columns: list[str]) -> Iterator[pa.Table]:
    """map_batches fn: every row of each shard named in `paths` (a table with a `path` column), in that order,
    as tables of `columns` plus `path`, READ_BATCH_ROWS rows at a time."""
    for path in paths.column("path").to_pylist():
        fs, where = pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)
        with fs.open_input_file(where) as fh:
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=READ_BATCH_ROWS, columns=columns):
                table = pa.Table.from_batches([batch])
                yield table.append_column("path", pa.array([path] * table.num_rows, pa.string()))
