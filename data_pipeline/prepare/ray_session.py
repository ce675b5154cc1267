"""The Ray session prepare runs in: an embedded local Ray (or a cluster's), and Ray Data's settings."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

_AF_UNIX_BUDGET = 40  # Ray appends ~65 chars of session/socket path to _temp_dir; sockets max out at 107


def short_ray_dir(out_dir: Path) -> Path:
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


def configure_ray_data(block_mb: int) -> None:
    """Ray Data's execution settings for prepare; block_mb is data.ray_block_mb."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True  # determinism: the driver sees (file, line) order
    # Ray's default 128 MiB blocks hold a whole input file's parsed records at 25k records per file, and an
    # ordered stream releases a block only when the task that makes it ends: with them the driver sees its
    # first record only after every record is parsed and tokenized, the whole corpus waiting in the object
    # store (spilled to disk past 1 GiB, with spill/restore workers of ~700 MiB). Small blocks keep the
    # stream flowing; what the driver sees, in order, is the same.
    ctx.target_max_block_size = block_mb << 20
    ctx.enable_progress_bars = False  # our own tqdm counts records; Ray's bars interleave badly in logs
    from ray.util.debug import log_once

    log_once("ray_data_progress_manager_disabled")  # marks Ray's "progress bars disabled" warning as shown
    for name in ("ray.data", "ray"):
        logging.getLogger(name).setLevel(logging.WARNING)
