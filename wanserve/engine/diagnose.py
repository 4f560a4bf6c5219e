"""Where the `fast` preset's low-bit numerics go wrong, block by block: `python -m wanserve.engine.diagnose`.

The first GPU run of `fast` (H200, 720p) gave non-finite predictions with FP8 linears, the low-bit self-attention and
compile all switched on at once. This check takes them apart on one expert, in one process. Its first GPU run found
the cause: the low-bit attention's output was not finite from block 1 on (its first call, which autotunes, was), and
FP8 linears alone were finite; the kernel's FP8 P.V is now float16 (kernels/int8_attention.py).

1. Teacher-forced. The expert runs its plain forward (cond and uncond batched). Each transformer block's exact
   input is also fed to copies of that block changed one way each (`VARIANTS`), and each copy's output is compared
   with the block's own. The error is that of the block's update (output - input), so every block is judged on
   its own, without the error of the blocks before it. A copy whose output is not finite runs again with a hook
   on every module, which names the first module whose output was not finite and says whether its input was.
2. Chained. The whole expert with cuDNN attention, then converted as `fast` converts it (eager, then compiled):
   the error of the final prediction against the plain forward, and (eager) the first block whose output is not
   finite.

`--model a14b` builds one full-size A14B expert with random bf16 weights on the device; `--model tiny` runs the
same code on the tiny model on a CPU (the low-bit numerics emulated in float32), which is how CI checks it.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_dispatch import AttentionBackendName

from wanserve.engine.fp8 import use_fp8_linears
from wanserve.engine.speed import (
    DeviceInfo,
    LowbitKernel,
    Preset,
    compile_experts,
    plan_speed,
    prepare_experts,
    set_attention_backend,
    use_lowbit_self_attention,
)


@dataclass(frozen=True)
class Variant:
    """One way of changing a block copy; `attention_backend` is set on all its attention processors."""

    name: str
    fp8_linears: bool = False
    lowbit_attention: bool = False
    lowbit_kernel: LowbitKernel = LowbitKernel.INT8
    attention_backend: str | None = None

    def apply(self, block: torch.nn.Module) -> None:
        if self.attention_backend:
            backend = AttentionBackendName(self.attention_backend)
            for module in block.modules():
                if isinstance(module, AttentionModuleMixin):
                    module.processor._attention_backend = backend
        if self.fp8_linears:
            use_fp8_linears(block, lambda _name: True)
        if self.lowbit_attention:
            use_lowbit_self_attention(block, self.attention_backend, kernel=self.lowbit_kernel)


def variants(device: DeviceInfo) -> list[Variant]:
    """A plain copy first (its error must be 0: the harness feeds each copy exactly the block's input), then what
    `exact` changes, then the two low-bit parts of `fast` alone and together, on exact's attention backend."""
    backend = plan_speed(Preset.EXACT, device).attention_backend
    found = [Variant("copy")]
    if backend:
        found.append(Variant("cuDNN attention", attention_backend=backend))
    found += [
        Variant("FP8 linears", fp8_linears=True, attention_backend=backend),
        Variant("low-bit attention", lowbit_attention=True, attention_backend=backend),
        Variant("fast block", fp8_linears=True, lowbit_attention=True, attention_backend=backend),
    ]
    fp8 = plan_speed(Preset.FAST, device, unvalidated_fast_gpu=True, lowbit_attention=True, lowbit_kernel="fp8")
    # Only where cuDNN's FP8 attention runs (on a CPU its reference would, which the tests check elsewhere).
    if device.type == "cuda" and fp8.lowbit_attention and fp8.lowbit_kernel is LowbitKernel.FP8:
        kernel = LowbitKernel.FP8
        found += [
            Variant("FP8 attention (cuDNN)", lowbit_attention=True, lowbit_kernel=kernel, attention_backend=backend),
            Variant(
                "fast block, FP8 attention",
                fp8_linears=True,
                lowbit_attention=True,
                lowbit_kernel=kernel,
                attention_backend=backend,
            ),
        ]
    return found


@dataclass
class Outcome:
    """One block copy against the block: its update's relative error, or where it stopped being finite."""

    finite: bool
    update_error: float
    first_bad: str = ""  # the first module with a non-finite output (only when not finite)

    def cell(self) -> str:
        return f"{self.update_error:.3%}" if self.finite else f"NOT FINITE: {self.first_bad}"


@dataclass
class BlockRow:
    index: int
    max_abs: float  # of the block's output (the residual stream)
    update_rms: float  # of output - input
    outcomes: dict[str, Outcome] = field(default_factory=dict)


@dataclass
class ChainedRow:
    name: str
    finite: bool
    rel_error: float  # of the final prediction against the plain forward
    first_bad_block: int | None = None  # eager runs only
    seconds: float = 0.0


@dataclass
class Report:
    model: str
    device: str
    size: str
    torch: str
    blocks: list[BlockRow] = field(default_factory=list)
    chained: list[ChainedRow] = field(default_factory=list)

    def table(self) -> str:
        names = list(self.blocks[0].outcomes) if self.blocks else []
        lines = [
            f"{self.model} expert on {self.device}, {self.size}, torch {self.torch}",
            "",
            "Teacher-forced, error of each block's update (output - input) against the plain block:",
            "",
            "| block | max abs out | update rms | " + " | ".join(names) + " |",
            "|---" * (3 + len(names)) + "|",
        ]
        for row in self.blocks:
            cells = " | ".join(row.outcomes[name].cell() for name in names)
            lines.append(f"| {row.index} | {row.max_abs:.4g} | {row.update_rms:.4g} | {cells} |")
        lines += ["", "Chained, the whole expert, final prediction against the plain forward:", ""]
        for c in self.chained:
            where = (
                ""
                if c.finite
                else "  NOT FINITE" + (f" from block {c.first_bad_block}" if c.first_bad_block is not None else "")
            )
            lines.append(f"- {c.name}: rel. error {c.rel_error:.3%}, {c.seconds:.1f} s{where}")
        return "\n".join(lines)


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got - want‖ / ‖want‖ in float64 (NaN when got is not finite)."""
    diff = (got.double() - want.double()).norm()
    return float(diff / want.double().norm().clamp(min=1e-30))


def _finite(value: Any) -> bool:
    tensors = [v for v in (value if isinstance(value, (tuple, list)) else (value,)) if isinstance(v, torch.Tensor)]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def first_non_finite(block: torch.nn.Module, args: tuple, kwargs: dict) -> str:
    """Run `block` once more, naming the first module (in the order modules finish) whose output is not finite."""
    found: list[str] = []
    handles = []
    for name, module in block.named_modules():
        if not name:
            continue

        def hook(_m: torch.nn.Module, inputs: tuple, output: Any, name: str = name) -> None:
            if not found and not _finite(output):
                origin = "its input was finite" if _finite(inputs) else "its input was not finite already"
                found.append(f"{name} ({type(_m).__name__}; {origin})")

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            block.forward(*args, **kwargs)  # not __call__: the twin carries a copy of the diagnosis' own block hook
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else "the block's own arithmetic (every module's output was finite)"


def compare_block(
    block: torch.nn.Module, variant: Variant, args: tuple, kwargs: dict, reference: torch.Tensor
) -> Outcome:
    twin = copy.deepcopy(block)
    variant.apply(twin)
    with torch.no_grad():
        out = twin.forward(*args, **kwargs)  # not __call__: the copy carries the diagnosis' own block hook
    hidden = args[0]
    if not _finite(out):
        return Outcome(False, float("nan"), first_non_finite(twin, args, kwargs))
    return Outcome(True, relative(out - hidden, reference - hidden))


@contextmanager
def _block_hooks(
    expert: WanTransformer3DModel, on_block: Callable[[int, torch.nn.Module, tuple, dict, Any], None]
) -> Iterator[None]:
    handles = [
        block.register_forward_hook(
            lambda module, args, kwargs, output, index=index: on_block(index, module, args, kwargs, output),
            with_kwargs=True,
        )
        for index, block in enumerate(expert.blocks)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def diagnose(
    expert: WanTransformer3DModel,
    inputs: dict[str, torch.Tensor],
    device: torch.device,
    info: DeviceInfo,
    compile_dir: Path | None,
    emit: Callable[[str], None] = print,
    report: Report | None = None,
) -> Report:
    """Both parts of the check on `expert` (changed in place by the chained part). `inputs` are the expert's
    forward keyword arguments; `compile_dir` None skips the compiled run."""
    report = report or Report("expert", str(device), "", torch.__version__)
    found = variants(info)

    def on_block(index: int, block: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        hidden = args[0]
        row = BlockRow(index, float(output.abs().max()), float((output.float() - hidden.float()).pow(2).mean().sqrt()))
        for variant in found:
            row.outcomes[variant.name] = compare_block(block, variant, args, kwargs, output)
        report.blocks.append(row)
        emit(f"block {index}: " + "; ".join(f"{name} {o.cell()}" for name, o in row.outcomes.items()))

    def forward() -> tuple[torch.Tensor, float]:
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = expert(**inputs, return_dict=False)[0]
        _sync(device)
        return out, time.perf_counter() - t0

    with _block_hooks(expert, on_block):
        reference, _ = forward()

    def chained(name: str, with_block_check: bool) -> None:
        bad: list[int] = []

        def check(index: int, _block: torch.nn.Module, _args: tuple, _kwargs: dict, output: torch.Tensor) -> None:
            if not bad and not _finite(output):
                bad.append(index)

        if with_block_check:
            with _block_hooks(expert, check):
                out, seconds = forward()
        else:
            out, seconds = forward()
        finite = _finite(out)
        row = ChainedRow(name, finite, relative(out, reference), bad[0] if bad else None, seconds)
        report.chained.append(row)
        emit(f"chained {name}: rel. error {row.rel_error:.3%}, finite {finite}, {seconds:.1f} s")

    exact = plan_speed(Preset.EXACT, info, compile=False)
    if exact.attention_backend:
        set_attention_backend(expert, exact.attention_backend)
        chained("cuDNN attention (eager)", True)
    fast = plan_speed(Preset.FAST, info, compile=False, unvalidated_fast_gpu=True, lowbit_attention=True)
    prepare_experts([expert], fast)
    chained("fast (eager)", True)
    if compile_dir is not None:
        compile_experts([expert], replace(fast, compile=True), compile_dir)
        chained("fast (compiled, first run: includes compiling)", False)
        chained("fast (compiled)", False)
    return report


def main(argv: list[str] | None = None) -> int:
    from wanserve.engine.bench import forward_inputs, random_a14b_expert
    from wanserve.engine.loading import load_pipeline, resolve_device

    parser = argparse.ArgumentParser(prog="python -m wanserve.engine.diagnose", description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["tiny", "a14b"], default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", default="720p", help="480p, 580p or 720p (16:9)")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--layers", type=int, default=0, help="only the first N transformer blocks (0: all)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled chained run")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "wanserve")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    if args.model == "a14b":
        expert = random_a14b_expert(device, seed=1)
        temporal, spatial = 4, 8  # the Wan 2.1 VAE's compression
    else:
        pipe = load_pipeline("tiny", args.cache_dir, torch.bfloat16 if device.type == "cuda" else torch.float32)
        expert = pipe.transformer.to(device)
        temporal, spatial = int(pipe.vae_scale_factor_temporal), int(pipe.vae_scale_factor_spatial)
    if args.layers:
        expert.blocks = expert.blocks[: args.layers]
    latents, t, cond, uncond, _tokens = forward_inputs(
        expert.config, args.size, args.frames, temporal, spatial, device, expert.dtype
    )
    inputs = {
        "hidden_states": torch.cat([latents, latents]),
        "timestep": t.expand(2),
        "encoder_hidden_states": torch.cat([cond, uncond]),
    }
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report = Report(args.model, device_name, args.size, torch.__version__)
    diagnose(
        expert,
        inputs,
        device,
        DeviceInfo.probe(device),
        None if args.no_compile else args.cache_dir / "compile",
        emit=lambda line: print(line, flush=True),
        report=report,
    )
    print(report.table(), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(report), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
