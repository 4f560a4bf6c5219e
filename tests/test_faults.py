"""Faults: kill -9 of the server and of its worker at random points of a stream of jobs, a disk that fills up
while a video is stored, an engine crash and a GPU out-of-memory. Nothing is lost, nothing completes twice, the
job store stays intact, and the next job succeeds."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
import traceback
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import torch
from disk import fill, not_root_or_fail, tmpfs
from fastapi.testclient import TestClient
from server import CHEAP_INPUT, Server

from wanserve.api.app import create_app
from wanserve.backends import open_file_store, open_job_store
from wanserve.config import Settings
from wanserve.errors import FileNotFound, ModelLoadError, StorageFull, StorageUnavailable
from wanserve.files.base import new_key
from wanserve.files.local import LocalFileStore
from wanserve.jobs.model import Job, JobState, NewJob
from wanserve.store.sqlite import SQLiteJobStore
from wanserve.worker.loop import Worker
from wanserve.worker.processes import pid_alive

APP = "fal-ai/wan-22"
SEED = 20260522
ITERATIONS = 14
IN_FLIGHT = 2  # requests kept submitted (queued or running) through the loop
SERVER_SHARE = 0.3  # of the kills; the others kill the worker child, which the server's supervisor restarts
# Where a kill lands: the phase (the log line that starts it; None: the worker's start, while it loads its model)
# and the most seconds into it. A kill mid-request costs a model load (~5 s here) before the next one can land,
# so most kills hit the worker while it (re)starts, and each phase of a request is hit at least once.
PHASES = {
    "loading": (None, 2.0),
    "claimed": ("Started on worker", 0.1),
    "denoising": ("step 1/", 0.1),
    "decoding": ("Decoding video", 2.4),
    "encoding": ("Encoding", 0.9),
    "stored": ("Stored video", 0.0),  # the video is in the store, the request not yet marked done
}
PLAN = ["claimed", "claimed", "denoising", "denoising", "decoding", "decoding", "encoding", "stored"]  # others: loading


# --- helpers ---


def _worker_pids(store: SQLiteJobStore) -> list[int]:
    return [int(w.detail["pid"]) for w in store.workers() if pid_alive(int(w.detail.get("pid", 0) or 0))]


def _submit(server: Server, body: dict[str, Any]) -> str:
    response = httpx.post(f"{server.url}/{APP}", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return str(response.json()["request_id"])


def _wait_jobs(store: SQLiteJobStore, ids: list[str], timeout_s: float, server: Server) -> list[Job]:
    deadline = time.monotonic() + timeout_s
    while True:
        jobs = [store.get(job_id) for job_id in ids]
        if all(job is not None and job.state is JobState.COMPLETED for job in jobs):
            return [job for job in jobs if job is not None]
        if time.monotonic() > deadline:
            states = {
                job_id: (job.state.value, job.attempts) if job else None for job_id, job in zip(ids, jobs, strict=True)
            }
            raise AssertionError(f"requests not completed after {timeout_s:.0f} s: {states}\n{server.log()}")
        time.sleep(0.1)


def _messages(store: SQLiteJobStore, job_id: str) -> list[str]:
    return [entry.message for entry in store.logs(job_id)]


def _kill_server(server: Server, store: SQLiteJobStore) -> None:
    """kill -9 of the server; its worker dies with it (the kernel's parent-death signal), which the test waits
    for, so the restarted server finds the worker dead and hands its job back at once."""
    workers = _worker_pids(store)
    server.kill()
    deadline = time.monotonic() + 10
    while any(pid_alive(pid) for pid in workers):
        assert time.monotonic() < deadline, "a worker outlived its killed server"
        time.sleep(0.02)


# --- one server for the kill loop and the full disk: its files on a small tmpfs, its database on the real disk ---


@dataclass
class Faulty:
    server: Server
    store: SQLiteJobStore  # the server's own database, read directly (also while the server is down)
    files_on_tmpfs: bool

    @property
    def files_root(self) -> Path:
        return self.server.data_dir / "files"

    def ensure_running(self) -> None:
        if self.server.process is None or self.server.process.poll() is not None:
            self.server.start(wait_ready=False)


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory, model_cache: Path, coarse_model: Path) -> Iterator[Faulty]:
    data = tmp_path_factory.mktemp("faults") / "data"
    with tmpfs(data / "files", "16m") as mounted:
        server = Server(data, model_cache, args=["--model", str(coarse_model)])
        try:
            server.start()
            store = SQLiteJobStore(data / "jobs.sqlite3")
            yield Faulty(server, store, mounted)
            store.close()
        finally:
            server.stop()


# --- kill -9 in a loop ---


def _log_count(store: SQLiteJobStore, job_ids: list[str], prefix: str) -> int:
    return sum(m.startswith(prefix) for job_id in job_ids for m in _messages(store, job_id))


def _completed(store: SQLiteJobStore, job_id: str) -> bool:
    job = store.get(job_id)
    return job is not None and job.state is JobState.COMPLETED


def _outcome(job: Job) -> tuple[str, Any]:
    return (job.failure.error_type, job.failure.message) if job.failure else ("ok", job.output)


def _remember_outcomes(store: SQLiteJobStore, ids: list[str], first: dict[str, tuple[str, Any]]) -> None:
    for job_id in ids:
        job = store.get(job_id)
        if job is not None and job.state is JobState.COMPLETED and job_id not in first:
            first[job_id] = _outcome(job)


def _runs(messages: list[str]) -> list[list[str]]:
    """A request's log lines, one list per run (each run starts with `Started on worker`)."""
    runs: list[list[str]] = [[]]
    for message in messages:
        if message.startswith("Started on worker"):
            runs.append([])
        runs[-1].append(message)
    return runs[1:] or runs  # lines before the first run (none, usually) are left out


def _wait_for(condition: Any, what: str, server: Server, timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (found := condition()):
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s:.0f} s:\n{server.log()}"
        time.sleep(0.02)
    return found


def test_kill_9_of_server_and_worker_at_random_points_loses_nothing_and_completes_nothing_twice(
    faulty: Faulty,
) -> None:
    """Each iteration kills the worker child (its supervisor restarts it) or the whole server (restarted on the
    same data dir) at a random point: while the worker loads, or once a request reaches a random phase (claimed,
    denoising, decoding, encoding, stored but not yet reported), a random time into it."""
    rng = random.Random(SEED)
    plan = PLAN + ["loading"] * (ITERATIONS - len(PLAN))
    rng.shuffle(plan)
    server, store = faulty.server, faulty.store
    faulty.ensure_running()
    jobs: list[str] = []
    kills: list[str] = []
    killed_pids: set[int] = set()
    worker_kills_in_this_server = 0
    first_outcome: dict[str, tuple[str, Any]] = {}
    started = time.monotonic()
    for i in range(ITERATIONS):
        # the same draws every iteration, whatever happens: the schedule depends on the seed alone
        server_draw, delay_draw, phase = rng.random(), rng.random(), plan[i]
        _remember_outcomes(store, jobs, first_outcome)
        pending = [j for j in jobs if not _completed(store, j)]
        for _ in range((IN_FLIGHT if i < ITERATIONS - 2 else 1) - len(pending)):  # less to finish after the loop
            jobs.append(_submit(server, {**CHEAP_INPUT, "seed": len(jobs)}))
            pending.append(jobs[-1])
        # The supervisor backs off a worker that keeps dying young (2 s, 4 s, 8 s...): after two worker kills
        # the server goes instead, which starts a fresh supervisor.
        kill_server = worker_kills_in_this_server >= 2 or server_draw < SERVER_SHARE
        prefix, max_delay = PHASES[phase]
        delay = delay_draw * max_delay
        if prefix is None:  # while the (new) worker loads its model
            if not kill_server:
                _wait_for(lambda: [p for p in _worker_pids(store) if p not in killed_pids], "a new worker", server)
        else:
            seen = _log_count(store, pending, prefix)
            deadline = time.monotonic() + 60
            while _log_count(store, pending, prefix) == seen:
                assert time.monotonic() < deadline, f"no {prefix!r} line within 60 s:\n{server.log()}"
                if all(_completed(store, j) for j in pending):  # finished before reaching it: one more
                    jobs.append(_submit(server, {**CHEAP_INPUT, "seed": len(jobs)}))
                    pending.append(jobs[-1])
                time.sleep(0.02)
        time.sleep(delay)
        if kill_server:
            _kill_server(server, store)
            server.start(wait_ready=False)
            worker_kills_in_this_server = 0
        else:
            (pid,) = _wait_for(lambda: [p for p in _worker_pids(store) if p not in killed_pids], "a worker", server)
            os.kill(pid, signal.SIGKILL)
            killed_pids.add(pid)
            worker_kills_in_this_server += 1
        kills.append(f"{'server' if kill_server else 'worker'}:{phase}+{delay:.1f}s@{time.monotonic() - started:.0f}")
    loop_s = time.monotonic() - started

    last = _submit(server, {**CHEAP_INPUT, "seed": len(jobs)})  # after all that, the server serves as usual
    jobs.append(last)
    done = _wait_jobs(store, jobs, 90, server)
    assert done[-1].failure is None, (done[-1].failure, _messages(store, last))
    _remember_outcomes(store, jobs, first_outcome)
    outcomes: dict[str, int] = {}
    for job in done:
        kind = job.failure.error_type if job.failure else "ok"
        outcomes[kind] = outcomes.get(kind, 0) + 1
        messages = _messages(store, job.id)
        # nothing completed twice: the outcome first seen is the one it keeps (a second completion of a request
        # would replace its output, and its video, with another)
        assert _outcome(job) == first_outcome[job.id], (job.id, messages)
        # "Completed in" is written with the completion itself: once for a request that succeeded, in its last
        # run, and never for one that failed (a run cut off by a kill never reports completion)
        runs = _runs(messages)
        completions = sum(m.startswith("Completed in") for m in messages)
        assert completions == (1 if job.failure is None else 0), messages
        assert len(runs) <= job.attempts <= 2, (job.attempts, messages)
        if job.failure is None:
            assert any(m.startswith("Completed in") for m in runs[-1]), messages
            assert job.output is not None
            ref = job.output["video"]["url"]  # stored as a reference; the API makes the URL when it is read
            assert ref.startswith("/files/"), ref
            video = httpx.get(f"{server.url}{ref}", timeout=30)
            assert video.status_code == 200 and video.content[4:8] == b"ftyp"
        else:  # failed only because its worker died on every attempt
            assert job.failure.error_type == "runner_disconnected" and job.attempts == 2, (job.failure, messages)
    interrupted = sum(job.attempts > 1 or job.failure is not None for job in done)
    print(
        f"\n{len(jobs)} requests, outcomes {outcomes}, {interrupted} interrupted mid-run; "
        f"loop {loop_s:.0f} s, drain {time.monotonic() - started - loop_s:.0f} s\nkills: {' '.join(kills)}"
    )
    assert len({job.id for job in done}) == len(jobs)  # nothing lost
    assert sum(k.startswith("server") for k in kills) >= 3
    assert interrupted >= 3, "too few kills landed on a running request to prove anything"
    counts = store.counts()
    assert counts["IN_QUEUE"] == counts["IN_PROGRESS"] == 0
    assert counts["COMPLETED"] >= len(jobs) and counts.get("outcome:ok", 0) >= outcomes.get("ok", 0)
    # the API agrees with the store, and answers after all of this
    for job in done:
        status = httpx.get(f"{server.url}/{APP}/requests/{job.id}/status", timeout=10).json()
        assert status["status"] == "COMPLETED"
        assert status.get("error_type") == (job.failure.error_type if job.failure else None)


# --- a full disk ---


def _assert_no_half_written_files(root: Path) -> None:
    """Every object is the version its metadata names and every metadata has its object, and no temporary file is
    left."""
    metas = {
        p.relative_to(root / "meta").as_posix().removesuffix(".json"): json.loads(p.read_text()).get("version")
        for p in (root / "meta").rglob("*")
        if p.is_file()
    }
    objects = sorted(p.relative_to(root / "objects").as_posix() for p in (root / "objects").rglob("*") if p.is_file())
    named = sorted(f"{k.split('/')[0]}/{v}~{k.split('/')[1]}" if v else k for k, v in metas.items())
    assert objects == named
    assert list((root / "tmp").iterdir()) == []


@pytest.fixture
def full_disk_store(tmp_path: Path) -> Iterator[LocalFileStore]:
    with tmpfs(tmp_path / "files", "256k") as mounted:
        if not mounted:
            not_root_or_fail()
        yield LocalFileStore(tmp_path / "files", "http://127.0.0.1:1")


def test_local_store_on_a_full_disk_leaves_nothing_behind_a_key(
    full_disk_store: LocalFileStore, tmp_path: Path
) -> None:
    store, now = full_disk_store, time.time()
    kept = new_key("kept.bin")
    store.put(kept, b"k" * 1000, "application/octet-stream", None, now)
    source = tmp_path / "video.mp4"  # on another filesystem: copied in through the store's temp dir
    source.write_bytes(os.urandom(512 * 1024))
    for data in (source, source.read_bytes()):
        key = new_key("video.mp4")
        with pytest.raises(OSError) as full:
            store.put(key, data, "video/mp4", None, now)
        assert full.value.errno == errno.ENOSPC
        with pytest.raises(FileNotFound):
            store.stat(key, now)
        assert not (store.root / "objects" / key.split("/")[0]).exists()
        _assert_no_half_written_files(store.root)
    # the metadata write is the one that fails: the object (staged already) goes too
    key = new_key("small.bin")
    filler = fill(store.root)
    os.truncate(filler, filler.stat().st_size - 4096)  # one page: room for the object, not for its metadata
    with pytest.raises(OSError) as full:
        store.put(key, b"x" * 3000, "application/octet-stream", None, now)
    assert any(frame.name == "_staged_meta" for frame in traceback.extract_tb(full.value.__traceback__))
    with pytest.raises(FileNotFound):
        store.stat(key, now)
    _assert_no_half_written_files(store.root)
    # the same again for a key that holds a file (a second PUT to a signed upload URL): the first file stays
    # whole. It is empty here, so replacing it frees no room for the new metadata.
    filler.unlink()
    first = store.put(key, b"", "text/plain", None, now)
    filler = fill(store.root)
    os.truncate(filler, filler.stat().st_size - 4096)
    with pytest.raises(OSError) as full:
        store.put(key, b"2" * 3000, "application/octet-stream", None, now + 1)
    assert any(frame.name == "_staged_meta" for frame in traceback.extract_tb(full.value.__traceback__))
    assert store.stat(key, now) == first and store.open(key).read() == b""
    _assert_no_half_written_files(store.root)
    store.delete(key)
    # a multipart completion on a full disk fails whole, and can be retried once there is room
    filler.unlink()
    upload = store.create_multipart(key, "application/octet-stream", None)
    etags = [store.put_part(upload, n, os.urandom(60 * 1024)) for n in (1, 2)]
    filler = fill(store.root)
    with pytest.raises(StorageFull):  # refused before copying: the parts' size is not free
        store.complete_multipart(upload, [(1, etags[0]), (2, etags[1])], now)
    with pytest.raises(FileNotFound):
        store.stat(key, now)
    filler.unlink()
    assert store.complete_multipart(upload, [(1, etags[0]), (2, etags[1])], now).size == 120 * 1024
    assert store.stat(kept, now).size == 1000 and store.open(kept).read() == b"k" * 1000
    _assert_no_half_written_files(store.root)


def test_a_job_store_on_a_full_disk_answers_507_and_keeps_what_it_held(tmp_path: Path) -> None:
    """SQLite's "database or disk is full" was a 500 with a traceback in the log. It is a 507 storage_full, the
    jobs stored before stay whole, and writes work again once there is room."""
    with tmpfs(tmp_path / "data", "1m") as mounted:
        if not mounted:
            not_root_or_fail()
        app = create_app(Settings(data_dir=tmp_path / "data", public_url="http://testserver"), workers=0)
        with TestClient(app, raise_server_exceptions=False) as client:
            kept = client.post(f"/{APP}", json={"prompt": "a fox"}).json()["request_id"]
            filler = fill(tmp_path / "data")
            big = {"prompt": "a fox " + "x" * 9_000}  # more than the pages SQLite had left
            for call in (
                lambda: client.post(f"/{APP}", json=big),
                lambda: client.put(f"/{APP}/requests/{kept}/cancel"),
            ):
                refused = call()
                assert refused.status_code == 507, refused.text
                assert refused.json()["error_type"] == "storage_full"
                assert "no space left on the disk of the job store" in refused.json()["detail"]
            assert client.get(f"/{APP}/requests/{kept}/status").json()["status"] == "IN_QUEUE"
            filler.unlink()
            again = client.post(f"/{APP}", json=big)
            assert again.status_code == 200, again.text
            assert client.put(f"/{APP}/requests/{kept}/cancel").status_code == 202
        store = SQLiteJobStore(tmp_path / "data" / "jobs.sqlite3")
        assert store._conn().execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert store.counts()["COMPLETED"] == 1 and store.counts()["IN_QUEUE"] == 1
        store.close()


def test_a_full_disk_fails_the_job_cleanly_and_the_next_one_succeeds(faulty: Faulty) -> None:
    if not faulty.files_on_tmpfs:
        not_root_or_fail()
    server, store = faulty.server, faulty.store
    faulty.ensure_running()
    earlier = _completed_ok(store)
    if not earlier:  # run on its own: one request to find intact afterwards
        _wait_jobs(store, [_submit(server, {**CHEAP_INPUT, "seed": 1})], 120, server)
        earlier = _completed_ok(store)
    results = {j.id: httpx.get(f"{server.url}/{APP}/requests/{j.id}").json() for j in earlier}
    videos = {j.id: httpx.get(results[j.id]["video"]["url"]).content for j in earlier}
    counts_before = store.counts()

    filler = fill(faulty.files_root)
    try:
        victim = _submit(server, {**CHEAP_INPUT, "seed": 2})
        (failed,) = _wait_jobs(store, [victim], 120, server)
    finally:
        filler.unlink()
    assert failed.failure is not None and failed.failure.error_type == "storage_full", failed.failure
    result = httpx.get(f"{server.url}/{APP}/requests/{victim}")
    assert result.status_code == 507 and result.headers["x-fal-error-type"] == "storage_full"
    assert "file store's disk is full (No space left on device)" in result.json()["detail"]
    assert any(m.startswith("Failed: the file store's disk is full") for m in _messages(store, victim))
    # the store is intact: every earlier result and its video, and the counts moved by exactly this request
    for job in earlier:
        assert httpx.get(f"{server.url}/{APP}/requests/{job.id}").json() == results[job.id]
        assert httpx.get(results[job.id]["video"]["url"]).content == videos[job.id]
    counts = store.counts()
    assert counts["COMPLETED"] == counts_before["COMPLETED"] + 1
    assert counts.get("outcome:storage_full", 0) == counts_before.get("outcome:storage_full", 0) + 1
    assert counts["outcome:ok"] == counts_before["outcome:ok"]
    _assert_no_half_written_files(faulty.files_root)

    after = _submit(server, {**CHEAP_INPUT, "seed": 3})  # the space is back
    (ok,) = _wait_jobs(store, [after], 120, server)
    assert ok.failure is None and ok.output is not None
    assert httpx.get(f"{server.url}{ok.output['video']['url']}").content[4:8] == b"ftyp"
    _assert_no_half_written_files(faulty.files_root)


def _completed_ok(store: SQLiteJobStore) -> list[Job]:
    db = store._conn()
    ids = [row[0] for row in db.execute("SELECT id FROM jobs")]
    return [j for j in (store.get(i) for i in ids) if j is not None and j.state is JobState.COMPLETED and not j.failure]


# --- an engine crash and a GPU out-of-memory (the engine replaced by a stand-in) ---


class _Activations:
    """Stands for the tensors a failed run held."""


class FailingRunner:
    """Raises the given errors on successive runs, then behaves (writes an mp4 header)."""

    def __init__(self, failures: list[BaseException]) -> None:
        self.failures = failures
        self.held: list[weakref.ref[_Activations]] = []

    def generate_video(self, request: Any, output: Path, on_step: Any, is_cancelled: Any, **extra: Any) -> Any:
        if self.failures:
            activations = _Activations()  # referenced only by this frame, so by the exception's traceback
            self.held.append(weakref.ref(activations))
            raise self.failures.pop(0)
        output.write_bytes(b"\x00\x00\x00\x18ftypisom")
        return SimpleNamespace(seed=7, generation=SimpleNamespace(timings={"total_s": 0.01}))


def _run_worker(tmp_path: Path, runner: FailingRunner, inputs: list[dict[str, Any]]) -> tuple[Any, list[Job]]:
    settings = Settings(data_dir=tmp_path, public_url="http://test", worker_poll_s=0.01)
    store = open_job_store(settings)
    ids = [f"job-{i}" for i in range(len(inputs))]
    for job_id, job_input in zip(ids, inputs, strict=True):
        store.submit(NewJob(job_id, APP, APP, job_input), time.time())
        time.sleep(0.002)  # claimed in submit order
    worker = Worker(settings, store, open_file_store(settings), worker_id="w1", runner_factory=lambda s: runner)

    def all_done() -> bool:
        return all((job := store.get(j)) is not None and job.state is JobState.COMPLETED for j in ids)

    worker.run(stop_when=all_done)  # one worker, one run: it must go on after each failure
    return store, [store.get(j) for j in ids]


def test_a_failed_job_never_answers_a_status_the_js_client_runs_again(tmp_path: Path) -> None:
    """The official JS client posts a request again on 429/502/503/504 (FAL_PROTOCOL.md section 5): a failed
    generation answered 503 would run up to 3 more times. A worker's failures are answered 500, type unchanged."""
    failures = [StorageUnavailable("S3 PutObject failed: endpoint unreachable"), ModelLoadError("weights missing")]
    _store, jobs = _run_worker(tmp_path, FailingRunner(list(failures)), [{"prompt": "a fox"}] * 2)
    for job, error in zip(jobs, failures, strict=True):
        assert job.failure is not None and job.failure.error_type == error.error_type
        assert job.failure.http_status == 500 and error.http_status == 503


def test_an_out_of_memory_fails_one_job_frees_gpu_memory_and_the_worker_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = FailingRunner(
        [
            torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
            RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (an older torch's way of saying it)"),
        ]
    )
    freed: list[bool] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # empty_cache runs once the failed run's tensors are gone: the traceback that held them was dropped first
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: freed.append(all(r() is None for r in runner.held)))
    big = {"prompt": "a fox", "resolution": "720p", "num_frames": 121}
    store, (oom, legacy, ok) = _run_worker(tmp_path, runner, [big, {"prompt": "a fox"}, {"prompt": "a fox"}])
    for job in (oom, legacy):
        assert job.failure is not None and job.failure.error_type == "out_of_memory"
        assert job.failure.http_status == 500  # not 503: the JS client would run the whole request again
        assert "try a lower resolution (480p) or fewer frames" in job.failure.message
        assert job.failure.result_body()["error_type"] == "out_of_memory"
    assert "out of memory generating 121 frames at 1280x720 (720p)" in oom.failure.message
    assert any(m.startswith("Failed: out of memory") for m in _messages(store, oom.id))
    assert freed == [True, True]
    assert ok.failure is None and ok.output is not None and ok.output["seed"] == 7


def test_an_engine_exception_fails_one_job_and_the_worker_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    freed: list[bool] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: freed.append(True))
    runner = FailingRunner([ZeroDivisionError("a kernel divided by zero"), ValueError("bad shape")])
    store, (crashed, again, ok) = _run_worker(tmp_path, runner, [{"prompt": "a fox"}] * 3)
    for job in (crashed, again):
        assert job.failure is not None and job.failure.error_type == "internal_error"
        assert job.failure.http_status == 500
    assert crashed.failure.message == "internal error: ZeroDivisionError"
    assert "Internal error: ZeroDivisionError: a kernel divided by zero" in _messages(store, crashed.id)
    assert ok.failure is None
    assert freed == []  # only an out-of-memory empties the GPU cache


def test_a_full_worker_disk_during_generation_is_a_storage_error(tmp_path: Path) -> None:
    full = OSError(errno.ENOSPC, "No space left on device")
    _, (failed, ok) = _run_worker(tmp_path, FailingRunner([full]), [{"prompt": "a fox"}] * 2)
    assert failed.failure is not None and failed.failure.error_type == "storage_full"
    assert failed.failure.http_status == 507 and "No space left on device" in failed.failure.message
    assert ok.failure is None


def test_the_worker_loop_and_the_api_import_no_torch() -> None:
    code = "import sys, wanserve.worker.loop, wanserve.api.app; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
