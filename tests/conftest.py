"""Fixtures shared across test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.launch import build_demo_data


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """The demo's path at small size, built once for every launcher test module (Slurm, multi-node, Ray):
    synth template (300 records) -> tokenizer train -> prepare into 2 train shards of seq_len 256. Tests only
    read it (each writes its runs to its own folder)."""
    return build_demo_data(tmp_path_factory.mktemp("launch_demo"), seq_len=256)
