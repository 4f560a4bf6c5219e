"""The job store interface. The API and the workers only ever talk to a job store through this."""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any, Protocol

from wanserve.jobs.model import (
    CancelOutcome,
    Failure,
    Job,
    LogEntry,
    LogLevel,
    NewJob,
    Webhook,
    WorkerInfo,
)

# Upper bounds (seconds) of the job-timing histograms' buckets (api/metrics.py): from a short video on a fast GPU
# to an hour in a long queue.
TIMING_BUCKETS_S: tuple[float, ...] = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
# What each completion adds to them: the worker's generation time (successful runs), and the wait from submission
# to the start of the run that completed the job.
INFERENCE, QUEUE_WAIT = "inference", "queue_wait"


def timing_bucket(seconds: float) -> int:
    """The index of the first bucket whose bound is at least `seconds` (len(TIMING_BUCKETS_S): past them all)."""
    return bisect_left(TIMING_BUCKETS_S, seconds)


# The errors of a store that is down, busy, full or failing over, which waiting cures. By class name: the worker
# need not import either client to tell. Redis: no connection or an answer too late, still loading, out of memory
# (retention frees it), a replica not yet promoted, a cluster slot moving. Its credential refusals are subclasses of
# its ConnectionError, and are not outages.
_OUTAGE_ERRORS = {
    "ConnectionError", "TimeoutError", "BusyLoadingError", "OutOfMemoryError", "ReadOnlyError", "TryAgainError",
    "ClusterDownError",
}  # fmt: skip
_REFUSALS = {"AuthenticationError", "AuthorizationError"}
# sqlite3.OperationalError's primary result codes that waiting cures: BUSY, LOCKED, READONLY, IOERR, FULL, CANTOPEN.
# Its others (a syntax error, no such table) are bugs.
_SQLITE_OUTAGE_CODES = {5, 6, 8, 10, 13, 14}


def is_store_outage(exc: BaseException) -> bool:
    """Whether `exc`, raised by a job store call, means the store is unreachable for now (not a refusal or a bug)."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & _REFUSALS:
        return False
    if "OperationalError" in names:
        code = getattr(exc, "sqlite_errorcode", None)
        return code is None or (code & 0xFF) in _SQLITE_OUTAGE_CODES
    return isinstance(exc, OSError) or bool(names & _OUTAGE_ERRORS)


def generation_seconds(inference_time: float | None) -> float | None:
    """A reported generation time as a store keeps it: None unless it is a finite, non-negative number of seconds
    (NaN or inf would make every later status answer of the job fail as JSON)."""
    if inference_time is not None and math.isfinite(inference_time) and inference_time >= 0:
        return inference_time
    return None


def completion_timings(inference_time: float | None, created_at: float, started_at: float | None) -> dict[str, float]:
    """The timings a completion adds: none for a job that never started (cancelled or expired in the queue), and no
    generation time that is not a finite number of seconds (a metric never stands in a completion's way)."""
    timings = {}
    if (seconds := generation_seconds(inference_time)) is not None:
        timings[INFERENCE] = seconds
    if started_at is not None:
        timings[QUEUE_WAIT] = max(0.0, started_at - created_at)
    return timings


@dataclass
class TimingTotals:
    """One job timing over every completion the store has seen (counters: pruning old jobs takes nothing off)."""

    bucket_counts: list[int] = field(default_factory=lambda: [0] * (len(TIMING_BUCKETS_S) + 1))  # not cumulative
    total_s: float = 0.0

    @property
    def count(self) -> int:
        return sum(self.bucket_counts)


class JobStore(Protocol):
    # True when a read is a local call that never waits (SQLite in WAL mode): the API's async routes then read on
    # the event loop. A store across the network (Redis) can take a round trip, or a socket timeout in an outage,
    # which on the loop would stall every request of the API process: its reads go to a thread.
    reads_are_local: bool

    def now(self) -> float:
        """Seconds since the epoch on the store's clock. Every time written to the store or compared with one read
        from it comes from here: leases, start deadlines, worker heartbeats and webhook retries then mean the same
        on every machine sharing the store, whatever each machine's own clock says."""
        ...

    # --- requests (API side) ---
    def submit(self, new: NewJob, now: float) -> Job: ...
    def get(self, job_id: str) -> Job | None: ...
    def queue_position(self, job: Job) -> int:
        """How many queued jobs run before this one (0: next)."""
        ...

    def queued_count(self, owner: str | None = None) -> int:
        """How many of this owner's (API key id's) jobs are queued (not running, not completed); None: everyone's."""
        ...

    def cancel(self, job_id: str, failure: Failure, now: float) -> CancelOutcome:
        """A queued job completes at once with `failure`; a running one is flagged for its worker."""
        ...

    def expire_overdue(self, now: float) -> list[str]:
        """Complete queued jobs whose start deadline passed; returns their ids."""
        ...

    # --- logs ---
    def add_log(self, job_id: str, level: LogLevel, message: str, now: float) -> None: ...
    def logs(self, job_id: str, after_seq: int = 0) -> list[LogEntry]: ...

    # --- workers ---
    def claim(self, worker_id: str, lease_s: float, now: float, token: str | None = None) -> Job | None:
        """The next queued job (priority, then submission order), now running on `worker_id`. `token` names this
        claim: a call that raised (its reply lost, say) and is made again with the same token returns the job the
        first one took, if it took one, rather than taking another and leaving that one without a worker."""
        ...

    def claimed_with(self, worker_id: str, token: str) -> Job | None:
        """The job a claim by `worker_id` with `token` took, while it still runs on that worker; never takes one. For
        a claim that raised: whether it took a job before its reply was lost (None: it took none)."""
        ...

    def heartbeat(self, job_id: str, worker_id: str, lease_s: float, now: float) -> bool:
        """Extends the lease; False when the job is no longer this worker's (it was recovered or ended)."""
        ...

    def release(self, job_id: str, worker_id: str, now: float, note: str | None = None) -> bool:
        """A worker that shuts down gives its running job back to the queue (the run does not count), logging
        `note` (a warning) with it. A job whose cancel was requested while it ran completes as cancelled instead:
        it is never queued again. False when the job is not running on `worker_id`."""
        ...

    def cancel_requested(self, job_id: str) -> bool: ...
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
        """Completes a job (once). With `worker_id`, only if that worker still holds it. Queues the webhook. The
        log gets the failure's line, or else `note`, in the same write: a reader that sees the job COMPLETED has
        that line, and a job whose finish is refused (its lease went to another worker) never shows it."""
        ...

    def probe_write(self, now: float) -> None:
        """Writes one small record (raises as any write would): the store takes writes again after an outage or a
        full disk. Housekeeping asks before it takes leases back (`jobs.service.LeaseRecovery`)."""
        ...

    def recover_lost(self, now: float, dead_workers: list[str], max_attempts: int) -> list[Job]:
        """Running jobs of dead workers or with an expired lease go back to the queue; those that already had
        `max_attempts` runs, or whose cancellation was requested, are returned for the caller to complete."""
        ...

    def register_worker(self, info: WorkerInfo) -> None: ...
    def remove_worker(self, worker_id: str) -> None: ...
    def workers(self) -> list[WorkerInfo]: ...

    # --- webhooks ---
    def due_webhooks(self, now: float, limit: int = 20) -> list[Webhook]: ...
    def claim_due_webhooks(self, now: float, hold_s: float, limit: int = 20) -> list[Webhook]:
        """Due webhooks, each put out of reach for `hold_s` (one delivery in flight, even across processes);
        the delivery's outcome then sets the next attempt."""
        ...

    def webhook_delivered(self, webhook_id: int, now: float) -> None: ...
    def webhook_failed(self, webhook_id: int, error: str, retry_at: float | None) -> None:
        """Records a failed delivery; `retry_at` None means it is given up."""
        ...

    def prune_completed(self, finished_before: float, batch: int = 500) -> int:
        """Deletes completed jobs that finished before the given time, with their logs and settled webhooks;
        returns how many jobs. A job whose webhook is still being retried is kept until that settles."""
        ...

    # --- metrics ---
    def counts(self) -> dict[str, int]:
        """Jobs by state; completed jobs still stored by outcome (`outcome:ok`, or `outcome:<error type>`); and every
        completion the store has seen by outcome (`finished:...`, counters that pruning takes nothing off)."""
        ...

    def timings(self) -> dict[str, TimingTotals]:
        """The job-timing histograms (INFERENCE, QUEUE_WAIT), counted as jobs complete."""
        ...

    def close(self) -> None: ...
