"""Speed presets: what runs the experts' forwards, chosen per device.

- `eager`: diffusers' modules as they come (default attention, no compile); the CPU default and the baseline.
- `exact` (GPU default): bf16 with no numerical change beyond float noise: regional compile of the repeated
  transformer block with a persistent compile cache, the fastest exact attention kernel measured on this GPU
  (`attention.py`; cuDNN unless another measures faster), cond and uncond batched in one forward.
- `fast`: `exact` plus FP8 linears (row-wise scaled) in the transformer blocks and, where a low-bit attention was
  measured faster than the exact one (LOWBIT_ATTENTION_FASTER; everywhere off the GPU), a low-bit self-attention:
  INT8-QK / FP16-PV (our Triton kernel, `kernels/int8_attention.py`) or FP8 (cuDNN's fused attention,
  `kernels/cudnn_fp8_attention.py`). Off the FP8 hardware their numerics are emulated in float32 (`fp8.py`), which
  is slow but lets CI measure their error.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, _get_qkv_projections
from torch._dynamo.exc import FailOnRecompileLimitHit

from wanserve.engine.attention import DIFFUSERS_BACKEND, AttentionFn, AttentionKernel, flash4_attention, static_choice
from wanserve.engine.fp8 import int8_attention_reference, quantize_fp8_attention_inputs, use_fp8_linears
from wanserve.engine.kernels import cudnn_fp8_attention  # registers torch.ops.wanserve.fp8_attention

log = logging.getLogger("wanserve.engine")


class Preset(StrEnum):
    EAGER = "eager"
    EXACT = "exact"
    FAST = "fast"


class LowbitKernel(StrEnum):
    """`fast`'s low-bit self-attention."""

    INT8 = "int8"  # our Triton kernel: INT8 scores (per-token scales), FP16 P.V
    FP8 = "fp8"  # cuDNN's fused FP8 attention (per-tensor scales), sm_90 and sm_100, `nvidia-cudnn-frontend`


# Caps this process put on its own GPU memory (cap_gpu_memory), by device index: the allocator enforces them, but
# torch offers no way to read one back.
_MEMORY_CAPS: dict[int, int] = {}


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def cap_gpu_memory(device: torch.device, cap_bytes: int) -> None:
    """Lets this process use at most `cap_bytes` of the GPU (to prove a small card's policy on a big one); what
    `usable_gpu_bytes`, and so the memory plan, then sees."""
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total), _index(device))
    _MEMORY_CAPS[_index(device)] = cap_bytes


def usable_gpu_bytes(device: torch.device) -> int:
    """GPU memory this process can still allocate: the driver's free memory plus what PyTorch's allocator holds
    cached but unused (mem_get_info counts it as taken, yet every allocation here can reuse it), within any cap.
    Under a cap it is negative when more than the cap is allocated already (a model built on the GPU before the
    cap): the memory plan adds the model's own bytes back, as those it can move off."""
    free = torch.cuda.mem_get_info(device)[0]
    allocated = torch.cuda.memory_allocated(device)
    usable = free + torch.cuda.memory_reserved(device) - allocated
    cap = _MEMORY_CAPS.get(_index(device))
    return usable if cap is None else min(usable, cap - allocated)


@dataclass(frozen=True)
class DeviceInfo:
    """What preset and memory-policy choices depend on; `probe` reads it, tests construct it."""

    type: str  # "cuda" or "cpu"
    name: str = ""
    capability: tuple[int, int] = (0, 0)
    free_bytes: int = 0

    @classmethod
    def probe(cls, device: torch.device) -> DeviceInfo:
        if device.type != "cuda":
            return cls(type=device.type, name=device.type)
        return cls(
            type="cuda",
            name=torch.cuda.get_device_name(device),
            capability=torch.cuda.get_device_capability(device),
            free_bytes=usable_gpu_bytes(device),
        )

    @property
    def has_fp8(self) -> bool:
        return self.type == "cuda" and self.capability >= (8, 9)


@dataclass(frozen=True)
class SpeedPlan:
    preset: Preset
    compile: bool = False
    attention_backend: str | None = None  # a diffusers AttentionBackendName; None: diffusers' default
    batch_cfg: bool = False  # cond and uncond in one batch-2 forward
    fp8_linears: bool = False
    lowbit_attention: bool = False  # `fast`'s low-bit kernel (`lowbit_kernel`) takes the self-attention
    lowbit_kernel: LowbitKernel = LowbitKernel.INT8
    flash4_self_attention: bool = False  # FlashAttention 4 takes the self-attention (attention.py)
    attention_note: str = ""  # how the attention kernel was chosen (attention.AttentionChoice.describe)
    notes: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        parts = [self.preset.value]
        parts += [name for name, on in (("compile", self.compile), ("batched CFG", self.batch_cfg)) if on]
        if self.attention_backend:
            parts.append(f"attention {self.attention_backend}")
        if self.flash4_self_attention:
            parts.append("FlashAttention 4 self-attention")
        if self.fp8_linears:
            parts.append("FP8 linears")
        if self.lowbit_attention:
            parts.append("INT8 attention" if self.lowbit_kernel is LowbitKernel.INT8 else "FP8 attention (cuDNN)")
        if self.attention_note:
            parts.append(f"attention choice {self.attention_note}")
        return ", ".join(parts) + "".join(f" ({note})" for note in self.notes)


def default_preset(device: DeviceInfo) -> Preset:
    return Preset.EXACT if device.type == "cuda" else Preset.EAGER


# Compute capabilities where `wanserve bench` measured `fast` faster than `exact` within its 3% error budget; on
# other GPUs `fast` runs as `exact` unless the caller (the bench) asks for it. Hopper (9.0): FP8 linears with cuDNN
# attention, 720p x 81 frames on an H200, 20.8 s per cond+uncond forward against exact's 22.8 s at 2.00% from
# diffusers eager (2026-11-27, docs/performance.md), compiled (uncompiled, as under offload or step caching, it runs
# as `exact`: not measured); with the INT8 attention it was slower (0.67x diffusers, 480p).
FAST_FASTER_THAN_EXACT: frozenset[tuple[int, int]] = frozenset({(9, 0)})

# Compute capabilities where a low-bit attention kernel beat cuDNN's bf16 attention within `fast`'s error budget
# (`benchmarks/lowbit_attention.py`, then `wanserve bench --lowbit-attention on --lowbit-kernel K`), and which one.
# None so far: on an H200 (9.0) our INT8 kernel reached 200-370 TFLOP/s-equivalent against cuDNN's ~580; cuDNN's FP8
# attention has not run on a GPU here yet. Elsewhere `fast` keeps cuDNN attention and gains what its FP8 linears give.
# Off the GPU the low-bit numerics always run (emulated), which is how CI checks them.
LOWBIT_ATTENTION_FASTER: dict[tuple[int, int], LowbitKernel] = {}


def _fp8_attention_missing(device: DeviceInfo) -> str | None:
    """Why cuDNN's FP8 attention cannot run on this GPU, or None."""
    if device.capability[0] not in (9, 10):
        arch = f"sm_{device.capability[0]}{device.capability[1]}"
        return f"cuDNN's FP8 attention runs on Hopper and data-centre Blackwell (sm_90, sm_100), not {arch}"
    if not cudnn_fp8_attention.installed():
        return "cuDNN's FP8 attention needs nvidia-cudnn-frontend (pip install 'wanserve[cudnn-fp8]')"
    return None


def plan_speed(
    preset: Preset | str,
    device: DeviceInfo,
    compile: bool | None = None,
    unvalidated_fast_gpu: bool = False,
    offloaded: bool = False,
    lowbit_attention: bool | None = None,
    attention: AttentionKernel | None = None,
    step_cached: bool = False,
    lowbit_kernel: LowbitKernel | str | None = None,
) -> SpeedPlan:
    """The concrete settings of `preset` ("auto" = the device's default) on `device`. `compile` overrides the
    preset's choice (compiling is on by default on CUDA only: on a CPU it costs more than it gains). `offloaded`:
    the experts stream in block by block (memory.MemoryPolicy.OFFLOAD), which rules out batched CFG (twice the
    activations on a small card) and compiling (the offload hooks sit on the blocks a regional compile compiles,
    and the copies bound the speed anyway). `lowbit_attention` overrides where `fast` uses a low-bit attention
    (None: where LOWBIT_ATTENTION_FASTER says one is faster, or where `lowbit_kernel` names one), `lowbit_kernel`
    which one (None or "auto": the one measured faster there, else INT8). FP8 needs sm_90/sm_100 and the cuDNN
    frontend: where it cannot run, a named FP8 falls back to INT8, a measured one to the exact attention.
    `attention` is the exact kernel (attention.resolve measures it; None: cuDNN on sm80+ GPUs, diffusers' default
    elsewhere); `fast`'s low-bit kernel, where on, takes the self-attention instead. `step_cached`: diffusers'
    First Block Cache is on, whose hooks on the blocks cannot be traced whole (they read a value back from the GPU),
    which rules out the regional compile."""
    chosen = default_preset(device) if preset == "auto" else Preset(preset)
    if chosen is Preset.EAGER:
        return SpeedPlan(chosen, compile=bool(compile) and not offloaded and not step_cached)
    on_gpu = device.type == "cuda"
    notes: list[str] = []
    if chosen is Preset.FAST and on_gpu and not device.has_fp8:
        chosen = Preset.EXACT
        notes.append(f"{device.name} has no FP8 tensor cores: fast runs as exact")
    elif chosen is Preset.FAST and on_gpu and not (device.capability in FAST_FASTER_THAN_EXACT or unvalidated_fast_gpu):
        chosen = Preset.EXACT
        arch = f"sm_{device.capability[0]}{device.capability[1]}"
        notes.append(f"fast has not been measured faster than exact on {arch} GPUs: runs as exact")
    elif chosen is Preset.FAST and not on_gpu:
        notes.append("FP8 emulated in float32 off the GPU")
    use_compile = on_gpu if compile is None else compile
    if offloaded and use_compile:
        use_compile = False
        notes.append("no compile under offload")
    if step_cached and use_compile:
        use_compile = False
        notes.append("no compile with step caching")
    if chosen is Preset.FAST and on_gpu and not use_compile and not unvalidated_fast_gpu:
        # Measured faster compiled only: eager, each FP8 linear quantizes its input in separate kernels.
        chosen = Preset.EXACT
        notes.append("fast was measured faster only compiled: runs as exact without compile")
    low_bit = chosen is Preset.FAST
    measured = LOWBIT_ATTENTION_FASTER.get(device.capability) if on_gpu else None
    asked = None if lowbit_kernel in (None, "auto") else LowbitKernel(lowbit_kernel)
    if lowbit_attention is None:  # naming a kernel asks for it
        lowbit_attention = not on_gpu or measured is not None or asked is not None
    lowbit = asked or measured or LowbitKernel.INT8
    if low_bit and lowbit_attention and lowbit is LowbitKernel.FP8 and on_gpu:
        missing = _fp8_attention_missing(device)
        if missing and asked is None:  # measured faster, but not runnable here: the exact attention, not INT8's
            lowbit_attention = False
            notes.append(f"{missing}: exact attention")
        elif missing:
            lowbit = LowbitKernel.INT8
            notes.append(f"{missing}: INT8 attention")
    kernel = attention or (static_choice(device.capability) if on_gpu else AttentionKernel.DEFAULT)
    if not on_gpu and kernel is not AttentionKernel.DEFAULT:
        notes.append(f"{kernel.value} attention needs a GPU: default attention")
        kernel = AttentionKernel.DEFAULT
    return SpeedPlan(
        chosen,
        compile=use_compile,
        attention_backend=DIFFUSERS_BACKEND[kernel],
        batch_cfg=not offloaded,
        fp8_linears=low_bit,
        lowbit_attention=low_bit and lowbit_attention,
        lowbit_kernel=lowbit,
        flash4_self_attention=kernel is AttentionKernel.FLASH4 and not (low_bit and lowbit_attention),
        notes=tuple(notes),
    )


# Where our custom ops and their fake implementations live (relative to this folder).
CUSTOM_OP_SOURCES = ("attention.py", "kernels/int8_attention.py", "kernels/cudnn_fp8_attention.py")


def _custom_op_fingerprint() -> str:
    """A digest of the code behind our custom ops. Inductor's graph cache keys on the traced graph, not on an op's
    fake implementation, so a graph compiled against an older one (another wanserve version) would be reused with
    the wrong output strides: each version of that code gets its own cache folder."""
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for source in CUSTOM_OP_SOURCES:  # read, not imported (Triton)
        digest.update((here / source).read_bytes())
    return digest.hexdigest()[:12]


def configure_compile_cache(cache_dir: Path) -> None:
    """Inductor's compiled kernels and graphs on disk, so that a worker's second start loads them instead of
    compiling again (dynamo still traces, which takes seconds)."""
    cache_dir = cache_dir / f"inductor-{_custom_op_fingerprint()}"
    cache_dir.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    # Round fused bf16 intermediates as eager does: without it the compiled blocks keep them in float32, which is
    # not less accurate but drifts from eager's output (0.50% on the tiny model, 0.03% with it), against `exact`'s
    # promise of eager's output up to float noise.
    inductor_config.emulate_precision_casts = True
    # Each (batch, video size) is a graph of the one block (78 for the endpoints' sizes), and each set of LoRAs
    # resident adds its own: room for all of them, and past it a block runs eagerly (_EagerPastTheLimit).
    dynamo_config = torch._dynamo.config
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)


_kernel_ready = False  # set once the Triton kernel's op is registered (prepare_experts on a GPU)


def _load_kernel() -> None:
    global _kernel_ready
    import wanserve.engine.kernels.int8_attention  # noqa: F401  (registers torch.ops.wanserve.lowbit_attention)

    _kernel_ready = True


def lowbit_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Self-attention of (batch, tokens, heads, head_dim) tensors with INT8 scores and FP16 P.V: the Triton kernel
    on a GPU, the float32 reference of the same numerics elsewhere."""
    if _kernel_ready and query.is_cuda and query.shape[-1] in (64, 128):
        return torch.ops.wanserve.lowbit_attention(query, key, value)
    out = int8_attention_reference(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
    return out.transpose(1, 2)


def fp8_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Self-attention of (batch, tokens, heads, head_dim) tensors in FP8: quantized here (inside the compiled block,
    where Inductor fuses it), attended by cuDNN on a GPU and by the float32 reference of the same numerics elsewhere."""
    q8, k8, v8, descales = quantize_fp8_attention_inputs(query, key, value)
    return torch.ops.wanserve.fp8_attention(q8, k8, v8, descales, query.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on interleaved channel pairs (the math of diffusers' WanAttnProcessor)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2).type_as(x)


class SelfAttnKernelProcessor(WanAttnProcessor):
    """diffusers' Wan attention with the self-attention product done by `kernel` (a low-bit one of `fast`, or
    FlashAttention 4); cross-attention (512 text tokens, a small share of the work) stays on the diffusers backend."""

    def __init__(self, kernel: AttentionFn) -> None:
        super().__init__()
        self.kernel = kernel

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None or attn.add_k_proj is not None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query, key = _rotate(query, *rotary_emb), _rotate(key, *rotary_emb)
        out = self.kernel(query, key, value).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def set_attention_backend(model: torch.nn.Module, backend: str | None) -> None:
    """Every attention processor of `model` on `backend` (None: diffusers' default). diffusers' own
    `set_attention_backend` also makes it the process's default, which every other model's processors without one
    then use: the bench's diffusers baseline, made after an `exact` engine, would run on cuDNN attention."""
    if backend is None:
        for module in model.modules():
            if isinstance(module, AttentionModuleMixin) and hasattr(module.processor, "_attention_backend"):
                module.processor._attention_backend = None
        return
    default = _AttentionBackendRegistry._active_backend
    try:
        model.set_attention_backend(backend)  # type: ignore[operator]
    finally:
        _AttentionBackendRegistry.set_active_backend(default)


def use_self_attention_kernel(block: torch.nn.Module, kernel: AttentionFn, attention_backend: str | None) -> None:
    """Give one transformer block's self-attention `kernel` (cross-attention keeps `attention_backend`)."""
    processor = SelfAttnKernelProcessor(kernel)
    if attention_backend:  # what set_attention_backend gave the processor it replaces (cross-attention uses it)
        processor._attention_backend = AttentionBackendName(attention_backend)
    attention = block.get_submodule("attn1")
    assert isinstance(attention, AttentionModuleMixin)
    attention.set_processor(processor)


def use_lowbit_self_attention(
    block: torch.nn.Module,
    attention_backend: str | None,
    on_gpu: bool | None = None,
    kernel: LowbitKernel = LowbitKernel.INT8,
) -> None:
    """Give one transformer block `kernel`'s low-bit self-attention. The INT8 one loads its Triton kernel when it
    will run on a GPU (`on_gpu`; by default, where the block is now): a worker's experts may still be on the host
    when this runs (swap, offload), and without the kernel a GPU forward would take the float32 reference, far too
    big at 720p. The FP8 one dispatches on its inputs' device at each call."""
    if kernel is LowbitKernel.FP8:
        use_self_attention_kernel(block, fp8_attention, attention_backend)
        return
    if next(block.parameters()).is_cuda if on_gpu is None else on_gpu:
        _load_kernel()
    use_self_attention_kernel(block, lowbit_attention, attention_backend)


def in_transformer_blocks(name: str) -> bool:
    """Which of an expert's linears `fast` runs in FP8: those of the repeated blocks (the embeddings and the output
    projection, a sliver of the work, stay in the compute dtype)."""
    return name.startswith("blocks.")


def prepare_experts(experts: list[WanTransformer3DModel], plan: SpeedPlan, device: torch.device | None = None) -> None:
    """Set up the experts' layers for `plan` (in place): FP8 linears, the attention backend and processors, for
    running on `device` (by default, where the experts are now)."""
    on_gpu = None if device is None else device.type == "cuda"
    for expert in experts:
        if plan.fp8_linears:
            count = use_fp8_linears(expert, in_transformer_blocks, on_gpu)
            log.info("FP8 linears: %d layers of %s", count, type(expert).__name__)
        for block in expert.blocks:  # an engine made again on the same experts (the bench) starts from diffusers'
            if isinstance(block.attn1.processor, SelfAttnKernelProcessor):
                block.attn1.set_processor(WanAttnProcessor())
        set_attention_backend(expert, plan.attention_backend)
        if plan.lowbit_attention:
            for block in expert.blocks:
                use_lowbit_self_attention(block, plan.attention_backend, on_gpu, plan.lowbit_kernel)
        elif plan.flash4_self_attention:
            for block in expert.blocks:
                use_self_attention_kernel(block, flash4_attention, plan.attention_backend)


# Graphs of the block one worker keeps. Dynamo's own default (8) would not hold the endpoints' sizes.
RECOMPILE_LIMIT = 512
# The torch.compile backend of the regional compile (the tests count graphs with a backend of their own).
COMPILE_BACKEND: str | Callable[..., Any] = "inductor"


def compile_experts(experts: list[WanTransformer3DModel], plan: SpeedPlan, cache_dir: Path) -> None:
    """Regional compile: the repeated transformer block is compiled once per shape and reused by all 40 blocks
    of both experts (parameters are graph inputs), in seconds instead of the minutes a whole-model compile takes."""
    if not plan.compile:
        return
    configure_compile_cache(cache_dir)
    for expert in experts:
        expert.compile_repeated_blocks(fullgraph=True, dynamic=False, backend=COMPILE_BACKEND)
        for block in expert.blocks:
            if block._compiled_call_impl is not None:
                block._compiled_call_impl = _EagerPastTheLimit(block._compiled_call_impl)


class _EagerPastTheLimit:
    """A compiled block that runs eagerly where it would need a new graph once dynamo has as many of it as it keeps:
    with fullgraph, a graph past the limit is an error (FailOnRecompileLimitHit), which would fail that request and
    every later one needing a new graph until the worker restarts. The graphs made stay in use."""

    full = False  # the limit counts the graphs of the block's one code object, which every block shares

    def __init__(self, compiled: Callable[..., Any]) -> None:
        self.compiled = compiled

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not _EagerPastTheLimit.full:
            try:
                return self.compiled(*args, **kwargs)
            except FailOnRecompileLimitHit:
                # Raised as dynamo took the block's forward, before it ran (nn.Module hooks, which these blocks do
                # not have, would run again below). Without the stance, each later call with a new shape would
                # go through dynamo's refusal again, with a warning of its own.
                _EagerPastTheLimit.full = True
                log.warning(
                    "the compiled block has %d graphs (video sizes x LoRA sets): new ones run eagerly",
                    torch._dynamo.config.recompile_limit,
                )
        with torch.compiler.set_stance("eager_on_recompile"):
            return self.compiled(*args, **kwargs)
