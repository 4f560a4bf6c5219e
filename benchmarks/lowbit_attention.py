"""The `fast` preset's low-bit attention kernels (our INT8-QK / FP16-PV Triton kernel; cuDNN's fused FP8 attention where
`nvidia-cudnn-frontend` is installed, quantization included in its time) against the exact ones (PyTorch's cuDNN and
flash backends, FlashAttention 4 where `flash-attn-4` is installed), at Wan 2.2's
self-attention shapes (batch 2 = cond + uncond, 40 heads x 128) for 480p and 720p, 81 frames. Needs a CUDA GPU.

    python benchmarks/lowbit_attention.py [--json out.json] [--then-bench BENCH_ARGS...]

Prints time, TFLOP/s (4 * L^2 * head_dim * heads * batch; equivalent for the low-bit kernel) and the relative
error against cuDNN bf16 attention (the first 2,048 queries). The kernel runs once per tile configuration and once
autotuned, each time writing into an output filled with NaN first: a configuration that leaves values unwritten
or non-finite shows up as `nan_fraction` > 0 (the FP8 P.V version of the kernel did, on an H200, only after its
autotuning call, which is how it slipped past the first version of this bench).

`--then-bench` restricts autotuning to the configurations that passed (every value finite, within 5% of exact at
both sizes) and runs `wanserve bench` with the remaining arguments in this process.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from functools import partial

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from wanserve.engine.attention import flash4_attention, flash4_installed, rel_error
from wanserve.engine.fp8 import quantize_fp8_attention_inputs
from wanserve.engine.kernels import cudnn_fp8_attention
from wanserve.engine.kernels import int8_attention as kernel
from wanserve.engine.speed import fp8_attention

SHAPES = {"480p": 32_760, "720p": 75_600}
QUERIES_CHECKED = 2048


def measure(run: Callable[[torch.Tensor], object], like: torch.Tensor, exact: torch.Tensor, flops: int) -> dict:
    """`run(out)` writes attention into `out`: its NaN fraction, error on the checked queries, and time."""
    row: dict[str, object] = {}
    try:
        out = torch.full_like(like, float("nan"))
        run(out)
        torch.cuda.synchronize()
        bad = ~torch.isfinite(out)
        row["nan_fraction"] = float(bad.float().mean())
        if bool(bad.any()):
            row["first_bad"] = bad.nonzero()[0].tolist()  # (batch, token, head, dim)
        else:
            row["err_exact"] = rel_error(out[:, :QUERIES_CHECKED], exact)
        ms = triton.testing.do_bench(partial(run, out), warmup=25, rep=100, return_mode="median")
        row.update(ms=ms, tflops=flops / ms / 1e9)
    except Exception as exc:  # a configuration or backend this GPU cannot run
        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
    return row


def bench_size(size: str, tokens: int, batch: int) -> list[dict[str, object]]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (batch, tokens, 40, 128)
    q, k, v = (torch.randn(shape, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(3))
    k = k + 0.5  # keys share an offset in real models: the kernel centres them
    flops = 4 * tokens * tokens * 128 * 40 * batch
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        exact = torch.nn.functional.scaled_dot_product_attention(qt[:, :, :QUERIES_CHECKED], kt, vt).transpose(1, 2)
    rows: list[dict[str, object]] = []

    def add(name: str, config: int | None, run: Callable[[torch.Tensor], object]) -> None:
        rows.append({"size": size, "kernel": name, "config": config, **measure(run, q, exact, flops)})
        print(rows[-1], flush=True)

    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        # The copy into `out` (for the NaN check) is timed too: about 1 ms of ~400 at 720p, against SDPA.
        def sdpa(out: torch.Tensor, backend: SDPBackend = backend) -> None:
            with sdpa_kernel(backend):
                out.copy_(torch.nn.functional.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2))

        add(name, None, sdpa)
    if flash4_installed():  # FlashAttention 4, an `exact` candidate where installed (wanserve/engine/attention.py)

        def flash4(out: torch.Tensor) -> None:
            out.copy_(flash4_attention(q, k, v))

        add("flash4", None, flash4)
    if cudnn_fp8_attention.installed():  # cuDNN's FP8 attention (fast's other low-bit candidate), quantizing included

        def cudnn_fp8(out: torch.Tensor) -> None:
            out.copy_(fp8_attention(q, k, v))

        add("cudnn fp8", None, cudnn_fp8)
        # The probabilities' scale before their FP8 cast is cuDNN's tests' 64; larger keeps more of the small ones
        # (if the kernel's running maximum lets them stay under 448: a NaN or a worse error says it does not).
        operands = quantize_fp8_attention_inputs(q, k, v)
        for p_scale in (16.0, 256.0, 448.0):

            def scaled(out: torch.Tensor, p_scale: float = p_scale) -> None:
                out.copy_(cudnn_fp8_attention.cudnn_fp8_attention(*operands, torch.bfloat16, p_scale))

            add(f"cudnn fp8, P x {p_scale:g} (quantized once)", None, scaled)
        built = cudnn_fp8_attention.built_graph(tuple(q.shape), q.device)
        if built is not None:
            amax = {name: float(value) for name, value in built.amax.items()}
            output = "fp8" if built.fp8_output else "bf16"
            version = torch.backends.cudnn.version()
            print(f"cudnn {version}: FP8 attention output {output}, last amax {amax}", flush=True)
    for index, config in enumerate(kernel._CONFIGS):
        add(f"int8 {config}", index, partial(kernel.int8_attention, q, k, v, config))
    kernel.int8_attention(q, k, v)  # autotunes: the checked call below is then an ordinary one
    chosen = kernel._CONFIGS.index(kernel._autotuned.best_config)
    add(f"int8 autotuned: {kernel._autotuned.best_config}", chosen, lambda out: kernel.int8_attention(q, k, v, out=out))
    return rows


def passed_configs(rows: list[dict[str, object]]) -> list[int]:
    """The configurations that wrote every value finite and within 5% of exact at every size (called alone, and as
    the autotuner's choice)."""

    def ok(row: dict[str, object]) -> bool:
        return row.get("nan_fraction") == 0.0 and float(row.get("err_exact", 1.0)) < 0.05  # type: ignore[arg-type]

    return [i for i in range(len(kernel._CONFIGS)) if all(ok(r) for r in rows if r["config"] == i)]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--then-bench", nargs=argparse.REMAINDER, default=None)
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}", flush=True)
    rows: list[dict[str, object]] = []
    for size, tokens in SHAPES.items():
        rows += bench_size(size, tokens, args.batch)
        torch.cuda.empty_cache()
        if args.json:  # after each size: a run stopped by its time limit keeps what it measured
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
    passed = passed_configs(rows)
    print(f"configurations that passed at every size: {passed}", flush=True)
    if args.then_bench is None:
        return 0
    if not passed:
        print("none passed: no bench", flush=True)
        return 1
    kernel._autotuned.configs = [kernel._CONFIGS[i] for i in passed]
    kernel._autotuned.cache.clear()  # the sizes above were tuned over all configurations: choose again
    from wanserve.cli import main as cli_main

    return int(cli_main(["bench", *args.then_bench]) or 0)


if __name__ == "__main__":
    sys.exit(main())
