"""Many clients following requests while the worker generates: does the API keep answering, how much memory does
it take, and is the worker's progress slowed?

    .venv/bin/python benchmarks/load_pollers.py                       # 500 pollers + 200 SSE streams, 30 s
    .venv/bin/python benchmarks/load_pollers.py --pollers 100 --streams 50 --seconds 10

Starts one `wanserve serve` on loopback (tiny model, one worker), then:
1. baseline: runs a request of `--steps` steps with no client load and times its denoising steps;
2. load: keeps the worker busy with the same requests while `--pollers` clients each poll a request's status once a
   second (httpx, async) and `--streams` clients hold `.../status/stream` (SSE, with logs) open, for `--seconds`.
Prints status latency p50/p99 and errors, SSE time to first event and errors, the API process's RSS (the worker is
a separate process, not counted) and the worker's seconds per step with and without the load.

Everything runs on one machine: the load generator (this process) competes with the server and the worker for the
CPUs, so on a small machine the slowdown it shows is an upper bound of what the API alone costs the worker.
Asserts nothing. Rate limits are turned off in the server it starts (one client stands for many here).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import os
import random
import resource
import ssl
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx

from wanserve.client.local_server import free_port, start_server, wait_until

APP = "fal-ai/wan-22"
# The whole pipeline on the tiny model; guidance 1 runs one forward per step, like the cheapest real request.
REQUEST = {"prompt": "load probe", "resolution": "480p", "guidance_scale": 1, "guidance_scale_2": 1, "seed": 1}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def rss_mb(pid: int) -> float:
    try:
        import psutil

        return float(psutil.Process(pid).memory_info().rss) / 2**20
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (from /proc: no psutil needed)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker_pid(api_pid: int) -> int | None:
    """The worker child of `wanserve serve` (its only `wanserve worker` child)."""
    for task in Path(f"/proc/{api_pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if b"worker" in Path(f"/proc/{child}/cmdline").read_bytes():
                return int(child)
    return None


def step_seconds(client: httpx.Client, request_id: str, window: tuple[float, float] | None = None) -> list[float]:
    """Seconds between consecutive `step i/N` log lines of a request (its first step, which includes the setup,
    left out); with `window`, only steps that ended inside it (epoch seconds)."""
    logs = client.get(f"/{APP}/requests/{request_id}/status", params={"logs": "1"}).json().get("logs") or []
    stamps = [
        (datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp(), e["message"])
        for e in logs
        if e["message"].startswith("step ")
    ]
    out = []
    for (t0, _), (t1, _) in itertools.pairwise(stamps):
        if window is None or (window[0] <= t0 and t1 <= window[1]):
            out.append(t1 - t0)
    return out


def wait_completed(client: httpx.Client, request_id: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while client.get(f"/{APP}/requests/{request_id}/status").json()["status"] != "COMPLETED":
        if time.monotonic() > deadline:
            raise TimeoutError(request_id)
        time.sleep(0.1)


@dataclass
class Load:
    poll_latency: list[float] = field(default_factory=list)
    poll_errors: dict[str, int] = field(default_factory=dict)
    stream_first_event: list[float] = field(default_factory=list)
    stream_events: int = 0
    streams_opened: int = 0
    stream_errors: dict[str, int] = field(default_factory=dict)
    rss_mb: list[float] = field(default_factory=list)
    loop_lag: list[float] = field(default_factory=list)

    def error(self, kind: dict[str, int], what: str) -> None:
        kind[what] = kind.get(what, 0) + 1


async def run_load(
    url: str, targets: list[str], pollers: int, streams: int, seconds: float, api_pid: int, seed: int
) -> Load:
    """`pollers` clients polling a status once a second and `streams` SSE clients, for `seconds`. Each picks a
    request of `targets` (the ones the worker is running or will run); a stream that ends (its request completed)
    opens again on another request that is not done yet."""
    load = Load()
    rng = random.Random(seed)
    stop_at = time.monotonic() + seconds
    done: set[str] = set()
    tls = ssl.create_default_context()  # built once: each client would otherwise load the CA bundle again

    # One client (one connection) per poller and per stream, as independent clients have: a single shared pool
    # of 700 connections costs httpx more CPU than the server spends answering.
    async def poll(offset: float, request_id: str) -> None:
        await asyncio.sleep(offset)  # spread over the first second, as independent clients are
        next_at = time.monotonic()
        async with httpx.AsyncClient(base_url=url, timeout=30, verify=tls) as client:
            while time.monotonic() < stop_at:
                start = time.perf_counter()
                try:
                    response = await client.get(f"/{APP}/requests/{request_id}/status")
                    if response.status_code in (200, 202):
                        load.poll_latency.append(time.perf_counter() - start)
                    else:
                        load.error(load.poll_errors, f"HTTP {response.status_code}")
                except httpx.HTTPError as exc:
                    load.error(load.poll_errors, type(exc).__name__)
                next_at += 1.0
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def stream(offset: float) -> None:
        await asyncio.sleep(offset)
        async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(30, read=None), verify=tls) as client:
            while time.monotonic() < stop_at:
                open_ones = [t for t in targets if t not in done]
                if not open_ones:
                    return
                request_id = rng.choice(open_ones)
                start = time.perf_counter()
                first = True
                try:
                    async with client.stream(
                        "GET", f"/{APP}/requests/{request_id}/status/stream", params={"logs": "1"}
                    ) as response:
                        if response.status_code != 200:
                            load.error(load.stream_errors, f"HTTP {response.status_code}")
                            await asyncio.sleep(1.0)
                            continue
                        load.streams_opened += 1
                        async for line in response.aiter_lines():
                            if not line.startswith("data:"):
                                continue
                            if first:
                                load.stream_first_event.append(time.perf_counter() - start)
                                first = False
                            load.stream_events += 1
                            if '"status": "COMPLETED"' in line:
                                done.add(request_id)
                            if time.monotonic() >= stop_at:
                                return
                except httpx.HTTPError as exc:
                    load.error(load.stream_errors, type(exc).__name__)
                    await asyncio.sleep(1.0)

    async def sample() -> None:
        """The API's RSS, and how late this process's own event loop runs (if it lags, so do the figures)."""
        while time.monotonic() < stop_at:
            load.rss_mb.append(rss_mb(api_pid))
            before = time.perf_counter()
            await asyncio.sleep(0.1)
            load.loop_lag.append(time.perf_counter() - before - 0.1)

    tasks = [asyncio.create_task(sample())]
    tasks += [asyncio.create_task(stream(1.0 * i / max(streams, 1))) for i in range(streams)]
    tasks += [asyncio.create_task(poll(1.0 * i / max(pollers, 1), targets[i % len(targets)])) for i in range(pollers)]
    # bounded: every task ends at `stop_at` (a stream at its next event), or is cancelled here
    _, still = await asyncio.wait(tasks, timeout=seconds + 30)
    for task in still:
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(*still, return_exceptions=True)
    return load


def summary(values: list[float]) -> str:
    if not values:
        return "no samples"
    return (
        f"median {statistics.median(values):.3f} s, mean {statistics.fmean(values):.3f} s, "
        f"p90 {percentile(values, 90):.3f} s ({len(values)} steps)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pollers", type=int, default=500)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--steps", type=int, default=40, help="denoising steps of each request the worker runs")
    parser.add_argument(
        "--model",
        default="coarse",
        help="model the server loads: `coarse` (the tiny model's cheap variant, default), `tiny` or a directory",
    )
    parser.add_argument("--cache-dir", type=Path, help="model cache (default: the server's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run the load generator at this niceness (19: it yields the CPU to the server and the worker, so the "
        "worker's slowdown is what the API costs it; the latencies then include the generator's own waiting)",
    )
    args = parser.parse_args()

    # one socket per client here, and as many in the server (which inherits the limit)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, max(soft, 4 * (args.pollers + args.streams) + 256))
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))

    env = {
        **os.environ,
        "WANSERVE_VIDEO_PRESET": "ultrafast",
        "WANSERVE_VIDEO_CRF": "51",
        "WANSERVE_RATE_LIMIT_PER_S": "0",
        "WANSERVE_READ_RATE_LIMIT_PER_S": "0",
        "WANSERVE_MAX_QUEUED_PER_KEY": "0",
    }
    if args.cache_dir:
        env["WANSERVE_CACHE_DIR"] = str(args.cache_dir)
    model = args.model
    if model == "coarse":
        from wanserve.config import Settings
        from wanserve.engine.tiny import TinyConfig, ensure_tiny_model  # torch: only for building it once

        model = str(ensure_tiny_model(args.cache_dir or Settings().cache_dir, TinyConfig(vae="coarse")))
    body = {**REQUEST, "num_inference_steps": args.steps}
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = Path(tmp) / "server.log"
        with log.open("wb") as out:
            proc = start_server(Path(tmp) / "data", port, args=["--model", model], env=env, output=out)
        try:
            wait_until(proc, url, timeout_s=600)
            with httpx.Client(base_url=url, timeout=60) as client:
                rss_idle = rss_mb(proc.pid)
                warm = client.post(f"/{APP}", json={**body, "num_inference_steps": 2}).json()["request_id"]
                wait_completed(client, warm)

                worker = worker_pid(proc.pid)
                worker_cpu = cpu_seconds(worker) if worker else 0.0
                started = time.monotonic()
                baseline_id = client.post(f"/{APP}", json=body).json()["request_id"]
                wait_completed(client, baseline_id)
                request_s = time.monotonic() - started
                idle_worker_cores = ((cpu_seconds(worker) if worker else 0.0) - worker_cpu) / request_s
                baseline = step_seconds(client, baseline_id)
                rss_before = rss_mb(proc.pid)

                # enough requests queued that the worker is busy for the whole load, and one more
                count = math.ceil(args.seconds / request_s) + 1
                targets = [client.post(f"/{APP}", json=body).json()["request_id"] for _ in range(count)]
                cpu_before = (cpu_seconds(proc.pid), cpu_seconds(worker) if worker else 0.0, time.process_time())
                load_from = time.time()
                if args.nice:
                    os.nice(args.nice)  # after the server started: it does not inherit it
                load = asyncio.run(
                    run_load(url, targets, args.pollers, args.streams, args.seconds, proc.pid, args.seed)
                )
                load_to = time.time()
                cpu_after = (cpu_seconds(proc.pid), cpu_seconds(worker) if worker else 0.0, time.process_time())
                cpu = [
                    (after - before) / (load_to - load_from)
                    for before, after in zip(cpu_before, cpu_after, strict=True)
                ]
                rss_after = rss_mb(proc.pid)
                for request_id in targets:  # what did not start during the load is not needed
                    client.put(f"/{APP}/requests/{request_id}/cancel")
                for request_id in targets:
                    wait_completed(client, request_id)
                loaded = [s for r in targets for s in step_seconds(client, r, (load_from, load_to))]
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    polls = len(load.poll_latency) + sum(load.poll_errors.values())
    print(
        f"{args.pollers} pollers (1 status request/s each) + {args.streams} SSE streams for {args.seconds:.0f} s"
        + (f" (load generator at nice {args.nice})" if args.nice else "")
    )
    print(
        f"  status: {polls} requests, p50 {percentile(load.poll_latency, 50) * 1000:.1f} ms, "
        f"p99 {percentile(load.poll_latency, 99) * 1000:.1f} ms, max {max(load.poll_latency, default=0) * 1000:.0f} ms,"
        f" errors {sum(load.poll_errors.values())} {load.poll_errors or ''}"
    )
    print(
        f"  SSE: {load.streams_opened} streams opened, {load.stream_events} events, first event "
        f"p50 {percentile(load.stream_first_event, 50) * 1000:.1f} ms, "
        f"p99 {percentile(load.stream_first_event, 99) * 1000:.1f} ms, errors {sum(load.stream_errors.values())} "
        f"{load.stream_errors or ''}"
    )
    print(
        f"  API process RSS: {rss_idle:.0f} MB idle, {rss_before:.0f} MB before the load, "
        f"peak {max(load.rss_mb, default=float('nan')):.0f} MB during, {rss_after:.0f} MB after"
    )
    print(
        f"  load generator's event loop lag: p50 {percentile(load.loop_lag, 50) * 1000:.0f} ms, "
        f"p99 {percentile(load.loop_lag, 99) * 1000:.0f} ms"
    )
    print(
        f"  CPU during the load (cores busy, of {os.cpu_count()}): API {cpu[0]:.2f}, worker {cpu[1]:.2f}, "
        f"load generator {cpu[2]:.2f} (the worker alone, without load: {idle_worker_cores:.2f})"
    )
    print(f"  worker ({args.model} model), {args.steps}-step requests ({request_s:.1f} s each without load):")
    print(f"    without load: {summary(baseline)}")
    print(f"    under load:   {summary(loaded)}")
    if baseline and loaded:
        print(f"    slowdown: x{statistics.median(loaded) / statistics.median(baseline):.2f} (median s/step)")


if __name__ == "__main__":
    main()
