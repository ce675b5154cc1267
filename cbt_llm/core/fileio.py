"""Files every stage writes and names: the one atomic file writer (metrics, checkpoints' markers, launcher scripts,
repaired files) and the rule that tells a local folder from a Hugging Face Hub id."""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: str | Path, text: str, *, mode: int | None = None) -> Path:
    """Write `text` (UTF-8) so that a reader sees the old file or the whole new one, never a part: write a
    temporary file beside it, flush it to disk, then rename it over `path`. The temporary name carries the
    process id because several processes may write the same file at once (every node of a --no_ssh launch
    writes the same script). `mode` sets the permission bits (0o755 for a script). Creates the folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    if mode is not None:
        tmp.chmod(mode)
    os.replace(tmp, path)
    return path


def is_local_path(name: str | Path) -> bool:
    """Whether a tokenizer (as manifest.json names it) or model name can only mean a local folder, not a Hugging
    Face Hub id ("org/name"): it starts with '.', '/' or this project's `runs` folder, or it has no '/' or more
    than one. A missing one is then reported as missing instead of as a failed download."""
    name = str(name)
    return name.startswith((".", "/", "runs")) or name.count("/") != 1
