"""What only the Redis store has: surviving a Redis restart, and scripts that are safe to run twice (a call
whose reply was lost is retried). The shared behaviour is in test_store_contract.py."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis
from redis_server import RedisServer
from test_store_contract import T0, new_job, submit_many

from wanserve.api.app import create_app
from wanserve.api.metrics import live_workers
from wanserve.config import Settings
from wanserve.jobs.model import JobState, LogLevel, Priority, WorkerInfo, cancelled_failure
from wanserve.jobs.service import forget_silent_workers, recover_lost_jobs
from wanserve.store.redis import RedisJobStore


def test_a_redis_killed_and_restarted_loses_no_job_and_the_store_reconnects(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    store = RedisJobStore.from_url(server.url, prefix="restart")
    try:
        ids = submit_many(store, 10)
        running = store.claim("w1", 60, T0 + 1)
        assert running is not None
        store.add_log(running.id, LogLevel.INFO, "step 1/30", T0 + 2)
        store.cancel(ids[5], cancelled_failure(), T0 + 3)

        server.kill()  # kill -9: only the append-only file survives
        restarted = threading.Timer(1.0, server.start)  # the store's calls wait and retry meanwhile
        restarted.start()
        before = time.monotonic()
        assert store.heartbeat(running.id, "w1", 60, T0 + 4) is True
        assert time.monotonic() - before >= 0.5  # it really waited for the restart
        restarted.join()

        counts = store.counts()
        assert counts["IN_QUEUE"] == 8 and counts["IN_PROGRESS"] == 1 and counts["COMPLETED"] == 1
        assert [e.message for e in store.logs(running.id)] == ["step 1/30"]
        claimed = []
        while (job := store.claim("w2", 60, T0 + 5)) is not None:
            claimed.append(job.id)
        assert claimed == [i for i in ids if i not in (running.id, ids[5])]  # same order as before the crash
        assert store.finish(running.id, T0 + 6, worker_id="w1", output={"ok": True})
    finally:
        store.close()
        server.stop()


def test_a_claim_sent_twice_claims_one_job(redis_server: RedisServer, redis_prefix: str) -> None:
    """The claim script run again with the same token (what a retried call whose reply was lost does) answers the
    job it claimed the first time, with its fields, and claims nothing more."""
    store = RedisJobStore.from_url(redis_server.url, prefix=redis_prefix)
    submit_many(store, 2)
    first = store._run("claim", "w", "1700000001", "1700000061", "token-1")
    again = store._run("claim", "w", "1700000002", "1700000062", "token-1")
    assert first == again and first[0] == "claimed"
    fields = dict(zip(first[1::2], first[2::2], strict=True))
    assert (fields["id"], fields["state"], fields["attempts"], fields["worker_id"]) == ("j000", "IN_PROGRESS", "1", "w")
    assert store.counts()["IN_QUEUE"] == 1 and store.counts()["IN_PROGRESS"] == 1
    store.close()


def test_a_submit_sent_twice_queues_one_job(redis_server: RedisServer, redis_prefix: str) -> None:
    store = RedisJobStore.from_url(redis_server.url, prefix=redis_prefix)
    first = store.submit(new_job("same", webhook_url="http://hook.test/"), T0)
    again = store.submit(new_job("same", webhook_url="http://hook.test/"), T0 + 1)
    assert again == first and store.counts()["IN_QUEUE"] == 1
    job = store.claim("w", 60, T0 + 2)
    assert job is not None and job.state is JobState.RUNNING
    assert store.finish("same", T0 + 3, worker_id="w", output={})
    assert not store.finish("same", T0 + 4, worker_id="w", output={})  # a retried finish: no second webhook
    assert len(store.due_webhooks(T0 + 10)) == 1
    store.close()


def test_queue_order_is_exact_for_large_submission_numbers(redis_server: RedisServer, redis_prefix: str) -> None:
    """The queue score packs (priority, seq) into one float: it must stay exact for 15-digit values."""
    store = RedisJobStore.from_url(redis_server.url, prefix=redis_prefix)
    store.redis.set(f"{redis_prefix}:seq", 10**13)
    submit_many(store, 3, priority=Priority.LOW)  # scores near 3e14
    a, b, c = (store.get(f"j00{i}") for i in range(3))
    assert a and b and c and (a.seq, b.seq, c.seq) == (10**13 + 1, 10**13 + 2, 10**13 + 3)
    assert [store.queue_position(j) for j in (a, b, c)] == [0, 1, 2]
    assert [store.claim("w", 60, T0).id for _ in range(3)] == ["j000", "j001", "j002"]  # type: ignore[union-attr]
    store.close()


def test_a_claim_whose_reply_was_lost_is_retried_without_claiming_a_second_job(
    redis_server: RedisServer, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RedisJobStore.from_url(redis_server.url, prefix=redis_prefix)
    submit_many(store, 2)
    send = store.redis._send_command_parse_response
    lost: list[object] = []

    def lose_first_script_reply(conn: object, command_name: str, *args: object, **options: object) -> object:
        reply = send(conn, command_name, *args, **options)  # Redis ran it...
        if command_name == "EVALSHA" and not lost:
            lost.append(reply)
            raise redis.ConnectionError("connection reset")  # ...but the reply never arrived: redis-py resends
        return reply

    monkeypatch.setattr(store.redis, "_send_command_parse_response", lose_first_script_reply)
    job = store.claim("w", 60, T0)
    assert lost and job is not None and job.id == "j000" and job.attempts == 1
    assert store.counts()["IN_PROGRESS"] == 1  # not j000 stranded with a second job claimed behind it
    assert store.get("j001").state is JobState.QUEUED  # type: ignore[union-attr]
    store.close()


def test_claim_with_a_token_again_returns_the_job_it_took(redis_server: RedisServer, redis_prefix: str) -> None:
    store = RedisJobStore.from_url(redis_server.url, prefix=redis_prefix)
    submit_many(store, 2)
    first = store.claim("w", 60, T0, token="t-1")
    again = store.claim("w", 60, T0 + 1, token="t-1")
    assert first is not None and again is not None and again.id == first.id == "j000"
    assert store.counts()["IN_QUEUE"] == 1
    other = store.claim("w", 60, T0 + 2, token="t-2")
    assert other is not None and other.id == "j001"
    store.close()


def test_a_retried_claim_does_not_return_a_job_that_is_no_longer_its_own(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """The retry came after the job's lease ran out and another worker took it: the token gives nothing back, and
    the claim goes on to the queue."""
    store = RedisJobStore.from_url(redis_server.url, prefix=redis_prefix)
    submit_many(store, 2)
    assert store.claim("w1", 10, T0, token="t-1") is not None  # j000, its reply "lost"
    assert store.recover_lost(T0 + 30, [], max_attempts=3) == []  # its lease ran out: back in the queue
    requeued = store.get("j000")
    assert requeued is not None and requeued.state is JobState.QUEUED
    taken = store.claim("w2", 60, T0 + 31)
    assert taken is not None and taken.id == "j000"
    retried = store.claim("w1", 60, T0 + 32, token="t-1")
    assert retried is not None and retried.id == "j001"  # the next job, not w2's
    job = store.get("j000")
    assert job is not None and job.worker_id == "w2"
    store.close()


def _store_on_a_machine(server: RedisServer, prefix: str, clock_error_s: float) -> RedisJobStore:
    """A store as a process on another machine opens it: that machine's clock is `clock_error_s` off."""
    client = redis.Redis.from_url(server.url, decode_responses=True)
    return RedisJobStore(client, prefix, machine_clock=lambda: time.time() + clock_error_s)


def test_machines_whose_clocks_disagree_agree_on_leases_deadlines_and_heartbeats(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """Times written to Redis come from Redis's clock: a worker whose machine runs an hour behind keeps its lease
    and counts as live on a replica an hour ahead, and that replica's worker still gets a job the slow machine
    queued with a one-minute start timeout."""
    behind = _store_on_a_machine(redis_server, redis_prefix, -3600.0)
    ahead = _store_on_a_machine(redis_server, redis_prefix, +3600.0)
    try:
        for store in (behind, ahead):  # this Redis runs here: its clock is this machine's
            assert abs(store.now() - time.time()) < 1.0

        behind.submit(new_job("running"), behind.now())
        running = behind.claim("w-behind", 30, behind.now())
        assert running is not None and running.id == "running"
        behind.register_worker(WorkerInfo("w-behind", True, behind.now(), {}))
        assert recover_lost_jobs(ahead, [], max_attempts=3, expired_leases=True) == []
        assert ahead.counts()["IN_PROGRESS"] == 1 and ahead.recover_lost(ahead.now(), [], 3) == []
        assert [w.id for w in live_workers(ahead, 30)] == ["w-behind"]
        assert forget_silent_workers(ahead, 600) == []
        assert behind.heartbeat("running", "w-behind", 30, behind.now())

        behind.submit(new_job("waiting", start_timeout_s=60), behind.now())
        claimed = ahead.claim("w-ahead", 30, ahead.now())
        assert claimed is not None and claimed.id == "waiting" and claimed.state is JobState.RUNNING

        # The lease still runs out on the shared clock.
        ahead.recover_lost(ahead.now() + 31, [], 3)
        job = ahead.get("running")
        assert job is not None and job.state is JobState.QUEUED
    finally:
        behind.close()
        ahead.close()


def test_a_step_of_the_machines_wall_clock_does_not_move_the_store_clock(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """NTP or an operator steps this machine's clock 40 s ahead between two readings: leases written before the
    step must not look expired to this replica's housekeeping (the store counts on with a monotonic clock)."""
    step = [0.0]
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    store = RedisJobStore(client, redis_prefix, machine_clock=lambda: time.time() + step[0])
    try:
        store.submit(new_job("running"), store.now())
        assert store.claim("w1", 30, store.now()) is not None
        before = store.now()
        step[0] = 40.0
        after = store.now()
        assert 0 <= after - before < 1.0
        assert store.recover_lost(store.now(), [], 3) == []
        assert recover_lost_jobs(store, [], max_attempts=1, expired_leases=True) == []
        assert store.heartbeat("running", "w1", 30, store.now())
    finally:
        store.close()


def test_a_step_of_redis_own_clock_reaches_every_process_within_a_second(
    redis_server: RedisServer, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis's clock steps 40 s back (NTP on its host, a failover to a replica on another machine). A worker that
    reads the new time first (one started since) takes a lease on it: the replica's housekeeping must not take that
    lease for expired because it still counts on the old time."""
    step = [0.0]

    def on_stepped_redis(store: RedisJobStore) -> RedisJobStore:
        real_time = store.redis.time

        def stepped() -> tuple[int, int]:
            seconds, micros = real_time()
            return int(seconds + step[0]), micros

        monkeypatch.setattr(store.redis, "time", stepped)
        return store

    replica = on_stepped_redis(_store_on_a_machine(redis_server, redis_prefix, 0.0))
    replica.submit(new_job("running"), replica.now())
    step[0] = -40.0
    time.sleep(1.1)
    worker = on_stepped_redis(_store_on_a_machine(redis_server, redis_prefix, 0.0))
    try:
        assert worker.claim("w1", 30, worker.now()) is not None  # its lease ends 10 s before the old time's now
        assert recover_lost_jobs(replica, [], max_attempts=3, expired_leases=True) == []
        job = replica.get("running")
        assert job is not None and job.state is JobState.RUNNING
    finally:
        worker.close()
        replica.close()


def test_the_store_clock_rides_out_a_lost_redis_with_the_offset_it_had(
    redis_server: RedisServer, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _store_on_a_machine(redis_server, redis_prefix, -120.0)
    try:
        assert abs(store.now() - time.time()) < 1.0
        monkeypatch.setattr("wanserve.store.redis.CLOCK_REFRESH_S", 0.0)  # measure again at every call

        def lost(*args: object) -> None:
            raise redis.ConnectionError("Redis went away")

        monkeypatch.setattr(store.redis, "time", lost)
        assert abs(store.now() - time.time()) < 1.0
        fresh = _store_on_a_machine(redis_server, redis_prefix, 0.0)
        monkeypatch.setattr(fresh.redis, "time", lost)
        with pytest.raises(redis.ConnectionError):  # no offset yet: no made-up time
            fresh.now()
        fresh.close()
    finally:
        store.close()


def test_a_stalled_redis_stalls_only_the_requests_that_read_it(tmp_path: Path) -> None:
    """Status reads of a Redis store run in a thread: on the event loop, one read waiting on a stalled Redis (30 s
    socket timeout) would hold up every request of the API process, health checks included."""
    stalled = RedisServer(tmp_path / "redis").start()
    assert stalled.process is not None
    settings = Settings(data_dir=tmp_path / "data", public_url="http://testserver", store=stalled.url)
    app = create_app(settings, workers=0)

    async def run() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as client:
            submitted = await client.post("/fal-ai/wan-22", json={"prompt": "a fox"})
            assert submitted.status_code == 200, submitted.text
            request_id = submitted.json()["request_id"]
            pid = stalled.process.pid
            os.kill(pid, signal.SIGSTOP)  # alive, connected, answering nothing
            # Redis comes back after 5 s whatever happens: a loop blocked by a read would otherwise never get here.
            resume = threading.Timer(5.0, os.kill, (pid, signal.SIGCONT))
            resume.start()
            try:
                # more pollers than any thread pool has threads (the fal clients poll every 0.1-0.5 s)
                url = f"/fal-ai/wan-22/requests/{request_id}/status"
                statuses = [asyncio.create_task(client.get(url)) for _ in range(60)]
                await asyncio.sleep(0.3)
                health = await asyncio.wait_for(client.get("/health"), 4)
                assert health.status_code == 200
                page = await asyncio.wait_for(client.get("/"), 4)  # a sync route: it needs a free pool thread
                assert page.status_code == 200
                assert not any(status.done() for status in statuses)  # still waiting for Redis, in their threads
            finally:
                resume.cancel()
                os.kill(pid, signal.SIGCONT)
            for answered in await asyncio.wait_for(asyncio.gather(*statuses), 30):
                assert answered.status_code == 202 and answered.json()["status"] == "IN_QUEUE"

    try:
        asyncio.run(run())
    finally:
        stalled.stop()
