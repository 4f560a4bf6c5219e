"""Per-API-key rate limits: one token bucket per key id, for the calls that create work and for the reads.

With the embedded store the buckets live in this process (`RateLimiter`). With Redis they live in Redis
(`RedisRateLimiter`), so that a key's limit holds across every API replica behind a load balancer rather than
multiplying by their number; one script per call takes the token, on Redis's own clock. Memory is one small entry
per key active recently: a bucket that has refilled is the same as no bucket and is dropped (here: first, and the
least recently used when there are more than `max_keys`; in Redis: it expires).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Limiter(Protocol):
    rate_per_s: float
    burst: float
    is_local: bool  # acquire() answers from this process's memory (no I/O: fine on the event loop)

    @property
    def enabled(self) -> bool: ...

    def acquire(self, key: str) -> float:
        """Takes one token from `key`'s bucket: 0.0 when there was one, else the seconds until there is one
        (nothing is taken then)."""
        ...


class RateLimiter:
    """The buckets in this process's memory."""

    is_local = True

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


# KEYS[1]: the bucket. ARGV: rate per second, burst. Returns the wait as a string (Redis would truncate a number).
_TAKE = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens), 'at', string.format('%.6f', now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
return string.format('%.6f', wait)
"""


class RedisRateLimiter:
    """The buckets in Redis, shared by every replica. If Redis cannot be asked, the call is let through (the
    request then meets the same Redis in the job store, which says what is wrong)."""

    @classmethod
    def from_url(cls, url: str, prefix: str, rate_per_s: float, burst: int) -> RedisRateLimiter:
        """On a client of its own that fails fast: the job store's client rides out an outage for many seconds,
        which the request then waits for anyway; the limit check must not double that wait."""
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        client = redis.Redis.from_url(
            url, decode_responses=True, socket_timeout=2, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0)
        )
        return cls(client, prefix, rate_per_s, burst)

    is_local = False

    def __init__(self, client: Any, prefix: str, rate_per_s: float, burst: int) -> None:
        self.rate_per_s = rate_per_s
        self.burst = float(burst)
        self._prefix = prefix
        self._take = client.register_script(_TAKE)
        self._warned_at = -math.inf

    @property
    def enabled(self) -> bool:
        return self.rate_per_s > 0

    def acquire(self, key: str) -> float:
        if not self.enabled:
            return 0.0
        try:
            return float(self._take(keys=[f"{self._prefix}:{key}"], args=[self.rate_per_s, self.burst]))
        except Exception as exc:
            if time.monotonic() - self._warned_at > 60:
                self._warned_at = time.monotonic()
                log.warning("rate limit not checked (Redis: %s: %s); letting calls through", type(exc).__name__, exc)
            return 0.0


def retry_after_s(wait_s: float) -> int:
    """Retry-After is whole seconds: rounded up, at least 1."""
    return max(1, math.ceil(wait_s))
