"""What the CPU benchmarks share: their common options, and the median time of a call with its last result."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def median_s(run: Callable[[], T], repeat: int) -> tuple[float, T]:
    """`run()` called `repeat` times: the median seconds, and what the last call returned."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def video_bench_args(parser: argparse.ArgumentParser, default_size: str) -> argparse.Namespace:
    """--size (81 frames at a 16:9 resolution of the wire schema), --threads and --repeat beside `parser`'s own
    options; the torch thread count is applied before returning."""
    parser.add_argument("--size", default=default_size, choices=["480p", "580p", "720p"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args
