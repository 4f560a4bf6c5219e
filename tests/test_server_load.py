"""50 concurrent submissions to a server with two workers: all complete, queue positions stay consistent."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from server import CHEAP_INPUT, Server

APP = "fal-ai/wan-22"
SUBMISSIONS = 50


@pytest.fixture(scope="module")
def two_worker_server(
    tmp_path_factory: pytest.TempPathFactory, model_cache: Path, coarse_model: Path
) -> Iterator[Server]:
    srv = Server(
        tmp_path_factory.mktemp("load") / "data",
        model_cache,
        args=["--workers", "2", "--model", str(coarse_model)],
        env={"WANSERVE_TORCH_THREADS": "1"},  # two workers share the two cores
    ).start()
    yield srv
    srv.stop()


# Status reads in one sweep are separate requests: a job or two may start between the first and the last.
SLACK = 2


async def _run(
    server: Server,
) -> tuple[list[str], dict[str, list[int]], dict[str, dict[str, object]], list[list[tuple[str, int]]]]:
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:

        async def submit(i: int) -> str:
            response = await client.post(f"/{APP}", json={**CHEAP_INPUT, "seed": i})
            assert response.status_code == 200, response.text
            return str(response.json()["request_id"])

        ids = await asyncio.gather(*(submit(i) for i in range(SUBMISSIONS)))
        positions: dict[str, list[int]] = {i: [] for i in ids}
        sweeps: list[list[tuple[str, int]]] = []
        final: dict[str, dict[str, object]] = {}
        deadline = time.monotonic() + 900
        while len(final) < len(ids):
            assert time.monotonic() < deadline, f"{len(ids) - len(final)} requests never completed"
            pending = [i for i in ids if i not in final]
            bodies = await asyncio.gather(*(client.get(f"/{APP}/requests/{i}/status") for i in pending))
            snapshot = []
            for request_id, response in zip(pending, bodies, strict=True):
                body = response.json()
                if body["status"] == "IN_QUEUE":
                    positions[request_id].append(body["queue_position"])
                    snapshot.append((request_id, body["queue_position"]))
                elif body["status"] == "COMPLETED":
                    final[request_id] = body
            # Positions count the queued requests ahead: never more than are waiting.
            assert all(p < len(snapshot) + SLACK for _, p in snapshot), snapshot
            sweeps.append(snapshot)
            await asyncio.sleep(0.5)
        return ids, positions, final, sweeps


def test_fifty_concurrent_submissions_all_complete(two_worker_server: Server) -> None:
    ids, positions, final, sweeps = asyncio.run(_run(two_worker_server))
    assert len(set(ids)) == SUBMISSIONS
    assert all("error" not in body for body in final.values()), [b for b in final.values() if "error" in b]
    for request_id, seen in positions.items():
        assert seen == sorted(seen, reverse=True), (request_id, seen)  # a queue position never goes up
        assert all(0 <= p < SUBMISSIONS for p in seen)
    # Every output is a distinct, downloadable video with its own seed.
    outputs = [httpx.get(f"{two_worker_server.url}/{APP}/requests/{i}").json() for i in ids]
    assert sorted(o["seed"] for o in outputs) == list(range(SUBMISSIONS))
    assert len({o["video"]["url"] for o in outputs}) == SUBMISSIONS
    # Requests start in the order their positions promised, and both workers took part.
    started = {i: _start_line(two_worker_server, i) for i in ids}
    assert len({worker for _, worker in started.values()}) == 2
    for snapshot in sweeps:
        for a, pos_a in snapshot:
            for b, pos_b in snapshot:
                if pos_a + SLACK < pos_b:
                    assert started[a][0] < started[b][0], (a, pos_a, b, pos_b)


def _start_line(server: Server, request_id: str) -> tuple[str, str]:
    """(timestamp, worker) of the log line the worker writes when it starts the request."""
    logs = httpx.get(f"{server.url}/{APP}/requests/{request_id}/status", params={"logs": "1"}).json()["logs"]
    line = next(log for log in logs if log["message"].startswith("Started on worker"))
    return line["timestamp"], line["message"].split(":")[0]
