"""Opens the job store and file store the settings name: embedded (SQLite, a local directory) or
distributed (Redis, an S3-compatible bucket), and the rate limits that go with the job store. Nothing else looks
at `store` or `files`."""

from __future__ import annotations

from pathlib import Path

from wanserve.api.ratelimit import Limiter, RateLimiter
from wanserve.config import Settings
from wanserve.files.base import FileStore
from wanserve.store.base import JobStore


def _on_redis(settings: Settings) -> bool:
    return settings.store.startswith(("redis://", "rediss://", "unix://"))


def open_job_store(settings: Settings) -> JobStore:
    if _on_redis(settings):
        from wanserve.store.redis import RedisJobStore  # redis-py is only imported where it is used

        return RedisJobStore.from_url(settings.store, prefix=settings.redis_prefix)
    from wanserve.store.sqlite import SQLiteJobStore

    if settings.store.startswith("sqlite:///"):
        # As SQLAlchemy writes them: sqlite:///relative/path, sqlite:////absolute/path. A relative one is under the
        # data dir, not the folder a process was started in: an API and a worker started elsewhere share it.
        path = Path(settings.store.removeprefix("sqlite:///"))
        return SQLiteJobStore(path if path.is_absolute() else settings.data_dir / path)
    return SQLiteJobStore(settings.data_dir / "jobs.sqlite3")


def open_file_store(settings: Settings) -> FileStore:
    if settings.files.startswith("s3://"):
        from wanserve.files.s3 import S3FileStore  # boto3 is only imported where it is used

        return S3FileStore.from_settings(settings)
    from wanserve.files.local import LocalFileStore

    return LocalFileStore(
        settings.data_dir / "files", settings.resolved_public_url(), upload_reserve=settings.upload_disk_reserve_bytes
    )


def open_rate_limiter(settings: Settings, name: str, rate_per_s: float, burst: int) -> Limiter:
    """A per-key rate limit that holds across every API replica sharing the job store: kept in Redis beside a
    Redis job store, in this process beside SQLite (one process serves it)."""
    if _on_redis(settings) and rate_per_s > 0:
        from wanserve.api.ratelimit import RedisRateLimiter

        return RedisRateLimiter.from_url(settings.store, f"{settings.redis_prefix}:ratelimit:{name}", rate_per_s, burst)
    return RateLimiter(rate_per_s, burst)
