"""Test-only fault injection: CBT_LLM_FAULT=<where>@<step>[:<rank>] SIGKILLs that rank there.

The tests use it to prove that a rank killed after a step or in the middle of a save never leaves a
checkpoint that `latest` points to half-written, and that resume reproduces the uninterrupted run. Unset (every
real run), `fault_hook` returns None and the loop calls nothing.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable


def fault_hook(rank: int) -> Callable[[str, int], None] | None:
    """hit(where, step) kills this process when (where, step, rank) match the variable; None when it is unset."""
    spec = os.environ.get("CBT_LLM_FAULT", "")
    if not spec:
        return None
    where, _, rest = spec.partition("@")
    step_s, _, rank_s = rest.partition(":")

    def hit(at: str, step: int) -> None:
        if at == where and step == int(step_s) and rank == int(rank_s or 0):
            os.kill(os.getpid(), signal.SIGKILL)

    return hit
