"""A worker whose engine hangs inside a step exits, so its supervisor restarts it and the job is retried."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

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
