"""kill -9 for real: of the whole server mid-run, and of its worker. No job, result or file is lost."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
from server import CHEAP_INPUT, Server, wait_completed
from webhook_receiver import Receiver

from wanserve.store.sqlite import SQLiteJobStore
from wanserve.worker.processes import pid_alive

APP = "fal-ai/wan-22"


def _submit(server: Server, body: dict[str, object]) -> str:
    response = httpx.post(f"{server.url}/{APP}", json=body)
    assert response.status_code == 200, response.text
    return str(response.json()["request_id"])


def _wait_for_log(server: Server, request_id: str, prefix: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = httpx.get(f"{server.url}/{APP}/requests/{request_id}/status", params={"logs": "1"}).json()
        if any(log["message"].startswith(prefix) for log in status.get("logs") or []):
            return
        time.sleep(0.05)
    raise TimeoutError(f"no log line starting with {prefix!r}")


def _worker_pids(data_dir: Path) -> list[int]:
    store = SQLiteJobStore(data_dir / "jobs.sqlite3")
    try:
        return [int(w.detail["pid"]) for w in store.workers()]
    finally:
        store.close()


def test_kill_9_of_the_server_mid_run_loses_nothing(tmp_path: Path, model_cache: Path, coarse_model: Path) -> None:
    server = Server(tmp_path / "data", model_cache, args=["--model", str(coarse_model)]).start()
    try:
        done = _submit(server, {**CHEAP_INPUT, "seed": 1})
        wait_completed(server, APP, done)
        done_output = httpx.get(f"{server.url}/{APP}/requests/{done}").json()
        video_before = httpx.get(done_output["video"]["url"]).content

        running = _submit(server, {**CHEAP_INPUT, "num_inference_steps": 3, "seed": 2})
        queued = [_submit(server, {**CHEAP_INPUT, "seed": 3 + i}) for i in range(2)]
        _wait_for_log(server, running, "step 1/3")
        workers = _worker_pids(server.data_dir)
        server.kill()

        # The worker dies with its server (no orphan keeps the GPU busy).
        deadline = time.monotonic() + 10
        while any(pid_alive(pid) for pid in workers):
            assert time.monotonic() < deadline, "worker outlived its killed server"
            time.sleep(0.1)

        server.start()
        for request_id in (running, *queued):
            status = wait_completed(server, APP, request_id)
            assert "error" not in status, status
        logs = httpx.get(f"{server.url}/{APP}/requests/{running}/status", params={"logs": "true"}).json()["logs"]
        messages = [log["message"] for log in logs]
        assert any("attempt 2" in m for m in messages), messages  # it ran again, from the start
        assert sum(m.startswith("step 3/3") for m in messages) == 1
        # Results and files from before the crash are intact.
        assert httpx.get(f"{server.url}/{APP}/requests/{done}").json() == done_output
        assert httpx.get(done_output["video"]["url"]).content == video_before
    finally:
        server.stop()


def test_a_worker_killed_twice_fails_its_job_and_the_server_goes_on(
    tmp_path: Path, model_cache: Path, coarse_model: Path
) -> None:
    server = Server(tmp_path / "data", model_cache, args=["--model", str(coarse_model)]).start()
    try:
        victim = _submit(server, {**CHEAP_INPUT, "num_inference_steps": 4})
        for attempt in (1, 2):
            _wait_for_log(server, victim, "step 1/4" if attempt == 1 else "Retrying")
            _wait_for_log(server, victim, "Started on worker")
            pids = _worker_pids(server.data_dir)
            assert len(pids) == 1
            os.kill(pids[0], 9)
            if attempt == 1:
                server.wait(ready=True)
        status = wait_completed(server, APP, victim)
        assert status["error_type"] == "runner_disconnected"
        result = httpx.get(f"{server.url}/{APP}/requests/{victim}")
        assert result.status_code == 503 and result.json()["error_type"] == "runner_disconnected"
        # The API never went down, and the restarted worker serves the next request.
        server.wait(ready=True)
        after = _submit(server, CHEAP_INPUT)
        assert "error" not in wait_completed(server, APP, after)
    finally:
        server.stop()


def test_webhook_delivery_resumes_after_a_kill(
    tmp_path: Path, model_cache: Path, coarse_model: Path, receiver: tuple[Receiver, str]
) -> None:
    state, url = receiver
    state.fail_first = 3
    # Retries after 0.5, 1 and 2 s instead of the default 5, 10 and 20: the same schedule, a quarter of the wait.
    server = Server(
        tmp_path / "data", model_cache, args=["--model", str(coarse_model)],
        env={"WANSERVE_WEBHOOK_RETRY_BASE_S": "0.5"},
    ).start()  # fmt: skip
    try:
        response = httpx.post(f"{server.url}/{APP}", json=CHEAP_INPUT, params={"fal_webhook": url})
        request_id = response.json()["request_id"]
        deadline = time.monotonic() + 60
        while not state.deliveries:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # Right after the first (failed) delivery: the retries are only in the database. A moment first, for the
        # failure to be written: killed before that, the webhook stays held (one delivery's time limit + 30 s, so
        # no replica sends it twice) and the retries start only after the hold.
        time.sleep(0.3)
        server.kill()
        attempts_before_restart = len(state.deliveries)
        server.start()
        deadline = time.monotonic() + 120
        while not any(status == 200 for status, _, _ in state.deliveries):
            assert time.monotonic() < deadline, state.deliveries
            time.sleep(0.1)
        time.sleep(1.0)
        assert attempts_before_restart < state.fail_first + 1 <= len(state.deliveries)
        assert [status for status, _, _ in state.deliveries].count(200) == 1
        assert all(headers["x-fal-webhook-request-id"] == request_id for _, headers, _ in state.deliveries)
    finally:
        server.stop()
