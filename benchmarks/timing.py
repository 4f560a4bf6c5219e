"""What the CPU benchmarks share: the median time of a call, and its last result."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def median_s(run: Callable[[], T], repeat: int) -> tuple[float, T]:
    """`run()` called `repeat` times: the median seconds, and what the last call returned."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out
