"""Where long work spends its time: :func:`timed` adds a block's wall seconds to a named total
(a federated stage's phases, an anonymize run's steps)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def timed(totals: dict[str, float], key: str) -> Iterator[None]:
    """Add the wall seconds of the block to ``totals[key]`` (0 when absent), even if it raises."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        totals[key] = totals.get(key, 0.0) + time.perf_counter() - t0
