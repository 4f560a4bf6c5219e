"""Where the model lives between and during requests, chosen from the GPU's free memory.

- `resident`: both experts on the GPU (>= 80 GB class). The text encoder stays too if everything fits with the
  largest video's activations; otherwise it lives in pinned host memory and visits the GPU to encode.
- `swap`: one expert on the GPU at a time (40-80 GB). At the step before the expert changes, the next expert is
  uploaded block by block on a side CUDA stream as each block of the current one finishes its last forward, into
  the memory that block leaves: the upload overlaps that step's compute and the switch does not stall.
- `offload`: diffusers' group offloading (one block at a time, prefetched on a CUDA stream) and a tiled VAE
  decode, for 24-48 GB cards; cond and uncond run as two forwards to halve the activations.

The VAE decode comes after the denoising loop, so it needs room beside what stays on the GPU rather than beside
the activations; where that room is missing, the decode is tiled (slower, a few GiB at most) under any policy. The
plan forecasts this for the largest video at start; each decode decides again from its own frame size and what is
free then (`tiles_decode`), since LoRA adapters cached since the start take GPU memory the plan could not count.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import cast

import torch
from diffusers import WanPipeline
from torch import nn

from wanserve.engine.fp8 import fp8_bytes_saved
from wanserve.engine.sampling import Expert
from wanserve.engine.speed import DeviceInfo, in_transformer_blocks, usable_gpu_bytes

GiB = 1024**3
# Activation peak of one expert forward per token per batch row, per model channel (DESIGN.md section 5: 720p,
# 75,600 tokens, batch 2, dim 5120 peaks at 15.9 GiB, i.e. ~22 bytes per token-channel).
ACTIVATION_BYTES_PER_TOKEN_CHANNEL = 22
# The video the policies are sized for: 1280x720, 81 frames (the default), cond and uncond in one batch-2 forward.
# Longer ones (up to 121 frames) run cond and uncond as two forwards, which needs less (WanEngine.predict_noise).
LARGEST_VIDEO_TOKENS = 75_600
HEADROOM_BYTES = 2 * GiB  # allocator fragmentation, LoRA adapters, the VAE's own weights
# The untiled VAE decode's working memory per output pixel (float32 VAE): about 20 GiB for a 1280x720 video, the
# decode's peak above the resident weights in the 720p video row of `benchmarks/gpu_bench.sh main` on an H200 (47.5 GiB
# peak with one 26.7 GiB expert resident). It depends on the frame size, not on the frame count (the decoder works a
# few latent frames at a time).
DECODE_BYTES_PER_PIXEL = 23_300


def decode_bytes(height: int, width: int) -> int:
    """GPU memory an untiled VAE decode of `height` x `width` frames works in, above the weights."""
    return DECODE_BYTES_PER_PIXEL * height * width


LARGEST_DECODE_BYTES = decode_bytes(720, 1280)


class MemoryPolicy(StrEnum):
    RESIDENT = "resident"
    SWAP = "swap"
    OFFLOAD = "offload"


@dataclass(frozen=True)
class MemoryPlan:
    policy: MemoryPolicy
    text_encoder_resident: bool
    reason: str
    tiled_decode: bool = False  # forecast for the largest video: an untiled decode would not fit beside the weights


def module_bytes(module: nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def activation_bytes(model_dim: int, batch: int, tokens: int = LARGEST_VIDEO_TOKENS) -> int:
    return ACTIVATION_BYTES_PER_TOKEN_CHANNEL * model_dim * tokens * batch


def _with_decode(
    plan: MemoryPlan, device: DeviceInfo, expert_bytes: int, experts: int, text_encoder_bytes: int
) -> MemoryPlan:
    """`plan` with its decode tiled where an untiled one would not fit beside what the plan keeps on the GPU (and
    always under `offload`, the policy of small cards)."""
    kept = (experts if plan.policy is MemoryPolicy.RESIDENT else 1) * expert_bytes
    kept += text_encoder_bytes if plan.text_encoder_resident else 0
    fits = device.type != "cuda" or kept + LARGEST_DECODE_BYTES + HEADROOM_BYTES <= device.free_bytes
    if fits and plan.policy is not MemoryPolicy.OFFLOAD:
        return plan
    return replace(plan, tiled_decode=True, reason=plan.reason + "; tiled VAE decode")


def choose_memory_plan(
    device: DeviceInfo, expert_bytes: int, experts: int, text_encoder_bytes: int, model_dim: int
) -> MemoryPlan:
    """The cheapest policy that holds the largest video (batched CFG) in the device's free memory, and whether
    its VAE decode must be tiled."""
    if device.type != "cuda":
        return MemoryPlan(MemoryPolicy.RESIDENT, True, "not a GPU: everything stays in host memory")
    free = device.free_bytes
    need_both = experts * expert_bytes + activation_bytes(model_dim, 2) + HEADROOM_BYTES
    gib = f"{free / GiB:.1f} GiB free"
    if need_both + text_encoder_bytes <= free:
        plan = MemoryPlan(MemoryPolicy.RESIDENT, True, f"{gib}: experts and text encoder fit")
    elif need_both <= free:
        plan = MemoryPlan(MemoryPolicy.RESIDENT, False, f"{gib}: experts fit, the text encoder visits to encode")
    elif expert_bytes + activation_bytes(model_dim, 2) + HEADROOM_BYTES <= free:
        plan = MemoryPlan(MemoryPolicy.SWAP, False, f"{gib}: one expert at a time")
    else:
        plan = MemoryPlan(MemoryPolicy.OFFLOAD, False, f"{gib}: block-by-block offload")
    return _with_decode(plan, device, expert_bytes, experts, text_encoder_bytes)


def tiles_decode(plan: MemoryPlan, height: int, width: int, usable_bytes: int | None) -> bool:
    """Whether one video's VAE decode runs tiled. Always under `offload` (the policy of small cards); elsewhere when
    an untiled decode of this frame size would not fit in `usable_bytes`, the GPU memory free at the decode (None:
    not a GPU, where the plan decides). Deciding per decode rather than once at start counts what the plan could
    not: LoRA adapters loaded since (up to `lora_memory_bytes` stay cached on the GPU), and videos smaller than the
    720p the plan is sized for, which decode untiled (faster) on cards where a 720p one would not fit."""
    if plan.policy is MemoryPolicy.OFFLOAD or usable_bytes is None:
        return plan.tiled_decode  # (`_with_decode` tiles every offload plan)
    return decode_bytes(height, width) + HEADROOM_BYTES > usable_bytes


def plan_from_override(policy: str, device: DeviceInfo, sizes: tuple[int, int, int, int]) -> MemoryPlan:
    """`policy` is a setting: "auto" chooses; a named policy is obeyed (the text encoder stays resident only under
    `resident` when it fits by the same rule). `sizes` = (expert bytes, experts, text encoder bytes, model dim)."""
    auto = choose_memory_plan(device, *sizes)
    if policy == "auto":
        return auto
    chosen = MemoryPolicy(policy)
    keep_encoder = chosen is MemoryPolicy.RESIDENT and auto.text_encoder_resident
    return _with_decode(MemoryPlan(chosen, keep_encoder, f"set to {chosen.value}"), device, *sizes[:3])


def plan_memory(policy: str, device: DeviceInfo, pipe: WanPipeline, fp8_experts: bool = False) -> MemoryPlan:
    """The plan for `pipe` on `device`: sizes read off the modules, the experts' as `fast` will hold them where
    `fp8_experts` (its FP8 linears, converted after the plan, take about half the bytes), and what the pipeline
    already holds on the GPU counted as available to it. A plan that comes to `offload` is made from the unconverted
    sizes: `fast` runs as `exact` there (speed.plan_speed; only the bench forces FP8 there, and then the bf16 sizes
    over-count), and the offload plan depends on no size anyway."""
    experts = [m for m in (pipe.transformer, pipe.transformer_2) if m is not None]
    if device.type == "cuda":
        held = [*experts, pipe.text_encoder, pipe.vae]
        on_gpu = sum(module_bytes(m) for m in held if next(m.parameters()).is_cuda)
        device = replace(device, free_bytes=device.free_bytes + on_gpu)
    config = experts[0].config
    expert_bytes = module_bytes(experts[0])
    others = (len(experts), module_bytes(pipe.text_encoder), config.num_attention_heads * config.attention_head_dim)
    if fp8_experts:
        fp8_bytes = expert_bytes - fp8_bytes_saved(experts[0], in_transformer_blocks, on_gpu=device.type == "cuda")
        plan = plan_from_override(policy, device, (fp8_bytes, *others))
        if plan.policy is not MemoryPolicy.OFFLOAD:
            return replace(plan, reason=f"{plan.reason}; FP8 experts, {fp8_bytes / GiB:.1f} GiB each")
    return plan_from_override(policy, device, (expert_bytes, *others))


class PinnedWeights:
    """Host copies of modules' weights in page-locked memory; a module is uploaded into fresh device tensors and
    released by pointing its tensors back at the host copies (weights never change, so nothing is copied back)."""

    def __init__(self, device: torch.device) -> None:
        if device.type == "cuda" and device.index is None:  # tensors report cuda:N; compare like with like
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._host: dict[int, torch.Tensor] = {}

    @staticmethod
    def tensors(module: nn.Module, recurse: bool = True) -> list[torch.Tensor]:
        return [*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)]

    def adopt(self, module: nn.Module) -> None:
        """Keep `module`'s weights in (pinned) host memory from now on."""
        module.to("cpu")
        for t in self.tensors(module):
            if self.stream is not None:
                t.data = t.data.pin_memory()
            self._host[id(t)] = t.data

    def upload(self, module: nn.Module, recurse: bool = True) -> None:
        """Issue the copies of `module` to the device on the side stream (`wait` makes the compute stream wait).
        The destinations are allocated on the compute stream, so memory released there just before is reused in
        stream order; the side stream first waits for everything the compute stream has issued so far."""
        stream = self.stream
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.device))
        for t in self.tensors(module, recurse):
            host = self._host.get(id(t))
            if host is None or t.device == self.device:  # LoRA adapters live on the device already
                continue
            dst = torch.empty_like(host, device=self.device)
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                dst.copy_(host, non_blocking=True)
            if stream is not None:
                dst.record_stream(stream)
            t.data = dst

    def release(self, module: nn.Module, recurse: bool = True) -> None:
        for t in self.tensors(module, recurse):
            host = self._host.get(id(t))
            if host is not None:
                t.data = host

    def wait(self) -> None:
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)


class HandoffBlocks(nn.ModuleList):
    """A ModuleList that calls `after_block(i)` once block i's forward has been issued (the model's forward loop
    asks for block i+1, or ends). Same state-dict keys and module names as the list it replaces."""

    after_block: Callable[[int], None] | None = None

    def __iter__(self) -> Iterator[nn.Module]:
        for i, block in enumerate(super().__iter__()):
            yield block
            if self.after_block is not None:
                self.after_block(i)


class ExpertSwap:
    """One expert's weights on the device at a time; host copies of both in pinned memory."""

    def __init__(self, experts: dict[Expert, nn.Module], weights: PinnedWeights) -> None:
        self.experts = experts
        self.weights = weights
        self.on_device: Expert | None = None
        self.handoffs: list[tuple[Expert, Expert, int]] = []  # (from, to, blocks moved during the step): for tests
        for model in {id(m): m for m in experts.values()}.values():
            weights.adopt(model)
            model.blocks = HandoffBlocks(cast(nn.ModuleList, model.blocks))

    @staticmethod
    def _outside_blocks(model: nn.Module) -> list[nn.Module]:
        return [m for name, m in model.named_children() if name != "blocks"]

    def ensure(self, expert: Expert) -> None:
        """Make `expert` resident before its forward (a no-op when a handoff already brought it)."""
        if self.on_device is expert:
            return
        if self.on_device is not None:
            self.weights.release(self.experts[self.on_device])
        self.weights.upload(self.experts[expert])
        self.on_device = expert
        self.weights.wait()

    @contextlib.contextmanager
    def handing_off(self, current: Expert, following: Expert) -> Iterator[None]:
        """Around the last forward(s) of `current` before `following` runs: each block of `current` is released
        after its last use and the same block of `following` uploaded in its place."""
        if current is following or self.experts[current] is self.experts[following]:
            yield
            return
        old, new = self.experts[current], self.experts[following]
        old_blocks, new_blocks = cast(HandoffBlocks, old.blocks), cast(nn.ModuleList, new.blocks)
        # Small parts first: embeddings, norms, the output head and the model's own tensors (scale_shift_table).
        self.weights.upload(new, recurse=False)
        for module in self._outside_blocks(new):
            self.weights.upload(module)
        moved: set[int] = set()

        def after_block(i: int) -> None:
            self.weights.release(old_blocks[i])
            self.weights.upload(new_blocks[i])
            moved.add(i)

        old_blocks.after_block = after_block
        try:
            yield
        finally:
            # Completed even when the forward failed, so that the next request finds one whole expert resident.
            old_blocks.after_block = None
            overlapped = len(moved)
            for i in range(len(old_blocks)):  # blocks a step cache skipped, or those an error did not reach
                if i not in moved:
                    after_block(i)
            self.weights.release(old, recurse=False)
            for module in self._outside_blocks(old):
                self.weights.release(module)
            self.on_device = following
            self.handoffs.append((current, following, overlapped))
            self.weights.wait()


class MemoryManager:
    """Applies a MemoryPlan to a pipeline and moves its parts in and out around each use."""

    def __init__(self, pipe: WanPipeline, plan: MemoryPlan, device: torch.device) -> None:
        self.plan = plan
        self.device = device
        self.pipe = pipe
        self.weights = PinnedWeights(device)
        self.swap: ExpertSwap | None = None
        high, low = pipe.transformer, pipe.transformer_2
        pipe.vae.to(device)
        if plan.text_encoder_resident:
            pipe.text_encoder.to(device)
        else:
            self.weights.adopt(pipe.text_encoder)
        if plan.policy is MemoryPolicy.RESIDENT or high is None or low is None:
            for model in (high, low):
                if model is not None:
                    model.to(device)
        elif plan.policy is MemoryPolicy.SWAP:
            self.swap = ExpertSwap({Expert.HIGH: high, Expert.LOW: low}, self.weights)
        else:
            for model in (high, low):
                model.enable_group_offload(
                    onload_device=device,
                    offload_device=torch.device("cpu"),
                    offload_type="block_level",
                    num_blocks_per_group=1,
                    use_stream=device.type == "cuda",
                    record_stream=device.type == "cuda",
                )

    def decode_tiled(self, height: int, width: int) -> bool:
        """Whether the VAE decodes a `height` x `width` video in tiles now (`tiles_decode`)."""
        usable = usable_gpu_bytes(self.device) if self.device.type == "cuda" else None
        return tiles_decode(self.plan, height, width, usable)

    @contextlib.contextmanager
    def text_encoder(self) -> Iterator[None]:
        """The text encoder on the device for the duration of the block."""
        if self.plan.text_encoder_resident:
            yield
            return
        self.weights.upload(self.pipe.text_encoder)
        self.weights.wait()
        try:
            yield
        finally:
            self.weights.release(self.pipe.text_encoder)

    def before_forward(self, expert: Expert) -> None:
        if self.swap is not None:
            self.swap.ensure(expert)

    def handing_off(self, expert: Expert, following: Expert | None) -> contextlib.AbstractContextManager[None]:
        """Context for a step's last forward: a handoff when the next step (or the next request, for the last
        step: `following` None) uses the other expert."""
        if self.swap is None:
            return contextlib.nullcontext()
        return self.swap.handing_off(expert, following or Expert.HIGH)
