"""Opens the job store and file store the settings name: embedded (SQLite, a local directory) or
distributed (Redis, an S3-compatible bucket). Nothing else looks at `store` or `files`."""

from __future__ import annotations

from pathlib import Path

from wanserve.config import Settings
from wanserve.files.base import FileStore
from wanserve.store.base import JobStore


def open_job_store(settings: Settings) -> JobStore:
    if settings.store.startswith(("redis://", "rediss://", "unix://")):
        from wanserve.store.redis import RedisJobStore  # redis-py is only imported where it is used

        return RedisJobStore.from_url(settings.store, prefix=settings.redis_prefix)
    from wanserve.store.sqlite import SQLiteJobStore

    if settings.store.startswith("sqlite:///"):
        return SQLiteJobStore(Path(settings.store.removeprefix("sqlite:///")))
    return SQLiteJobStore(settings.data_dir / "jobs.sqlite3")


def open_file_store(settings: Settings) -> FileStore:
    if settings.files.startswith("s3://"):
        from wanserve.files.s3 import S3FileStore  # boto3 is only imported where it is used

        return S3FileStore.from_settings(settings)
    from wanserve.files.local import LocalFileStore

    return LocalFileStore(
        settings.data_dir / "files", settings.resolved_public_url(), upload_reserve=settings.upload_disk_reserve_bytes
    )
