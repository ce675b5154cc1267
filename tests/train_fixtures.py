"""Test helpers for the trainer and launcher tests: a free TCP port, and (from bench/fixtures.py, which
bench/train_bench.py shares) tiny packed shards + manifest in the prepare -> train contract.
"""

from __future__ import annotations

from bench.fixtures import SPECIALS, VOCAB, make_shards, write_tiny_tokenizer

__all__ = ["SPECIALS", "VOCAB", "free_port", "make_shards", "write_tiny_tokenizer"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for torchrun/deepspeed masters and Ray heads in tests)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
