"""A worker whose engine hangs inside a step exits, so its supervisor restarts it and the job is retried."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from wanserve.jobs.model import JobState, NewJob
from wanserve.jobs.service import recover_lost_jobs
from wanserve.store.sqlite import SQLiteJobStore
from wanserve.worker.loop import STALLED_EXIT_CODE

# The engine is replaced by one that never returns, as a hung GPU kernel would: the worker's own code
# (claim, heartbeat, watchdog) is what runs. In a subprocess, because the watchdog ends its process.
HANGING_WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from wanserve.backends import open_file_store, open_job_store
    from wanserve.config import Settings
    from wanserve.worker.loop import Worker

    class HangingRunner:
        def generate_video(self, *args, **kwargs):
            time.sleep(3600)

    settings = Settings(data_dir=Path(sys.argv[1]), job_stall_s=1.0, job_lease_s=0.4, public_url="http://test")
    worker = Worker(
        settings, open_job_store(settings), open_file_store(settings),
        worker_id="hung", runner_factory=lambda s: HangingRunner(),
    )
    worker.run()
    """
)


def test_a_stalled_worker_exits_and_its_job_is_retried(tmp_path: Path) -> None:
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    store.submit(NewJob("j1", "fal-ai/wan-22", "fal-ai/wan-22", {"prompt": "a fox"}), time.time())
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", HANGING_WORKER, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == STALLED_EXIT_CODE, proc.stderr
    assert time.monotonic() - started < 30
    job = store.get("j1")
    assert job is not None and job.state is JobState.RUNNING and job.worker_id == "hung"
    assert any("stalled" in entry.message for entry in store.logs("j1"))
    assert recover_lost_jobs(store, ["hung"], max_attempts=2) == []  # first attempt: back to the queue
    requeued = store.get("j1")
    assert requeued is not None and requeued.state is JobState.QUEUED


# A worker stand-in that takes a second to hand its job back on SIGINT, as a real one does.
SLOW_TO_STOP = (
    "import signal, sys, time\nsignal.signal(signal.SIGINT, lambda *_: (time.sleep(1), sys.exit(3)))\ntime.sleep(60)"
)


def test_a_restarted_worker_is_stopped_with_sigint_not_killed(tmp_path: Path, monkeypatch: Any) -> None:
    """The parent-death signal (PR_SET_PDEATHSIG) is per thread: a worker restarted by the supervisor's thread
    was SIGKILLed as soon as that thread ended at shutdown, before it could hand its job back."""
    from wanserve.backends import open_job_store
    from wanserve.config import Settings
    from wanserve.worker import supervisor

    spawned: list[subprocess.Popen[bytes]] = []
    popen = subprocess.Popen

    def stand_in(_args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        spawned.append(popen([sys.executable, "-c", SLOW_TO_STOP], preexec_fn=kwargs.get("preexec_fn")))
        return spawned[-1]

    monkeypatch.setattr(supervisor.subprocess, "Popen", stand_in)
    settings = Settings(data_dir=tmp_path / "data", public_url="http://test")
    workers = supervisor.WorkerSupervisor(settings, open_job_store(settings), 1)
    workers.start()
    time.sleep(0.5)
    spawned[0].kill()  # a crash: the supervisor's thread starts the next one
    deadline = time.monotonic() + 30
    while len(spawned) < 2:
        assert time.monotonic() < deadline, "the crashed worker was not restarted"
        time.sleep(0.1)
    time.sleep(0.5)  # the stand-in installs its SIGINT handler
    workers.stop()
    assert spawned[1].returncode == 3  # its SIGINT handler ran to the end (-9: killed)


def test_a_worker_that_exits_once_the_server_is_stopping_is_not_started_again(tmp_path: Path, monkeypatch: Any) -> None:
    """systemd's stop signals every process of the unit: the worker drains and exits while uvicorn still waits for
    open requests. A new worker started then would load the model and could claim a job as the server goes."""
    from wanserve.backends import open_job_store
    from wanserve.config import Settings
    from wanserve.worker import supervisor

    spawned: list[subprocess.Popen[bytes]] = []
    popen = subprocess.Popen

    def stand_in(_args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        spawned.append(
            popen([sys.executable, "-c", "import time; time.sleep(60)"], preexec_fn=kwargs.get("preexec_fn"))
        )
        return spawned[-1]

    monkeypatch.setattr(supervisor.subprocess, "Popen", stand_in)
    settings = Settings(data_dir=tmp_path / "data", public_url="http://test")
    workers = supervisor.WorkerSupervisor(settings, open_job_store(settings), 1)
    workers.start()
    try:
        workers.begin_shutdown()
        spawned[0].terminate()  # the worker's own SIGTERM: it drains and exits
        spawned[0].wait(10)
        time.sleep(3.0)  # past the 2 s back-off of a worker that died young
        assert len(spawned) == 1
    finally:
        workers.stop()


def test_a_starting_server_recovers_only_workers_it_can_see_are_dead(tmp_path: Path) -> None:
    """At start, workers registered from this process space whose process is gone are dead: their jobs are requeued
    at once. A worker registered from another space (a container or machine with the same host name) may be alive
    although its pid is not found here: its job is left to its lease."""
    import socket

    from wanserve.backends import open_job_store
    from wanserve.config import Settings
    from wanserve.jobs.model import WorkerInfo
    from wanserve.worker import supervisor
    from wanserve.worker.processes import process_space

    settings = Settings(data_dir=tmp_path / "data", public_url="http://test")
    store = open_job_store(settings)
    now = time.time()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that was a process of this space, and is not any more
    host = socket.gethostname()
    registered = {
        "dead-here": {"host": host, "pid": gone.pid, "pid_space": process_space()},
        "alive-here": {"host": host, "pid": os.getpid(), "pid_space": process_space()},
        "elsewhere": {"host": host, "pid": gone.pid, "pid_space": "another-boot/pid:[1]"},
    }
    for worker_id, detail in registered.items():
        store.register_worker(WorkerInfo(worker_id, True, now, detail))
        store.submit(NewJob(f"job-{worker_id}", "fal-ai/wan-22", "fal-ai/wan-22", {"prompt": "a fox"}), now)
        claimed = store.claim(worker_id, 600, now)
        assert claimed is not None and claimed.id == f"job-{worker_id}"
    supervisor.WorkerSupervisor(settings, store, 0).recover_previous_run()
    states = {worker_id: store.get(f"job-{worker_id}").state for worker_id in registered}  # type: ignore[union-attr]
    assert states == {"dead-here": JobState.QUEUED, "alive-here": JobState.RUNNING, "elsewhere": JobState.RUNNING}
    assert sorted(w.id for w in store.workers()) == ["alive-here", "elsewhere"]


# A worker stand-in whose settings cannot run here the first time (no GPU yet: a driver still loading), then can.
NO_GPU_YET = (
    "import os, sys, time\n"
    "if os.environ['STAND_IN_TRY'] == '1':\n"
    "    open(os.environ['WANSERVE_WORKER_REASON_FILE'], 'w').write('torch sees no CUDA GPU')\n"
    "    sys.exit(78)\n"
    "if os.environ['STAND_IN_TRY'] == '2':\n"
    "    sys.exit(1)  # past the GPU check, then a crash: another problem, restarted with the crash back-off\n"
    "time.sleep(60)\n"
)


def test_a_worker_that_cannot_run_here_is_tried_again_only_after_a_long_wait(tmp_path: Path, monkeypatch: Any) -> None:
    """Exit 78 (settings this machine cannot run): restarting with the crash back-off (1 s, 2 s... 30 s) only
    repeated the error for ever. The supervisor says why in `problems` and tries again after CANNOT_RUN_RETRY_S,
    since a GPU can come back (a driver loaded late, a GPU reset)."""
    from wanserve.backends import open_job_store
    from wanserve.config import Settings
    from wanserve.worker import supervisor

    spawned: list[subprocess.Popen[bytes]] = []
    popen = subprocess.Popen

    def stand_in(_args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        env = {**kwargs["env"], "STAND_IN_TRY": str(len(spawned) + 1)}
        spawned.append(popen([sys.executable, "-c", NO_GPU_YET], env=env, preexec_fn=kwargs.get("preexec_fn")))
        return spawned[-1]

    monkeypatch.setattr(supervisor.subprocess, "Popen", stand_in)
    monkeypatch.setattr(supervisor, "CANNOT_RUN_RETRY_S", 3.0)
    settings = Settings(data_dir=tmp_path / "data", public_url="http://test")
    workers = supervisor.WorkerSupervisor(settings, open_job_store(settings), 1)
    workers.start()
    try:
        deadline = time.monotonic() + 30
        while not workers.problems():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert workers.problems() == [
            "worker 0 cannot run here with these settings (tried again every 3 s): torch sees no CUDA GPU"
        ]
        time.sleep(2)  # the crash back-off would have started it again after 1 s
        assert len(spawned) == 1
        while len(spawned) < 3:
            assert time.monotonic() < deadline, "not tried again"
            time.sleep(0.05)
        assert workers.problems() == []  # not the GPU any more: the crash is in the log
        assert spawned[2].poll() is None  # this one runs
    finally:
        workers.stop()
