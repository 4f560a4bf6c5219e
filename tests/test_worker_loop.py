"""The worker's own bookkeeping around a run, with the engine replaced by a stand-in that writes a file."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from wanserve.backends import open_file_store, open_job_store
from wanserve.config import Settings
from wanserve.jobs.model import JobState, NewJob
from wanserve.jobs.service import recover_lost_jobs
from wanserve.worker.loop import Worker


class InstantRunner:
    """Does what EngineRunner.generate_video promises (progress, cancel checks, an mp4 at `output`)."""

    def generate_video(
        self, request: Any, output: Path, on_step: Any, is_cancelled: Any, on_phase: Any, loras: Any = ()
    ) -> Any:
        assert not is_cancelled()
        output.write_bytes(b"\x00\x00\x00\x18ftypisom")
        return SimpleNamespace(seed=3, generation=SimpleNamespace(timings={"total_s": 0.01}))


def test_a_job_taken_back_from_a_worker_runs_normally_when_that_worker_claims_it_again(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, public_url="http://test", job_lease_s=10)
    store = open_job_store(settings)
    worker = Worker(
        settings, store, open_file_store(settings), worker_id="w1", runner_factory=lambda s: InstantRunner()
    )
    worker.load()
    store.submit(NewJob("j1", "fal-ai/wan-22", "fal-ai/wan-22", {"prompt": "a fox"}), time.time())
    first = store.claim("w1", 10, time.time())
    assert first is not None
    worker._lease_lost_job = "j1"  # what the heartbeat records when the store gave the job away
    recover_lost_jobs(store, ["w1"], max_attempts=3)
    again = store.claim("w1", 10, time.time())
    assert again is not None and again.attempts == 2
    worker.process(again)
    done = store.get("j1")
    assert done is not None and done.state is JobState.COMPLETED and done.failure is None
    assert done.output is not None and done.output["seed"] == 3
