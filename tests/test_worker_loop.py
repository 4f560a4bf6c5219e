"""The worker's own bookkeeping around a run, with the engine replaced by a stand-in that writes a file."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from redis_server import RedisServer

from wanserve.backends import open_file_store, open_job_store
from wanserve.config import Settings
from wanserve.errors import (
    FileNotFound,
    GenerationCancelled,
    InvalidGenerationInput,
    NonFiniteOutput,
    ParallelGroupFailed,
    StorageUnavailable,
)
from wanserve.files.base import check_key, key_from_file_ref, output_key
from wanserve.jobs.model import Job, JobState, NewJob
from wanserve.jobs.service import recover_lost_jobs
from wanserve.worker import loop
from wanserve.worker.loop import Worker


class InstantRunner:
    """Does what EngineRunner.generate_video promises (progress, cancel checks, an mp4 at `output`)."""

    def generate_video(
        self, request: Any, output: Path, on_step: Any, is_cancelled: Any, on_phase: Any, **extra: Any
    ) -> Any:
        assert not is_cancelled()
        output.write_bytes(b"\x00\x00\x00\x18ftypisom")
        return SimpleNamespace(seed=3, generation=SimpleNamespace(timings={"total_s": 0.01}))


def claimed_by_a_worker(settings: Settings, job_input: dict[str, Any] | None = None) -> tuple[Any, Worker, Job]:
    """A loaded worker `w1` (InstantRunner) on the settings' store, holding the job `j1` it claimed."""
    store = open_job_store(settings)
    worker = Worker(
        settings, store, open_file_store(settings), worker_id="w1", runner_factory=lambda s: InstantRunner()
    )
    worker.load()
    store.submit(NewJob("j1", "fal-ai/wan-22", "fal-ai/wan-22", job_input or {"prompt": "a fox"}), time.time())
    job = store.claim("w1", 10, time.time())
    assert job is not None
    return store, worker, job


def test_a_worker_says_when_its_safety_checker_has_nothing_to_check_with(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """enable_safety_checker is on by default, and checks nothing until the operator configures a term list or a
    classifier: the worker's start says so, and /ready's worker details show what the checks do."""
    with caplog.at_level("WARNING", logger="wanserve.engine.prompt_gate"):
        _store, worker, _job = claimed_by_a_worker(Settings(data_dir=tmp_path, public_url="http://test"))
    assert any("nothing to check with" in r.getMessage() for r in caplog.records)
    assert (worker._detail["safety_checker"], worker._detail["prompt_expansion"]) == (
        "nothing configured",
        "not configured",
    )
    terms = tmp_path / "terms.txt"
    terms.write_text("forbidden\n")
    caplog.clear()
    with caplog.at_level("WARNING", logger="wanserve.engine.prompt_gate"):
        _store, worker, _job = claimed_by_a_worker(
            Settings(data_dir=tmp_path / "b", public_url="http://test", safety_terms_file=terms)
        )
    assert not any("nothing to check with" in r.getMessage() for r in caplog.records)
    assert worker._detail["safety_checker"] == "term policy"


def test_a_job_taken_back_from_a_worker_runs_normally_when_that_worker_claims_it_again(tmp_path: Path) -> None:
    store, worker, _first = claimed_by_a_worker(Settings(data_dir=tmp_path, public_url="http://test", job_lease_s=10))
    worker._lease_lost_run = ("j1", 1)  # what the heartbeat records when the store gave the job away
    recover_lost_jobs(store, ["w1"], max_attempts=3)
    again = store.claim("w1", 10, time.time())
    assert again is not None and again.attempts == 2

    class LateBeatRunner(InstantRunner):
        def generate_video(self, *args: Any, **kwargs: Any) -> Any:
            # The heartbeat thread's answer about run 1 arrives while run 2 has started (it read run 1 as current).
            worker._lease_lost_run = ("j1", 1)
            return super().generate_video(*args, **kwargs)

    worker._runner = LateBeatRunner()  # type: ignore[assignment]
    worker.process(again)
    done = store.get("j1")
    assert done is not None and done.state is JobState.COMPLETED and done.failure is None
    assert done.output is not None and done.output["seed"] == 3


def test_a_lease_lost_by_the_running_run_stops_it_without_finishing_it(tmp_path: Path) -> None:
    store, worker, job = claimed_by_a_worker(Settings(data_dir=tmp_path, public_url="http://test", job_lease_s=10))

    class LostRunner(InstantRunner):
        def generate_video(self, *args: Any, **kwargs: Any) -> Any:
            worker._lease_lost_run = ("j1", 1)  # this very run's lease: the store gave it away
            return super().generate_video(*args, **kwargs)

    worker._runner = LostRunner()  # type: ignore[assignment]
    worker.process(job)
    left = store.get("j1")
    assert left is not None and left.state is JobState.RUNNING and left.output is None  # left to the store


def run_one(settings: Settings, job_input: dict[str, Any]) -> tuple[Any, list[str]]:
    store, worker, job = claimed_by_a_worker(settings, job_input)
    worker.process(job)
    return store.get("j1"), [entry.message for entry in store.logs("j1")]


def test_operator_forced_safety_checks_run_even_when_the_request_turns_them_off(tmp_path: Path) -> None:
    terms = tmp_path / "terms.txt"
    terms.write_text("forbidden\n")
    settings = Settings(data_dir=tmp_path, public_url="http://test", safety_terms_file=terms, safety_force=True)
    done, logs = run_one(settings, {"prompt": "a forbidden fox", "enable_safety_checker": False})
    assert done.failure is not None and done.failure.error_type == "content_policy_violation"
    assert done.failure.http_status == 422 and done.failure.body["detail"][0]["loc"] == ["body", "prompt"]
    assert "Safety checker: checking the prompt (term policy)" in logs
    # Not forced: the request's own choice, and the log says the check did not run.
    unforced = settings.model_copy(update={"safety_force": False, "data_dir": tmp_path / "unforced"})
    done, logs = run_one(unforced, {"prompt": "a forbidden fox", "enable_safety_checker": False})
    assert done.failure is None
    assert "Safety checker: off for this request (enable_safety_checker: false)" in logs


def test_expansion_asked_for_without_a_backend_uses_the_prompt_and_says_why(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, public_url="http://test")
    done, logs = run_one(settings, {"prompt": "a fox", "enable_prompt_expansion": True})
    assert done.failure is None and done.output["prompt"] == "a fox"
    assert any(line.startswith("Prompt expansion skipped: no expansion model or API is configured") for line in logs)


class SteppingRunner(InstantRunner):
    """Takes `steps` x `step_s`, checking for cancellation between steps like the engine."""

    def __init__(self, steps: int, step_s: float = 0.05) -> None:
        self.steps, self.step_s = steps, step_s
        self.started = threading.Event()

    def generate_video(
        self, request: Any, output: Path, on_step: Any, is_cancelled: Any, on_phase: Any, **extra: Any
    ) -> Any:
        self.started.set()
        for _ in range(self.steps):
            time.sleep(self.step_s)
            if is_cancelled():
                raise GenerationCancelled("cancelled")
        return super().generate_video(request, output, on_step, lambda: False, on_phase, **extra)


def drained_worker(tmp_path: Path, drain_s: float, steps: int) -> tuple[Any, Worker, SteppingRunner, threading.Thread]:
    """A running worker with one job running and one queued."""
    settings = Settings(data_dir=tmp_path, public_url="http://test", drain_s=drain_s, worker_poll_s=0.01)
    store = open_job_store(settings)
    runner = SteppingRunner(steps)
    worker = Worker(settings, store, open_file_store(settings), worker_id="w1", runner_factory=lambda s: runner)
    for job_id in ("running", "queued"):
        store.submit(NewJob(job_id, "fal-ai/wan-22", "fal-ai/wan-22", {"prompt": "a fox"}), time.time())
    thread = threading.Thread(target=worker.run)
    thread.start()
    assert runner.started.wait(30)
    return store, worker, runner, thread


def test_a_draining_worker_finishes_its_job_takes_no_new_one_and_exits(tmp_path: Path) -> None:
    store, worker, _, thread = drained_worker(tmp_path, drain_s=60, steps=10)
    worker.drain()  # what SIGTERM does
    assert not store.workers()[0].ready  # advertised at once: no load balancer or autoscaler counts on it
    thread.join(30)
    assert not thread.is_alive()
    done, queued = store.get("running"), store.get("queued")
    assert done is not None and done.state is JobState.COMPLETED and done.failure is None
    assert queued is not None and queued.state is JobState.QUEUED and queued.attempts == 0
    assert store.workers() == []


def test_a_drain_that_runs_out_hands_the_job_back_without_counting_the_run(tmp_path: Path) -> None:
    store, worker, _, thread = drained_worker(tmp_path, drain_s=0.2, steps=1000)
    worker.drain()
    thread.join(30)
    assert not thread.is_alive()
    job = store.get("running")
    assert job is not None and job.state is JobState.QUEUED and job.attempts == 0
    assert "Worker shutting down; the request goes back to the queue" in [e.message for e in store.logs("running")]


def test_a_second_drain_signal_hands_the_job_back_at_once(tmp_path: Path) -> None:
    store, worker, _, thread = drained_worker(tmp_path, drain_s=600, steps=1000)
    worker.drain()
    worker.drain()
    thread.join(10)
    assert not thread.is_alive()
    job = store.get("running")
    assert job is not None and job.state is JobState.QUEUED


def test_a_stopped_worker_keeps_the_lease_of_a_step_that_outlasts_it_and_hands_the_job_back(tmp_path: Path) -> None:
    """stop() (SIGINT, a drain that ran out) lands mid-step; the step takes longer than a lease. The heartbeat must
    go on until the job is handed back, or the API's housekeeping takes the job as lost and counts the run."""
    settings = Settings(data_dir=tmp_path, public_url="http://test", job_lease_s=0.4, job_max_attempts=1,
                        worker_poll_s=0.01)  # fmt: skip
    store = open_job_store(settings)
    runner = SteppingRunner(steps=5, step_s=1.0)
    worker = Worker(settings, store, open_file_store(settings), worker_id="w1", runner_factory=lambda s: runner)
    store.submit(NewJob("running", "fal-ai/wan-22", "fal-ai/wan-22", {"prompt": "a fox"}), time.time())
    thread = threading.Thread(target=worker.run)
    thread.start()
    assert runner.started.wait(30)
    worker.stop()
    while thread.is_alive():  # the API's housekeeping, meanwhile
        recovered = recover_lost_jobs(store, [], max_attempts=1, expired_leases=True)
        assert recovered == [], [e.message for e in store.logs("running")]
        time.sleep(0.05)
    job = store.get("running")
    assert job is not None and job.state is JobState.QUEUED and job.attempts == 0


class UncheckedStepRunner(SteppingRunner):
    """One long step that never looks for a stop, then a finished video: a 720p step outlasting a server's stop."""

    def generate_video(
        self, request: Any, output: Path, on_step: Any, is_cancelled: Any, on_phase: Any, **extra: Any
    ) -> Any:
        self.started.set()
        time.sleep(self.step_s)
        return InstantRunner.generate_video(self, request, output, on_step, lambda: False, on_phase, **extra)


def test_a_stop_hands_the_job_back_at_once_while_the_step_still_runs(tmp_path: Path) -> None:
    """A stopping server kills its workers after a grace shorter than a 720p step: the job must be back in the queue,
    its run not counted, before the step ends. The video that step still finishes is not this worker's any more."""
    settings = Settings(data_dir=tmp_path, public_url="http://test", worker_poll_s=0.01)  # leases of 30 s
    store = open_job_store(settings)
    files = open_file_store(settings)
    runner = UncheckedStepRunner(steps=1, step_s=3.0)
    worker = Worker(settings, store, files, worker_id="w1", runner_factory=lambda s: runner)
    store.submit(NewJob("running", "fal-ai/wan-22", "fal-ai/wan-22", {"prompt": "a fox"}), time.time())
    thread = threading.Thread(target=worker.run)
    thread.start()
    assert runner.started.wait(30)
    stopped = time.monotonic()
    worker.stop()
    while (job := store.get("running")) is not None and job.state is not JobState.QUEUED:
        assert time.monotonic() - stopped < 1.5, "not handed back while the step ran"
        time.sleep(0.02)
    assert thread.is_alive()  # the step is still running
    assert job.attempts == 0 and job.worker_id is None
    thread.join(30)
    job = store.get("running")
    assert job is not None and job.state is JobState.QUEUED and job.attempts == 0 and job.output is None
    with pytest.raises(FileNotFound):  # the step's late video is never stored: the run was dropped
        files.stat(output_key("running", 1), time.time())
    notes = [e.message for e in store.logs("running")]
    assert notes.count("Worker shutting down; the request goes back to the queue") == 1


class SlowPut:
    """A file store whose put takes `seconds` (a large video to S3), telling when it has begun."""

    def __init__(self, files: Any, seconds: float) -> None:
        self._files, self.seconds, self.began = files, seconds, threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._files, name)

    def put(self, *args: Any, **kwargs: Any) -> Any:
        self.began.set()
        time.sleep(self.seconds)
        return self._files.put(*args, **kwargs)


def test_a_stop_during_the_upload_lets_the_finished_video_complete_its_job(tmp_path: Path) -> None:
    """Once the video is being stored and reported, a stop no longer hands the job back: that would throw the video
    away, and the next run (same attempt number, same output key) could have its own video deleted by this one."""
    settings = Settings(data_dir=tmp_path, public_url="http://test", worker_poll_s=0.01, job_lease_s=0.4)
    store = open_job_store(settings)
    files = SlowPut(open_file_store(settings), seconds=1.5)  # longer than a lease: the heartbeat must go on
    worker = Worker(settings, store, files, worker_id="w1", runner_factory=lambda s: InstantRunner())  # type: ignore[arg-type]
    store.submit(NewJob("j1", "fal-ai/wan-22", "fal-ai/wan-22", {"prompt": "a fox"}), time.time())
    thread = threading.Thread(target=worker.run)
    thread.start()
    assert files.began.wait(30)
    worker.stop()
    while thread.is_alive():  # the API's housekeeping, meanwhile: the lease is kept
        assert recover_lost_jobs(store, [], max_attempts=3, expired_leases=True) == []
        job = store.get("j1")
        assert job is not None and job.state is not JobState.QUEUED, [e.message for e in store.logs("j1")]
        time.sleep(0.05)
    done = store.get("j1")
    assert done is not None and done.state is JobState.COMPLETED and done.failure is None
    assert files.stat(key_from_file_ref(done.output["video"]["url"]), time.time()).size > 0


class Died(BaseException):
    """The worker process dying (kill -9, power loss) at a chosen point: nothing after it runs."""


def test_a_retry_removes_the_video_that_a_dead_attempt_stored_but_never_reported(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, public_url="http://test", job_lease_s=10)
    store, files = open_job_store(settings), open_file_store(settings)
    # each video's key's file name (the local store names a key's object `<version>~<name>`)
    stored_videos = lambda: sorted(p.name.rpartition("~")[2] for p in tmp_path.rglob("*.mp4"))  # noqa: E731
    store.submit(NewJob("j1", "fal-ai/wan-22", "fal-ai/wan-22", {"prompt": "a fox"}), time.time())

    def dies_before_reporting(*_args: Any, **_kwargs: Any) -> bool:
        raise Died

    first = Worker(settings, store, files, worker_id="w1", runner_factory=lambda s: InstantRunner())
    first.load()
    first.store = SimpleNamespace(**{name: getattr(store, name) for name in dir(store) if not name.startswith("__")})
    first.store.finish = dies_before_reporting
    job = store.claim("w1", 10, time.time())
    assert job is not None
    try:
        first.process(job)
        raise AssertionError("the first attempt reported its video")
    except Died:
        pass
    assert stored_videos() == ["j1.mp4"]  # stored, never reported

    recover_lost_jobs(store, ["w1"], max_attempts=3)  # the dead worker's job goes back to the queue
    second = Worker(settings, store, files, worker_id="w2", runner_factory=lambda s: InstantRunner())
    second.load()
    again = store.claim("w2", 10, time.time())
    assert again is not None and again.attempts == 2
    second.process(again)
    done = store.get("j1")
    assert done is not None and done.state is JobState.COMPLETED and done.output is not None
    assert stored_videos() == ["j1.mp4"]  # one video: the reported one
    key = key_from_file_ref(done.output["video"]["url"])
    assert key is not None and check_key(key) == key  # a key that the file routes accept
    assert files.stat(key, time.time()).size == done.output["video"]["file_size"]


def test_a_job_failed_after_its_last_attempt_leaves_no_unreported_video(tmp_path: Path) -> None:
    """No later attempt comes to remove what the last one stored but never reported: the recovery that fails the
    job does (the supervisor, a GPU group, the API's lease housekeeping), and leaves other jobs' videos alone."""
    settings = Settings(data_dir=tmp_path, public_url="http://test", job_lease_s=10)
    store, files = open_job_store(settings), open_file_store(settings)
    store.submit(NewJob("j1", "fal-ai/wan-22", "fal-ai/wan-22", {"prompt": "a fox"}), time.time())
    job = store.claim("w1", 10, time.time())
    assert job is not None and job.attempts == 1
    files.put(output_key("j1", 1), b"video of the last attempt", "video/mp4", None, time.time())
    files.put(output_key("j2", 1), b"another job's video", "video/mp4", None, time.time())
    assert recover_lost_jobs(store, ["w1"], max_attempts=1, files=files) == ["j1"]
    failed = store.get("j1")
    assert failed is not None and failed.state is JobState.COMPLETED and failed.failure is not None
    with pytest.raises(FileNotFound):
        files.stat(output_key("j1", 1), time.time())
    assert files.stat(output_key("j2", 1), time.time()).size == len(b"another job's video")


class FlakyStore:
    """A store whose calls named in `failures` raise ConnectionError (or `error`) that many times first (a store
    outage longer than its client's own retries)."""

    def __init__(
        self, store: Any, failures: dict[str, int], error: Callable[[str], Exception] = ConnectionError
    ) -> None:
        self._store, self.failures, self.error = store, dict(failures), error

    def __getattr__(self, name: str) -> Any:
        call = getattr(self._store, name)
        if name not in self.failures:
            return call

        def flaky(*args: Any, **kwargs: Any) -> Any:
            if self.failures[name] > 0:
                self.failures[name] -= 1
                raise self.error(f"store down ({name})")
            return call(*args, **kwargs)

        return flaky


def run_until_finished(settings: Settings, store: Any, worker_store: Any, files: Any) -> None:
    """Job j1 through a worker (on `worker_store` and `files`, stand-ins allowed) until `store` has it completed."""
    worker = Worker(settings, worker_store, files, worker_id="w1", runner_factory=lambda s: InstantRunner())
    store.submit(NewJob("j1", "fal-ai/wan-22", "fal-ai/wan-22", {"prompt": "a fox"}), time.time())
    thread = threading.Thread(target=worker.run, kwargs={"stop_when": lambda: finished(store, "j1")})
    thread.start()
    thread.join(30)
    assert not thread.is_alive()


def test_a_store_outage_delays_the_worker_but_neither_kills_it_nor_fails_the_video(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """Past the file store's outage window too: the report waited that long, then raised out of the worker, which
    died with the job leased to it (the next attempt redid the video). Nor may registering once the model has
    loaded end the worker."""
    monkeypatch.setattr(loop, "STORE_RETRY_FIRST_S", 0.01)
    monkeypatch.setattr(Worker, "_outage_window_s", lambda self: 0.05)
    settings = Settings(data_dir=tmp_path, public_url="http://test", worker_poll_s=0.01)
    store = open_job_store(settings)
    # the cancel check: once in the engine's step loop, once before the upload; registering: at the start, then
    # ready (the heartbeat's first comes after a quarter lease)
    failures = {"claim": 3, "add_log": 2, "finish": 6, "cancel_requested": 2, "register_worker": 2}
    flaky = FlakyStore(store, dict(failures))
    files = open_file_store(settings)
    run_until_finished(settings, store, flaky, files)
    # every outage happened and was ridden out
    assert flaky.failures == dict.fromkeys(failures, 0)
    job = store.get("j1")
    assert job is not None and job.state is JobState.COMPLETED and job.failure is None and job.output is not None


def _sqlite_error(sql: str, read_only: Path | None = None) -> Exception:
    """A real sqlite3 error: of `sql` on a fresh database, or on `read_only`, opened read-only."""
    import sqlite3

    db = sqlite3.connect(f"file:{read_only}?mode=ro", uri=True) if read_only else sqlite3.connect(":memory:")
    try:
        db.execute(sql)
    except sqlite3.Error as exc:
        return exc
    raise AssertionError(f"{sql} did not fail")


def test_store_outages_are_told_from_refusals_and_bugs(tmp_path: Path) -> None:
    """What the report waits out for ever (an outage) and what it gives up on after the window (no wait cures it)."""
    import sqlite3

    import redis.exceptions as r

    from wanserve.store.base import is_store_outage

    sqlite3.connect(tmp_path / "ro.db").execute("CREATE TABLE t (a)").connection.commit()
    outages = [
        ConnectionRefusedError(), r.ConnectionError("refused"), r.TimeoutError(), r.BusyLoadingError(),
        r.OutOfMemoryError("used memory > maxmemory"), r.ReadOnlyError("read only replica"), r.TryAgainError(),
        r.MasterDownError("MASTERDOWN"), _sqlite_error("INSERT INTO t VALUES (1)", read_only=tmp_path / "ro.db"),
    ]  # fmt: skip
    not_outages = [
        r.AuthenticationError("invalid password"), r.AuthorizationError("NOPERM"), r.ResponseError("ERR in script"),
        TypeError("not JSON serializable"), _sqlite_error("SELEC 1"), _sqlite_error("SELECT * FROM missing"),
    ]  # fmt: skip
    assert [is_store_outage(exc) for exc in outages] == [True] * len(outages)
    assert [is_store_outage(exc) for exc in not_outages] == [False] * len(not_outages)


def test_an_outage_longer_than_the_window_does_not_use_up_the_windows_patience_for_a_refusal(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """After a long outage, one error that is no outage (a replica not yet writable, say, counted as a refusal here)
    made the report give up at once: the window had started with the report, not with that error."""
    monkeypatch.setattr(loop, "STORE_RETRY_FIRST_S", 0.01)
    monkeypatch.setattr(Worker, "_outage_window_s", lambda self: 0.2)
    settings = Settings(data_dir=tmp_path, public_url="http://test", worker_poll_s=0.01)
    store = open_job_store(settings)
    errors = iter([ConnectionError("down")] * 8 + [TypeError("once")])  # 8 backoffs: about 2.5 s of outage

    class OutageThenRefusal(FlakyStore):
        def finish(self, job_id: str, *args: Any, **kwargs: Any) -> bool:
            error = next(errors, None)
            if error is not None:
                raise error
            return bool(store.finish(job_id, *args, **kwargs))

    run_until_finished(settings, store, OutageThenRefusal(store, {}), open_file_store(settings))
    done = store.get("j1")
    assert done is not None and done.state is JobState.COMPLETED and done.failure is None


@pytest.mark.parametrize("how", ["drain", "parent gone"])
def test_a_worker_waiting_for_the_store_to_register_ends_on_a_drain_or_its_parents_exit(
    tmp_path: Path, monkeypatch: Any, how: str
) -> None:
    """Registering waits out a store outage, as claiming does: and ends as claiming does, on SIGTERM's drain or the
    launching server's exit too (not only on a stop), without loading the model for nothing."""
    monkeypatch.setattr(loop, "STORE_RETRY_FIRST_S", 0.01)
    settings = Settings(data_dir=tmp_path, public_url="http://test", worker_poll_s=0.01)
    flaky = FlakyStore(open_job_store(settings), {"register_worker": 10_000, "remove_worker": 10_000})
    loaded: list[Settings] = []
    worker = Worker(
        settings, flaky, open_file_store(settings), worker_id="w1",
        runner_factory=lambda s: loaded.append(s) or InstantRunner(),  # type: ignore[func-returns-value]
    )  # fmt: skip
    parent_gone = threading.Event()
    thread = threading.Thread(target=worker.run, kwargs={"stop_when": parent_gone.is_set})
    thread.start()
    deadline = time.monotonic() + 30
    while flaky.failures["register_worker"] == 10_000:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    worker.drain() if how == "drain" else parent_gone.set()
    thread.join(10)
    assert not thread.is_alive() and loaded == []


def test_a_report_the_store_refuses_while_up_gives_up_after_the_window_and_the_worker_goes_on(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """An error no wait cures (a script error, an output the store cannot write), the store otherwise up: the report
    waited for ever, its heartbeat keeping the lease, and the worker took no other job. Now, after the outage
    window, the job is left to its lease and the next job runs."""
    monkeypatch.setattr(loop, "STORE_RETRY_FIRST_S", 0.01)
    monkeypatch.setattr(Worker, "_outage_window_s", lambda self: 0.1)
    settings = Settings(data_dir=tmp_path, public_url="http://test", worker_poll_s=0.01)
    store = open_job_store(settings)
    refused: list[str] = []

    class RefusesJ1(FlakyStore):
        def finish(self, job_id: str, *args: Any, **kwargs: Any) -> bool:
            if job_id == "j1":
                refused.append(job_id)
                raise TypeError("Object of type bytes is not JSON serializable")
            return bool(store.finish(job_id, *args, **kwargs))

    files = open_file_store(settings)
    worker = Worker(settings, RefusesJ1(store, {}), files, worker_id="w1", runner_factory=lambda s: InstantRunner())
    store.submit(NewJob("j1", "fal-ai/wan-22", "fal-ai/wan-22", {"prompt": "a fox"}), time.time())
    store.submit(NewJob("j2", "fal-ai/wan-22", "fal-ai/wan-22", {"prompt": "a cat"}), time.time() + 1)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not finished(store, "j2"):
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.01)
    finally:
        worker.stop()
        thread.join(10)
    first = store.get("j1")
    assert first is not None and first.state is JobState.RUNNING and first.worker_id == "w1"  # left to its lease
    assert len(refused) > 1  # tried again for the window first


def test_a_stop_while_the_job_store_is_down_at_the_report_exits_after_a_grace(tmp_path: Path, monkeypatch: Any) -> None:
    """The video is stored, the job store is down when the run is to be reported, and the worker is stopped: it
    tries to report for REPORT_GRACE_AFTER_STOP_S more, not for the whole outage window (minutes), then exits. The
    job stays leased to it (the store hands it to another worker when the lease runs out) and its video stays."""
    monkeypatch.setattr(loop, "STORE_RETRY_FIRST_S", 0.05)
    monkeypatch.setattr(loop, "REPORT_GRACE_AFTER_STOP_S", 0.5)
    settings = Settings(data_dir=tmp_path, public_url="http://test", worker_poll_s=0.01)
    store = open_job_store(settings)
    flaky = FlakyStore(store, {"finish": 10_000, "remove_worker": 1})
    files = open_file_store(settings)
    worker = Worker(settings, flaky, files, worker_id="w1", runner_factory=lambda s: InstantRunner())
    store.submit(NewJob("j1", "fal-ai/wan-22", "fal-ai/wan-22", {"prompt": "a fox"}), time.time())
    thread = threading.Thread(target=worker.run)
    thread.start()
    deadline = time.monotonic() + 30
    while flaky.failures["finish"] == 10_000:  # the first report failed: the worker waits for the store
        assert time.monotonic() < deadline
        time.sleep(0.01)
    stopped = time.monotonic()
    worker.stop()
    thread.join(10)
    assert not thread.is_alive()
    assert 0.5 <= time.monotonic() - stopped < 5
    assert 10_000 - flaky.failures["finish"] > 2  # it went on trying during the grace
    job = store.get("j1")
    assert job is not None and job.state is JobState.RUNNING and job.worker_id == "w1"
    assert files.stat(output_key("j1", 1), time.time()).size > 0  # the next attempt removes it when it runs


@pytest.mark.parametrize("outage", ["short", "long", "refused"])
def test_a_file_store_outage_at_the_upload_waits_for_it_then_fails_the_job(
    tmp_path: Path, monkeypatch: Any, outage: str
) -> None:
    """S3 unreachable when the finished video is stored: the worker tries again (its heartbeat keeps the lease)
    rather than throw the rendered video away; only an outage past its window fails the job, as
    storage_unavailable, and the worker goes on. A refusal (credentials, no such bucket) fails it at once."""
    monkeypatch.setattr(loop, "STORE_RETRY_FIRST_S", 0.01)
    monkeypatch.setattr(Worker, "_outage_window_s", lambda self: 0.3 if outage == "long" else 60.0)
    settings = Settings(data_dir=tmp_path, public_url="http://test", worker_poll_s=0.01)
    store = open_job_store(settings)
    error = functools.partial(StorageUnavailable, transient=outage != "refused")
    files = FlakyStore(open_file_store(settings), {"put": 3 if outage == "short" else 10_000}, error=error)
    run_until_finished(settings, store, store, files)
    done = store.get("j1")
    assert done is not None and done.state is JobState.COMPLETED
    notes = [e.message for e in store.logs("j1")]
    waited = notes.count("The file store is unreachable: waiting for it to store the video")
    assert waited == (0 if outage == "refused" else 1)
    if outage == "short":
        assert done.failure is None and files.failures["put"] == 0
        assert files.stat(key_from_file_ref(done.output["video"]["url"]), time.time()).size > 0
    else:
        assert done.failure is not None and done.failure.error_type == "storage_unavailable"
        tries = 10_000 - files.failures["put"]
        assert tries == 1 if outage == "refused" else tries > 1


def test_a_worker_stopped_after_a_lost_claim_reply_hands_that_claims_job_back(
    tmp_path: Path, monkeypatch: Any, redis_server: RedisServer, redis_prefix: str
) -> None:
    """On Redis a claim can take the job and lose its reply (SQLite's rolls back whole); the worker is stopped
    before it asks again: the job goes straight back to the queue, its attempt not counted, rather than waiting for
    the lease to run out."""
    monkeypatch.setattr(loop, "STORE_RETRY_FIRST_S", 0.01)
    settings = Settings(
        data_dir=tmp_path, public_url="http://t", worker_poll_s=0.01, store=redis_server.url, redis_prefix=redis_prefix
    )
    store = open_job_store(settings)
    files = open_file_store(settings)
    worker = Worker(settings, store, files, worker_id="w1", runner_factory=lambda s: InstantRunner())
    store.submit(NewJob("j1", "fal-ai/wan-22", "fal-ai/wan-22", {"prompt": "a fox"}), time.time())
    real_claim = store.claim

    def claim_then_lose_the_reply(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(store, "claim", real_claim)  # once
        taken = real_claim(*args, **kwargs)
        assert taken is not None and taken.worker_id == "w1"
        worker.stop()  # SIGTERM while the store is unreachable
        raise ConnectionError("the reply was lost")

    monkeypatch.setattr(store, "claim", claim_then_lose_the_reply)
    worker.run()
    job = store.get("j1")
    assert job is not None and job.state is JobState.QUEUED and job.worker_id is None and job.attempts == 0
    assert "Worker stopping" in store.logs("j1")[-1].message


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_a_worker_stopped_after_a_claim_that_never_reached_the_store_takes_no_job(
    tmp_path: Path, monkeypatch: Any, backend: str, request: pytest.FixtureRequest
) -> None:
    """A claim that failed before it reached the store (connection refused) took nothing: the stopping worker
    must not take the head of the queue now to hand it back, which would log a false hand-back and clear the
    job's start deadline (x-fal-request-timeout: it would never time out)."""
    monkeypatch.setattr(loop, "STORE_RETRY_FIRST_S", 0.01)
    on_redis: dict[str, Any] = {}
    if backend == "redis":
        redis_server: RedisServer = request.getfixturevalue("redis_server")
        on_redis = {"store": redis_server.url, "redis_prefix": request.getfixturevalue("redis_prefix")}
    settings = Settings(data_dir=tmp_path, public_url="http://t", worker_poll_s=0.01, **on_redis)
    store = open_job_store(settings)
    worker = Worker(
        settings, store, open_file_store(settings), worker_id="w1", runner_factory=lambda s: InstantRunner()
    )
    submitted = time.time()
    store.submit(NewJob("j1", "fal-ai/wan-22", "fal-ai/wan-22", {"prompt": "a fox"}, start_timeout_s=5), submitted)

    real_claim = store.claim

    def refused(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(store, "claim", real_claim)  # the store is back for whatever comes next
        worker.stop()  # SIGTERM while the store is unreachable
        raise ConnectionError("connection refused")

    monkeypatch.setattr(store, "claim", refused)
    worker.run()
    job = store.get("j1")
    assert job is not None and job.state is JobState.QUEUED and job.attempts == 0 and job.started_at is None
    assert not [e.message for e in store.logs("j1")]
    assert store.expire_overdue(submitted + 60) == ["j1"]  # its start deadline still holds


def finished(store: Any, job_id: str) -> bool:
    job = store.get(job_id)
    return job is not None and job.state is JobState.COMPLETED


class FailingRunner(InstantRunner):
    def __init__(self, error: Exception) -> None:
        self.error = error

    def generate_video(self, *args: Any, **kwargs: Any) -> Any:
        raise self.error


def test_a_gpu_group_failure_keeps_the_job_for_its_launcher_to_count_the_attempt(tmp_path: Path) -> None:
    """The worker stops itself; the stop must not hand the job back (that would not count the attempt, and a request
    that kills a rank every time would never run out of attempts): the launcher recovers it as a dead worker's."""
    settings = Settings(data_dir=tmp_path, public_url="http://test", worker_poll_s=0.01, job_lease_s=0.2)
    store = open_job_store(settings)

    class BreakingRunner(InstantRunner):
        """As the GPU group's leader: it finds the group broken, stops the worker (its `on_broken`), then raises."""

        def generate_video(self, *args: Any, **kwargs: Any) -> Any:
            worker.abandon()
            time.sleep(0.3)  # the heartbeat thread, woken by the stop, sees the job still running meanwhile
            raise ParallelGroupFailed("rank 1 exited with code -9")

    worker = Worker(
        settings, store, open_file_store(settings), worker_id="w1", runner_factory=lambda s: BreakingRunner()
    )
    store.submit(NewJob("j1", "fal-ai/wan-22", "fal-ai/wan-22", {"prompt": "a fox"}), time.time())
    worker.run()
    job = store.get("j1")
    assert job is not None and job.state is JobState.RUNNING and job.worker_id == "w1" and job.attempts == 1
    recover_lost_jobs(store, ["w1"], max_attempts=3)
    job = store.get("j1")
    assert job is not None and job.state is JobState.QUEUED and job.attempts == 1  # the run counted


@pytest.mark.parametrize(
    ("error", "logged"),
    [(NonFiniteOutput("NaN latents"), True), (InvalidGenerationInput("width must be a multiple of 16"), False)],
)
def test_a_server_side_failure_is_logged_for_the_operator_and_in_the_jobs_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, error: Exception, logged: bool
) -> None:
    """A 5xx (the server failed) is in the worker's log and the job's log lines; a 4xx (the caller's) is only
    answered."""
    settings = Settings(data_dir=tmp_path, public_url="http://test")
    store = open_job_store(settings)
    worker = Worker(
        settings, store, open_file_store(settings), worker_id="w1", runner_factory=lambda s: FailingRunner(error)
    )
    worker.load()
    store.submit(NewJob("j1", "fal-ai/wan-22", "fal-ai/wan-22", {"prompt": "a fox"}), time.time())
    job = store.claim("w1", 10, time.time())
    assert job is not None
    with caplog.at_level("ERROR", logger="wanserve"):
        worker.process(job)
    done = store.get("j1")
    assert done is not None and done.failure is not None and done.failure.message == str(error)
    assert any(f"Failed: {error}" == entry.message for entry in store.logs("j1")) is logged
    assert any(str(error) in record.getMessage() for record in caplog.records) is logged


class TakenAwayRunner(InstantRunner):
    """Renders while the store gives the job away (its lease ran out: recovery fails it, or with attempts left
    queues it again): the worker's video is stored, and then its finish is refused."""

    def __init__(self, store: Any, max_attempts: int = 1) -> None:
        self.store, self.max_attempts = store, max_attempts

    def generate_video(self, request: Any, output: Path, *args: Any, **kwargs: Any) -> Any:
        recover_lost_jobs(self.store, ["w1"], max_attempts=self.max_attempts)
        return super().generate_video(request, output, *args, **kwargs)


def process_j1(tmp_path: Path, runner: Callable[[Any, Any], InstantRunner]) -> tuple[Any, Any]:
    """Worker `w1` claims and processes job `j1` with `runner(store, files)`; returns (store, files)."""
    settings = Settings(data_dir=tmp_path, public_url="http://test", job_lease_s=10)
    store = open_job_store(settings)
    files = open_file_store(settings)
    worker = Worker(settings, store, files, worker_id="w1", runner_factory=lambda s: runner(store, files))
    worker.load()
    store.submit(NewJob("j1", "fal-ai/wan-22", "fal-ai/wan-22", {"prompt": "a fox"}), time.time())
    job = store.claim("w1", 10, time.time())
    assert job is not None
    worker.process(job)
    return store, files


def test_the_video_of_a_refused_finish_is_deleted(tmp_path: Path) -> None:
    store, files = process_j1(tmp_path, lambda store, files: TakenAwayRunner(store))
    done = store.get("j1")
    assert done is not None and done.failure is not None and done.failure.error_type == "runner_disconnected"
    with pytest.raises(FileNotFound):  # stored, then removed: nothing refers to it
        files.stat(output_key("j1", 1), time.time())
    # queued again by its lease running out: the next run is attempt 2, with a key of its own
    store, files = process_j1(tmp_path / "requeued", lambda store, files: TakenAwayRunner(store, max_attempts=3))
    queued = store.get("j1")
    assert queued is not None and queued.state is JobState.QUEUED and queued.attempts == 1
    with pytest.raises(FileNotFound):
        files.stat(output_key("j1", 1), time.time())


class HandedBackRunner(InstantRunner):
    """Renders while its job goes back to the queue (a stop's hand-back whose reply was lost: the worker does not
    know) and another worker claims it under the same attempt number and stores its video."""

    def __init__(self, store: Any, files: Any) -> None:
        self.store, self.files = store, files

    def generate_video(self, request: Any, output: Path, *args: Any, **kwargs: Any) -> Any:
        assert self.store.release("j1", "w1", time.time())
        again = self.store.claim("w2", 10, time.time())
        assert again is not None and again.attempts == 1  # a hand-back does not count the run
        self.files.put(output_key("j1", 1), b"w2's video", "video/mp4", None, time.time())
        return super().generate_video(request, output, *args, **kwargs)


def test_a_refused_finish_leaves_the_video_of_the_run_that_took_the_job_over(tmp_path: Path) -> None:
    store, files = process_j1(tmp_path, HandedBackRunner)
    current = store.get("j1")
    assert current is not None and current.state is JobState.RUNNING and current.worker_id == "w2"
    assert files.stat(output_key("j1", 1), time.time()).size > 0  # w2 will report this key: it must stay


def test_a_finish_retried_after_a_lost_reply_keeps_its_video(tmp_path: Path) -> None:
    """On Redis a finish whose first reply was lost is refused when sent again, though it landed: the video the
    job now holds must stay."""
    settings = Settings(data_dir=tmp_path, public_url="http://test", job_lease_s=10)
    store = open_job_store(settings)
    files = open_file_store(settings)
    worker = Worker(settings, store, files, worker_id="w1", runner_factory=lambda s: InstantRunner())
    worker.load()
    landed: list[bool] = []

    def finish_twice(job_id: str, now: float, **outcome: Any) -> bool:
        landed.append(store.finish(job_id, now, **outcome))
        return store.finish(job_id, now, **outcome)  # the resent call: refused

    worker.store = SimpleNamespace(  # type: ignore[assignment]
        finish=finish_twice, **{name: getattr(store, name) for name in ("get", "add_log", "cancel_requested", "now")}
    )
    store.submit(NewJob("j1", "fal-ai/wan-22", "fal-ai/wan-22", {"prompt": "a fox"}), time.time())
    job = store.claim("w1", 10, time.time())
    assert job is not None
    worker.process(job)
    done = store.get("j1")
    assert landed == [True] and done is not None and done.output is not None
    assert files.stat(output_key("j1", 1), time.time()).size > 0


def test_a_worker_start_removes_the_job_folders_of_workers_that_are_gone(tmp_path: Path) -> None:
    """A worker ended by its watchdog (os._exit) leaves its job's folder (the video being encoded) behind."""
    import os
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    names = [f"wanserve-{gone.pid}-abc", f"wanserve-{os.getpid()}-def", "wanserve-cache", "other-1-x"]
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "video.mp4").write_bytes(b"x")
    assert loop.remove_stale_temp_dirs(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])


def test_a_claim_whose_reply_was_lost_is_made_again_under_its_own_token(tmp_path: Path, monkeypatch: Any) -> None:
    """The store took a job, then the reply was lost (the call raised): the worker's next claim carries the same
    token, so a store that remembers it (Redis) gives back that job instead of leaving it running with no worker."""
    monkeypatch.setattr(loop, "STORE_RETRY_FIRST_S", 0.01)
    settings = Settings(data_dir=tmp_path, public_url="http://test", worker_poll_s=0.01)
    store = open_job_store(settings)
    tokens: list[str | None] = []

    class LostReply:
        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

        def claim(self, worker_id: str, lease_s: float, now: float, token: str | None = None) -> Any:
            tokens.append(token)
            job = store.claim(worker_id, lease_s, now, token)
            if len(tokens) == 1:
                raise ConnectionError("reply lost")
            return job

    worker = Worker(
        settings, LostReply(), open_file_store(settings), worker_id="w1", runner_factory=lambda s: InstantRunner()
    )  # type: ignore[arg-type]
    store.submit(NewJob("j1", "fal-ai/wan-22", "fal-ai/wan-22", {"prompt": "a fox"}), time.time())
    thread = threading.Thread(target=worker.run, kwargs={"stop_when": lambda: len(tokens) >= 3})
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    assert tokens[0] is not None and tokens[1] == tokens[0]  # the retry of the lost claim
    assert tokens[2] != tokens[0]  # the claim after an answered one is a new one
