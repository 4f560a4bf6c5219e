"""`wanserve serve` runs its workers as child processes: an engine crash, a GPU OOM or a segfault kills
only the child. The supervisor notices, hands the child's job back to the queue (or fails it after its
last attempt) and starts a new child."""

from __future__ import annotations

import ctypes
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from wanserve.config import Settings
from wanserve.files.base import FileStore
from wanserve.jobs.service import recover_lost_jobs
from wanserve.store.base import JobStore
from wanserve.tempdirs import process_temp_dir
from wanserve.worker.processes import pid_alive, process_space

log = logging.getLogger("wanserve.supervisor")

SETTINGS_ENV = "WANSERVE_WORKER_SETTINGS"
REASON_FILE_ENV = "WANSERVE_WORKER_REASON_FILE"  # where a worker that cannot run here writes why
MAX_RESTART_DELAY_S = 30.0
# A worker's exit code when its settings cannot run on this machine (a GPU it does not have, or none yet: a driver
# still loading at boot, a GPU recovering from a fault): starting it again at once cannot help, so it is tried again
# only every CANNOT_RUN_RETRY_S, and /ready says why meanwhile. 78 is sysexits' EX_CONFIG.
CANNOT_RUN_HERE_EXIT = 78
CANNOT_RUN_RETRY_S = 300.0


def exit_cannot_run_here(reason: str) -> int:
    """For a worker whose settings cannot run here: says why on stderr and, when a supervisor started it, in the
    file the supervisor reads. Returns the exit code to exit with."""
    print(f"error: {reason}", file=sys.stderr)
    path = os.environ.get(REASON_FILE_ENV)
    if path:
        with suppress(OSError):
            Path(path).write_text(reason)
    return CANNOT_RUN_HERE_EXIT


def next_restart_delay(previous_s: float, lived_s: float) -> float:
    """Back off when a worker dies young (a broken model would crash-loop); start again soon when it lived."""
    return 1.0 if lived_s > 60 else min(previous_s * 2, MAX_RESTART_DELAY_S)


def _die_with_parent() -> None:
    """Runs in the child before exec: the kernel kills it when the server dies, even by kill -9."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the worker also exits when it sees its parent change


@dataclass
class _Slot:
    index: int
    generation: int = 0
    process: subprocess.Popen[bytes] | None = None
    worker_id: str = ""
    started_at: float = 0.0
    restart_delay: float = 1.0
    restart_at: float = 0.0
    cannot_run: str | None = None  # why this slot's worker cannot run here: tried again every CANNOT_RUN_RETRY_S


class WorkerSupervisor:
    def __init__(self, settings: Settings, store: JobStore, count: int, files: FileStore | None = None) -> None:
        """`files`: where a job that fails after its last attempt may have left an unreported video."""
        self.settings = settings
        self.store = store
        self.files = files
        self.slots = [_Slot(i) for i in range(count)]
        self._stop = threading.Event()
        self._lock = threading.Lock()  # a check (and the restart it may do) and stop() never overlap
        # The parent-death signal is per thread: the thread that restarted a worker must outlive it, so it runs
        # until stop() has seen every worker exit, not merely until stop() begins.
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self.host = socket.gethostname()
        self.boot = secrets.token_hex(3)

    def problems(self) -> list[str]:
        """Why workers of this server are not running (until they are tried again), one line each."""
        return [
            f"worker {slot.index} cannot run here with these settings (tried again every {CANNOT_RUN_RETRY_S:.0f} s): "
            f"{slot.cannot_run}"
            for slot in self.slots
            if slot.cannot_run is not None
        ]

    def recover_previous_run(self) -> None:
        """Workers registered from this process space (see `process_space`) that are not running any more are dead:
        their jobs go back to the queue (or fail after their last attempt) at once. A worker of another space (another
        container or machine, perhaps with this host name) is left to its lease: its pid means nothing here."""
        space = process_space()
        dead = [
            w.id
            for w in self.store.workers()
            if w.detail.get("pid_space") == space and not pid_alive(int(w.detail.get("pid", 0) or 0))
        ]
        if dead:
            failed = recover_lost_jobs(self.store, dead, self.settings.job_max_attempts, files=self.files)
            for worker_id in dead:
                self.store.remove_worker(worker_id)
            log.warning(
                "recovered jobs of %d stopped worker(s); %d failed after their last attempt", len(dead), len(failed)
            )

    def start(self) -> None:
        self.recover_previous_run()
        for slot in self.slots:
            self._spawn(slot)
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)
        self._thread.start()

    def _spawn(self, slot: _Slot) -> None:
        slot.generation += 1
        # The boot nonce keeps ids unique across restarts (a server in a container is pid 1 every time).
        slot.worker_id = f"{self.host}-{self.boot}-w{slot.index}-{slot.generation}"
        env = dict(os.environ)
        env[SETTINGS_ENV] = self.settings.model_dump_json()
        env[REASON_FILE_ENV] = reason_file = self._reason_file(slot)
        Path(reason_file).unlink(missing_ok=True)
        slot.cannot_run = None  # until this try says otherwise
        slot.process = subprocess.Popen(
            [sys.executable, "-m", "wanserve", "worker", "--worker-id", slot.worker_id, "--exit-with-parent"],
            env=env,
            preexec_fn=_die_with_parent,
        )
        slot.started_at = time.monotonic()
        log.info("started worker %s (pid %d)", slot.worker_id, slot.process.pid)

    def _reason_file(self, slot: _Slot) -> str:
        return str(process_temp_dir("workers") / f"w{slot.index}")

    def _reason(self, slot: _Slot) -> str:
        with suppress(OSError):
            if reason := Path(self._reason_file(slot)).read_text().strip():
                return reason
        return "its error is in the log above"

    def _watch(self) -> None:
        while not self._done.wait(0.2):
            if self._stop.is_set():
                continue
            for slot in self.slots:
                try:
                    with self._lock:
                        self._check(slot)
                except Exception:
                    log.exception("supervising worker %s failed", slot.worker_id)

    def _check(self, slot: _Slot) -> None:
        if slot.process is not None:
            code = slot.process.poll()
            if code is None:
                return
            log.error("worker %s exited with code %s", slot.worker_id, code)
            failed = recover_lost_jobs(self.store, [slot.worker_id], self.settings.job_max_attempts, files=self.files)
            self.store.remove_worker(slot.worker_id)
            if failed:
                log.error("failed %d job(s) after their last attempt: %s", len(failed), ", ".join(failed))
            slot.process = None
            if code == CANNOT_RUN_HERE_EXIT:
                slot.cannot_run = self._reason(slot)
                slot.restart_at = time.monotonic() + CANNOT_RUN_RETRY_S
                log.error(
                    "worker %d cannot run here: %s; trying again in %.0f s (or correct the settings and restart)",
                    slot.index,
                    slot.cannot_run,
                    CANNOT_RUN_RETRY_S,
                )
            else:
                slot.restart_delay = next_restart_delay(slot.restart_delay, time.monotonic() - slot.started_at)
                slot.restart_at = time.monotonic() + slot.restart_delay
        if not self._stop.is_set() and time.monotonic() >= slot.restart_at:
            self._spawn(slot)

    def begin_shutdown(self) -> None:
        """The server is stopping: a worker that exits from now on (draining on the same SIGTERM, say) is not
        started again, and its clean exit is no crash. `stop` still ends those left."""
        self._stop.set()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        with self._lock:  # a restart in progress completes first; none starts after this
            procs = [s.process for s in self.slots if s.process is not None]
        for proc in procs:
            # SIGINT, not SIGTERM (a drain): the server is going away, so running jobs go back to the queue
            # at once, for another worker or the next start, instead of holding the shutdown up.
            proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # Only now: the supervisor thread's exit would SIGKILL the workers it restarted (their jobs would count an
        # attempt) had they not stopped already.
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        # A child that had to be killed leaves its job running: hand it back now, not after its lease.
        ids = [slot.worker_id for slot in self.slots if slot.worker_id]
        recover_lost_jobs(self.store, ids, self.settings.job_max_attempts, files=self.files)
        for worker_id in ids:
            self.store.remove_worker(worker_id)
