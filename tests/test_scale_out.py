"""Many boxes on loopback: two API replicas (`serve --no-worker`) and two GPU-less workers (`wanserve worker`)
sharing a real redis-server (append-only, fsync always) and an S3 API (moto's server). No process shares a
data directory with another except for the signing keys, as on separate machines."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import httpx
import pytest
from redis_server import RedisServer
from s3_server import REGION
from server import CHEAP_INPUT, Server

APP = "fal-ai/wan-22"
SHORT = CHEAP_INPUT
LEASE_S = 3.0
STARTED = re.compile(r"^Started on worker (\S+):")


@dataclass
class Cluster:
    root: Path
    redis: RedisServer
    env: dict[str, str]
    service_args: list[str]
    model: Path
    replicas: list[Server] = field(default_factory=list)
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start_worker(self, name: str) -> None:
        log = (self.root / f"{name}.log").open("ab")
        command = [sys.executable, "-m", "wanserve", "worker", "--worker-id", name, "--model", str(self.model)]
        command += ["--data-dir", str(self.root / name), *self.service_args]
        self.workers[name] = subprocess.Popen(command, env={**os.environ, **self.env}, stdout=log, stderr=log)

    def wait_ready(self, count: int, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, proc in self.workers.items():
                assert proc.poll() is None, f"worker {name} exited:\n{self.log(name)}"
            body = httpx.get(f"{self.replicas[0].url}/ready", timeout=5).json()
            if len(body["workers"]) >= count:
                return
            time.sleep(0.3)
        raise TimeoutError("workers not ready")

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self) -> None:
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        for replica in self.replicas:
            replica.stop()
        self.redis.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, model_cache: Path, coarse_model: Path, s3_endpoint: str):
    root = tmp_path_factory.mktemp("cluster")
    bucket = f"videos-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name=REGION).create_bucket(Bucket=bucket)
    redis = RedisServer(root / "redis").start()
    service_args = ["--store", redis.url, "--files", f"s3://{bucket}/wanserve", "--s3-endpoint-url", s3_endpoint]
    first_url = f"http://127.0.0.1:{_port()}"
    env = {
        "WANSERVE_CACHE_DIR": str(model_cache),
        "WANSERVE_VIDEO_PRESET": "ultrafast",
        "WANSERVE_VIDEO_CRF": "51",
        "WANSERVE_JOB_LEASE_S": str(LEASE_S),
        "WANSERVE_TORCH_THREADS": "1",  # two workers share this machine's two cores
        "WANSERVE_KEYS_DIR": str(root / "shared-keys"),  # the one thing replicas share besides Redis and S3
        "WANSERVE_PUBLIC_URL": first_url,  # the load balancer's address, in production
    }
    cluster = Cluster(root, redis, env, service_args, coarse_model)
    try:
        for name, port in (("api-a", int(first_url.rsplit(":", 1)[1])), ("api-b", _port())):
            replica = Server(root / name, model_cache, port=port, env=env, args=["--no-worker", *service_args])
            cluster.replicas.append(replica.start(wait_ready=False))
        for name in ("gpu-1", "gpu-2"):
            cluster.start_worker(name)
        cluster.wait_ready(2)
        yield cluster
    finally:
        cluster.stop()


def _port() -> int:
    from wanserve.client.local_server import free_port

    return free_port()


def _submit(replica: Server, **overrides: object) -> str:
    reply = httpx.post(f"{replica.url}/{APP}", json={**SHORT, **overrides}, timeout=60)
    assert reply.status_code == 200, reply.text
    return str(reply.json()["request_id"])


def _status(replica: Server, request_id: str, logs: bool = False) -> dict[str, object]:
    params = {"logs": 1} if logs else {}
    reply = httpx.get(f"{replica.url}/{APP}/requests/{request_id}/status", params=params, timeout=30)
    assert reply.status_code in (200, 202), reply.text
    return dict(reply.json())


def _wait_all(replica: Server, ids: list[str], timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    pending = set(ids)
    while pending and time.monotonic() < deadline:
        pending = {i for i in pending if _status(replica, i)["status"] != "COMPLETED"}
        time.sleep(0.3)
    assert not pending, f"{len(pending)} request(s) never completed"


def _messages(replica: Server, request_id: str) -> list[str]:
    logs = _status(replica, request_id, logs=True).get("logs") or []  # a queued request has no logs yet
    return [entry["message"] for entry in logs]  # type: ignore[attr-defined]


def test_twenty_jobs_across_two_replicas_complete_once_each_and_either_replica_answers(cluster: Cluster) -> None:
    a, b = cluster.replicas
    ids = [_submit((a, b)[i % 2], seed=i) for i in range(20)]
    cancelled = ids[-1]  # submitted to b, cancelled through a
    cancel = httpx.put(f"{a.url}/{APP}/requests/{cancelled}/cancel", timeout=30)
    assert cancel.status_code == 202 and cancel.json() == {"status": "CANCELLATION_REQUESTED"}
    _wait_all(b, ids)

    ran_on: Counter[str] = Counter()
    for request_id in ids:
        assert _status(a, request_id, logs=True) == _status(b, request_id, logs=True)  # one truth, two replicas
        messages = _messages(a, request_id)
        starts = [m for m in messages if STARTED.match(m)]
        if request_id == cancelled:
            result = httpx.get(f"{b.url}/{APP}/requests/{cancelled}", timeout=30)
            assert result.status_code == 499 and result.json()["error_type"] == "client_cancelled"
            continue
        assert len(starts) == 1 and sum(m.startswith("Completed in") for m in messages) == 1, messages
        ran_on[STARTED.match(starts[0]).group(1)] += 1  # type: ignore[union-attr]
        result = httpx.get(f"{(b, a)[ids.index(request_id) % 2].url}/{APP}/requests/{request_id}", timeout=30)
        assert result.status_code == 200 and result.json()["seed"] == ids.index(request_id)
    assert set(ran_on) == {"gpu-1", "gpu-2"} and sum(ran_on.values()) == 19  # both workers took jobs

    # The video lives in S3; either replica redirects to it (a presigned URL), and the bytes are an mp4.
    video = httpx.get(f"{a.url}/{APP}/requests/{ids[0]}", timeout=30).json()["video"]
    for replica in (a, b):
        path = video["url"].split("/files/", 1)[1]
        download = httpx.get(f"{replica.url}/files/{path}", follow_redirects=True, timeout=30)
        assert download.status_code == 200 and download.content[4:8] == b"ftyp"
        assert len(download.content) == video["file_size"]

    ready = httpx.get(f"{b.url}/ready", timeout=10).json()
    details = {w["id"]: w for w in ready["details"]}
    assert set(details) == {"gpu-1", "gpu-2"}
    assert all(w["model"] == str(cluster.model) and w["current_job"] is None for w in details.values())
    metrics = httpx.get(f"{a.url}/metrics", timeout=10).text
    assert 'wanserve_jobs_completed{outcome="ok"} 19.0' in metrics
    assert 'wanserve_jobs_finished_total{outcome="ok"} 19.0' in metrics  # counted in Redis, not per replica
    assert 'wanserve_worker_busy{worker="gpu-1"} 0.0' in metrics


def test_queued_jobs_survive_a_redis_kill_and_restart(cluster: Cluster) -> None:
    a, b = cluster.replicas
    ids = [_submit((a, b)[i % 2], seed=100 + i) for i in range(3)]
    cluster.redis.kill()  # kill -9, with jobs queued and probably one running
    time.sleep(1.0)  # API replicas and workers retry meanwhile
    cluster.redis.start()
    _wait_all(a, ids)
    for request_id in ids:
        assert "error" not in _status(b, request_id), _messages(b, request_id)
        assert httpx.get(f"{b.url}/{APP}/requests/{request_id}", timeout=30).status_code == 200


def test_a_worker_killed_mid_job_hands_it_to_the_other_worker(cluster: Cluster) -> None:
    a, b = cluster.replicas
    request_id = _submit(a, num_inference_steps=6, seed=7)
    deadline = time.monotonic() + 120
    victim = None
    while victim is None and time.monotonic() < deadline:
        messages = _messages(b, request_id)
        started = [STARTED.match(m) for m in messages]
        if any(m.startswith("step 1/") for m in messages):
            victim = next(m.group(1) for m in started if m)
        time.sleep(0.1)
    assert victim is not None, "the job never started"
    cluster.workers[victim].kill()  # kill -9 mid-denoising
    cluster.workers[victim].wait(10)

    _wait_all(b, [request_id], timeout_s=120)
    messages = _messages(a, request_id)
    starts = [STARTED.match(m).group(1) for m in messages if STARTED.match(m)]  # type: ignore[union-attr]
    assert starts == [victim, ({"gpu-1", "gpu-2"} - {victim}).pop()], messages
    assert any("attempt 2" in m for m in messages)
    assert sum(m.startswith("Completed in") for m in messages) == 1
    assert httpx.get(f"{b.url}/{APP}/requests/{request_id}", timeout=30).json()["seed"] == 7
