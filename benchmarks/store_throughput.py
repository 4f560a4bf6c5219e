"""How many jobs per second each job store sustains for the queue's hot path: claim, two progress log
lines, heartbeat, finish, with no-op work in between. Several worker processes compete for one queue, as
GPU workers do.

    .venv/bin/python benchmarks/store_throughput.py                      # SQLite and a throwaway redis-server
    .venv/bin/python benchmarks/store_throughput.py --jobs 4000 --workers 1,4,8
    .venv/bin/python benchmarks/store_throughput.py --redis redis://10.0.0.5:6379/0   # an existing Redis

Prints jobs/s per backend and worker count (submit rate too); asserts nothing. A GPU video takes seconds to
minutes, so either store is far from being the limit; the figure says how far.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from wanserve.jobs.model import LogLevel, NewJob
from wanserve.store.base import JobStore
from wanserve.store.redis import RedisJobStore
from wanserve.store.sqlite import SQLiteJobStore

Opener = Callable[[], JobStore]


def _sqlite(path: Path) -> Opener:
    return lambda: SQLiteJobStore(path)


def _redis(url: str, prefix: str) -> Opener:
    return lambda: RedisJobStore.from_url(url, prefix=prefix)


def _work(open_store: Opener, worker_id: str, done: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    store = open_store()
    finished = 0
    while (job := store.claim(worker_id, 60, time.time())) is not None:
        store.add_log(job.id, LogLevel.INFO, "Started", time.time())
        store.heartbeat(job.id, worker_id, 60, time.time())
        store.add_log(job.id, LogLevel.INFO, "step 1/1", time.time())
        finished += store.finish(job.id, time.time(), worker_id=worker_id, output={"video": {"url": "x"}})
    done.put(finished)
    store.close()


def measure(open_store: Opener, jobs: int, workers: int) -> tuple[float, float]:
    """(submits per second, claim-to-finish jobs per second)."""
    store = open_store()
    started = time.perf_counter()
    for i in range(jobs):
        new = NewJob(f"job-{uuid.uuid4().hex}-{i}", "fal-ai/wan-22", "fal-ai/wan-22", {"prompt": "x"})
        store.submit(new, time.time())
    submit_rate = jobs / (time.perf_counter() - started)
    done: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
    procs = [multiprocessing.Process(target=_work, args=(open_store, f"w{i}", done)) for i in range(workers)]
    started = time.perf_counter()
    for p in procs:
        p.start()
    finished = sum(done.get(timeout=600) for _ in procs)
    elapsed = time.perf_counter() - started
    for p in procs:
        p.join()
    assert finished == jobs, (finished, jobs)
    store.close()
    return submit_rate, jobs / elapsed


def _durability(url: str) -> str:
    """What the Redis server says of its persistence (managed services may refuse CONFIG)."""
    import redis

    try:
        config = redis.Redis.from_url(url).config_get("append*")
    except redis.RedisError as exc:
        return f"persistence unknown ({exc})"
    if config.get("appendonly") != "yes":
        return "without append-only persistence"
    return f"append-only, appendfsync {config.get('appendfsync')}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--workers", default="1,4")
    parser.add_argument("--redis", default=None, help="an existing Redis URL (default: start redis-server)")
    args = parser.parse_args()
    worker_counts = [int(n) for n in args.workers.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="store-bench-"))
    server = None
    try:
        url = args.redis
        if url is None:
            from redis_server import RedisServer  # the tests' helper: append-only, fsync on every write

            server = RedisServer(tmp / "redis").start()
            url = server.url
        print(f"{args.jobs} jobs; claim + 2 logs + heartbeat + finish each; redis {_durability(url)}")
        print(f"{'store':8} {'workers':>7} {'submit/s':>10} {'jobs/s':>10}")
        for workers in worker_counts:
            for name, opener in (
                ("sqlite", _sqlite(tmp / f"jobs-{workers}.sqlite3")),
                ("redis", _redis(url, f"bench-{uuid.uuid4().hex[:8]}")),
            ):
                submit_rate, job_rate = measure(opener, args.jobs, workers)
                print(f"{name:8} {workers:>7} {submit_rate:>10.0f} {job_rate:>10.0f}", flush=True)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if shutil.which("redis-server") is None and "--redis" not in sys.argv:
        sys.exit("redis-server is not installed (apt-get install redis-server), or pass --redis URL")
    main()
