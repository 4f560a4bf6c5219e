"""Per-API-key rate limits: one token bucket per key id, for the calls that create work and for the reads.

The buckets live in this process: each API replica limits on its own, so N replicas behind a load balancer let a
key through at up to N times the rate (a shared limit would cost a Redis round trip per call; the queued-requests
limit, which is the one that protects the GPUs, is kept in the job store and holds across replicas). Memory is one
small entry per key active recently: a bucket that has refilled is the same as no bucket and is dropped first, and
the least recently used go when there are more than `max_keys` (keys are only counted once authenticated, so the
number of keys configured bounds it anyway).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict


class RateLimiter:
    def __init__(self, rate_per_s: float, burst: int, max_keys: int = 10_000) -> None:
        self.rate_per_s = rate_per_s
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate_per_s > 0

    def acquire(self, key: str, now: float | None = None) -> float:
        """Takes one token from `key`'s bucket: 0.0 when there was one, else the seconds until there is one
        (nothing is taken then)."""
        if not self.enabled:
            return 0.0
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, at = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + max(0.0, now - at) * self.rate_per_s)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                wait = 0.0
            else:
                self._buckets[key] = (tokens, now)
                wait = (1.0 - tokens) / self.rate_per_s
            self._evict(now)
        return wait

    def _evict(self, now: float) -> None:
        """Drops the oldest buckets while there are too many, or while the oldest is full again (forgetting a full
        bucket changes nothing). Amortised O(1): each bucket is dropped at most once per use."""
        while self._buckets:
            key, (tokens, at) = next(iter(self._buckets.items()))
            full = tokens + (now - at) * self.rate_per_s >= self.burst
            if len(self._buckets) <= self.max_keys and not full:
                return
            del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)


def retry_after_s(wait_s: float) -> int:
    """Retry-After is whole seconds: rounded up, at least 1."""
    return max(1, math.ceil(wait_s))
