"""What only the SQLite store has: its transactions and its schema migrations (the shared behaviour is
in test_store_contract.py)."""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path

import pytest
from test_store_contract import T0, new_job

from wanserve.jobs.model import NewJob
from wanserve.store.sqlite import SCHEMA, SQLiteJobStore


@pytest.fixture
def store(tmp_path: Path):
    s = SQLiteJobStore(tmp_path / "jobs.sqlite")
    yield s
    s.close()


def test_failed_transaction_rolls_back(store: SQLiteJobStore) -> None:
    store.submit(new_job("a"), T0)
    with pytest.raises(Exception, match="UNIQUE"):
        store.submit(new_job("a"), T0 + 1)
    # the store is still usable and nothing half-written is visible
    assert store.counts()["IN_QUEUE"] == 1
    store.submit(new_job("b"), T0 + 2)
    assert Counter(j.id for j in [store.claim("w", 60, T0 + 3), store.claim("w", 60, T0 + 3)] if j) == {
        "a": 1,
        "b": 1,
    }


def test_an_error_the_sqlite_module_raises_itself_passes_through_a_write(store: SQLiteJobStore) -> None:
    """Only SQLITE_FULL becomes StorageFull; an OperationalError without an SQLite code (raised by the Python
    module, or a test) is itself, not an AttributeError, and the transaction is rolled back."""
    store.submit(new_job("a"), T0)
    with pytest.raises(sqlite3.OperationalError, match="no code"), store._write() as db:
        db.execute("DELETE FROM jobs")
        raise sqlite3.OperationalError("no code")
    assert not store._conn().in_transaction
    store.submit(new_job("b"), T0)  # usable, and the delete was rolled back
    assert store.counts()["IN_QUEUE"] == 2


def test_opening_a_database_from_before_first_started_at_migrates_it(tmp_path: Path) -> None:
    old = sqlite3.connect(tmp_path / "old.sqlite3")
    old_schema = SCHEMA.replace(",\n    first_started_at REAL", "")
    assert "first_started_at" not in old_schema
    old.executescript(old_schema)
    old.execute(
        "INSERT INTO jobs (id, endpoint, app, input, priority, state, created_at, start_timeout_s, attempts)"
        " VALUES ('ran-once', 'a/b', 'a/b', '{}', 0, 'IN_QUEUE', ?, 5, 1)",
        (T0,),
    )
    old.commit()
    old.close()
    store = SQLiteJobStore(tmp_path / "old.sqlite3")
    assert store.expire_overdue(T0 + 100) == []  # it had started before the upgrade: no start deadline
    job = store.claim("w", 10, T0 + 100)
    assert job is not None and job.id == "ran-once" and job.attempts == 2


def test_opening_a_database_from_before_owners_migrates_it(tmp_path: Path) -> None:
    old = sqlite3.connect(tmp_path / "old.sqlite3")
    old_schema = SCHEMA.replace(",\n    owner TEXT", "")
    assert "owner" not in old_schema
    old.executescript(old_schema)
    old.execute(
        "INSERT INTO jobs (id, endpoint, app, input, priority, state, created_at) VALUES ('old', 'a/b', 'a/b', '{}',"
        " 0, 'IN_QUEUE', ?)",
        (T0,),
    )
    old.commit()
    old.close()
    store = SQLiteJobStore(tmp_path / "old.sqlite3")
    job = store.get("old")
    assert job is not None and job.owner is None  # submitted before there were owners
    store.submit(NewJob(id="new", endpoint="a/b", app="a/b", input={}, owner="key-a"), T0 + 1)
    assert store.queued_count("key-a") == 1
    indexes = {row[1] for row in store._conn().execute("PRAGMA index_list(jobs)")}
    assert "jobs_owner" in indexes
