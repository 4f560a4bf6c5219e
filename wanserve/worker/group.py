"""`wanserve worker --gpus 0,1,...`: one worker whose every video is spread over several GPUs, one process per GPU.

The launcher (`run_worker_group`) starts the ranks with torch.distributed's usual environment (MASTER_ADDR,
MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK). Rank 0 is an ordinary job-claiming `Worker` whose runner
(`LeaderRunner`) sends each generation to the other ranks before running its own share; ranks > 0 (`follow`)
run what they are sent, until told to exit. Rank 0 also decides, before every step, whether the generation stops
(cancel, lease lost, shutdown), and all ranks learn that decision at the same step, so they stop together.

A rank that dies breaks the group: rank 0's next collective fails (gloo notices a closed connection at once; the
collective timeout bounds a rank that hangs; rank 0 pings the group before each claim, so a rank that died while
idle is found before a job is claimed), rank 0 exits, and the launcher restarts the whole group, handing back to the
queue the job the dead group held (the attempt counts, as when a single-GPU worker dies). Without CUDA (or
with `device` set to `cpu`) the GPU indices only count CPU processes on gloo: CI's way to run a group.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from wanserve.config import Settings
from wanserve.engine.parallel import (
    ParallelContext,
    ParallelPlan,
    collective_timeout,
    init_distributed,
    rank_environment,
    shutdown_distributed,
)
from wanserve.engine.pipeline import CancelCheck, GenerationSpec, StepCallback, StepProgress, draw_seed
from wanserve.engine.runner import EngineRunner, VideoResult
from wanserve.errors import GenerationCancelled, ParallelGroupFailed, WanserveError
from wanserve.logsetup import configure_logging
from wanserve.lora.sources import LoraUse
from wanserve.schema import WanT2VRequest
from wanserve.worker.signals import handle_signals_at_once
from wanserve.worker.supervisor import next_restart_delay

log = logging.getLogger("wanserve.worker.group")

GROUP_BROKEN_EXIT = 75  # a rank's exit code when the group can no longer run generations together
# Between generations the other ranks wait for rank 0, which may spend long on an upload: their wait on the command
# channel allows this much (rank 0 pings while idle, so an idle group never comes near it).
COMMAND_TIMEOUT_S = 3600.0

PING_S = 1.0  # how often an idle rank 0 checks that the other ranks are alive (tick)

FollowerHook = Callable[[int, StepProgress], None]


class GroupChannel:
    """Rank 0's word to the other ranks, on CPU (gloo) groups whatever the accelerator: commands between
    generations, and each step's stop decision. Every rank makes one, in the same order (group creation is
    collective)."""

    def __init__(self, command_timeout_s: float = COMMAND_TIMEOUT_S) -> None:
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self._commands = dist.new_group(backend="gloo", timeout=timedelta(seconds=command_timeout_s))
        self._flags = dist.new_group(backend="gloo", timeout=collective_timeout())

    def send(self, command: dict[str, Any]) -> None:
        """Rank 0: `command` to every other rank (pickled: the same code runs on both ends)."""
        dist.broadcast_object_list([command], src=0, group=self._commands)

    def receive(self) -> dict[str, Any]:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self._commands)
        return dict(box[0])

    def agree(self, stop: bool) -> bool:
        """Whether any rank says stop (only rank 0 ever does). An all-reduce rather than a broadcast: it needs an
        answer from every rank, so rank 0 learns of a dead rank here rather than sending into the void."""
        flag = torch.tensor([int(stop)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._flags)
        return bool(flag.item())

    def ping(self) -> None:
        """Rank 0 while idle: keeps the command wait of the other ranks short and finds a dead rank."""
        self.send({"op": "ping"})
        self.agree(False)


def is_collective_error(exc: BaseException) -> bool:
    """A failed or timed-out collective: torch's DistError, or the RuntimeError gloo and NCCL raise on a closed
    connection or a timeout (it names the backend)."""
    return isinstance(exc, dist.DistError) or (
        isinstance(exc, RuntimeError) and any(name in str(exc) for name in ("gloo", "NCCL", "nccl"))
    )


def _group_error(exc: BaseException) -> ParallelGroupFailed:
    # gloo's text is "[<source file>:<line>] <what happened>. <advice>": keep what happened.
    lines = str(exc).strip().splitlines() or ["no detail"]
    cause = re.sub(r"^\[[^\]]*\]\s*", "", lines[0]).split(". ")[0].rstrip(".")
    return ParallelGroupFailed(
        f"a process of this worker's GPU group died or stopped answering during the generation ({cause}); "
        "the worker restarts its process group"
    )


class LeaderRunner:
    """Rank 0's runner, as the Worker sees it (the EngineRunner interface): each generation goes to the other
    ranks first, then rank 0 runs its share; the cancel check becomes a decision all ranks share."""

    def __init__(self, runner: EngineRunner, channel: GroupChannel) -> None:
        self.runner = runner
        self.channel = channel
        self.broken: str | None = None  # why the group cannot go on, once it cannot
        self._pinged = -PING_S
        self.on_broken: Callable[[], None] = lambda: None  # the Worker's abandon()

    @property
    def engine(self) -> Any:
        return self.runner.engine

    def _break(self, reason: str) -> None:
        if self.broken is None:
            self.broken = reason
            log.error("GPU group broken: %s", reason)
            self.on_broken()

    def generate_video(
        self,
        request: WanT2VRequest,
        output: Path,
        on_step: StepCallback | None = None,
        is_cancelled: CancelCheck | None = None,
        on_phase: Callable[[str], None] | None = None,
        loras: Sequence[LoraUse] = (),
        check_frames: Callable[[Any], None] | None = None,
    ) -> VideoResult:
        if self.broken is not None:
            raise ParallelGroupFailed(self.broken)
        # Every rank must draw the same noise: the seed is fixed here, not drawn on each rank.
        request = request.model_copy(update={"seed": request.seed if request.seed is not None else draw_seed()})
        agreed_stop = False

        def cancelled() -> bool:
            nonlocal agreed_stop
            try:
                mine = bool(is_cancelled()) if is_cancelled is not None else False
            except BaseException:  # the worker's own reasons to stop (lease lost, shutting down): all ranks stop
                agreed_stop = True
                self.channel.agree(True)
                raise
            agreed_stop = self.channel.agree(mine)
            return agreed_stop

        try:
            self.channel.send({"op": "generate", "request": request, "loras": list(loras)})
            return self.runner.generate_video(
                request, output, on_step, cancelled, on_phase, loras=loras, check_frames=check_frames
            )
        except GenerationCancelled:
            raise
        except ParallelGroupFailed as exc:
            self._break(str(exc))
            raise
        except WanserveError:  # input errors: every rank raises them at the same point, the group is in step
            raise
        except BaseException as exc:
            if is_collective_error(exc):
                error = _group_error(exc)
                self._break(str(error))
                raise error from exc
            if agreed_stop:  # a stop every rank took part in (LeaseLost, ShuttingDown)
                raise
            # Anything else may have left the other ranks inside a collective: the group restarts.
            self._break(f"rank 0 failed mid-generation: {type(exc).__name__}: {exc}")
            raise

    def tick(self) -> bool:
        """The Worker's `stop_when`, called before each claim (every `worker_poll_s` while idle): pings the group
        (a round trip of a millisecond or so) at most every PING_S, so that a rank that died while the group was
        idle is found before a job is claimed rather than by that job (which would then go back to the queue, its
        attempt spent). True (stop the worker) once the group is broken."""
        if self.broken is None and time.monotonic() - self._pinged >= PING_S:
            try:
                self.channel.ping()
            except Exception as exc:
                self._break(str(_group_error(exc)))
            self._pinged = time.monotonic()
        return self.broken is not None

    def close(self) -> None:
        """Tells the other ranks to exit (when they can still hear it)."""
        if self.broken is None:
            with contextlib.suppress(Exception):
                self.channel.send({"op": "exit"})


def follow(runner: EngineRunner, channel: GroupChannel, step_hook: FollowerHook | None = None) -> int:
    """Ranks > 0: run what rank 0 sends until it says exit. Returns the process exit code. An error that rank 0
    raises too (bad input, a cancel) leaves the group in step; anything else ends this process, and with it the
    group, which the launcher restarts."""
    rank = channel.rank
    while True:
        command = channel.receive()
        if command["op"] == "exit":
            return 0
        if command["op"] == "ping":
            channel.agree(False)
            continue
        spec = GenerationSpec.from_request(command["request"], loras=tuple(command["loras"]))
        on_step = None if step_hook is None else (lambda p: step_hook(rank, p))
        try:
            # Every rank ends with the same latents; rank 0 decodes them and reports.
            runner.engine.generate(spec, on_step=on_step, is_cancelled=lambda: channel.agree(False), decode=False)
        except GenerationCancelled:
            log.info("rank %d: generation stopped with the group", rank)
        except WanserveError as exc:
            log.info("rank %d: generation refused as on rank 0: %s", rank, exc)


# --- the processes ---


def _die_with_parent() -> None:
    """The kernel kills a rank when its launcher dies, even by kill -9."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass(frozen=True)
class _RankConfig:
    settings: Settings
    worker_id: str
    rank: int
    world_size: int
    port: int
    device: str
    plan: ParallelPlan | None
    collective_timeout_s: float
    step_hook: FollowerHook | None


# settings.cfg_parallel -> the CFG degree ParallelContext plans with (None: its own choice).
CFG_DEGREES: dict[str, int | None] = {"auto": None, "on": 2, "off": 1}


def _rank_main(config: _RankConfig) -> None:
    """One rank's process: join the group, load the model with its share of the plan, then lead or follow."""
    _die_with_parent()
    # Ctrl-C reaches every process of the terminal, and `systemctl stop` sends SIGTERM to every process of the
    # unit: the ranks take their orders from the launcher alone (rank 0: SIGUSR1 drain, SIGINT now, see `_lead`;
    # ranks > 0 leave on rank 0's word, or with the launcher).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if not logging.getLogger().handlers:
        configure_logging(logging.INFO, f"%(asctime)s [rank {config.rank}] %(name)s %(levelname)s: %(message)s")
    os.environ.update(rank_environment(config.rank, config.world_size, config.port))
    settings = config.settings.model_copy(update={"device": config.device})
    device = torch.device(config.device)
    if device.type == "cpu" and not settings.torch_threads:  # the ranks share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.world_size))
    code = GROUP_BROKEN_EXIT
    try:
        init_distributed(device, config.collective_timeout_s)
        channel = GroupChannel()
        parallel = ParallelContext(device, config.plan, cfg_degree=CFG_DEGREES[settings.cfg_parallel])

        def build(s: Settings) -> EngineRunner:
            runner = EngineRunner.from_settings(s, parallel)
            log.info("engine: %s", runner.engine.describe())
            runner.warm_up(on_phase=lambda line: log.info("%s", line))  # every rank, the same generations
            return runner

        if config.rank == 0:
            code = _lead(settings, config, channel, build)
        else:
            code = follow(build(settings), channel, config.step_hook)
    except Exception:
        log.exception("rank %d failed", config.rank)
    finally:
        if code == 0:
            shutdown_distributed()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    # A broken group's collectives may never return; exiting now is what restarts it.
    os._exit(code)


def _lead(
    settings: Settings, config: _RankConfig, channel: GroupChannel, build: Callable[[Settings], EngineRunner]
) -> int:
    from wanserve.backends import open_file_store, open_job_store
    from wanserve.worker.loop import Worker

    leader: LeaderRunner | None = None

    def factory(s: Settings) -> LeaderRunner:
        nonlocal leader
        leader = LeaderRunner(build(s), channel)
        leader.on_broken = worker.abandon  # the job stays leased: the launcher recovers it, counting the attempt
        return leader

    worker = Worker(
        settings, open_job_store(settings), open_file_store(settings), worker_id=config.worker_id,
        runner_factory=factory,
    )  # fmt: skip
    # The launcher's orders: SIGUSR1 finishes the running job first, SIGINT hands it back now. (SIGTERM, which a
    # service manager sends to every process at once, is the launcher's to act on: ignored here, see _rank_main.)
    handle_signals_at_once({signal.SIGUSR1: worker.drain, signal.SIGINT: worker.stop})
    worker.run(stop_when=lambda: leader is not None and leader.tick())
    if leader is None or leader.broken is not None:
        return GROUP_BROKEN_EXIT
    leader.close()
    return 0


def rank_process_context(devices: Sequence[str]) -> Any:
    """How rank processes start. On GPUs by spawn (a fresh interpreter: CUDA state must never be forked). On a CPU
    by a forkserver that has imported torch and diffusers once, so that a rank starts in a fraction of a second
    instead of re-importing them (seconds each, which CI would pay per rank and per restart)."""
    if any(device.startswith("cuda") for device in devices):
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["wanserve.worker.forkserver_preload"])
    return context


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class WorkerGroup:
    """The launcher: starts one process per GPU, watches them, restarts the whole group when one dies, and stops
    them on `stop()` or `stop_event`: rank 0 first (drained: its running job may finish for `drain_s`; with
    `stop(now=True)` it goes back to the queue at the next step), which then tells the others to exit.

    `collective_timeout_s` bounds each collective of the group (and is how long the launcher lets rank 0 fail its
    job after another rank died before it ends it). `plan` overrides the automatic split; `follower_step_hook`
    runs in ranks > 0 after each step (tests use it to kill a rank). Both must be picklable."""

    def __init__(
        self,
        settings: Settings,
        worker_id: str | None,
        gpus: Sequence[int],
        *,
        stop_event: threading.Event | None = None,
        collective_timeout_s: float = 600.0,
        stop_timeout_s: float = 60.0,
        exit_with_parent: bool = False,
        plan: ParallelPlan | None = None,
        follower_step_hook: FollowerHook | None = None,
    ) -> None:
        if not gpus:
            raise ValueError("a worker group needs at least one GPU")
        if len(set(gpus)) != len(gpus):
            raise ValueError(f"GPU indices repeat: {list(gpus)}")
        self.settings = settings
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.gpus = list(gpus)
        self.stop_event = stop_event or threading.Event()
        self.collective_timeout_s = collective_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.exit_with_parent = exit_with_parent
        self.plan = plan
        self.follower_step_hook = follower_step_hook
        self.starts = 0  # how many times the group was started
        self._now = threading.Event()  # stop without draining
        self._leader: Any = None  # rank 0's process while a group runs
        self._parent = os.getppid()
        self._context = rank_process_context(self.devices())

    def devices(self) -> list[str]:
        return group_devices(self.settings, self.gpus)

    def stop(self, now: bool = False) -> None:
        """Drain and stop (`now`: hand the running job back at once). Safe from a signal handler."""
        self.stop_event.set()
        if now:
            self._now.set()
            self._signal_leader(signal.SIGINT)

    def _signal_leader(self, sig: int) -> None:
        leader = self._leader
        if leader is not None and leader.exitcode is None:
            with contextlib.suppress(ProcessLookupError, TypeError):
                os.kill(leader.pid, sig)

    def _stopping(self) -> bool:
        if self.exit_with_parent and os.getppid() != self._parent:
            self.stop_event.set()
        return self.stop_event.is_set()

    def run(self) -> int:
        """Runs the group until `stop_event`; returns the exit code for the `worker` command."""
        delay = 1.0
        while not self._stopping():
            started = time.monotonic()
            procs = self._start()
            died = self._watch(procs)
            self._end(procs, died)
            self._recover()
            if self._stopping():
                break
            delay = next_restart_delay(delay, time.monotonic() - started)
            log.warning("restarting the GPU group of worker %s in %.0f s", self.worker_id, delay)
            self.stop_event.wait(delay)
        return 0

    def _start(self) -> list[Any]:
        self.starts += 1
        port = _free_port()
        devices = self.devices()
        procs = []
        for rank, device in enumerate(devices):
            config = _RankConfig(
                self.settings, self.worker_id, rank, len(devices), port, device, self.plan,
                self.collective_timeout_s, self.follower_step_hook,
            )  # fmt: skip
            proc = self._context.Process(target=_rank_main, args=(config,), name=f"wanserve-rank{rank}")
            proc.start()
            procs.append(proc)
        self._leader = procs[0]
        log.info("worker %s: started %d ranks on %s (port %d)", self.worker_id, len(procs), ", ".join(devices), port)
        return procs

    def _watch(self, procs: list[Any]) -> bool:
        """Until a stop is asked for (False) or a rank exits on its own (True)."""
        while not self._stopping():
            for rank, proc in enumerate(procs):
                if proc.exitcode is not None:
                    log.error("worker %s: rank %d exited with code %s", self.worker_id, rank, proc.exitcode)
                    return True
            self.stop_event.wait(0.1)
        return False

    def _end(self, procs: list[Any], died: bool) -> None:
        """Stops the group. On a stop, rank 0 is asked first (it drains, or hands back its job at once, and tells
        the others to exit). After a death, rank 0 gets one collective timeout (plus a ping interval) to notice it and
        exit."""
        leader = procs[0]
        if died:
            leader.join(self.collective_timeout_s + PING_S + 5)
        else:
            now = self._now.is_set()
            self._signal_leader(signal.SIGINT if now else signal.SIGUSR1)
            deadline = time.monotonic() + self.stop_timeout_s + (0 if now else self.settings.drain_s)
            while leader.exitcode is None and time.monotonic() < deadline:
                if not now and self._now.is_set():  # asked again while draining: no more waiting for the job
                    now, deadline = True, time.monotonic() + self.stop_timeout_s
                leader.join(0.1)
        self._leader = None
        deadline = time.monotonic() + 5  # the others exit once rank 0 has (exit command or a closed connection)
        for proc in procs:
            proc.join(max(deadline - time.monotonic(), 0.05))
            if proc.exitcode is None:
                proc.kill()
                proc.join()

    def _recover(self) -> None:
        """A job the group still held when it ended goes back to the queue (or fails after its last attempt)."""
        from wanserve.backends import open_file_store, open_job_store
        from wanserve.jobs.service import recover_lost_jobs

        try:
            store = open_job_store(self.settings)
            files = open_file_store(self.settings)
            failed = recover_lost_jobs(store, [self.worker_id], self.settings.job_max_attempts, files=files)
            store.remove_worker(self.worker_id)
        except Exception:
            log.exception("worker %s: could not hand back its jobs; their leases will expire", self.worker_id)
            return
        if failed:
            log.error("failed %d job(s) after their last attempt: %s", len(failed), ", ".join(failed))


def group_devices(settings: Settings, gpus: Sequence[int]) -> list[str]:
    """Each rank's device: GPU `gpus[rank]`, or the CPU where `device` is `cpu` (CI's groups). A machine without
    the GPUs named is the worker's start error (`device_problem`), not a group of CPU processes running a 14B model."""
    return [f"cuda:{gpu}" if settings.device != "cpu" else "cpu" for gpu in gpus]


def run_worker_group(
    settings: Settings,
    worker_id: str | None,
    gpus: Sequence[int],
    stop_event: threading.Event | None = None,
    **options: Any,
) -> int:
    """`wanserve worker --gpus ...`: runs a WorkerGroup until `stop_event` or a signal (handled here when called on
    the main thread, as `wanserve worker` does: SIGTERM drains, SIGINT or a second SIGTERM hands the running job
    back now). `options` are WorkerGroup's keyword arguments. Returns the command's exit code."""
    if settings.model == "tiny":
        # Built here, before any rank starts: on a torch.distributed rank other than 0, transformers saves no text
        # encoder, and a rank building the model would leave it without one.
        from wanserve.engine.tiny import ensure_tiny_model

        ensure_tiny_model(settings.cache_dir)
    group = WorkerGroup(settings, worker_id, gpus, stop_event=stop_event, **options)
    if threading.current_thread() is not threading.main_thread():
        return group.run()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, lambda *_: group.stop(now=group.stop_event.is_set()))
    signal.signal(signal.SIGINT, lambda *_: group.stop(now=True))
    try:
        return group.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
