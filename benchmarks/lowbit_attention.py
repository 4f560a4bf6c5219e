"""The `fast` preset's INT8-QK / FP8-PV attention kernel against PyTorch's exact attention backends, at Wan 2.2's
self-attention shapes (batch 2 = cond + uncond, 40 heads x 128) for 480p and 720p, 81 frames. Needs a CUDA GPU.

    python benchmarks/lowbit_attention.py [--json out.json]

Prints time, TFLOP/s (4 * L^2 * head_dim * heads * batch; equivalent for the low-bit kernel) and the relative
error against cuDNN bf16 attention and against the kernel's float32 reference (`fp8_attention_reference`, on the
first 2,048 queries).
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from wanserve.engine.fp8 import fp8_attention_reference
from wanserve.engine.kernels.fp8_attention import fp8_attention

SHAPES = {"480p": 32_760, "720p": 75_600}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def bench_size(size: str, tokens: int, batch: int) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (batch, tokens, 40, 128)
    q, k, v = (torch.randn(shape, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(3))
    k = k + 0.5  # keys share an offset in real models: the kernel centres them
    flops = 4 * tokens * tokens * 128 * 40 * batch
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    exact = None
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)
                ms = triton.testing.do_bench(
                    partial(torch.nn.functional.scaled_dot_product_attention, qt, kt, vt),
                    warmup=50,
                    rep=300,
                    return_mode="median",
                )
            exact = out.transpose(1, 2) if exact is None else exact
            rows.append({"size": size, "kernel": name, "ms": ms, "tflops": flops / ms / 1e9, "err_exact": 0.0})
        except Exception as exc:  # a backend this torch/GPU lacks
            rows.append({"size": size, "kernel": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
        print(rows[-1], flush=True)
    out = fp8_attention(q, k, v)  # autotunes
    ms = triton.testing.do_bench(partial(fp8_attention, q, k, v), warmup=50, rep=300, return_mode="median")
    n = 2048
    ref = fp8_attention_reference(qt[:, :, :n], kt, vt, chunk=256).transpose(1, 2)
    rows.append(
        {
            "size": size,
            "kernel": "wanserve int8/fp8",
            "ms": ms,
            "tflops": flops / ms / 1e9,
            "err_exact": rel(out, exact) if exact is not None else None,
            "err_reference": rel(out[:, :n], ref),
        }
    )
    print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}", flush=True)
    rows = []
    for size, tokens in SHAPES.items():
        rows += bench_size(size, tokens, args.batch)
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
