"""How far one expert forward moves under changes that are exact in real arithmetic: the float-noise floor that
`exact`'s error (`wanserve bench`'s `rel. error`, against diffusers eager) is to be read against.

The reference is diffusers eager as `wanserve bench` runs it: default attention, cond then uncond as two batch-1
forwards. Each variant runs the same inputs with one change and reports ||variant - reference|| / ||reference||
over both predictions:

- `repeat`: the reference again (0 unless the kernels are not deterministic);
- `batched`: cond and uncond as one batch-2 forward (what `exact` does);
- `flash`, `efficient`, `cudnn`: PyTorch's attention restricted to that kernel (another exact kernel sums in
  another order).

    python benchmarks/float_noise.py --model a14b --size 720p --json out.json     # a GPU: one full-size expert
    python benchmarks/float_noise.py --model tiny --device cpu --variants repeat,batched   # the same code, tiny
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from wanserve.engine.attention import rel_error
from wanserve.engine.bench import forward_inputs, random_a14b_expert
from wanserve.engine.loading import load_pipeline

KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
           "cudnn": SDPBackend.CUDNN_ATTENTION}  # fmt: skip
VARIANTS = ("repeat", "batched", *KERNELS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["a14b", "tiny"], default="a14b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="720p", choices=["480p", "580p", "720p"])
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"some of {', '.join(VARIANTS)}")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "wanserve")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here (rewritten after each)")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants: {', '.join(unknown)} (choose from {', '.join(VARIANTS)})")

    device = torch.device(args.device)
    if args.model == "a14b":
        model = random_a14b_expert(device, seed=1)
        temporal, spatial = 4, 8  # the Wan 2.1 VAE's compression
    else:
        pipe = load_pipeline("tiny", args.cache_dir, torch.bfloat16 if device.type == "cuda" else torch.float32)
        model = pipe.transformer.to(device).eval()
        temporal, spatial = int(pipe.vae_scale_factor_temporal), int(pipe.vae_scale_factor_spatial)
    latents, t, cond, uncond, tokens = forward_inputs(
        model.config, args.size, args.frames, temporal, spatial, device, model.dtype
    )

    def forward(text: torch.Tensor, batch: int = 1) -> torch.Tensor:
        return model(hidden_states=latents.expand(batch, -1, -1, -1, -1), timestep=t.expand(batch),
                     encoder_hidden_states=text, return_dict=False)[0]  # fmt: skip

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(run: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
        sync()
        t0 = time.perf_counter()
        out = run()
        sync()
        return time.perf_counter() - t0, out

    rows: list[dict[str, object]] = []

    def report(row: dict[str, object]) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json is not None:
            args.json.write_text(json.dumps(rows, indent=1))

    two_forwards = lambda: torch.cat([forward(cond), forward(uncond)])  # noqa: E731
    with torch.no_grad():
        forward(cond)  # untimed: kernels loaded, the allocator grown
        seconds, reference = timed(two_forwards)
        report({"variant": "reference", "seconds": seconds, "tokens": tokens, "size": args.size,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "torch": torch.__version__})  # fmt: skip
        for variant in variants:
            try:
                if variant == "repeat":
                    seconds, out = timed(two_forwards)
                elif variant == "batched":
                    seconds, out = timed(lambda: forward(torch.cat([cond, uncond]), batch=2))
                else:
                    with sdpa_kernel([KERNELS[variant]]):
                        seconds, out = timed(two_forwards)
                report({"variant": variant, "seconds": seconds, "rel_error": rel_error(out, reference)})
                del out
            except Exception as exc:  # a kernel this GPU, dtype or head size cannot run: the others still run
                report({"variant": variant, "error": f"{type(exc).__name__}: {exc}"[:300]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
