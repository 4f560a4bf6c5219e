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
        self, request: Any, output: Path, on_step: Any, is_cancelled: Any, on_phase: Any, **extra: Any
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


def run_one(settings: Settings, job_input: dict[str, Any]) -> tuple[Any, list[str]]:
    store = open_job_store(settings)
    worker = Worker(
        settings, store, open_file_store(settings), worker_id="w1", runner_factory=lambda s: InstantRunner()
    )
    worker.load()
    store.submit(NewJob("j1", "fal-ai/wan-22", "fal-ai/wan-22", job_input), time.time())
    job = store.claim("w1", 10, time.time())
    assert job is not None
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


def test_expansion_asked_for_without_a_backend_uses_the_prompt_and_says_why(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, public_url="http://test")
    done, logs = run_one(settings, {"prompt": "a fox", "enable_prompt_expansion": True})
    assert done.failure is None and done.output["prompt"] == "a fox"
    assert any(line.startswith("Prompt expansion skipped: no expansion model or API is configured") for line in logs)
