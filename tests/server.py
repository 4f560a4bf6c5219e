"""Start a real `wanserve serve` (uvicorn on loopback, supervised worker, tiny model) for tests."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from wanserve.client.local_server import ServerNotReady, free_port, start_server, wait_until
from wanserve.jobs.endpoints import app_of

# A request that exercises the whole pipeline as cheaply as the schema allows on the tiny model.
CHEAP_INPUT = {
    "prompt": "a red fox in snow",
    "resolution": "480p",
    "num_inference_steps": 1,
    "guidance_scale": 1,
    "guidance_scale_2": 1,
}


@dataclass
class Server:
    data_dir: Path
    model_cache: Path
    port: int = field(default_factory=free_port)
    env: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}-server.log"

    def start(self, wait_ready: bool = True, timeout_s: float = 180.0) -> Server:
        env = {
            **os.environ,
            "WANSERVE_CACHE_DIR": str(self.model_cache),
            # Test videos are random noise: the cheapest encode keeps them valid mp4s at a fraction of the cost.
            "WANSERVE_VIDEO_PRESET": "ultrafast",
            "WANSERVE_VIDEO_CRF": "51",
            "WANSERVE_WEBHOOK_RETRY_BASE_S": "0.3",
            "WANSERVE_FILE_SWEEP_S": "0.5",
            "WANSERVE_ALLOW_PRIVATE_URLS": "true",  # the tests' webhook receivers listen on loopback
            **self.env,
        }
        for inherited in ("WANSERVE_API_KEYS", "WANSERVE_PUBLIC_URL", "WANSERVE_HOST", "WANSERVE_PORT"):
            if inherited not in self.env:
                env.pop(inherited, None)
        log = self.log_path.open("ab")
        self.process = start_server(self.data_dir, self.port, args=self.args, env=env, output=log)
        self.wait(ready=wait_ready, timeout_s=timeout_s)
        return self

    def wait(self, ready: bool = True, timeout_s: float = 180.0) -> None:
        assert self.process is not None
        try:
            wait_until(self.process, self.url, ready=ready, timeout_s=timeout_s)
        except ServerNotReady as exc:
            raise RuntimeError(f"{exc}:\n{self.log()}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""

    def kill(self) -> None:
        """kill -9: no cleanup of any kind runs in the server."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def wait_completed(server: Server, app: str, request_id: str, timeout_s: float = 300.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = httpx.get(f"{server.url}/{app}/requests/{request_id}/status", timeout=10).json()
        if body["status"] == "COMPLETED":
            return body
        time.sleep(0.2)
    raise TimeoutError(f"request {request_id} not completed after {timeout_s}s")


def run_request(
    server: Server, endpoint: str, body: dict[str, object]
) -> tuple[dict[str, Any], httpx.Response, list[str]]:
    """Submit `body` to `endpoint`, wait for it, and return (its final status with logs, the result response,
    the log messages)."""
    submitted = httpx.post(f"{server.url}/{endpoint}", json=body, timeout=30)
    assert submitted.status_code == 200, submitted.text
    reply = submitted.json()
    wait_completed(server, app_of(endpoint), reply["request_id"])
    status = httpx.get(reply["status_url"], params={"logs": 1}, timeout=10).json()
    return status, httpx.get(reply["response_url"], timeout=30), [entry["message"] for entry in status["logs"]]
