"""The deterministic draws the template generators share: record i of a seed is a pure function of a BLAKE2b digest
of (a per-generator prefix, i), read as one large integer that each choice divides down."""

from __future__ import annotations

import hashlib

# probabilities are drawn in parts per million
PPM = 1_000_000


def digest(prefix: bytes, index: int) -> int:
    """512 random bits for draw `index` under `prefix`, as an integer."""
    return int.from_bytes(hashlib.blake2b(prefix + index.to_bytes(8, "little"), digest_size=64).digest(), "little")
