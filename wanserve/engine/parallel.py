"""One video over several GPUs: CFG-parallel and sequence parallel (diffusers' context parallelism).

The plan (`plan_parallel`) splits the world of N processes into
- a CFG degree of 2 when N is even: one half of the ranks computes the conditional prediction, the other half the
  unconditional one, and the two are swapped after each forward so that every rank runs the same scheduler step;
- a sequence-parallel degree of N / cfg inside each half, split into Ulysses x ring. Ulysses (an all-to-all that
  trades sequence shards for head shards) needs the degree to divide the head count (40 in Wan 2.2 A14B), so
  Ulysses takes gcd(heads, rest), the largest divisor of the heads that also divides the rest, and ring attention
  (key/value shards gathered and merged by their log-sum-exp) takes what is left.
For 40 heads: 2 GPUs -> CFG 2; 4 -> CFG 2 x Ulysses 2; 8 -> CFG 2 x Ulysses 4; 3 -> ring 3; 5 -> Ulysses 5;
6 -> CFG 2 x ring 3.

`ParallelContext` is what a rank's `WanEngine` holds: it builds the device mesh (cfg, ring, ulysses), enables
diffusers' context parallelism on both experts with the rank's (ring, ulysses) sub-mesh, and does the CFG exchange
in the denoising step. Every rank starts from the same seed and text, and after each step holds the same latents,
so the ranks stay in lockstep without sending latents around.

Two things diffusers 0.42.1 cannot do by itself on a CPU (gloo), each bridged here and only where needed:
- `ModelMixin.enable_parallelism` picks the device as `rank % torch.accelerator.device_count()`, which divides by
  zero without an accelerator (and would pick the wrong GPU for `--gpus 2,3`): the model's config resolver is
  replaced, per instance, by one that uses this rank's device and our mesh; the rest of `enable_parallelism`
  (backend check, processors, split/gather hooks) is diffusers' own.
- Ring attention needs an attention op that returns the log-sum-exp. On a GPU `_native_cudnn` does; on a CPU no
  registered backend does, so ring runs on `_native_flash` and its aten op, which has no CPU kernel, gets one that
  calls `_scaled_dot_product_flash_attention_for_cpu` (the same flash kernel CPU SDPA uses, with its LSE).
The collectives used (all_to_all_single, all_gather, broadcast) all exist in gloo.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from wanserve.errors import InvalidGenerationInput

if TYPE_CHECKING:
    from wanserve.engine.pipeline import EngineOptions, PromptEmbeds
    from wanserve.engine.speed import SpeedPlan

log = logging.getLogger("wanserve.engine")

# Attention backends whose forward returns the log-sum-exp that ring attention merges shards with.
LSE_BACKENDS = frozenset({"_native_cudnn", "_native_flash", "flash", "flash_hub", "_flash_3_hub", "sage", "sage_hub"})


@dataclass(frozen=True)
class ParallelPlan:
    """How `world_size` processes share one video. Ranks are laid out (cfg, ring, ulysses), row-major: ranks
    0..sp-1 are the conditional half, sp..2sp-1 the unconditional one."""

    world_size: int
    cfg_degree: int = 1
    ulysses_degree: int = 1
    ring_degree: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        if self.cfg_degree not in (1, 2):
            raise ValueError("the CFG degree is 1 or 2 (cond and uncond)")
        if min(self.ulysses_degree, self.ring_degree) < 1:
            raise ValueError("parallel degrees must be positive")
        if self.cfg_degree * self.ulysses_degree * self.ring_degree != self.world_size:
            raise ValueError(f"{self.describe()} does not use exactly {self.world_size} processes")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside a world of {self.world_size}")

    @property
    def sp_degree(self) -> int:
        """Processes one forward is split over (its sequence)."""
        return self.ulysses_degree * self.ring_degree

    @property
    def cfg_rank(self) -> int:
        """0: this rank computes the conditional prediction; 1: the unconditional one."""
        return self.rank // self.sp_degree

    @property
    def splits_cfg(self) -> bool:
        return self.cfg_degree == 2

    def for_rank(self, rank: int) -> ParallelPlan:
        return replace(self, rank=rank)

    def check_heads(self, num_heads: int) -> None:
        if num_heads % self.ulysses_degree:
            raise ValueError(f"Ulysses degree {self.ulysses_degree} does not divide the model's {num_heads} heads")

    def describe(self) -> str:
        parts = [f"{self.world_size} processes"]
        parts += [f"{name} {degree}" for name, degree in (("CFG", self.cfg_degree), ("Ulysses", self.ulysses_degree),
                                                          ("ring", self.ring_degree)) if degree > 1]  # fmt: skip
        return ": ".join([parts[0], " x ".join(parts[1:]) or "no split"])


def plan_parallel(world_size: int, num_heads: int, *, cfg_degree: int | None = None, rank: int = 0) -> ParallelPlan:
    """The split of `world_size` processes for a model with `num_heads` attention heads (module docstring).
    `cfg_degree` overrides the CFG choice (1: every process on the sequence; 2 needs an even world)."""
    if world_size < 1:
        raise ValueError("a parallel plan needs at least one process")
    cfg = cfg_degree if cfg_degree is not None else (2 if world_size % 2 == 0 else 1)
    if world_size % cfg:
        raise ValueError(f"CFG degree {cfg} does not divide {world_size} processes")
    rest = world_size // cfg
    ulysses = math.gcd(num_heads, rest)
    return ParallelPlan(world_size, cfg, ulysses, rest // ulysses, rank)


_timeout = timedelta(minutes=10)  # of the groups made here; init_distributed sets it


def init_distributed(device: torch.device, timeout_s: float) -> tuple[int, int]:
    """Joins the process group described by the torchrun-style environment (MASTER_ADDR, MASTER_PORT, RANK,
    WORLD_SIZE): NCCL for CUDA tensors, gloo for CPU ones (commands and flags always travel on CPU tensors).
    `timeout_s` bounds each collective of the groups made here. Returns (rank, world size)."""
    global _timeout
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # Initialised now, so that the device mesh keeps this device instead of choosing one from LOCAL_RANK.
        torch.cuda.init()
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    _timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(backend, timeout=_timeout)
    return dist.get_rank(), dist.get_world_size()


def collective_timeout() -> timedelta:
    return _timeout


def rank_environment(rank: int, world_size: int, port: int, local_rank: int | None = None) -> dict[str, str]:
    """The torchrun-style variables `init_distributed` reads."""
    return {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank if local_rank is None else local_rank),
    }


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


_cpu_flash_lib: Any = None


def _register_cpu_flash_attention() -> None:
    """Gives `aten::_scaled_dot_product_flash_attention` a CPU kernel (it has none) so that diffusers'
    `_native_flash` backend, the one that returns a log-sum-exp without a GPU, can run ring attention on gloo."""
    global _cpu_flash_lib
    if _cpu_flash_lib is not None:
        return
    lib = torch.library.Library("aten", "IMPL")

    def flash_cpu(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        return_debug_mask: bool = False,
        *,
        scale: float | None = None,
    ) -> tuple[Any, ...]:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, scale=scale
        )
        empty = query.new_empty(0)  # sequence offsets and RNG state: only the GPU kernel's backward reads them
        return out, lse, empty, empty, query.shape[2], key.shape[2], empty, empty, empty

    lib.impl("_scaled_dot_product_flash_attention", flash_cpu, "CPU")
    _cpu_flash_lib = lib


def _context_parallel_backend(backend: str | None) -> bool:
    """Whether diffusers' context parallelism runs on this attention backend (None: its default, which does)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    return backend is None or _AttentionBackendRegistry._is_context_parallel_available(AttentionBackendName(backend))


class ParallelContext:
    """One rank's share of a multi-process generation (module docstring). Built after `init_distributed`; bound
    to a pipeline's experts by `WanEngine`."""

    def __init__(
        self, device: torch.device, plan: ParallelPlan | None = None, *, cfg_degree: int | None = None
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError("init_distributed() must run before a ParallelContext is made")
        self.device = device
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self._requested = plan.for_rank(self.rank) if plan is not None else None
        self._cfg_override = cfg_degree
        self._plan: ParallelPlan | None = None
        self._cfg_group: Any = None  # this rank and its counterpart in the other CFG half
        self._sp_mesh: Any = None  # this rank's CFG half as a (ring, ulysses) device mesh

    @property
    def plan(self) -> ParallelPlan:
        if self._plan is None:
            raise RuntimeError("the parallel context is not bound to a model yet")
        return self._plan

    @property
    def splits_cfg(self) -> bool:
        return self.plan.splits_cfg

    def describe(self) -> str:
        return self.plan.describe() if self._plan is not None else f"{self.world_size} processes"

    # --- set-up, called by WanEngine.__init__ ---
    def bind(self, experts: list[Any], options: EngineOptions) -> EngineOptions:
        """Chooses the plan from the experts' head count, makes the process groups, and returns the engine options
        a parallel run needs: resident weights (each rank holds both experts; sequence parallelism exists to split
        activations, not weights) and no First Block Cache under sequence parallelism (its skip decision is made
        on each rank's shard and could differ between ranks, which would leave them in different collectives)."""
        heads = int(experts[0].config.num_attention_heads)
        plan = self._requested or plan_parallel(self.world_size, heads, cfg_degree=self._cfg_override, rank=self.rank)
        if plan.world_size != self.world_size:
            raise ValueError(f"the plan is for {plan.world_size} processes, the group has {self.world_size}")
        plan.check_heads(heads)
        self._plan = plan
        self._make_groups()
        changes: dict[str, Any] = {}
        if options.memory_policy == "auto" and plan.world_size > 1:
            changes["memory_policy"] = "resident"
        if plan.sp_degree > 1 and options.step_cache_threshold > 0:
            log.warning("First Block Cache is off under sequence parallelism")
            changes["step_cache_threshold"] = 0.0
        return replace(options, **changes)

    def _make_groups(self) -> None:
        plan = self.plan
        # Every rank takes part in creating every group, in the same order (new_group is collective).
        if plan.splits_cfg:
            pairs = [[r, r + plan.sp_degree] for r in range(plan.sp_degree)]
            self._cfg_group, _ = dist.new_subgroups_by_enumeration(pairs, timeout=_timeout)
        if plan.sp_degree > 1:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(
                self.device.type,
                (plan.cfg_degree, plan.ring_degree, plan.ulysses_degree),
                mesh_dim_names=("cfg", "ring", "ulysses"),
            )
            self._sp_mesh = mesh["ring", "ulysses"]

    def adjust_speed(self, speed: SpeedPlan) -> SpeedPlan:
        """The speed plan as the parallel split allows it: each CFG half runs one prediction, so nothing to batch;
        our self-attention processors (the low-bit ones, FlashAttention 4) attend within their own shard only, so
        they are off under sequence parallelism; ring attention needs a backend that returns the log-sum-exp."""
        plan, notes = self.plan, list(speed.notes)
        changes: dict[str, Any] = {}
        if plan.splits_cfg and speed.batch_cfg:
            changes["batch_cfg"] = False
        if plan.sp_degree > 1 and speed.lowbit_attention:
            changes["lowbit_attention"] = False
            notes.append("low-bit attention off under sequence parallelism")
        if plan.sp_degree > 1 and speed.flash4_self_attention:
            changes["flash4_self_attention"] = False
            notes.append("FlashAttention 4 off under sequence parallelism")
        if plan.ring_degree > 1 and speed.attention_backend not in LSE_BACKENDS:
            # cuDNN attention wants bf16/fp16: the GPU dtype (settings.dtype auto).
            changes["attention_backend"] = "_native_cudnn" if self.device.type == "cuda" else "_native_flash"
            if self.device.type != "cuda":
                _register_cpu_flash_attention()
        elif plan.sp_degree > 1 and not _context_parallel_backend(speed.attention_backend):
            # diffusers refuses context parallelism on some backends (the memory-efficient one): its default does.
            changes["attention_backend"] = None
            notes.append(f"attention {speed.attention_backend} has no sequence parallelism: PyTorch's default")
        return replace(speed, notes=tuple(notes), **changes)

    def enable(self, experts: list[Any]) -> None:
        """diffusers' context parallelism on both experts, over this rank's CFG half (its (ring, ulysses) mesh)."""
        if self.plan.sp_degree == 1:
            return
        from diffusers import ContextParallelConfig
        from diffusers.models._modeling_parallel import ParallelConfig

        for expert in experts:
            cp = ContextParallelConfig(
                ulysses_degree=self.plan.ulysses_degree, ring_degree=self.plan.ring_degree, mesh=self._sp_mesh
            )

            def resolve(config: Any, expert: Any = expert) -> Any:
                # diffusers' own resolver, minus its device guess (module docstring).
                config = ParallelConfig(context_parallel_config=config)
                config.setup(self.rank, self.world_size, self.device, mesh=config.context_parallel_config.mesh)
                expert._parallel_config = config
                return config

            expert._resolve_parallel_config = resolve
            expert.enable_parallelism(config=cp)

    # --- per request ---
    def check_tokens(self, tokens: int) -> None:
        """Refuses a video whose token count does not split evenly over the sequence-parallel ranks: diffusers
        shards the sequence into equal chunks. (Its "anything" variants for uneven shards gather unequal tensors,
        which gloo cannot.) With 40 heads the 1-, 2-, 4- and 8-GPU plans split every size of the wire schema
        (each frame is a multiple of 8 tokens); the odd degrees of 3, 5 and 6 GPUs fit some sizes only."""
        sp = self.plan.sp_degree
        if tokens % sp:
            raise InvalidGenerationInput(
                f"this video's {tokens} tokens do not split evenly over the {sp} sequence-parallel processes of "
                f"this worker ({self.plan.describe()}); use another size or frame count"
            )

    def cfg_parallel(
        self,
        forward: Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor],
        latent_input: torch.Tensor,
        embeds: PromptEmbeds,
        handing_off: Callable[[], AbstractContextManager[None]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A CFG step: this rank's half of the prediction, then both halves on every rank."""
        assert embeds.uncond is not None
        with handing_off():
            if self.plan.cfg_rank == 0:
                mine = forward("cond", latent_input, embeds.cond)
            else:
                mine = forward("uncond", latent_input, embeds.uncond)
        both = [torch.empty_like(mine) for _ in range(2)]
        dist.all_gather(both, mine.contiguous(), group=self._cfg_group)
        return both[0], both[1]


def tokens_of(frames: int, height: int, width: int, frame_step: int, size_multiple: int) -> int:
    """Sequence length of one forward: latent frames x latent patches per frame."""
    return ((frames - 1) // frame_step + 1) * (height // size_multiple) * (width // size_multiple)
