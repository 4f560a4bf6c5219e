"""The JobStore contract, run against both backends (embedded SQLite, distributed Redis): the queue's state
machine, its ordering, atomicity across store instances (processes, machines) and durability."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from redis_server import RedisServer

from wanserve.jobs.model import (
    CancelOutcome,
    Failure,
    JobState,
    LogLevel,
    NewJob,
    Priority,
    cancelled_failure,
)
from wanserve.jobs.service import recover_lost_jobs
from wanserve.store.base import INFERENCE, QUEUE_WAIT, TIMING_BUCKETS_S, JobStore, timing_bucket
from wanserve.store.redis import RedisJobStore
from wanserve.store.sqlite import SQLiteJobStore

T0 = 1_000_000.0

OpenStore = Callable[[], JobStore]


@pytest.fixture(params=["sqlite", "redis"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenStore]:
    """Opens another store on the same backend and data: what a second process or machine would see."""
    opened: list[JobStore] = []

    def open_one() -> JobStore:
        if request.param == "sqlite":
            store: JobStore = SQLiteJobStore(tmp_path / "state" / "jobs.sqlite")
        else:
            server: RedisServer = request.getfixturevalue("redis_server")
            store = RedisJobStore.from_url(server.url, prefix=request.getfixturevalue("redis_prefix"))
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store: OpenStore) -> JobStore:
    return open_store()


def new_job(job_id: str, **kw) -> NewJob:
    return NewJob(id=job_id, endpoint="fal-ai/wan-22/t2v", app="fal-ai/wan-22", input={"prompt": job_id}, **kw)


def submit_many(store: JobStore, n: int, prefix: str = "j", now: float = T0, **kw) -> list[str]:
    ids = [f"{prefix}{i:03d}" for i in range(n)]
    for i, job_id in enumerate(ids):
        store.submit(new_job(job_id, **kw), now + i * 0.001)
    return ids


# --- submit / get ---


def test_submit_get_round_trip(store: JobStore) -> None:
    lifecycle = {"expiration_duration_seconds": 3600, "initial_acl": {"default": "allow"}}
    inp = {"prompt": "a fox ✓", "seed": 7, "nested": {"a": [1, 2.5, None, True]}}
    created = store.submit(
        NewJob(
            id="r1",
            endpoint="fal-ai/wan-22/lora",
            app="fal-ai/wan-22",
            input=inp,
            priority=Priority.LOW,
            start_timeout_s=30.0,
            webhook_url="https://example.test/hook?x=1",
            output_lifecycle=lifecycle,
            owner="0123456789ab",
        ),
        T0,
    )
    got = store.get("r1")
    assert got == created
    assert got is not None
    assert got.input == inp
    assert got.priority is Priority.LOW
    assert got.state is JobState.QUEUED
    assert got.endpoint == "fal-ai/wan-22/lora"
    assert got.app == "fal-ai/wan-22"
    assert got.webhook_url == "https://example.test/hook?x=1"
    assert got.output_lifecycle == lifecycle
    assert got.owner == "0123456789ab"
    assert got.created_at == T0
    assert got.start_deadline == T0 + 30.0
    assert got.attempts == 0 and got.worker_id is None and got.output is None and got.failure is None
    assert store.get("missing") is None


def test_submit_defaults_have_no_deadline_webhook_or_lifecycle(store: JobStore) -> None:
    job = store.submit(new_job("a"), T0)
    assert job.priority is Priority.NORMAL
    assert job.start_deadline is None
    assert job.webhook_url is None
    assert job.output_lifecycle is None
    assert job.owner is None


# --- owners (API key ids) ---


def test_queued_count_follows_an_owners_jobs_through_every_transition(store: JobStore) -> None:
    submit_many(store, 3, prefix="a", owner="key-a")
    submit_many(store, 1, prefix="b", now=T0 + 1, owner="key-b")
    submit_many(store, 1, prefix="n", now=T0 + 2)  # no owner: counted for nobody
    assert (store.queued_count("key-a"), store.queued_count("key-b"), store.queued_count("nobody")) == (3, 1, 0)
    assert store.queued_count() == 5  # everyone's, the ownerless job included
    claimed = store.claim("w", 10, T0 + 3)
    assert claimed is not None and claimed.id == "a000" and claimed.owner == "key-a"
    assert store.queued_count("key-a") == 2  # running is not queued
    assert store.queued_count() == 4
    assert store.release("a000", "w", T0 + 3) is True
    assert store.queued_count("key-a") == 3  # back in the queue
    store.claim("w", 10, T0 + 4)
    assert store.recover_lost(T0 + 100, ["w"], max_attempts=3) == []  # requeued: queued again
    assert store.queued_count("key-a") == 3
    assert store.cancel("a001", cancelled_failure(), T0 + 101) is CancelOutcome.CANCELLED
    assert store.queued_count("key-a") == 2
    assert store.finish("a002", T0 + 102, failure=cancelled_failure()) is True  # completed while queued
    assert store.queued_count("key-a") == 1
    store.claim("w", 10, T0 + 103)
    assert store.finish("a000", T0 + 104, worker_id="w", output={}) is True
    assert (store.queued_count("key-a"), store.queued_count("key-b"), store.queued_count()) == (0, 1, 2)
    assert store.cancel("a000", cancelled_failure(), T0 + 105) is CancelOutcome.ALREADY_COMPLETED
    assert store.queued_count("key-a") == 0  # never below zero, never counted twice


def test_queued_count_drops_when_the_start_deadline_expires_a_job(store: JobStore) -> None:
    store.submit(new_job("late", start_timeout_s=5.0, owner="key-a"), T0)
    store.submit(new_job("patient", owner="key-a"), T0)
    assert store.queued_count("key-a") == 2
    assert store.expire_overdue(T0 + 10) == ["late"]
    assert store.queued_count("key-a") == 1
    assert store.get("late").owner == "key-a"  # type: ignore[union-attr]


# --- ordering ---


def test_claim_order_is_priority_then_fifo(store: JobStore) -> None:
    store.submit(new_job("low1", priority=Priority.LOW), T0)
    store.submit(new_job("norm1"), T0 + 1)
    store.submit(new_job("low2", priority=Priority.LOW), T0 + 2)
    store.submit(new_job("norm2"), T0 + 3)
    claimed = []
    while (job := store.claim("w", 60, T0 + 10)) is not None:
        claimed.append(job.id)
    assert claimed == ["norm1", "norm2", "low1", "low2"]


def test_queue_positions_are_dense_and_shrink_as_jobs_are_claimed(store: JobStore) -> None:
    for i in range(6):
        store.submit(new_job(f"q{i}", priority=Priority.LOW if i % 2 == 0 else Priority.NORMAL), T0 + i)

    def positions() -> dict[str, int]:
        out = {}
        for i in range(6):
            job = store.get(f"q{i}")
            assert job is not None
            if job.state is JobState.QUEUED:
                out[job.id] = store.queue_position(job)
        return out

    before = positions()
    assert sorted(before.values()) == list(range(6))
    # normal jobs (odd) come first, each group in submission order
    assert [k for k, _ in sorted(before.items(), key=lambda kv: kv[1])] == ["q1", "q3", "q5", "q0", "q2", "q4"]
    first = store.claim("w", 60, T0 + 10)
    assert first is not None and before[first.id] == 0
    after = positions()
    assert first.id not in after
    assert sorted(after.values()) == list(range(5))
    assert all(after[k] == before[k] - 1 for k in after)


def test_claim_sets_running_attempt_worker_and_lease(store: JobStore) -> None:
    store.submit(new_job("a"), T0)
    job = store.claim("worker-1", 45.0, T0 + 5)
    assert job is not None
    assert job.state is JobState.RUNNING
    assert job.attempts == 1
    assert job.worker_id == "worker-1"
    assert job.started_at == T0 + 5
    assert job.lease_expires_at == T0 + 50
    assert store.claim("worker-2", 45.0, T0 + 6) is None
    assert store.heartbeat("a", "worker-1", 45.0, T0 + 20) is True
    assert store.get("a").lease_expires_at == T0 + 65  # type: ignore[union-attr]
    assert store.heartbeat("a", "worker-2", 45.0, T0 + 20) is False


def test_concurrent_claims_from_separate_stores_never_share_a_job(open_store: OpenStore) -> None:
    ids = submit_many(open_store(), 40)
    claims: dict[str, list[str]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def worker(name: str) -> None:
        mine: list[str] = []
        try:
            s = open_store()
            barrier.wait()
            while (job := s.claim(name, 60, T0 + 100)) is not None:
                assert job.worker_id == name and job.attempts == 1
                mine.append(job.id)
        except BaseException as exc:
            errors.append(exc)
        claims[name] = mine

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    every = [job_id for mine in claims.values() for job_id in mine]
    assert sorted(every) == ids  # each job exactly once
    check = open_store()
    for job_id in ids:
        job = check.get(job_id)
        assert job is not None and job.state is JobState.RUNNING and job.attempts == 1
        assert job_id in claims[job.worker_id]  # type: ignore[index]


# --- cancel ---


def test_cancel_queued_completes_with_the_given_failure(store: JobStore) -> None:
    store.submit(new_job("a"), T0)
    store.submit(new_job("b"), T0 + 1)
    assert store.cancel("a", cancelled_failure(), T0 + 2) is CancelOutcome.CANCELLED
    job = store.get("a")
    assert job is not None
    assert job.state is JobState.COMPLETED
    assert job.failure == cancelled_failure()
    assert job.finished_at == T0 + 2
    assert not job.succeeded
    # a cancelled job is never claimed, and it no longer counts in the queue
    b = store.get("b")
    assert b is not None and store.queue_position(b) == 0
    claimed = store.claim("w", 60, T0 + 3)
    assert claimed is not None and claimed.id == "b"
    assert store.cancel("a", cancelled_failure(), T0 + 4) is CancelOutcome.ALREADY_COMPLETED


def test_cancel_running_requests_and_completed_and_unknown(store: JobStore) -> None:
    store.submit(new_job("a"), T0)
    store.claim("w", 60, T0)
    assert store.cancel_requested("a") is False
    assert store.cancel("a", cancelled_failure(), T0 + 1) is CancelOutcome.REQUESTED
    assert store.cancel_requested("a") is True
    job = store.get("a")
    assert job is not None and job.state is JobState.RUNNING and job.cancel_requested
    assert store.finish("a", T0 + 2, worker_id="w", failure=cancelled_failure())
    assert store.cancel("a", cancelled_failure(), T0 + 3) is CancelOutcome.ALREADY_COMPLETED
    assert store.get("a").failure == cancelled_failure()  # type: ignore[union-attr]
    assert store.cancel("nope", cancelled_failure(), T0) is CancelOutcome.NOT_FOUND
    assert store.cancel_requested("nope") is False


# --- finish ---


def test_finish_only_once_and_only_by_owner(store: JobStore) -> None:
    store.submit(new_job("a"), T0)
    store.claim("owner", 60, T0)
    assert store.finish("a", T0 + 1, worker_id="intruder", output={"x": 1}, note="Completed by the intruder") is False
    assert store.get("a").state is JobState.RUNNING  # type: ignore[union-attr]
    assert store.finish("a", T0 + 2, worker_id="owner", output={"video": {"url": "u"}}, inference_time=1.5,
                        note="Completed in 1.5s")  # fmt: skip
    # The note is logged with the completion, in the same write; a refused finish logs nothing.
    assert [(entry.level, entry.message) for entry in store.logs("a")] == [(LogLevel.INFO, "Completed in 1.5s")]
    job = store.get("a")
    assert job is not None
    assert job.succeeded and job.output == {"video": {"url": "u"}} and job.inference_time == 1.5
    assert job.finished_at == T0 + 2 and job.lease_expires_at is None
    # second finish, with or without the worker, changes nothing
    assert store.finish("a", T0 + 3, worker_id="owner", failure=Failure("x", "y", 500)) is False
    assert store.finish("a", T0 + 3, failure=Failure("x", "y", 500)) is False
    job = store.get("a")
    assert job is not None and job.failure is None and job.output == {"video": {"url": "u"}}
    assert job.finished_at == T0 + 2
    assert [entry.message for entry in store.logs("a")] == ["Completed in 1.5s"]
    assert store.finish("missing", T0) is False


def test_finish_with_worker_refuses_a_queued_job(store: JobStore) -> None:
    store.submit(new_job("a"), T0)
    assert store.finish("a", T0, worker_id="w", output={}) is False
    assert store.get("a").state is JobState.QUEUED  # type: ignore[union-attr]


def test_finish_failure_round_trips(store: JobStore) -> None:
    store.submit(new_job("a"), T0)
    store.claim("w", 60, T0)
    failure = Failure("bad_request", "nope", 422, {"detail": [{"loc": ["body", "x"], "msg": "m"}]})
    assert store.finish("a", T0 + 1, worker_id="w", failure=failure)
    job = store.get("a")
    assert job is not None and job.failure == failure and job.output is None and not job.succeeded


# --- start timeout ---


def test_expire_overdue_fails_only_late_queued_jobs(store: JobStore) -> None:
    store.submit(new_job("running", start_timeout_s=10), T0)
    store.submit(new_job("late", start_timeout_s=10), T0)
    store.submit(new_job("in-time", start_timeout_s=100), T0)
    store.submit(new_job("no-limit"), T0)
    # "running" was submitted first, so it is claimed first and then escapes the start timeout
    running = store.claim("w", 600, T0 + 1)
    assert running is not None and running.id == "running"
    assert store.expire_overdue(T0 + 5) == []
    assert store.expire_overdue(T0 + 11) == ["late"]
    late = store.get("late")
    assert late is not None and late.state is JobState.COMPLETED
    assert late.failure is not None and late.failure.error_type == "request_timeout" and late.failure.http_status == 504
    for other in ("in-time", "no-limit"):
        assert store.get(other).state is JobState.QUEUED  # type: ignore[union-attr]
    assert store.get("running").state is JobState.RUNNING  # type: ignore[union-attr]
    assert store.expire_overdue(T0 + 12) == []  # never twice


def test_a_completed_job_keeps_no_input(store: JobStore) -> None:
    """Nothing reads it once the job is done, and it may hold a large data URI for the whole retention period."""
    data = {"prompt": "p", "loras": [{"path": "data:application/octet-stream;base64," + "A" * 1000}]}
    for job_id in ("finished", "running", "cancelled", "expired"):
        store.submit(NewJob(id=job_id, endpoint="e", app="a", input=data, start_timeout_s=5.0), T0)
    claimed = [store.claim(f"w{i}", 600, T0 + 1) for i in range(2)]
    assert [job.id for job in claimed if job] == ["finished", "running"]
    assert store.get("finished").input == data  # type: ignore[union-attr]  # a running job has it
    assert store.finish("finished", T0 + 2, worker_id="w0", output={"video": {}})
    assert store.cancel("cancelled", cancelled_failure(), T0 + 2) is CancelOutcome.CANCELLED
    assert store.expire_overdue(T0 + 10) == ["expired"]
    for job_id in ("finished", "cancelled", "expired"):
        job = store.get(job_id)
        assert job is not None and job.state is JobState.COMPLETED and job.input == {}, job_id
    assert store.get("finished").output == {"video": {}}  # type: ignore[union-attr]
    assert store.get("running").input == data  # type: ignore[union-attr]


def test_claim_skips_jobs_past_their_start_deadline(store: JobStore) -> None:
    store.submit(new_job("late", start_timeout_s=5), T0)
    store.submit(new_job("ok"), T0 + 1)
    job = store.claim("w", 60, T0 + 10)
    assert job is not None and job.id == "ok"
    assert store.get("late").failure.error_type == "request_timeout"  # type: ignore[union-attr]


# --- recovery ---


def test_recover_lost_requeues_dead_workers_job_keeping_its_place(store: JobStore) -> None:
    submit_many(store, 3)
    first = store.claim("dead", 600, T0)
    assert first is not None and first.id == "j000"
    assert store.recover_lost(T0 + 1, ["dead"], max_attempts=3) == []
    job = store.get("j000")
    assert job is not None
    assert job.state is JobState.QUEUED and job.worker_id is None and job.lease_expires_at is None
    assert job.attempts == 1  # the lost run counts
    assert store.queue_position(job) == 0
    again = store.claim("alive", 600, T0 + 2)
    assert again is not None and again.id == "j000" and again.attempts == 2


def test_recover_lost_leaves_live_workers_jobs(store: JobStore) -> None:
    submit_many(store, 2)
    store.claim("dead", 600, T0)
    store.claim("alive", 600, T0)
    store.recover_lost(T0 + 1, ["dead"], max_attempts=3)
    assert store.get("j000").state is JobState.QUEUED  # type: ignore[union-attr]
    alive = store.get("j001")
    assert alive is not None and alive.state is JobState.RUNNING and alive.worker_id == "alive"


def test_recover_lost_returns_exhausted_jobs_and_helper_fails_them(store: JobStore) -> None:
    now = time.time()
    store.submit(new_job("a"), now)
    for _ in range(2):
        store.claim("dead", 600, now)
        store.recover_lost(now, ["dead"], max_attempts=2)
    job = store.get("a")
    assert job is not None and job.state is JobState.RUNNING and job.attempts == 2  # second recover gave up
    exhausted = store.recover_lost(now, ["dead"], max_attempts=2)
    assert [j.id for j in exhausted] == ["a"]
    assert store.get("a").state is JobState.RUNNING  # type: ignore[union-attr]  # the caller fails it
    assert recover_lost_jobs(store, ["dead"], max_attempts=2) == ["a"]
    job = store.get("a")
    assert job is not None and job.state is JobState.COMPLETED
    assert job.failure is not None and job.failure.error_type == "runner_disconnected"
    assert job.failure.http_status == 503
    assert any(e.level is LogLevel.ERROR for e in store.logs("a"))
    assert recover_lost_jobs(store, ["dead"], max_attempts=2) == []


def test_a_dead_workers_recovery_leaves_other_expired_leases_to_the_housekeeping(store: JobStore) -> None:
    """A supervisor that saw its worker exit takes that worker's jobs only: a healthy worker whose lease ran out in
    an outage gets its chance to renew it (the housekeeping's LeaseRecovery decides about expired leases)."""
    now = store.now()
    store.submit(new_job("dead's"), now - 100)
    store.submit(new_job("healthy's"), now - 99)
    store.claim("dead", 600, now - 100)
    store.claim("healthy", 30, now - 100)  # ran out 70 s ago
    assert recover_lost_jobs(store, ["dead"], max_attempts=3) == []
    assert store.get("dead's").state is JobState.QUEUED  # type: ignore[union-attr]
    assert store.get("healthy's").state is JobState.RUNNING  # type: ignore[union-attr]
    assert store.heartbeat("healthy's", "healthy", 30, now)
    recover_lost_jobs(store, [], max_attempts=3, expired_leases=True)
    assert store.get("healthy's").state is JobState.RUNNING  # type: ignore[union-attr]  # renewed meanwhile


def test_recover_lost_jobs_requeues_when_attempts_remain(store: JobStore) -> None:
    now = time.time()
    store.submit(new_job("a"), now)
    store.claim("dead", 600, now)
    assert recover_lost_jobs(store, ["dead"], max_attempts=3) == []
    assert store.get("a").state is JobState.QUEUED  # type: ignore[union-attr]


def test_expired_lease_is_recovered_without_naming_the_worker(store: JobStore) -> None:
    submit_many(store, 2)
    store.claim("hung", 10, T0)  # lease until T0 + 10
    store.claim("fine", 100, T0)  # lease until T0 + 100
    assert store.recover_lost(T0 + 5, [], max_attempts=3) == []
    assert store.get("j000").state is JobState.RUNNING  # type: ignore[union-attr]
    assert store.recover_lost(T0 + 11, [], max_attempts=3) == []
    assert store.get("j000").state is JobState.QUEUED  # type: ignore[union-attr]
    assert store.get("j001").state is JobState.RUNNING  # type: ignore[union-attr]
    # the hung worker no longer owns it
    assert store.heartbeat("j000", "hung", 10, T0 + 12) is False
    assert store.finish("j000", T0 + 12, worker_id="hung", output={}) is False


def test_release_requeues_without_counting_the_attempt(store: JobStore) -> None:
    submit_many(store, 2)
    store.claim("w", 60, T0)
    assert store.release("j000", "other", T0) is False
    assert store.release("j000", "w", T0, note="Worker shutting down") is True
    job = store.get("j000")
    assert job is not None
    assert job.state is JobState.QUEUED and job.attempts == 0 and job.worker_id is None and job.started_at is None
    assert store.queue_position(job) == 0
    assert [(e.level, e.message) for e in store.logs("j000")] == [(LogLevel.WARN, "Worker shutting down")]
    assert store.release("j000", "w", T0) is False  # no longer running
    again = store.claim("w2", 60, T0 + 1)
    assert again is not None and again.id == "j000" and again.attempts == 1


def test_a_job_cancelled_while_running_is_not_queued_again_when_released(store: JobStore) -> None:
    """A cancel that lands between a shutting-down worker's last cancel check and its hand-back."""
    submit_many(store, 2)
    store.claim("w", 60, T0)
    assert store.cancel("j000", cancelled_failure(), T0 + 1) is CancelOutcome.REQUESTED
    assert store.release("j000", "w", T0 + 2, note="Worker shutting down") is True
    job = store.get("j000")
    assert job is not None and job.state is JobState.COMPLETED and job.finished_at == T0 + 2
    assert job.failure is not None and job.failure.error_type == "client_cancelled"
    assert "Worker shutting down" not in [e.message for e in store.logs("j000")]
    assert store.counts()["IN_QUEUE"] == 1
    again = store.claim("w2", 60, T0 + 3)
    assert again is not None and again.id == "j001"  # the cancelled one never runs again


# --- logs ---


def test_logs_in_order_and_after_seq(store: JobStore) -> None:
    store.submit(new_job("a"), T0)
    store.submit(new_job("b"), T0)
    store.add_log("a", LogLevel.INFO, "one", T0 + 1)
    store.add_log("b", LogLevel.WARN, "other job", T0 + 1)
    store.add_log("a", LogLevel.ERROR, "two", T0 + 2)
    store.add_log("a", LogLevel.DEBUG, "three", T0 + 3)
    logs = store.logs("a")
    assert [(e.message, e.level, e.timestamp) for e in logs] == [
        ("one", LogLevel.INFO, T0 + 1),
        ("two", LogLevel.ERROR, T0 + 2),
        ("three", LogLevel.DEBUG, T0 + 3),
    ]
    assert [e.seq for e in logs] == sorted(e.seq for e in logs)
    assert [e.message for e in store.logs("a", after_seq=logs[0].seq)] == ["two", "three"]
    assert store.logs("a", after_seq=logs[-1].seq) == []
    assert [e.message for e in store.logs("b")] == ["other job"]
    assert store.logs("nobody") == []


# --- webhooks ---


def test_finished_job_with_webhook_url_queues_one_due_webhook(store: JobStore) -> None:
    store.submit(new_job("hooked", webhook_url="http://h.test/cb"), T0)
    store.submit(new_job("plain"), T0)
    store.claim("w", 60, T0)
    store.claim("w", 60, T0)
    assert store.due_webhooks(T0 + 100) == []
    store.finish("hooked", T0 + 1, worker_id="w", output={})
    store.finish("plain", T0 + 1, worker_id="w", output={})
    assert store.due_webhooks(T0 + 0.5) == []  # not due before the job finished
    due = store.due_webhooks(T0 + 1)
    assert len(due) == 1
    assert (due[0].job_id, due[0].url, due[0].attempts) == ("hooked", "http://h.test/cb", 0)
    store.finish("hooked", T0 + 2, output={})  # a refused second finish queues nothing
    assert len(store.due_webhooks(T0 + 3)) == 1


def test_cancelled_queued_job_also_queues_its_webhook(store: JobStore) -> None:
    store.submit(new_job("a", webhook_url="http://h.test/cb"), T0)
    store.cancel("a", cancelled_failure(), T0 + 1)
    assert [w.job_id for w in store.due_webhooks(T0 + 1)] == ["a"]


def test_webhook_retry_give_up_and_delivery(store: JobStore) -> None:
    for job_id in ("r", "g", "d"):
        store.submit(new_job(job_id, webhook_url=f"http://h.test/{job_id}"), T0)
        store.finish(job_id, T0, output={})
    hooks = {w.job_id: w for w in store.due_webhooks(T0)}
    assert set(hooks) == {"r", "g", "d"}
    store.webhook_failed(hooks["r"].id, "HTTP 500", retry_at=T0 + 50)
    store.webhook_failed(hooks["g"].id, "HTTP 500", retry_at=None)
    store.webhook_delivered(hooks["d"].id, T0 + 1)
    assert store.due_webhooks(T0 + 49) == []
    later = store.due_webhooks(T0 + 50)
    assert [(w.job_id, w.attempts, w.next_attempt_at) for w in later] == [("r", 1, T0 + 50)]
    assert store.due_webhooks(T0 + 10_000) == later  # the given-up and delivered ones never come back


def test_due_webhooks_limit_and_order(store: JobStore) -> None:
    for i in range(5):
        store.submit(new_job(f"h{i}", webhook_url="http://h.test/"), T0)
        store.finish(f"h{i}", T0 + 5 - i, output={})
    due = store.due_webhooks(T0 + 10, limit=3)
    assert [w.job_id for w in due] == ["h4", "h3", "h2"]


# --- metrics ---


def test_counts_by_state_and_outcome(open_store: OpenStore) -> None:
    """`outcome:` counts the completed jobs still stored; `finished:` counts every completion, and pruning the
    jobs takes nothing off it (a Prometheus counter, read by every API replica from the store)."""
    store = open_store()
    assert store.counts() == {"IN_QUEUE": 0, "IN_PROGRESS": 0, "COMPLETED": 0}
    submit_many(store, 6)
    store.claim("w", 60, T0)  # j000
    store.claim("w", 60, T0)  # j001
    store.finish("j001", T0, worker_id="w", output={})
    store.cancel("j002", cancelled_failure(), T0)
    store.cancel("j003", cancelled_failure(), T0)
    store.claim("w", 60, T0)  # j004
    store.finish("j004", T0, worker_id="w", failure=Failure("bad_request", "x", 422))
    assert store.counts() == {
        "IN_QUEUE": 1,
        "IN_PROGRESS": 1,
        "COMPLETED": 4,
        "outcome:ok": 1,
        "outcome:client_cancelled": 2,
        "outcome:bad_request": 1,
        "finished:ok": 1,
        "finished:client_cancelled": 2,
        "finished:bad_request": 1,
    }
    assert not store.finish("j004", T0, worker_id="w", output={})  # refused: counted once
    store.finish("j000", T0 + 1, worker_id="w", output={})
    assert store.prune_completed(T0 + 100) == 5
    assert open_store().counts() == {  # as another process reads them (the API's scrape)
        "IN_QUEUE": 1,
        "IN_PROGRESS": 0,
        "COMPLETED": 0,
        "finished:ok": 2,
        "finished:client_cancelled": 2,
        "finished:bad_request": 1,
    }


def test_job_timings_count_each_completion(open_store: OpenStore) -> None:
    """The histograms behind /metrics: each completion adds its generation time (successful runs) and its wait
    from submission to the start of the run that completed it; a job cancelled in the queue adds neither."""
    store = open_store()
    assert store.timings() == {}
    store.submit(new_job("fast"), T0)
    store.submit(new_job("slow"), T0 + 1)
    store.submit(new_job("never"), T0 + 2)
    store.cancel("never", cancelled_failure(), T0 + 3)
    assert store.claim("w", 60, T0 + 12).id == "fast"  # type: ignore[union-attr]
    assert store.finish("fast", T0 + 50, worker_id="w", output={}, inference_time=37.5)
    assert store.claim("w", 60, T0 + 400).id == "slow"  # type: ignore[union-attr]
    assert store.finish("slow", T0 + 401, worker_id="w", failure=Failure("bad_request", "x", 422))
    store.finish("slow", T0 + 402, worker_id="w", output={}, inference_time=1.0)  # refused: already completed

    timings = open_store().timings()  # as another process reads them (the API's scrape)
    assert set(timings) == {INFERENCE, QUEUE_WAIT}
    inference, wait = timings[INFERENCE], timings[QUEUE_WAIT]
    assert inference.count == 1 and inference.total_s == pytest.approx(37.5)
    assert inference.bucket_counts[timing_bucket(37.5)] == 1 and TIMING_BUCKETS_S[timing_bucket(37.5)] == 60
    assert wait.count == 2 and wait.total_s == pytest.approx(12 + 399)
    assert wait.bucket_counts[timing_bucket(12)] == 1 and wait.bucket_counts[timing_bucket(399)] == 1
    assert TIMING_BUCKETS_S[timing_bucket(12)] == 20 and TIMING_BUCKETS_S[timing_bucket(399)] == 600
    assert timing_bucket(60) == TIMING_BUCKETS_S.index(60)  # a bucket holds values up to its bound, included
    store.submit(new_job("late"), T0)
    store.claim("w", 60, T0 + 7200)
    store.finish("late", T0 + 9000, worker_id="w", output={}, inference_time=1800.0)
    timings = store.timings()
    assert timings[QUEUE_WAIT].bucket_counts[-1] == 1  # past the last bound: +Inf
    assert timings[INFERENCE].bucket_counts[TIMING_BUCKETS_S.index(1800)] == 1


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -1.0])
def test_a_generation_time_that_is_no_duration_completes_the_job_uncounted(store: JobStore, bad: float) -> None:
    """Redis' HINCRBYFLOAT refuses inf and NaN, and a script that fails keeps what it wrote before: the job stayed
    running for good (and each retry of the finish counted once more)."""
    store.submit(new_job("odd"), T0)
    store.claim("w", 60, T0 + 1)
    assert store.finish("odd", T0 + 2, worker_id="w", output={}, inference_time=bad)
    done = store.get("odd")
    assert done is not None and done.state is JobState.COMPLETED
    assert done.inference_time is None  # stored, NaN or inf would fail every status answer as JSON
    assert INFERENCE not in store.timings()
    assert store.timings()[QUEUE_WAIT].count == 1


# --- workers ---


def test_workers_register_update_remove(store: JobStore) -> None:
    from wanserve.jobs.model import WorkerInfo

    store.register_worker(WorkerInfo("w2", False, T0, {"gpu": 1}))
    store.register_worker(WorkerInfo("w1", True, T0))
    store.register_worker(WorkerInfo("w2", True, T0 + 5, {"gpu": 2}))
    assert store.workers() == [WorkerInfo("w1", True, T0), WorkerInfo("w2", True, T0 + 5, {"gpu": 2})]
    store.remove_worker("w1")
    assert [w.id for w in store.workers()] == ["w2"]


def test_a_write_probe_changes_no_job_or_worker(store: JobStore) -> None:
    store.submit(new_job("j"), T0)
    before = (store.get("j"), store.workers(), store.counts())
    store.probe_write(T0)
    store.probe_write(T0 + 1)  # again: it replaces its one record
    assert (store.get("j"), store.workers(), store.counts()) == before


# --- durability ---


def test_data_survives_closing_and_reopening_the_store(open_store: OpenStore) -> None:
    a = open_store()
    submit_many(a, 3)
    a.claim("w", 60, T0)
    a.finish("j000", T0 + 1, worker_id="w", output={"video": {"url": "x"}})
    a.add_log("j001", LogLevel.INFO, "hello", T0)
    a.close()
    b = open_store()
    done = b.get("j000")
    assert done is not None and done.state is JobState.COMPLETED and done.output == {"video": {"url": "x"}}
    assert [e.message for e in b.logs("j001")] == ["hello"]
    nxt = b.claim("w2", 60, T0 + 2)
    assert nxt is not None and nxt.id == "j001"
    assert b.counts()["IN_QUEUE"] == 1


def test_writes_are_visible_to_another_open_store_at_once(open_store: OpenStore) -> None:
    a, b = open_store(), open_store()
    a.submit(new_job("x"), T0)
    job = b.claim("w", 60, T0)
    assert job is not None and job.id == "x"
    assert a.get("x").state is JobState.RUNNING  # type: ignore[union-attr]
    assert a.cancel("x", cancelled_failure(), T0) is CancelOutcome.REQUESTED
    assert b.cancel_requested("x") is True


def test_the_start_deadline_never_expires_a_job_that_already_started(store: JobStore) -> None:
    store.submit(new_job("retried", start_timeout_s=5), T0)
    store.submit(new_job("released", start_timeout_s=5), T0)
    assert store.claim("w1", 10, T0 + 1) is not None
    assert store.claim("w2", 100, T0 + 1) is not None
    assert store.release("released", "w2", T0 + 1)
    assert store.recover_lost(T0 + 20, [], max_attempts=3) == []  # w1's lease ran out: back to the queue
    assert store.expire_overdue(T0 + 21) == []
    claimed = {store.claim("w3", 10, T0 + 22).id, store.claim("w3", 10, T0 + 22).id}  # type: ignore[union-attr]
    assert claimed == {"retried", "released"}


def test_a_failure_is_logged_in_the_transaction_that_completes_the_job(store: JobStore) -> None:
    store.submit(new_job("q"), T0)
    store.cancel("q", cancelled_failure(), T0 + 1)
    job = store.get("q")
    logs = store.logs("q")
    assert job is not None and job.state is JobState.COMPLETED
    assert logs and "client_cancelled" in logs[-1].message and logs[-1].timestamp == T0 + 1


def test_a_job_cancelled_while_running_is_not_rerun_when_its_worker_dies(store: JobStore) -> None:
    store.submit(new_job("c"), T0)
    store.claim("dead", 10, T0)
    store.cancel("c", cancelled_failure(), T0 + 1)
    assert recover_lost_jobs(store, ["dead"], max_attempts=3) == ["c"]
    job = store.get("c")
    assert job is not None and job.failure is not None and job.failure.error_type == "client_cancelled"


def test_prune_deletes_old_completed_jobs_with_their_logs_but_waits_for_pending_webhooks(
    store: JobStore,
) -> None:
    store.submit(new_job("old"), T0)
    store.submit(new_job("old-hooked", webhook_url="http://hook.test/"), T0)
    store.submit(new_job("recent"), T0)
    store.submit(new_job("queued"), T0)
    store.add_log("old", LogLevel.INFO, "hello", T0)
    for job_id, finished in (("old", T0 + 1), ("old-hooked", T0 + 1), ("recent", T0 + 100)):
        store.claim("w", 60, T0)
        assert store.finish(job_id, finished, output={"ok": True})
    assert store.prune_completed(T0 + 50) == 1  # "old-hooked" waits for its webhook
    assert store.get("old") is None and store.logs("old") == []
    assert store.get("old-hooked") is not None and store.get("recent") is not None
    assert store.get("queued") is not None  # never prunes unfinished work
    (hook,) = store.due_webhooks(T0 + 10**6)
    store.webhook_delivered(hook.id, T0 + 2)
    assert store.prune_completed(T0 + 50) == 1
    assert store.get("old-hooked") is None and store.due_webhooks(T0 + 10**6) == []


def test_claim_expires_every_overdue_job_not_only_the_head(store: JobStore) -> None:
    store.submit(new_job("first"), T0)
    store.submit(new_job("late", start_timeout_s=5), T0 + 1)
    job = store.claim("w", 60, T0 + 10)
    assert job is not None and job.id == "first"
    late = store.get("late")
    assert late is not None and late.state is JobState.COMPLETED  # expired by the claim, as a queue scan would
    assert late.failure is not None and late.failure.error_type == "request_timeout"
    assert store.counts()["IN_QUEUE"] == 0


def test_logs_after_a_negative_seq_are_all_of_them(store: JobStore) -> None:
    store.submit(new_job("a"), T0)
    store.add_log("a", LogLevel.INFO, "one", T0)
    store.add_log("a", LogLevel.INFO, "two", T0)
    assert store.logs("a", after_seq=-1) == store.logs("a")


def test_a_webhook_pending_again_after_it_settled_keeps_its_job_from_pruning(store: JobStore) -> None:
    """Two deliveries of one webhook overlapped (the first outlived its hold): the first settled it, the second
    failed and scheduled a retry. The job must stay until that retry settles, and the retry must still run."""
    store.submit(new_job("h", webhook_url="http://hook.test/"), T0)
    store.finish("h", T0, output={})
    (hook,) = store.claim_due_webhooks(T0, hold_s=10)
    store.webhook_delivered(hook.id, T0 + 1)
    store.webhook_failed(hook.id, "HTTP 500", retry_at=T0 + 20)
    assert store.prune_completed(T0 + 10**6) == 0
    assert store.get("h") is not None
    assert [w.job_id for w in store.claim_due_webhooks(T0 + 20, hold_s=10)] == ["h"]


def test_the_out_of_attempts_jobs_recovery_returns_are_as_it_found_them(store: JobStore) -> None:
    """The sweep hands back the jobs out of attempts as it found them, under its own write: still running, on the
    worker and attempt they had. recover_lost_jobs fails each only if it is still that run (the test below puts a
    handover between the two steps); a job read again instead could already be another worker's new run."""
    store.submit(new_job("j1"), T0)
    assert store.claim("w1", 10, T0) is not None
    (found,) = store.recover_lost(T0 + 60, ["w1"], max_attempts=1)
    assert (found.id, found.state, found.worker_id, found.attempts) == ("j1", JobState.RUNNING, "w1", 1)
    job = store.get("j1")  # the sweep itself leaves it running, for recover_lost_jobs to fail
    assert job is not None and (job.state, job.worker_id) == (JobState.RUNNING, "w1")


def test_recovering_an_out_of_attempts_job_leaves_a_newer_run_alone(store: JobStore) -> None:
    """The sweep reads the jobs out of attempts, then completes them. If in between the slow original worker handed
    the job back and another worker claimed it, the new run must not be failed under it."""
    store.submit(new_job("j1"), T0)
    first = store.claim("w1", 10, T0)
    assert first is not None and first.attempts == 1
    found = store.recover_lost(T0 + 60, ["w1"], max_attempts=1)  # w1's lease ran out: out of attempts
    assert [job.id for job in found] == ["j1"]

    class Interleaved:  # the store as the sweep sees it, with the two workers acting between its two steps
        def __getattr__(self, name: str) -> object:
            return getattr(store, name)

        def recover_lost(self, now: float, dead: list[str], max_attempts: int) -> list[object]:
            jobs = store.recover_lost(now, dead, max_attempts)
            assert store.release("j1", "w1", now)
            assert store.claim("w2", 60, now) is not None
            return jobs

    assert recover_lost_jobs(Interleaved(), ["w1"], 1) == []  # type: ignore[arg-type]
    job = store.get("j1")
    assert job is not None and job.state is JobState.RUNNING and job.worker_id == "w2"
    assert store.heartbeat("j1", "w2", 60, T0 + 61)
