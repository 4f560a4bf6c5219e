"""Which exact attention kernel runs the transformer blocks, chosen by measuring it on the GPU at hand.

Attention is about 70% of a 720p forward, and which exact kernel is fastest depends on the GPU, the library
versions and the sequence length: on an H200 cuDNN's fused attention ran at ~580 TFLOP/s at 720p, where PyTorch's
bundled FlashAttention 2 is slower and FlashAttention 4 (a separate package) targets Hopper and Blackwell. So with
`attention = auto` the engine times every candidate this GPU can run, once, on a 720p 81-frame self-attention
(batch 1, the model's heads), checks each one's output against an exact float32 reference on a slice of queries,
and keeps the fastest that is exact; the answer is stored on disk (keyed by GPU, versions and shape) so that a
restarted worker does not measure again.

Candidates (all exact in bf16; none changes the output beyond float noise):
- `cudnn`: PyTorch's cuDNN fused attention (diffusers' `_native_cudnn`), sm80 and newer.
- `flash`: PyTorch's bundled FlashAttention 2 (`_native_flash`).
- `efficient`: PyTorch's memory-efficient attention (`_native_efficient`).
- `flash4`: FlashAttention 4 (`pip install flash-attn-4`, CuTe DSL kernels compiled at first use) on Hopper and
  Blackwell. It takes the self-attention only; cross-attention (512 text tokens, a small share) keeps cuDNN.
- `default`: whatever PyTorch's SDPA picks (diffusers' default; never measured, only set explicitly).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from wanserve.files.base import atomic_write

log = logging.getLogger("wanserve.engine")

# (batch, tokens, heads, head_dim) in, the same out: the layout diffusers' attention dispatch uses.
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class AttentionKernel(StrEnum):
    DEFAULT = "default"
    CUDNN = "cudnn"
    FLASH = "flash"
    EFFICIENT = "efficient"
    FLASH4 = "flash4"


# The diffusers attention backend each kernel sets on the experts. FLASH4 replaces only the self-attention
# processor's product; everything else (cross-attention) runs on cuDNN.
DIFFUSERS_BACKEND: dict[AttentionKernel, str | None] = {
    AttentionKernel.DEFAULT: None,
    AttentionKernel.CUDNN: "_native_cudnn",
    AttentionKernel.FLASH: "_native_flash",
    AttentionKernel.EFFICIENT: "_native_efficient",
    AttentionKernel.FLASH4: "_native_cudnn",
}
_SDPA_BACKEND = {
    AttentionKernel.CUDNN: SDPBackend.CUDNN_ATTENTION,
    AttentionKernel.FLASH: SDPBackend.FLASH_ATTENTION,
    AttentionKernel.EFFICIENT: SDPBackend.EFFICIENT_ATTENTION,
}

# A candidate whose output is further than this from the float32 reference is not exact and is never chosen
# (bf16 rounding alone gives ~0.3%; a kernel that writes garbage or NaN gives far more).
EXACT_TOLERANCE = 0.02
REFERENCE_QUERIES = 64  # queries checked against float32 math attention (its score matrix grows with them)
NOT_EXACT = "not exact"
REFERENCE_HEADS = 8  # heads per float32 reference call: ~1 GiB at 720p instead of ~5 for all 40 at once


class AttentionUnavailable(ValueError):
    """The `attention` setting names a kernel this GPU or this installation cannot run."""


def flash4_installed() -> bool:
    try:
        return importlib.util.find_spec("flash_attn.cute") is not None
    except (ImportError, OSError, RuntimeError, ValueError):
        # No flash_attn at all, or a FlashAttention 2 build whose extension does not load (finding the submodule
        # imports the package): either way no FlashAttention 4, and no reason to stop the engine.
        return False


def candidates(capability: tuple[int, int], flash4: bool | None = None) -> list[AttentionKernel]:
    """The kernels worth timing on a CUDA GPU of this compute capability (the first is the fallback)."""
    if capability < (8, 0):
        return [AttentionKernel.EFFICIENT]
    found = [AttentionKernel.CUDNN, AttentionKernel.FLASH, AttentionKernel.EFFICIENT]
    if capability[0] in (9, 10) and (flash4_installed() if flash4 is None else flash4):
        found.append(AttentionKernel.FLASH4)
    return found


def static_choice(capability: tuple[int, int]) -> AttentionKernel:
    """The choice when nothing was measured: cuDNN on sm80+ (the fastest measured on Hopper, DESIGN.md section 5)."""
    return AttentionKernel.CUDNN if capability >= (8, 0) else AttentionKernel.DEFAULT


def sdpa(backends: Sequence[SDPBackend]) -> AttentionFn:
    """PyTorch's scaled-dot-product attention restricted to `backends`, on (batch, tokens, heads, dim)."""

    def run(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(list(backends)):
            out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
        return out.transpose(1, 2)

    return run


_math_attention = sdpa([SDPBackend.MATH])  # the float32 reference of `measure`


@torch.library.custom_op("wanserve::flash4_attention", mutates_args=())
def flash4_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """FlashAttention 4, non-causal, on (batch, tokens, heads, dim). A custom op so that a compiled block treats
    the JIT-compiled kernel as one opaque call (fullgraph compile cannot trace into it)."""
    from flash_attn.cute import flash_attn_func

    out, _lse = flash_attn_func(query, key, value)
    return out


@flash4_attention.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    # FlashAttention 4 returns a new contiguous tensor whatever the inputs' strides.
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def kernel_function(kernel: AttentionKernel) -> AttentionFn:
    """What `measure` times for a candidate (DEFAULT is never one: PyTorch would pick among the others)."""
    if kernel is AttentionKernel.FLASH4:
        return flash4_attention
    return sdpa([_SDPA_BACKEND[kernel]])


@dataclass(frozen=True)
class Timing:
    kernel: str
    ms: float = float("nan")
    rel_error: float = float("nan")
    error: str = ""  # why it could not run, or was not exact

    @property
    def usable(self) -> bool:
        return not self.error

    @property
    def settled(self) -> bool:
        """Ran, or was found not exact (its numerics, which the next start would find again); not one that raised."""
        return self.usable or self.error.startswith(NOT_EXACT)


@dataclass(frozen=True)
class AttentionChoice:
    kernel: AttentionKernel
    how: str  # "set", "measured", "measured earlier", "not measured: <why>"
    timings: tuple[Timing, ...] = ()

    def describe(self) -> str:
        ran = ", ".join(f"{t.kernel} {t.ms:.1f} ms" for t in self.timings if t.usable)
        return f"{self.kernel.value} ({self.how}{': ' + ran if ran else ''})"


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||, in float32: how far a kernel's (or a preset's) output is from the reference."""
    return float((got.float() - want.float()).norm() / want.float().norm())


def measure(
    functions: dict[str, AttentionFn],
    shape: tuple[int, int, int, int],
    device: torch.device,
    dtype: torch.dtype,
    repeats: int = 3,
    clock: Callable[[], float] = time.perf_counter,
) -> list[Timing]:
    """Time each function on random (batch, tokens, heads, dim) inputs: one untimed call (which also compiles a
    JIT kernel), then the median of `repeats`. Each output is checked against float32 math attention on its
    first REFERENCE_QUERIES queries; a function that raises or is not exact gets `error` set instead."""
    gen = torch.Generator(device=device).manual_seed(0)
    query, key, value = (torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(3))
    head = query[:, :REFERENCE_QUERIES]
    heads = [slice(h, h + REFERENCE_HEADS) for h in range(0, shape[2], REFERENCE_HEADS)]
    reference = torch.cat([_math_attention(*(x[:, :, h].float() for x in (head, key, value))) for h in heads], dim=2)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    timings: list[Timing] = []
    for name, fn in functions.items():
        try:
            with torch.no_grad():
                out = fn(query, key, value)
                sync()
                error = rel_error(out[:, :REFERENCE_QUERIES], reference)
                del out
                if not error <= EXACT_TOLERANCE:  # NaN fails this too
                    timings.append(Timing(name, rel_error=error, error=f"{NOT_EXACT}: {error:.2%} from float32"))
                    continue
                seconds = []
                for _ in range(repeats):
                    t0 = clock()
                    fn(query, key, value)
                    sync()
                    seconds.append(clock() - t0)
            timings.append(Timing(name, ms=statistics.median(seconds) * 1e3, rel_error=error))
        except Exception as exc:  # a kernel this GPU or this build cannot run: measured as unusable
            timings.append(Timing(name, error=f"{type(exc).__name__}: {exc}"[:300]))
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return timings


def fastest(timings: Sequence[Timing], fallback: AttentionKernel) -> AttentionKernel:
    usable = [t for t in timings if t.usable]
    return AttentionKernel(min(usable, key=lambda t: t.ms).kernel) if usable else fallback


def cache_key(device: torch.device, shape: tuple[int, ...], dtype: torch.dtype, kernels: Sequence[str]) -> str:
    """What a measurement depends on: the GPU, the kernels' library versions, the shape and the candidates."""
    parts = [torch.cuda.get_device_name(device) if device.type == "cuda" else device.type, f"torch {torch.__version__}"]
    if device.type == "cuda":
        parts.append(f"cudnn {torch.backends.cudnn.version()}")
    if AttentionKernel.FLASH4.value in kernels:
        from importlib.metadata import PackageNotFoundError, version

        try:
            parts.append(f"flash-attn-4 {version('flash-attn-4')}")
        except PackageNotFoundError:
            parts.append("flash-attn-4 ?")
    parts += ["x".join(map(str, shape)), str(dtype).removeprefix("torch."), ",".join(kernels)]
    return " | ".join(parts)


def _read(path: Path) -> dict[str, dict]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def choose(
    functions: dict[str, AttentionFn],
    shape: tuple[int, int, int, int],
    device: torch.device,
    dtype: torch.dtype,
    cache_file: Path | None,
    fallback: AttentionKernel,
) -> AttentionChoice:
    """The fastest exact kernel among `functions` (named by AttentionKernel values) at `shape`: measured now, or
    read from `cache_file` where the same GPU, versions, shape and candidates were measured before."""
    key = cache_key(device, shape, dtype, list(functions))
    stored = _read(cache_file).get(key) if cache_file is not None else None
    if stored is not None:
        try:
            timings = tuple(Timing(**row) for row in stored["timings"])
            return AttentionChoice(AttentionKernel(stored["kernel"]), "measured earlier", timings)
        except (KeyError, TypeError, ValueError):
            pass  # an entry from another version of this file: measure again
    try:
        timings = tuple(measure(functions, shape, device, dtype))
    except Exception as exc:  # the inputs or the reference did not fit (memory): run on the usual kernel
        log.warning("attention not measured (%s: %s): %s", type(exc).__name__, exc, fallback.value)
        return AttentionChoice(fallback, f"not measured: {type(exc).__name__}")
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    kernel = fastest(timings, fallback)
    for timing in timings:
        log.info("attention %s: %s", timing.kernel, timing.error or f"{timing.ms:.2f} ms, {timing.rel_error:.2%}")
    # Stored only when every candidate ran (or was found not exact, which is its numerics): one that raised may
    # have met a passing condition (memory taken by another process, a first-use compile) and is tried next start.
    if cache_file is not None and all(t.settled for t in timings):
        try:
            doc = _read(cache_file)
            doc[key] = {"kernel": kernel.value, "timings": [asdict(t) for t in timings]}
            atomic_write(cache_file, json.dumps(doc, indent=1).encode())  # a kill mid-write keeps the old
        except OSError as exc:  # a read-only cache: measure again next start
            log.warning("could not store the attention measurement in %s: %s", cache_file, exc)
    return AttentionChoice(kernel, "measured", timings)


def resolve(
    setting: str,
    device: torch.device,
    capability: tuple[int, int],
    shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    cache_file: Path | None,
) -> AttentionChoice:
    """The kernel for the `attention` setting: itself when set; with `auto`, measured on a CUDA GPU (elsewhere
    diffusers' default)."""
    if device.type != "cuda":
        # speed.plan_speed notes a GPU kernel set here and keeps diffusers' default
        how = "set" if setting != "auto" else "not measured: no GPU"
        return AttentionChoice(AttentionKernel(setting if setting != "auto" else "default"), how)
    half = dtype in (torch.float16, torch.bfloat16)
    kernels = candidates(capability) if half else []  # the fused kernels take float16 and bfloat16 only
    if setting != "auto":
        chosen = AttentionKernel(setting)
        if chosen is not AttentionKernel.DEFAULT and chosen not in kernels:
            raise AttentionUnavailable(_unavailable(chosen, capability, dtype))
        return AttentionChoice(chosen, "set")
    if not half:
        return AttentionChoice(AttentionKernel.DEFAULT, f"not measured: {str(dtype).removeprefix('torch.')}")
    functions = {kernel.value: kernel_function(kernel) for kernel in kernels}
    return choose(functions, shape, device, dtype, cache_file, fallback=static_choice(capability))


def _unavailable(kernel: AttentionKernel, capability: tuple[int, int], dtype: torch.dtype) -> str:
    head = f"attention={kernel.value} cannot run here"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"{head}: the model runs in {dtype}, and the fused kernels take float16 or bfloat16 (dtype=auto)"
    if kernel is AttentionKernel.FLASH4 and capability[0] in (9, 10):
        return f"{head}: FlashAttention 4 is not installed (pip install 'wanserve[flash4]')"
    arch = f"sm_{capability[0]}{capability[1]}"
    return (
        f"{head}: not for this GPU ({arch}); use auto, or one of {', '.join(k.value for k in candidates(capability))}"
    )
