"""One embedded Ray for every in-process prepare in this package: each module's fixture and each run_prepare then
reuse it (init_ray returns started=False) instead of starting and stopping a local cluster of their own."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from data_pipeline.prepare.ray_session import init_ray


@pytest.fixture(scope="package", autouse=True)
def one_local_ray():
    tmp = tempfile.mkdtemp(prefix="cbtray", dir="/tmp")  # Ray's socket paths must stay short
    started, _ = init_ray(None, Path(tmp))
    yield
    if started:
        import ray

        ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)
