"""One worker: loads the model once, then claims and runs jobs until told to stop.

The job store is the only channel to the API: progress logs, the cancel flag and the lease heartbeat
all go through it, so a worker can be a child of `wanserve serve` or a process on another machine.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from wanserve.config import Settings
from wanserve.errors import (
    ContentPolicyViolation,
    FieldError,
    GenerationCancelled,
    ParallelGroupFailed,
    StorageFull,
    StorageUnavailable,
    WanserveError,
    exception_chain,
    is_out_of_memory,
)
from wanserve.files.base import FileStore, StoredFile, delete_outputs, file_ref, lifecycle_expiry, output_key
from wanserve.files.space import is_disk_full
from wanserve.jobs.endpoints import EndpointRegistry
from wanserve.jobs.model import Failure, Job, JobState, LogLevel, WorkerInfo, cancelled_failure, settled
from wanserve.jobs.service import validation_errors
from wanserve.lora.sources import LoraFile, LoraResolver, LoraUse, SourceKind
from wanserve.progress import StepLine
from wanserve.store.base import JobStore, is_store_outage
from wanserve.tempdirs import TEMP_PREFIX, remove_stale_temp_dirs
from wanserve.worker.processes import process_space

log = logging.getLogger("wanserve.worker")

# A job renders into `<tmp>/wanserve-<pid>-<random>/` (tempdirs.py): a worker ended by its watchdog (os._exit)
# leaves its own, removed by the next worker to start.


def _describe_file(file: LoraFile) -> str:
    size = f"{file.size / 1e6:.2f} MB"
    if file.downloaded:
        return f"downloaded {size} in {file.seconds:.2f}s"
    cached = file.kind not in (SourceKind.LOCAL, SourceKind.HUB)
    return f"{size} {file.kind} file" + (" from the disk cache" if cached else "")


STALLED_EXIT_CODE = 70


def disk_full_cause(exc: BaseException) -> OSError | None:
    """The `No space left on device` (or disk quota) error behind `exc`, if that is what it is."""
    for current in exception_chain(exc):
        if is_disk_full(current):
            return current
    return None


def free_accelerator_memory() -> None:
    """After an out-of-memory: drops the failed run's tensors (their frames held them until now) and hands
    the allocator's cached blocks back, so the next job starts from a clean GPU."""
    gc.collect()
    torch = sys.modules.get("torch")  # never imported here: without torch loaded there is no GPU memory to free
    if torch is None:
        return
    try:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # a broken CUDA context: the next job will say so
        log.exception("freeing GPU memory after an out-of-memory failed")


class LeaseLost(Exception):
    """The store gave this worker's job away (its lease expired): stop without reporting."""


class ShuttingDown(Exception):
    """The worker was asked to stop: the running job goes back to the queue."""


STORE_RETRY_FIRST_S = 1.0  # then doubling, up to 30 s
# A stop while a finished run waits for the job store to report it: it tries this much longer, then the worker exits
# and leaves the job leased (the store gives it to another worker when the lease runs out). Under `serve` the
# supervisor's own grace is shorter and ends it first.
REPORT_GRACE_AFTER_STOP_S = 15.0


class StoreOutage:
    """Backoff and one log line per outage, for a worker calling a store that is down."""

    def __init__(self, doing: str, store: str = "job store") -> None:
        self.doing = doing
        self.store = store
        self.delay = 0.0

    def failed(self, exc: BaseException) -> float:
        """The seconds to wait before trying again."""
        if self.delay == 0.0:
            cause = f"{type(exc).__name__}: {exc}"
            log.error("%s unreachable (%s); will %s when it is back", self.store, cause, self.doing)
        self.delay = min(max(2 * self.delay, STORE_RETRY_FIRST_S), 30.0)
        return self.delay

    def over(self) -> None:
        if self.delay:
            log.info("job store reachable again")
        self.delay = 0.0


class Report(Enum):
    """What came of reporting a run's outcome to the job store."""

    DONE = "done"
    REFUSED = "refused"  # the job was no longer this worker's
    UNREPORTED = "unreported"  # the store stayed unreachable until the worker stopped


class Worker:
    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        files: FileStore,
        *,
        worker_id: str | None = None,
        runner_factory: Callable[[Settings], Any] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.files = files
        self.endpoints = EndpointRegistry(settings.app_ids)
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self._runner_factory = runner_factory
        self._runner: Any = None
        self._lora_resolver: LoraResolver | None = None
        self._prompts: Any = None  # engine.prompt_gate.PromptGate, made by load()
        self._current: Job | None = None
        self._shape: str | None = None  # the running job's frames and size, for an out-of-memory message
        self._progress_at = time.monotonic()  # last sign of life of the running job
        # The run (job id, attempt) whose job the store took back from this worker: a run, not a job, so that a
        # late answer about an earlier run of a job this worker claimed again cannot stop the new run.
        self._lease_lost_run: tuple[str, int] | None = None
        # The run the heartbeat thread handed back to the queue when the worker was told to stop (see stop()).
        self._handed_back_run: tuple[str, int] | None = None
        # The run a stop does not hand back: its outcome is being stored and reported (its video would be thrown
        # away, and a next run would write under the same output key), or its GPU group broke (`abandon`).
        self._kept_run: tuple[str, int] | None = None
        self._hand_back_lock = threading.Lock()  # the heartbeat thread and the main thread may both try
        self._stop = threading.Event()
        self._stopped_at: float | None = None  # monotonic time of the first stop()
        self._beat_now = threading.Event()  # wakes the heartbeat thread before its interval (a stop, the end)
        self._draining = threading.Event()
        self._stop_when: Callable[[], bool] = lambda: False  # `run`'s, once it runs
        self._detail: dict[str, Any] = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_space": process_space(),  # where `pid` means this process (WorkerSupervisor.recover_previous_run)
            "model": settings.model,
            "gpus": settings.gpus or [settings.device],
            "current_job": None,
            "draining": False,
        }

    # --- lifecycle ---
    def stop(self) -> None:
        """Stop now: the running job goes back to the queue at once (it runs again elsewhere, its attempt not
        counted). The heartbeat thread hands it back: the engine looks for a stop only between denoising steps, and
        a 720p step can outlast the grace a stopping server gives its workers before it kills them."""
        if self._stopped_at is None:
            self._stopped_at = time.monotonic()
        self._stop.set()
        self._beat_now.set()

    def abandon(self) -> None:
        """Stop now, leaving the running job leased to this worker id: a GPU group that broke. Its launcher then
        recovers the job as a dead worker's, counting the attempt (a request that kills a rank every time runs
        out of attempts); a stop's hand-back would not count it."""
        with self._hand_back_lock:
            job = self._current
            if job is not None:
                self._kept_run = (job.id, job.attempts)
        self.stop()

    def drain(self) -> None:
        """Take no new job; let the running one finish for up to `drain_s`, then stop. Asked again: stop now."""
        if self._draining.is_set():
            self.stop()
            return
        self._draining.set()
        self._detail["draining"] = True
        log.info("worker %s draining: no new job; the running one has %.0f s to finish", self.id, self.settings.drain_s)
        timer = threading.Timer(self.settings.drain_s, self.stop)
        timer.daemon = True
        timer.start()
        with contextlib.suppress(Exception):  # the heartbeat re-registers anyway; this makes it visible sooner
            self._register(ready=False)

    def _register(self, ready: bool) -> None:
        ready = ready and not self._draining.is_set() and not self._stop.is_set()
        self.store.register_worker(WorkerInfo(self.id, ready, self.store.now(), self._detail))

    def _register_through_outage(self, ready: bool) -> None:
        """`_register` at the start and once the model is loaded, waiting out a store outage as the claim loop does:
        minutes of model loading are not thrown away (the process exiting) for a store that is down a while."""
        outage = StoreOutage("register this worker")
        while True:
            try:
                self._register(ready)
            except Exception as exc:
                if self._stopping():  # the run loop ends at once; the entry was never written, or ages out
                    return
                self._stop.wait(outage.failed(exc))
                continue
            outage.over()
            return

    def _stopping(self) -> bool:
        """What ends the run loop: a stop, a drain, or `run`'s `stop_when` (the parent process gone)."""
        return self._stop.is_set() or self._draining.is_set() or self._stop_when()

    def load(self) -> None:
        self._register_through_outage(ready=False)
        if self._stopping():  # stopped while the store was down: no model to load for nothing
            return
        remove_stale_temp_dirs()
        if self._runner_factory is None:
            from wanserve.engine.runner import EngineRunner  # the engine (torch) loads only in workers

            runner = EngineRunner.from_settings(self.settings)
            self._detail["engine"] = runner.engine.describe()
            log.info("engine: %s", self._detail["engine"])
            self._detail["warmed_up"] = runner.warm_up(on_phase=lambda line: log.info("%s", line))
            self._runner = runner
        else:
            self._runner = self._runner_factory(self.settings)
            engine = getattr(self._runner, "engine", None)  # a GPU group's leader has one; test stand-ins do not
            if engine is not None:
                self._detail["engine"] = engine.describe()
        self._load_checks()
        self._register_through_outage(ready=True)
        log.info("worker %s ready (model %s)", self.id, self.settings.model)

    def _load_checks(self) -> None:
        from wanserve.engine.prompt_gate import PromptGate

        self._prompts = PromptGate(self.settings)
        self._detail.update(self._prompts.describe())

    def run(self, stop_when: Callable[[], bool] = lambda: False) -> None:
        """Loads the model, then runs jobs until `stop()` or `stop_when()`."""
        # The heartbeat outlives stop(): the running job keeps its lease until it is handed back or finished (a
        # step can take longer than a lease, and a lease that ran out would count the run as a failed attempt).
        self._stop_when = stop_when
        finished = threading.Event()
        heartbeat = threading.Thread(target=self._heartbeat_loop, args=(finished,), name="heartbeat", daemon=True)
        heartbeat.start()
        try:
            self.load()
            outage = StoreOutage("claim a job")
            token, unanswered = uuid.uuid4().hex, False
            while not self._stopping():
                try:
                    job = self.store.claim(self.id, self.settings.job_lease_s, self.store.now(), token=token)
                except Exception as exc:  # the store is down for longer than its client retries: wait, not die
                    # The same token next time: if this claim took a job before its reply was lost, that job.
                    unanswered = True
                    self._stop.wait(outage.failed(exc))
                    continue
                outage.over()
                token, unanswered = uuid.uuid4().hex, False
                if job is None:
                    self._stop.wait(self.settings.worker_poll_s)
                    continue
                self.process(job)
            if unanswered:
                self._hand_back_unanswered_claim(token)
        finally:
            self._stop.set()
            finished.set()
            self._beat_now.set()
            try:
                self.store.remove_worker(self.id)
            except Exception as exc:  # a store outage: the entry ages out of the worker list (its heartbeat stopped)
                log.warning("could not remove worker %s from the store (%s: %s)", self.id, type(exc).__name__, exc)

    def _hand_back_unanswered_claim(self, token: str) -> None:
        """Stopping after a claim whose reply was lost: that claim may have taken a job, which would then wait for
        its lease to run out and count a run it never had. The store is asked which job the claim took, if any (a
        claim that never reached it took none, and none is taken now) and that job is handed straight back, its
        place and attempts kept."""
        try:
            job = self.store.claimed_with(self.id, token)
            if job is not None:
                note = "Worker stopping; the request goes back to the queue"
                if not self.store.release(job.id, self.id, self.store.now(), note=note):
                    log.warning("job %s was no longer this worker's when it was handed back", job.id)
        except Exception as exc:  # still no store: a job the lost claim took goes back when its lease runs out
            log.warning("could not settle a claim whose reply was lost (%s: %s)", type(exc).__name__, exc)

    def _heartbeat_loop(self, finished: threading.Event) -> None:
        interval = max(self.settings.job_lease_s / 4, 0.05)
        while True:
            self._beat_now.wait(interval)
            self._beat_now.clear()
            if finished.is_set():
                return
            job = self._current
            if job is not None and time.monotonic() - self._progress_at > self.settings.job_stall_s:
                self._exit_stalled(job)
            if job is not None and self._stop.is_set() and self._hand_back_at_stop(job):
                continue
            try:
                self._register(ready=self._runner is not None)
                if job is not None and not self.store.heartbeat(
                    job.id, self.id, self.settings.job_lease_s, self.store.now()
                ):
                    self._lease_lost_run = (job.id, job.attempts)
            except Exception:  # a store hiccup must not kill the heartbeat; the next beat retries
                log.exception("heartbeat failed")

    def _hand_back_at_stop(self, job: Job, main_thread: bool = False) -> bool:
        """The heartbeat thread's half of stop(): the running job back to the queue now, while the engine finishes
        its step (the main thread then drops the run at its next check). Not once the main thread is storing and
        reporting the run's outcome (`_begin_commit`): that finishes, the lease kept by the heartbeat. Without a
        store the job stays leased: this is tried again at the next beat, and the lease ends it. True when the job
        is no longer this worker's to keep alive."""
        run = (job.id, job.attempts)
        with self._hand_back_lock:
            if self._handed_back_run == run or (not main_thread and self._current is not job):
                return True  # done already, or the heartbeat read a job whose run has ended since
            if self._kept_run == run and not main_thread:
                return False
            try:
                note = "Worker shutting down; the request goes back to the queue"
                if self.store.release(job.id, self.id, self.store.now(), note=note):
                    log.info("job %s handed back to the queue (worker %s stopping)", job.id, self.id)
                else:
                    log.warning("job %s was no longer this worker's when it was handed back", job.id)
                self._handed_back_run = run
                return True
            except Exception as exc:
                log.warning("job %s: could not hand it back yet (%s: %s)", job.id, type(exc).__name__, exc)
                return True  # nothing to renew meanwhile: a stopping worker's lease may run out

    def _begin_commit(self, job: Job) -> bool:
        """From here the main thread stores and reports the run's outcome; a stop no longer hands the job back.
        False when it was handed back already (the run is then dropped: nothing is stored)."""
        run = (job.id, job.attempts)
        with self._hand_back_lock:
            if self._handed_back_run == run:
                return False
            self._kept_run = run
            return True

    def _exit_stalled(self, job: Job) -> None:
        """The engine is stuck inside a step (a hung kernel, a deadlock): no cancel check will ever run, so
        the only way out is to end the process. The job stays with this worker id, which the supervisor (or,
        for a standalone worker, the lease expiry) hands back to the queue for its retry."""
        stalled = time.monotonic() - self._progress_at
        log.error("job %s made no progress for %.0f s: exiting so the worker restarts", job.id, stalled)
        with contextlib.suppress(Exception):
            self._log(job, f"Worker stalled ({stalled:.0f} s without progress); restarting it", LogLevel.ERROR)
        os._exit(STALLED_EXIT_CODE)

    # --- one job ---
    def _log(self, job: Job, message: str, level: LogLevel = LogLevel.INFO) -> None:
        self._progress_at = time.monotonic()
        try:
            self.store.add_log(job.id, level, message, self.store.now())
        except Exception as exc:  # a progress line lost in a store outage must not fail the video
            log.warning("job %s: log line not stored (%s: %s): %s", job.id, type(exc).__name__, exc, message)

    def _discard_earlier_outputs(self, job: Job) -> None:
        """A video that an earlier attempt stored but never reported (its worker died in between) is referenced by
        nothing: remove it rather than leave it in the store for ever. Failing to is not worth failing the job."""
        delete_outputs(self.files, job.id, range(1, job.attempts))

    def _is_cancelled(self, job: Job) -> bool:
        if self._lease_lost_run == (job.id, job.attempts):
            raise LeaseLost(job.id)
        if self._stop.is_set():
            raise ShuttingDown(job.id)
        try:
            return self.store.cancel_requested(job.id)
        except Exception as exc:  # a store outage: the video goes on (its lease, not this check, bounds a cut-off run)
            log.warning("job %s: could not check for a cancel: %s", job.id, exc)
            return False

    def process(self, job: Job) -> None:
        # In this order: the heartbeat thread may look between two lines, and must never see this job with an
        # old progress time (a false stall) or a lease loss that belonged to an earlier run of it.
        self._progress_at = time.monotonic()
        self._lease_lost_run = None
        self._current, started = job, time.perf_counter()
        self._detail["current_job"] = job.id
        out_of_memory = False
        try:
            output, inference_time = self._run(job)
        except LeaseLost:
            log.warning("job %s: lease lost, leaving it to the store", job.id)
        except ShuttingDown:
            self._hand_back_at_stop(job, main_thread=True)  # unless the heartbeat thread did already
        except GenerationCancelled:
            self._finish(job, failure=cancelled_failure())
        except ParallelGroupFailed as exc:
            # As when a single-GPU worker dies: the job stays with this worker, which stops; its launcher hands it
            # back (the attempt counts, so a request that kills a rank every time fails after the last attempt).
            log.error("job %s: %s", job.id, exc)
            self._log(job, "A GPU process of this worker failed; the request goes back to the queue", LogLevel.WARN)
            self.abandon()
        except ValidationError as exc:
            self._finish(
                job, failure=Failure("validation_error", "invalid input", 422, {"detail": validation_errors(exc)})
            )
        except (ContentPolicyViolation, FieldError) as exc:  # an input the request cannot have: a 422 naming it
            flagged = isinstance(exc, ContentPolicyViolation)
            self._log(job, f"{'Flagged by the safety checker' if flagged else 'Failed'}: {exc}", LogLevel.ERROR)
            self._finish(job, failure=Failure(exc.error_type, str(exc), exc.http_status, {"detail": [exc.detail()]}))
        except StorageFull as exc:
            log.error("job %s: %s (%s)", job.id, exc, exc.__cause__)
            self._log(job, f"Failed: {exc}", LogLevel.ERROR)
            self._finish(job, failure=Failure(exc.error_type, str(exc), exc.http_status))
        except WanserveError as exc:
            if exc.http_status >= 500:  # the server's failure, not the caller's: the operator needs to see it
                log.error("job %s: %s: %s", job.id, type(exc).__name__, exc)
                self._log(job, f"Failed: {exc}", LogLevel.ERROR)
            self._finish(job, failure=Failure(exc.error_type, str(exc), exc.http_status))
        except Exception as exc:  # any engine crash fails this job only; the worker goes on
            out_of_memory = is_out_of_memory(exc)
            if out_of_memory:
                message = self._out_of_memory_message()
                log.error("job %s: %s (%s: %s)", job.id, message, type(exc).__name__, str(exc)[:500])
                self._log(job, f"Failed: {message}", LogLevel.ERROR)
                self._finish(job, failure=Failure("out_of_memory", message, 500))
            elif (full := disk_full_cause(exc)) is not None:
                message = f"no space left on the worker's disk while generating the video ({full.strerror})"
                log.error("job %s: %s: %s", job.id, message, full)
                self._log(job, f"Failed: {message}", LogLevel.ERROR)
                self._finish(job, failure=Failure(StorageFull.error_type, message, StorageFull.http_status))
            else:
                log.error("job %s crashed", job.id, exc_info=True)
                self._log(job, f"Internal error: {type(exc).__name__}: {exc}", LogLevel.ERROR)
                self._finish(job, failure=Failure("internal_error", f"internal error: {type(exc).__name__}", 500))
        else:
            note = f"Completed in {time.perf_counter() - started:.1f}s"
            if self._finish(job, output=output, inference_time=inference_time, note=note) is Report.REFUSED:
                self._discard_refused_output(job, output)
        finally:
            with self._hand_back_lock:  # a hand-back in progress sees the run either whole or over
                self._current = None
                self._kept_run = None
            self._detail["current_job"] = None
            self._shape = None
        if out_of_memory:  # here, not in the handler: the exception's frames (and their tensors) are gone now
            free_accelerator_memory()

    def _outage_window_s(self) -> float:
        """How long a finished run waits before giving up on storing its video (a file store that is down) or on
        reporting it (a job store that answers with an error no wait cures: an outage of it is waited out)."""
        return max(60.0, 10 * self.settings.job_lease_s)

    def _wait_out(self, outage: StoreOutage, exc: Exception, give_up: float, wait: Callable[[float], object]) -> None:
        """One backoff of a finished run riding out a store outage: `exc` again once `give_up` (monotonic) has
        passed. Waiting is not stalling: the stall watchdog is told so."""
        if time.monotonic() > give_up:
            raise exc
        wait(outage.failed(exc))
        self._progress_at = time.monotonic()

    def _store_video(self, job: Job, key: str, path: Path) -> StoredFile:
        """The finished video into the file store, through an outage of S3 as long as `_finish` rides out one of
        the job store (the heartbeat keeps the lease meanwhile): a few seconds of S3 trouble must not throw a
        rendered video away. A cancel or a stop ends the wait. A full disk is the operator's to fix: no wait."""
        outage = StoreOutage(f"store job {job.id}'s video", store="file store")
        give_up = time.monotonic() + self._outage_window_s()
        while True:
            now = time.time()
            try:
                return self.files.put(key, path, "video/mp4", lifecycle_expiry(job.output_lifecycle, now), now)
            except OSError as exc:
                if not is_disk_full(exc):
                    raise
                raise StorageFull(
                    f"the file store's disk is full ({exc.strerror}): the video could not be stored; "
                    "the operator must free space there"
                ) from exc
            except StorageUnavailable as exc:
                if not exc.transient:  # a refusal (credentials, bucket) fails now
                    raise
                if outage.delay == 0.0:
                    self._log(job, "The file store is unreachable: waiting for it to store the video", LogLevel.WARN)
                self._wait_out(outage, exc, give_up, self._stop.wait)
                if self._is_cancelled(job):
                    raise GenerationCancelled("cancelled while waiting for the file store") from None

    def _out_of_memory_message(self) -> str:
        shape = self._shape or "this request"
        return (
            f"out of memory generating {shape}: try a lower resolution (480p) or fewer frames; "
            "the worker freed its cached memory and goes on with the next request"
        )

    def _finish(self, job: Job, **outcome: Any) -> Report:
        """Report the outcome, through a store outage of any length, as the claim loop waits one out: a finished
        video is worth waiting for the store (while it is down nobody can take the job from this worker; once it
        is back, the lease decides). REFUSED: the job was no longer this worker's, or a stop handed it back first.
        UNREPORTED, the job left leased to this worker (the store gives it to another run when the lease runs out):
        a stop during the wait, after REPORT_GRACE_AFTER_STOP_S more; or a report that fails with the store up
        (an error no wait cures), after the outage window, and the worker goes on with the next job."""
        if not self._begin_commit(job):
            return Report.REFUSED
        if (failure := outcome.get("failure")) is not None:
            outcome["failure"] = settled(failure)
        outage = StoreOutage(f"report job {job.id}")
        refused_since: float | None = None  # the first of the errors in a row that are no outage
        while True:
            try:
                finished = self.store.finish(job.id, self.store.now(), worker_id=self.id, **outcome)
                break
            except Exception as exc:
                if is_store_outage(exc):
                    refused_since = None  # an outage's wait counts for nothing against the window
                elif refused_since is None:
                    refused_since = time.monotonic()
                stopping = time.monotonic() > self._report_deadline()
                refused_too_long = refused_since is not None and time.monotonic() - refused_since > (
                    self._outage_window_s()
                )
                if stopping or refused_too_long:
                    log.error(
                        "job %s: %s with its outcome unreported (%s: %s); the job store gives it to another run "
                        "when its lease runs out",
                        job.id,
                        "stopping" if stopping else "going on",
                        type(exc).__name__,
                        exc,
                    )
                    return Report.UNREPORTED
                self._wait_out(outage, exc, math.inf, self._wait_unless_stopping)
        if not finished:
            log.warning("job %s was no longer ours when it finished", job.id)
            return Report.REFUSED
        failure = outcome.get("failure")
        how = (outcome.get("note") or "done") if failure is None else f"failed ({failure.error_type})"
        log.info("job %s %s", job.id, how[:1].lower() + how[1:])
        return Report.DONE

    def _report_deadline(self) -> float:
        """When a report waiting out a store outage gives up: REPORT_GRACE_AFTER_STOP_S after a stop, else never."""
        return math.inf if self._stopped_at is None else self._stopped_at + REPORT_GRACE_AFTER_STOP_S

    def _wait_unless_stopping(self, seconds: float) -> None:
        """A backoff that a stop cuts short; once stopping, backoffs end with the report's grace."""
        if self._stopped_at is None:
            self._stop.wait(seconds)
        else:
            time.sleep(max(0.0, min(seconds, self._report_deadline() - time.monotonic())))

    def _discard_refused_output(self, job: Job, output: dict[str, Any]) -> None:
        """The video of a finish the store refused (the job was taken back, failed or cancelled meanwhile) is
        referenced by nothing, unless the refusal answered a retried finish whose first reply was lost: then the
        job holds this very output. Nor is it this run's alone when the job is queued or running again under the
        same attempt number (a hand-back whose reply was lost does not count the run): that run stores its video
        at the same key, perhaps already, and will name it in its result."""
        try:
            current = self.store.get(job.id)
            if current is not None:
                named = (current.output or {}).get("video", {}).get("url") == output["video"]["url"]
                # a claim counts an attempt and a hand-back takes it back: after a hand-back the job is queued one
                # attempt lower and its next claim is this one's number again (a lease requeue keeps the count, so
                # its next run has a key of its own)
                run_again = (current.state is JobState.RUNNING and current.attempts == job.attempts) or (
                    current.state is JobState.QUEUED and current.attempts == job.attempts - 1
                )
                if named or run_again:
                    return
            self.files.delete(output_key(job.id, job.attempts))
        except Exception as exc:  # a store outage: the file stays
            log.warning("job %s: could not remove the video of a refused finish: %s", job.id, exc)

    def _resolve_loras(self, job: Job, loras: list[Any]) -> list[LoraUse]:
        if not loras:
            return []
        if self._lora_resolver is None:
            self._lora_resolver = LoraResolver(self.settings, self.files)

        def before_each(i: int, label: str) -> None:  # a long download is progress too, and may be cancelled
            if self._is_cancelled(job):
                raise GenerationCancelled(f"cancelled while fetching LoRA {i + 1}")
            self._log(job, f"LoRA {i + 1}/{len(loras)} ({label}): fetching")

        uses = self._lora_resolver.uses(loras, before_each)
        for i, use in enumerate(uses):
            self._log(job, f"LoRA {i + 1}/{len(uses)} ({use.label}): {_describe_file(use.file)}")
        return uses

    def _run(self, job: Job) -> tuple[dict[str, Any], float]:
        request = self.endpoints.request_model(job.endpoint).model_validate(job.input)
        if job.attempts > 1:
            self._log(job, f"Retrying after the previous worker stopped (attempt {job.attempts})", LogLevel.WARN)
        width, height = request.frame_size
        self._shape = f"{request.num_frames} frames at {width}x{height} ({request.resolution})"
        self._log(
            job,
            f"Started on worker {self.id}: {request.num_frames} frames at {width}x{height},"
            f" {request.num_inference_steps} steps",
        )
        log.info(
            "job %s started (attempt %d): %s, %d steps", job.id, job.attempts, self._shape, request.num_inference_steps
        )
        checked = self._prompts.checks(request)
        request = self._prompts.prepare(request, lambda message, level: self._log(job, message, level))
        loras = self._resolve_loras(job, getattr(request, "loras", None) or [])

        def on_step(p: Any) -> None:
            self._log(job, StepLine(p.step, p.total, p.expert.value, p.seconds, round(p.eta_seconds)).format())
            if p.step == p.total:
                self._log(job, "Decoding video")

        with tempfile.TemporaryDirectory(prefix=f"{TEMP_PREFIX}{os.getpid()}-") as tmp:
            out_path = Path(tmp) / "video.mp4"
            result = self._runner.generate_video(
                request,
                out_path,
                on_step=on_step,
                is_cancelled=lambda: self._is_cancelled(job),
                on_phase=lambda message: self._log(job, message),
                loras=loras,
                check_frames=self._prompts.safety.check_frames
                if checked and self._prompts.safety.checks_output
                else None,
            )
            if self._is_cancelled(job):
                raise GenerationCancelled("cancelled before the upload")
            if not self._begin_commit(job):  # handed back by a stop since the check above
                raise ShuttingDown(job.id)
            key = output_key(job.id, job.attempts)
            self._discard_earlier_outputs(job)
            stored = self._store_video(job, key, out_path)
        self._log(job, f"Stored video ({stored.size / 1e6:.2f} MB)")
        output = {
            "video": {
                "url": file_ref(key),  # made into the client's URL when the output is read (api.files)
                "content_type": "video/mp4",
                "file_name": stored.file_name,
                "file_size": stored.size,
            },
            "seed": result.seed,
            "prompt": request.prompt,
        }
        return output, float(result.generation.timings.get("total_s", 0.0))
