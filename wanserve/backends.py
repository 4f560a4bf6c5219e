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
        if not path.is_absolute():
            # Before, a relative path was the current folder's: a database found there (and not under the data
            # dir) is refused rather than left behind for an empty new one, with its queued jobs.
            if path.exists() and not (settings.data_dir / path).exists():
                raise OSError(
                    f"the job store sqlite:///{path} is {settings.data_dir / path} (under the data dir), but the "
                    f"database is at {path.resolve()}: name it sqlite:///{path.resolve()} (four slashes in all)"
                )
            path = settings.data_dir / path
        return SQLiteJobStore(path)
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
