"""The embedded job store: one SQLite file in WAL mode, shared by the API and its worker processes.

Every write is one `BEGIN IMMEDIATE` transaction, so a claim, a cancel or a finish is atomic across
processes, and `synchronous=FULL` makes each commit survive a kill -9 (and a power cut) of any of them.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from wanserve.errors import StorageFull
from wanserve.jobs.model import (
    CancelOutcome,
    Failure,
    Job,
    JobState,
    LogEntry,
    LogLevel,
    NewJob,
    Priority,
    Webhook,
    WorkerInfo,
    cancelled_failure,
    start_timeout_failure,
)
from wanserve.store.base import (
    TIMING_BUCKETS_S,
    TimingTotals,
    completion_timings,
    generation_seconds,
    timing_bucket,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    endpoint TEXT NOT NULL,
    app TEXT NOT NULL,
    input TEXT NOT NULL,
    priority INTEGER NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    start_timeout_s REAL,
    started_at REAL,
    finished_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker_id TEXT,
    lease_expires_at REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    output TEXT,
    failure TEXT,
    inference_time REAL,
    webhook_url TEXT,
    output_lifecycle TEXT,
    first_started_at REAL,
    owner TEXT
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (state, priority, seq);
CREATE TABLE IF NOT EXISTS logs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    ts REAL NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_job ON logs (job_id, seq);
CREATE TABLE IF NOT EXISTS webhooks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    url TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    delivered_at REAL
);
CREATE INDEX IF NOT EXISTS webhooks_due ON webhooks (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS webhooks_job ON webhooks (job_id);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    ready INTEGER NOT NULL,
    heartbeat_at REAL NOT NULL,
    detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS timings (
    metric TEXT NOT NULL,
    bucket INTEGER NOT NULL,
    count INTEGER NOT NULL,
    total_s REAL NOT NULL,
    PRIMARY KEY (metric, bucket)
);
CREATE TABLE IF NOT EXISTS finished (
    outcome TEXT PRIMARY KEY,
    count INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS probes (
    name TEXT PRIMARY KEY,
    at REAL NOT NULL
);
"""

_QUEUED, _RUNNING, _COMPLETED = JobState.QUEUED.value, JobState.RUNNING.value, JobState.COMPLETED.value


def _job(row: sqlite3.Row) -> Job:
    timeout = row["start_timeout_s"]
    return Job(
        id=row["id"],
        endpoint=row["endpoint"],
        app=row["app"],
        input=json.loads(row["input"]),
        priority=Priority(row["priority"]),
        state=JobState(row["state"]),
        seq=row["seq"],
        created_at=row["created_at"],
        start_deadline=row["created_at"] + timeout if timeout is not None else None,
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        attempts=row["attempts"],
        worker_id=row["worker_id"],
        lease_expires_at=row["lease_expires_at"],
        cancel_requested=bool(row["cancel_requested"]),
        output=json.loads(row["output"]) if row["output"] else None,
        failure=Failure.from_json(row["failure"]) if row["failure"] else None,
        inference_time=row["inference_time"],
        webhook_url=row["webhook_url"],
        output_lifecycle=json.loads(row["output_lifecycle"]) if row["output_lifecycle"] else None,
        owner=row["owner"],
    )


class SQLiteJobStore:
    reads_are_local = True

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._conn().executescript(SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Columns added after a database was created (SQLite's CREATE TABLE IF NOT EXISTS keeps old tables)."""
        with self._write() as db:  # one writer at a time: a worker and the server may open it together
            columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
            if "first_started_at" not in columns:
                db.execute("ALTER TABLE jobs ADD COLUMN first_started_at REAL")
                # Jobs that ran before the column existed have started: their start deadline no longer applies.
                db.execute(
                    "UPDATE jobs SET first_started_at = COALESCE(started_at, created_at)"
                    " WHERE attempts > 0 OR started_at IS NOT NULL OR state != ?",
                    (_QUEUED,),
                )
            if "owner" not in columns:
                db.execute("ALTER TABLE jobs ADD COLUMN owner TEXT")  # jobs from before it have no owner
            db.execute("CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, state)")

    # --- connections: one per thread, autocommit; writes take the database lock up front ---
    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction, whole or not at all. A full disk is StorageFull (507), not an internal error: nothing of
        the write is kept, what was stored before stays, and writes succeed again once there is room."""
        db = self._conn()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # a COMMIT that failed (a full disk) leaves its transaction open
                    db.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorcode", 0) & 0xFF != sqlite3.SQLITE_FULL:  # none: raised by the module
                raise
            raise StorageFull(
                f"no space left on the disk of the job store ({self.path.parent}): nothing was written"
            ) from exc

    def now(self) -> float:
        return time.time()  # one machine: its clock is the store's

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # --- requests ---
    def submit(self, new: NewJob, now: float) -> Job:
        with self._write() as db:
            db.execute(
                "INSERT INTO jobs (id, endpoint, app, input, priority, state, created_at, start_timeout_s,"
                " webhook_url, output_lifecycle, owner) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    new.id,
                    new.endpoint,
                    new.app,
                    json.dumps(new.input),
                    int(new.priority),
                    _QUEUED,
                    now,
                    new.start_timeout_s,
                    new.webhook_url,
                    json.dumps(new.output_lifecycle) if new.output_lifecycle is not None else None,
                    new.owner or None,
                ),
            )
        job = self.get(new.id)
        assert job is not None
        return job

    def get(self, job_id: str) -> Job | None:
        row = self._conn().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def queue_position(self, job: Job) -> int:
        row = (
            self._conn()
            .execute(
                "SELECT COUNT(*) FROM jobs WHERE state = ? AND (priority < ? OR (priority = ? AND seq < ?))",
                (_QUEUED, int(job.priority), int(job.priority), job.seq),
            )
            .fetchone()
        )
        return int(row[0])

    def queued_count(self, owner: str | None = None) -> int:
        query, args = "SELECT COUNT(*) FROM jobs WHERE state = ?", [_QUEUED]
        if owner is not None:
            query, args = query + " AND owner = ?", [_QUEUED, owner]
        return int(self._conn().execute(query, args).fetchone()[0])

    def cancel(self, job_id: str, failure: Failure, now: float) -> CancelOutcome:
        with self._write() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return CancelOutcome.NOT_FOUND
            if row["state"] == _COMPLETED:
                return CancelOutcome.ALREADY_COMPLETED
            if row["state"] == _QUEUED:
                self._complete(db, job_id, now, None, failure, None)
                return CancelOutcome.CANCELLED
            db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            self._log(db, job_id, LogLevel.INFO, "Cancellation requested: stopping at the next denoising step", now)
            return CancelOutcome.REQUESTED

    def expire_overdue(self, now: float) -> list[str]:
        with self._write() as db:
            return self._expire_overdue(db, now)

    def _expire_overdue(self, db: sqlite3.Connection, now: float) -> list[str]:
        rows = db.execute(
            "SELECT id, start_timeout_s FROM jobs WHERE state = ? AND start_timeout_s IS NOT NULL"
            " AND first_started_at IS NULL AND created_at + start_timeout_s < ?",
            (_QUEUED, now),
        ).fetchall()
        for row in rows:
            self._complete(db, row["id"], now, None, start_timeout_failure(row["start_timeout_s"]), None)
        return [row["id"] for row in rows]

    # --- logs ---
    def add_log(self, job_id: str, level: LogLevel, message: str, now: float) -> None:
        with self._write() as db:
            self._log(db, job_id, level, message, now)

    @staticmethod
    def _log(db: sqlite3.Connection, job_id: str, level: LogLevel, message: str, now: float) -> None:
        db.execute(
            "INSERT INTO logs (job_id, ts, level, message) VALUES (?, ?, ?, ?)", (job_id, now, level.value, message)
        )

    def logs(self, job_id: str, after_seq: int = 0) -> list[LogEntry]:
        rows = (
            self._conn()
            .execute(
                "SELECT seq, ts, level, message FROM logs WHERE job_id = ? AND seq > ? ORDER BY seq",
                (job_id, after_seq),
            )
            .fetchall()
        )
        return [LogEntry(r["seq"], r["ts"], LogLevel(r["level"]), r["message"]) for r in rows]

    # --- workers ---
    def claim(self, worker_id: str, lease_s: float, now: float, token: str | None = None) -> Job | None:
        # `token` needs nothing here: the claimed job is read inside the transaction, so a claim that raised rolled
        # back whole and took nothing (a retry takes the same head).
        with self._write() as db:
            self._expire_overdue(db, now)
            row = db.execute(
                "SELECT id FROM jobs WHERE state = ? ORDER BY priority, seq LIMIT 1", (_QUEUED,)
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state = ?, worker_id = ?, attempts = attempts + 1, started_at = ?,"
                " first_started_at = COALESCE(first_started_at, ?), lease_expires_at = ? WHERE id = ?",
                (_RUNNING, worker_id, now, now, now + lease_s, row["id"]),
            )
            claimed = db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone()
            return _job(claimed)

    def claimed_with(self, worker_id: str, token: str) -> Job | None:
        return None  # a claim that raised took nothing (see claim)

    def heartbeat(self, job_id: str, worker_id: str, lease_s: float, now: float) -> bool:
        with self._write() as db:
            cur = db.execute(
                "UPDATE jobs SET lease_expires_at = ? WHERE id = ? AND state = ? AND worker_id = ?",
                (now + lease_s, job_id, _RUNNING, worker_id),
            )
            return cur.rowcount == 1

    def release(self, job_id: str, worker_id: str, now: float, note: str | None = None) -> bool:
        with self._write() as db:
            row = db.execute(
                "SELECT cancel_requested FROM jobs WHERE id = ? AND state = ? AND worker_id = ?",
                (job_id, _RUNNING, worker_id),
            ).fetchone()
            if row is None:
                return False
            if row["cancel_requested"]:
                self._complete(db, job_id, now, None, cancelled_failure(), None)
                return True
            db.execute(
                "UPDATE jobs SET state = ?, worker_id = NULL, lease_expires_at = NULL, started_at = NULL,"
                " attempts = MAX(attempts - 1, 0) WHERE id = ?",
                (_QUEUED, job_id),
            )
            if note is not None:
                self._log(db, job_id, LogLevel.WARN, note, now)
            return True

    def cancel_requested(self, job_id: str) -> bool:
        row = self._conn().execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row[0])

    def finish(
        self,
        job_id: str,
        now: float,
        *,
        worker_id: str | None = None,
        output: dict[str, Any] | None = None,
        failure: Failure | None = None,
        inference_time: float | None = None,
        note: str | None = None,
    ) -> bool:
        with self._write() as db:
            row = db.execute("SELECT state, worker_id FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["state"] == _COMPLETED:
                return False
            if worker_id is not None and (row["state"] != _RUNNING or row["worker_id"] != worker_id):
                return False
            self._complete(db, job_id, now, output, failure, generation_seconds(inference_time), note)
            return True

    def _complete(
        self,
        db: sqlite3.Connection,
        job_id: str,
        now: float,
        output: dict[str, Any] | None,
        failure: Failure | None,
        inference_time: float | None,
        note: str | None = None,
    ) -> None:
        started = db.execute("SELECT created_at, started_at FROM jobs WHERE id = ?", (job_id,)).fetchone()
        for metric, seconds in completion_timings(inference_time, started[0], started[1]).items():
            db.execute(
                "INSERT INTO timings (metric, bucket, count, total_s) VALUES (?, ?, 1, ?) ON CONFLICT(metric, bucket)"
                " DO UPDATE SET count = count + 1, total_s = total_s + excluded.total_s",
                (metric, timing_bucket(seconds), seconds),
            )
        db.execute(
            "INSERT INTO finished (outcome, count) VALUES (?, 1) ON CONFLICT(outcome) DO UPDATE SET count = count + 1",
            (failure.error_type if failure is not None else "ok",),
        )
        # The input goes: nothing reads it once the job is done, and it may hold a 512 KiB data URI for the
        # retention period (a submit-then-cancel loop would fill the disk with them).
        db.execute(
            "UPDATE jobs SET state = ?, finished_at = ?, output = ?, failure = ?, inference_time = ?,"
            " lease_expires_at = NULL, input = '{}' WHERE id = ?",
            (
                _COMPLETED,
                now,
                json.dumps(output) if output is not None else None,
                failure.to_json() if failure is not None else None,
                inference_time,
                job_id,
            ),
        )
        # In the same transaction: whoever sees COMPLETED (a status stream) also sees why.
        if failure is not None:
            self._log(db, job_id, *failure.log_line(), now)
        elif note is not None:
            self._log(db, job_id, LogLevel.INFO, note, now)
        db.execute(
            "INSERT INTO webhooks (job_id, url, next_attempt_at) SELECT id, webhook_url, ? FROM jobs"
            " WHERE id = ? AND webhook_url IS NOT NULL",
            (now, job_id),
        )

    def recover_lost(self, now: float, dead_workers: list[str], max_attempts: int) -> list[Job]:
        marks = ",".join("?" * len(dead_workers)) or "NULL"
        with self._write() as db:
            rows = db.execute(
                f"SELECT * FROM jobs WHERE state = ? AND (worker_id IN ({marks}) OR lease_expires_at < ?)",
                (_RUNNING, *dead_workers, now),
            ).fetchall()
            exhausted = []
            for row in rows:
                # A job cancelled while it ran is not run again, however many attempts it has left.
                if row["attempts"] >= max_attempts or row["cancel_requested"]:
                    # As found here, under the write: read again later, it may have been handed back meanwhile.
                    exhausted.append(_job(row))
                    continue
                db.execute(
                    "UPDATE jobs SET state = ?, worker_id = NULL, lease_expires_at = NULL, started_at = NULL"
                    " WHERE id = ?",
                    (_QUEUED, row["id"]),
                )
        return exhausted

    def register_worker(self, info: WorkerInfo) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO workers (id, ready, heartbeat_at, detail) VALUES (?, ?, ?, ?)"
                " ON CONFLICT(id) DO UPDATE SET ready = excluded.ready, heartbeat_at = excluded.heartbeat_at,"
                " detail = excluded.detail",
                (info.id, int(info.ready), info.heartbeat_at, json.dumps(info.detail)),
            )

    def probe_write(self, now: float) -> None:
        with self._write() as db:  # a changed row: a write that changes nothing commits even on a full disk
            db.execute("INSERT OR REPLACE INTO probes (name, at) VALUES ('housekeeping', ?)", (now,))

    def remove_worker(self, worker_id: str) -> None:
        with self._write() as db:
            db.execute("DELETE FROM workers WHERE id = ?", (worker_id,))

    def workers(self) -> list[WorkerInfo]:
        rows = self._conn().execute("SELECT * FROM workers ORDER BY id").fetchall()
        return [WorkerInfo(r["id"], bool(r["ready"]), r["heartbeat_at"], json.loads(r["detail"])) for r in rows]

    # --- webhooks ---
    def due_webhooks(self, now: float, limit: int = 20) -> list[Webhook]:
        rows = (
            self._conn()
            .execute(
                "SELECT * FROM webhooks WHERE state = 'pending' AND next_attempt_at <= ?"
                " ORDER BY next_attempt_at LIMIT ?",
                (now, limit),
            )
            .fetchall()
        )
        return [Webhook(r["id"], r["job_id"], r["url"], r["attempts"], r["next_attempt_at"]) for r in rows]

    def claim_due_webhooks(self, now: float, hold_s: float, limit: int = 20) -> list[Webhook]:
        with self._write() as db:
            rows = db.execute(
                "SELECT * FROM webhooks WHERE state = 'pending' AND next_attempt_at <= ?"
                " ORDER BY next_attempt_at LIMIT ?",
                (now, limit),
            ).fetchall()
            db.executemany(
                "UPDATE webhooks SET next_attempt_at = ? WHERE id = ?", [(now + hold_s, r["id"]) for r in rows]
            )
        return [Webhook(r["id"], r["job_id"], r["url"], r["attempts"], r["next_attempt_at"]) for r in rows]

    def webhook_delivered(self, webhook_id: int, now: float) -> None:
        with self._write() as db:
            db.execute(
                "UPDATE webhooks SET state = 'delivered', attempts = attempts + 1, delivered_at = ? WHERE id = ?",
                (now, webhook_id),
            )

    def webhook_failed(self, webhook_id: int, error: str, retry_at: float | None) -> None:
        with self._write() as db:
            db.execute(
                "UPDATE webhooks SET attempts = attempts + 1, last_error = ?, state = ?,"
                " next_attempt_at = COALESCE(?, next_attempt_at) WHERE id = ?",
                (error[:1000], "pending" if retry_at is not None else "failed", retry_at, webhook_id),
            )

    def prune_completed(self, finished_before: float, batch: int = 500) -> int:
        pruned = 0
        while True:  # short transactions: workers' heartbeats and submits keep getting the lock in between
            with self._write() as db:
                doomed = [
                    (row[0],)
                    for row in db.execute(
                        "SELECT id FROM jobs WHERE state = ? AND finished_at < ? AND id NOT IN"
                        " (SELECT job_id FROM webhooks WHERE state = 'pending') LIMIT ?",
                        (_COMPLETED, finished_before, batch),
                    )
                ]
                for table, column in (("logs", "job_id"), ("webhooks", "job_id"), ("jobs", "id")):
                    db.executemany(f"DELETE FROM {table} WHERE {column} = ?", doomed)
            pruned += len(doomed)
            if len(doomed) < batch:
                return pruned

    # --- metrics ---
    def counts(self) -> dict[str, int]:
        db = self._conn()
        counts = {state.value: 0 for state in JobState}
        for row in db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
            counts[row[0]] = row[1]
        for row in db.execute(
            "SELECT COALESCE(json_extract(failure, '$.error_type'), 'ok'), COUNT(*) FROM jobs"
            " WHERE state = ? GROUP BY 1",
            (_COMPLETED,),
        ):
            counts[f"outcome:{row[0]}"] = row[1]
        for row in db.execute("SELECT outcome, count FROM finished"):
            counts[f"finished:{row[0]}"] = row[1]
        return counts

    def timings(self) -> dict[str, TimingTotals]:
        totals: dict[str, TimingTotals] = {}
        rows = self._conn().execute("SELECT metric, bucket, count, total_s FROM timings")
        for metric, bucket, count, total_s in rows:
            timing = totals.setdefault(metric, TimingTotals())
            timing.bucket_counts[min(bucket, len(TIMING_BUCKETS_S))] += count
            timing.total_s += total_s
        return totals
