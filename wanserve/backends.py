"""Opens the job store and file store the settings name (today: the embedded SQLite + local directory)."""

from __future__ import annotations

from wanserve.config import Settings
from wanserve.files.base import FileStore
from wanserve.files.local import LocalFileStore
from wanserve.store.base import JobStore
from wanserve.store.sqlite import SQLiteJobStore


def open_job_store(settings: Settings) -> JobStore:
    return SQLiteJobStore(settings.data_dir / "jobs.sqlite3")


def open_file_store(settings: Settings) -> FileStore:
    return LocalFileStore(settings.data_dir / "files", settings.resolved_public_url())
