"""Queue service figures: submit -> IN_PROGRESS latency on an idle server, and status latency under load.

    .venv/bin/python benchmarks/queue_latency.py                 # starts its own server (tiny model)
    .venv/bin/python benchmarks/queue_latency.py --url http://host:8000 --key KEY

Prints figures; asserts nothing. The pollers run in this process, so on a small machine they compete
with the server for the CPU: the status figures are an upper bound of the server's own latency.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from wanserve.client.local_server import free_port, start_server, wait_until

APP = "fal-ai/wan-22"
CHEAP = {"prompt": "latency probe", "resolution": "480p", "num_inference_steps": 1, "guidance_scale": 1}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def local_server(data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "WANSERVE_VIDEO_PRESET": "ultrafast", "WANSERVE_VIDEO_CRF": "51"}
    proc = start_server(data_dir, port, env=env, output=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_until(proc, url)
    return proc, url


def wait_idle(client: httpx.Client, request_id: str) -> None:
    while client.get(f"/{APP}/requests/{request_id}/status").json()["status"] != "COMPLETED":
        time.sleep(0.05)


def submit_to_start(client: httpx.Client, samples: int) -> tuple[list[float], str]:
    """Seconds from sending the submit to the first status that says IN_PROGRESS (polled every 5 ms),
    and the id of the last (completed) request."""
    latencies = []
    request_id = ""
    for _ in range(samples):
        start = time.perf_counter()
        request_id = client.post(f"/{APP}", json=CHEAP).json()["request_id"]
        while client.get(f"/{APP}/requests/{request_id}/status").json()["status"] == "IN_QUEUE":
            time.sleep(0.005)
        latencies.append(time.perf_counter() - start)
        client.put(f"/{APP}/requests/{request_id}/cancel")
        wait_idle(client, request_id)
    return latencies, request_id


async def status_under_load(
    url: str, headers: dict[str, str], request_id: str, pollers: int, seconds: float, interval: float
) -> list[float]:
    """Latency of status requests (with logs) while `pollers` clients poll as fast as they can. The worker
    is idle meanwhile: on a GPU box it would be busy on the GPU, not on the CPU the API shares here."""
    limits = httpx.Limits(max_connections=pollers, max_keepalive_connections=pollers)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60) as client:
        latencies: list[float] = []
        stop_at = time.perf_counter() + seconds

        async def poll(offset: float) -> None:
            await asyncio.sleep(offset)  # spread the pollers over one interval, as independent clients are
            while time.perf_counter() < stop_at:
                start = time.perf_counter()
                response = await client.get(f"/{APP}/requests/{request_id}/status", params={"logs": "1"})
                response.raise_for_status()
                latencies.append(time.perf_counter() - start)
                await asyncio.sleep(max(0.0, interval - (time.perf_counter() - start)))

        await asyncio.gather(*(poll(interval * i / pollers) for i in range(pollers)))
        return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="an existing server (default: start one with the tiny model)")
    parser.add_argument("--key", help="API key of that server")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--pollers", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--interval",
        type=float,
        default=0.5,
        help="seconds between one poller's requests (JS client: 0.5; 0: flat out)",
    )
    args = parser.parse_args()
    headers = {"Authorization": f"Key {args.key}"} if args.key else {}
    proc = None
    with tempfile.TemporaryDirectory() as tmp:
        url = args.url
        if url is None:
            proc, url = local_server(Path(tmp) / "data")
        try:
            with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
                starts, last_id = submit_to_start(client, args.samples)
            print(f"submit -> IN_PROGRESS on an idle server ({args.samples} samples):")
            print(
                f"  median {statistics.median(starts) * 1000:.0f} ms, min {min(starts) * 1000:.0f} ms,"
                f" max {max(starts) * 1000:.0f} ms"
            )
            lat = asyncio.run(status_under_load(url, headers, last_id, args.pollers, args.seconds, args.interval))
            print(
                f"status under {args.pollers} concurrent pollers, one request every {args.interval:g} s each,"
                f" for {args.seconds:.0f} s ({len(lat)} requests):"
            )
            print(
                f"  p50 {percentile(lat, 50) * 1000:.1f} ms, p99 {percentile(lat, 99) * 1000:.1f} ms,"
                f" {len(lat) / args.seconds:.0f} requests/s"
            )
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(30)


if __name__ == "__main__":
    main()
