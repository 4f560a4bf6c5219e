"""`serve --workers 0` plus a separately started `wanserve worker`: the seam that scale-out builds on."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from server import CHEAP_INPUT, Server, wait_completed

APP = "fal-ai/wan-22"


def test_a_separately_started_worker_serves_the_queue(tmp_path: Path, model_cache: Path, coarse_model: Path) -> None:
    server = Server(tmp_path / "data", model_cache, args=["--workers", "0"]).start(wait_ready=False)
    worker = None
    try:
        assert httpx.get(f"{server.url}/ready").status_code == 503  # no worker has the model loaded
        queued = httpx.post(f"{server.url}/{APP}", json=CHEAP_INPUT).json()
        env = {
            **os.environ,
            "WANSERVE_CACHE_DIR": str(model_cache),
            "WANSERVE_VIDEO_CRF": "51",
            "WANSERVE_PUBLIC_URL": server.url,
        }
        worker = subprocess.Popen(
            [sys.executable, "-m", "wanserve", "worker", "--data-dir", str(server.data_dir),
             "--model", str(coarse_model), "--worker-id", "box-2-gpu-0"],
            env=env,
        )  # fmt: skip
        server.wait(ready=True)
        assert httpx.get(f"{server.url}/ready").json()["workers"] == ["box-2-gpu-0"]
        status = wait_completed(server, APP, queued["request_id"])
        assert "error" not in status
        video = httpx.get(queued["response_url"]).json()["video"]
        assert video["url"].startswith(server.url) and httpx.get(video["url"]).status_code == 200
        worker.terminate()  # a clean stop unregisters the worker
        assert worker.wait(30) == 0
        assert httpx.get(f"{server.url}/ready").status_code == 503
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
        server.stop()


def test_a_worker_whose_gpu_is_missing_is_not_restarted_at_once_and_ready_says_why(
    tmp_path: Path, model_cache: Path
) -> None:
    """`WANSERVE_GPUS=3 wanserve serve` on a machine without that GPU: the worker exits at its start, and starting
    it again at once cannot help. It used to be restarted with back-off for ever, an ERROR each time, with nothing
    in `/ready` saying why."""
    server = Server(tmp_path / "data", model_cache, env={"WANSERVE_GPUS": "3"}).start(wait_ready=False)
    try:
        deadline = time.monotonic() + 90
        while "problems" not in (answer := httpx.get(f"{server.url}/ready")).json():
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.3)
        assert answer.status_code == 503
        (problem,) = answer.json()["problems"]
        assert problem.startswith("worker 0 cannot run here with these settings (tried again every 300 s): ")
        assert "device cuda:3 was asked for (--device or --gpus), but torch sees no CUDA GPU" in problem
        time.sleep(4)  # a restart came after 1 s, then 2 s
        assert server.log().count("started worker ") == 1, server.log()
        assert "worker 0 cannot run here: device cuda:3" in server.log()
        assert httpx.get(f"{server.url}/health").status_code == 200  # the API still serves stored requests
    finally:
        server.stop()
