"""One video over several processes (CPU, gloo): the parallel plan, the same frames as one process for CFG-parallel,
Ulysses and ring sequence parallelism, all ranks stopping together on cancel, and a dying rank failing the job
and restarting the group instead of hanging."""

from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from engines import small_spec

from wanserve.config import Settings
from wanserve.engine.loading import load_pipeline
from wanserve.engine.parallel import ParallelPlan, plan_parallel
from wanserve.engine.pipeline import StepProgress, WanEngine
from wanserve.engine.tiny import TinyConfig
from wanserve.jobs.model import JobState, NewJob
from wanserve.worker.group import rank_process_context

TINY_HEADS = TinyConfig().heads
# Frames are uint8; float32 sums in another order (ring attention merges shards by their log-sum-exp) differ by ~1e-7,
# which can move a pixel that sat on a rounding edge by one level, rarely. Ulysses and CFG-parallel compute every head
# over the whole sequence and come out bit-identical here.
TOLERANCE_LEVELS = 1
TOLERANCE_SHARE = 1e-3  # of the pixels off by that level
STEPS = 3
SESSION_TIMEOUT_S = 120.0


# --- the plan ---


@pytest.mark.parametrize(
    ("gpus", "expected"),
    [(1, (1, 1, 1)), (2, (2, 1, 1)), (3, (1, 1, 3)), (4, (2, 2, 1)), (5, (1, 5, 1)), (6, (2, 1, 3)), (8, (2, 4, 1))],
)
def test_plan_for_the_40_heads_of_wan22(gpus: int, expected: tuple[int, int, int]) -> None:
    plan = plan_parallel(gpus, 40)
    assert (plan.cfg_degree, plan.ulysses_degree, plan.ring_degree) == expected
    assert 40 % plan.ulysses_degree == 0
    assert plan.cfg_degree * plan.sp_degree == gpus


@pytest.mark.parametrize(
    ("gpus", "expected"),
    [(1, (1, 1, 1)), (2, (2, 1, 1)), (3, (1, 1, 3)), (4, (2, 2, 1)), (5, (1, 1, 5)), (6, (2, 1, 3)), (8, (2, 2, 2))],
)
def test_plan_for_the_tiny_model(gpus: int, expected: tuple[int, int, int]) -> None:
    assert TINY_HEADS == 2
    plan = plan_parallel(gpus, TINY_HEADS)
    assert (plan.cfg_degree, plan.ulysses_degree, plan.ring_degree) == expected


def test_plan_ranks_overrides_and_refusals() -> None:
    plan = plan_parallel(8, 40, rank=5)
    assert (plan.cfg_rank, plan.sp_degree) == (1, 4)  # ranks 0-3 compute cond, 4-7 uncond
    assert plan.for_rank(3).cfg_rank == 0
    assert plan.describe() == "8 processes: CFG 2 x Ulysses 4"
    assert plan_parallel(4, 40, cfg_degree=1).describe() == "4 processes: Ulysses 4"
    with pytest.raises(ValueError, match="does not divide"):
        plan_parallel(3, 40, cfg_degree=2)
    with pytest.raises(ValueError, match="exactly 4"):
        ParallelPlan(4, cfg_degree=2, ulysses_degree=1)
    with pytest.raises(ValueError, match="heads"):
        ParallelPlan(2, ulysses_degree=2).check_heads(3)


# --- running ranks ---


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_entry(target: Callable[..., Any], rank: int, world: int, port: int, results: Any, args: tuple) -> None:
    """A rank of a test session: joins a gloo group, runs `target`, reports what it returns (or its error)."""
    from wanserve.engine.parallel import init_distributed, rank_environment, shutdown_distributed

    torch.set_num_threads(1)  # the ranks share two cores
    os.environ.update(rank_environment(rank, world, port))
    try:
        init_distributed(torch.device("cpu"), timeout_s=30)
        results.put((rank, target(rank, *args)))
    except BaseException as exc:
        results.put((rank, exc))
        raise
    finally:
        shutdown_distributed()


def run_ranks(world: int, target: Callable[..., Any], *args: Any) -> dict[int, Any]:
    """Runs `target(rank, *args)` in `world` spawned processes; never waits longer than SESSION_TIMEOUT_S."""
    context = rank_process_context(["cpu"])  # the launcher's way: forked from a server that has imported torch
    results = context.Queue()
    port = _free_port()
    procs = [context.Process(target=_rank_entry, args=(target, r, world, port, results, args)) for r in range(world)]
    for proc in procs:
        proc.start()
    out: dict[int, Any] = {}
    deadline = time.monotonic() + SESSION_TIMEOUT_S
    try:
        while len(out) < world:
            rank, value = results.get(timeout=max(deadline - time.monotonic(), 0.1))
            if isinstance(value, BaseException):
                raise AssertionError(f"rank {rank} failed: {value!r}")
            out[rank] = value
        for proc in procs:
            proc.join(max(deadline - time.monotonic(), 0.1))
            assert proc.exitcode == 0, f"a rank exited with {proc.exitcode}"
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
    return out


def _generate(model_cache: Path, plan: ParallelPlan | None) -> tuple[np.ndarray, str, list[int]]:
    """The small spec on a fresh tiny engine with this rank's share of `plan` (None: the automatic plan), and the
    sequence length each self-attention of the first block saw (the shard, under sequence parallelism)."""
    from wanserve.engine.parallel import ParallelContext

    engine = WanEngine(
        load_pipeline("tiny", model_cache, torch.float32), torch.device("cpu"),
        parallel=ParallelContext(torch.device("cpu"), plan),
    )  # fmt: skip
    seen: list[int] = []
    hook = engine.pipe.transformer.blocks[0].attn1.register_forward_pre_hook(
        lambda _m, args: seen.append(int(args[0].shape[1]))
    )
    frames = engine.generate(small_spec(num_inference_steps=STEPS)).frames
    hook.remove()
    return frames, engine.describe(), seen


def _two_rank_session(rank: int, model_cache: Path, coarse_model: Path, tmp: Path) -> dict[str, Any]:
    """Everything the 2-process tests look at, in one pair of processes (starting them is the expensive part)."""
    out: dict[str, Any] = {}
    out["cfg"] = _generate(model_cache, None)
    out["ulysses"] = _generate(model_cache, ParallelPlan(2, ulysses_degree=2))
    out["ring"] = _generate(model_cache, ParallelPlan(2, ring_degree=2))
    out["group"] = _group_session(rank, coarse_model, tmp)
    out["uneven"] = _uneven(model_cache)
    return out


def _uneven(model_cache: Path) -> str:
    """What a video of 45 tokens (80x48, 9 frames) does on 2 Ulysses ranks."""
    from wanserve.engine.parallel import ParallelContext
    from wanserve.errors import InvalidGenerationInput

    engine = WanEngine(
        load_pipeline("tiny", model_cache, torch.float32), torch.device("cpu"),
        parallel=ParallelContext(torch.device("cpu"), ParallelPlan(2, ulysses_degree=2)),
    )  # fmt: skip
    try:
        engine.generate(small_spec(width=80, height=48, num_inference_steps=1))
    except InvalidGenerationInput as exc:
        return str(exc)
    return "generated"


def _automatic_plan_session(rank: int, model_cache: Path) -> dict[str, Any]:
    return {"auto": _generate(model_cache, None)}


def _group_session(rank: int, coarse_model: Path, tmp: Path) -> dict[str, Any]:
    """Rank 0 runs the worker's runner: one video to the end, then one cancelled after step 1; rank 1 follows. Each
    reports the steps it ran, how the second ended and how many times it decoded latents into frames."""
    from wanserve.engine.parallel import ParallelContext
    from wanserve.engine.runner import EngineRunner
    from wanserve.errors import GenerationCancelled
    from wanserve.schema import WanT2VRequest
    from wanserve.worker.group import GroupChannel, LeaderRunner, follow

    channel = GroupChannel()
    settings = Settings(model=str(coarse_model), device="cpu", warmup=[])
    runner = EngineRunner.from_settings(settings, ParallelContext(torch.device("cpu")))
    decodes: list[int] = []
    decode = runner.engine.decode
    runner.engine.decode = lambda *args: decodes.append(1) or decode(*args)  # type: ignore[method-assign]
    steps: list[int] = []
    if rank > 0:
        code = follow(runner, channel, step_hook=lambda _rank, p: steps.append(p.step))
        return {"steps": steps, "ended": f"follow returned {code}", "decodes": len(decodes)}
    leader = LeaderRunner(runner, channel)
    video = tmp / "video.mp4"
    leader.generate_video(WanT2VRequest(prompt="a fox", resolution="480p", num_inference_steps=1, seed=4), video)
    request = WanT2VRequest(prompt="a fox", resolution="480p", num_inference_steps=4, seed=5)
    try:
        leader.generate_video(
            request, tmp / "cancelled.mp4", on_step=lambda p: steps.append(p.step), is_cancelled=lambda: len(steps) >= 1
        )
        ended = "completed"
    except GenerationCancelled as exc:
        ended = f"cancelled: {exc}"
    leader.close()
    return {"steps": steps, "ended": ended, "broken": leader.broken, "decodes": len(decodes),
            "video_bytes": video.stat().st_size if video.exists() else 0}  # fmt: skip


@pytest.fixture(scope="module")
def reference(model_cache: Path) -> np.ndarray:
    """The frames of one process."""
    return (
        WanEngine(load_pipeline("tiny", model_cache, torch.float32), torch.device("cpu"))
        .generate(small_spec(num_inference_steps=STEPS))
        .frames
    )


@pytest.fixture(scope="module")
def two_ranks(model_cache: Path, coarse_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Any]:
    return run_ranks(2, _two_rank_session, model_cache, coarse_model, tmp_path_factory.mktemp("ranks"))


def _check_same_frames(reference: np.ndarray, results: dict[int, Any], key: str, describe: str, seq: int) -> None:
    tokens = 3 * 4 * 6  # small_spec: 9 frames -> 3 latent frames of 64x96 / 16
    for rank, out in results.items():
        frames, described, seen = out[key]
        assert described.endswith(describe)
        assert set(seen) == {seq}, f"rank {rank} attended over {seen} tokens, not {seq} of {tokens}"
        difference = np.abs(frames.astype(np.int16) - reference.astype(np.int16))
        share = float((difference > 0).mean())
        print(f"{key} rank {rank}: max |frame difference| {difference.max()} levels, on {share:.3%} of the pixels")
        assert difference.max() <= TOLERANCE_LEVELS and share <= TOLERANCE_SHARE


def test_two_processes_cfg_parallel_make_the_same_frames(reference: np.ndarray, two_ranks: dict[int, Any]) -> None:
    _check_same_frames(reference, two_ranks, "cfg", "2 processes: CFG 2", seq=72)


def test_two_processes_ulysses_make_the_same_frames(reference: np.ndarray, two_ranks: dict[int, Any]) -> None:
    _check_same_frames(reference, two_ranks, "ulysses", "2 processes: Ulysses 2", seq=36)


def test_two_processes_ring_make_the_same_frames(reference: np.ndarray, two_ranks: dict[int, Any]) -> None:
    _check_same_frames(reference, two_ranks, "ring", "2 processes: ring 2", seq=36)


@pytest.mark.parametrize(
    ("world", "describe", "seq"), [(4, "4 processes: CFG 2 x Ulysses 2", 36), (3, "3 processes: ring 3", 24)]
)
def test_more_processes_make_the_same_frames(
    reference: np.ndarray, model_cache: Path, world: int, describe: str, seq: int
) -> None:
    results = run_ranks(world, _automatic_plan_session, model_cache)
    _check_same_frames(reference, results, "auto", describe, seq=seq)


def test_a_video_that_does_not_split_evenly_is_refused_on_every_rank(two_ranks: dict[int, Any]) -> None:
    for out in two_ranks.values():
        assert out["uneven"].startswith("this video's 45 tokens do not split evenly over the 2 sequence-parallel")


def test_cancel_stops_every_rank_at_the_same_step(two_ranks: dict[int, Any]) -> None:
    leader, follower = two_ranks[0]["group"], two_ranks[1]["group"]
    assert leader["ended"] == "cancelled: cancelled before step 2/4"
    assert leader["broken"] is None  # the group is in step and takes the next generation
    assert leader["steps"] == [1]
    assert follower["steps"] == [1, 1]  # the 1-step video, then step 1 of the cancelled one
    assert follower["ended"] == "follow returned 0"  # it stopped, then left on rank 0's exit


def test_only_rank_0_decodes_the_video(two_ranks: dict[int, Any]) -> None:
    leader, follower = two_ranks[0]["group"], two_ranks[1]["group"]
    assert leader["video_bytes"] > 1000
    assert leader["decodes"] == 1
    assert follower["decodes"] == 0  # every rank holds the same latents: decoding them again would be wasted


# --- the worker group: a rank that dies ---


def die_once(marker: Path, rank: int, progress: StepProgress) -> None:
    """Rank 1 dies after step 2 of the first generation only (the restarted group runs normally)."""
    if rank == 1 and progress.step == 2 and not marker.exists():
        marker.touch()
        os._exit(3)


def finished(store: Any, job_id: str) -> Any:
    job = store.get(job_id)
    return job if job is not None and job.state is JobState.COMPLETED else None


def _wait_for(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def group_settings(tmp_path: Path, model_cache: Path, coarse_model: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data", public_url="http://test", model=str(coarse_model), cache_dir=model_cache,
        device="cpu", warmup=[], job_lease_s=30,
    )  # fmt: skip


@pytest.fixture
def running_group(group_settings: Settings, tmp_path: Path) -> Iterator[Any]:
    from wanserve.worker.group import WorkerGroup

    group = WorkerGroup(
        group_settings, "group-w", [0, 1], collective_timeout_s=20, stop_timeout_s=20,
        follower_step_hook=functools.partial(die_once, tmp_path / "died"),
    )  # fmt: skip
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(group.run()), daemon=True)
    thread.start()
    try:
        yield group
    finally:
        group.stop_event.set()
        thread.join(60)
        assert not thread.is_alive(), "the launcher did not stop"
        assert codes == [0]
        assert multiprocessing.active_children() == []


def test_a_rank_that_dies_puts_the_job_back_and_the_restarted_group_runs_it(
    running_group: Any, group_settings: Settings
) -> None:
    """As when a single-GPU worker dies: the job goes back to the queue with the attempt counted (a request that
    kills a rank every time fails after the last one), and the group the launcher starts again runs it."""
    from wanserve.backends import open_job_store

    store = open_job_store(group_settings)
    job_input = {"prompt": "a fox", "resolution": "480p", "num_inference_steps": 3, "seed": 2}
    store.submit(NewJob("j1", "fal-ai/wan-22", "fal-ai/wan-22", job_input), time.time())
    started = time.monotonic()
    first = _wait_for(lambda: finished(store, "j1"), 120, "the job")
    print(f"job ended {time.monotonic() - started:.1f}s after it was submitted")
    assert first.failure is None and first.output is not None, first.failure
    assert first.attempts == 2 and running_group.starts == 2
    logs = [entry.message for entry in store.logs("j1")]
    assert "A GPU process of this worker failed; the request goes back to the queue" in logs, logs


@pytest.mark.parametrize("to", ["launcher", "every process"])
def test_sigterm_lets_the_running_job_finish_then_every_rank_exits(
    group_settings: Settings, coarse_model: Path, model_cache: Path, to: str
) -> None:
    """`wanserve worker --gpus 0,1 --cfg-parallel off` as a real command: both processes on the sequence; SIGTERM
    drains (the running job completes), then the launcher and its ranks exit cleanly. Sent to every process at once
    too, as `systemctl stop` does (rank 1 must not die of it, nor rank 0 take it as a second, impatient stop)."""
    from wanserve.backends import open_job_store

    env = dict(os.environ)
    env.update(
        WANSERVE_GPUS="0,1", WANSERVE_DEVICE="cpu", WANSERVE_MODEL=str(coarse_model), WANSERVE_WARMUP="",
        WANSERVE_CACHE_DIR=str(model_cache), WANSERVE_DATA_DIR=str(group_settings.data_dir),
        WANSERVE_PUBLIC_URL="http://test",
    )  # fmt: skip
    command = [sys.executable, "-m", "wanserve", "worker", "--worker-id", "cli-w", "--cfg-parallel", "off"]
    launcher = subprocess.Popen(command, env=env, start_new_session=True)  # its own process group
    try:
        store = open_job_store(group_settings)
        job_input = {"prompt": "a fox", "resolution": "480p", "num_inference_steps": 8, "seed": 3}
        store.submit(NewJob("j1", "fal-ai/wan-22", "fal-ai/wan-22", job_input), time.time())
        running = _wait_for(lambda: (j := store.get("j1")) and j.state is JobState.RUNNING and j, 60, "the job")
        detail = next(w for w in store.workers() if w.id == "cli-w").detail
        assert "2 processes: Ulysses 2" in detail["engine"], detail  # not the automatic CFG 2
        leader_pid = int(detail["pid"])
        if to == "launcher":
            launcher.send_signal(signal.SIGTERM)
        else:
            os.killpg(launcher.pid, signal.SIGTERM)
        assert launcher.wait(60) == 0
        done = store.get("j1")
        assert running is not None and done is not None
        assert done.state is JobState.COMPLETED and done.failure is None and done.output is not None
        with pytest.raises(ProcessLookupError):  # rank 0 is gone (and it only left after telling rank 1 to)
            os.kill(leader_pid, 0)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
