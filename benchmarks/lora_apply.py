"""How long applying a LoRA to both experts takes: uncached (download + read + convert + load), from the disk
cache (read + convert + load), and resident in memory; plus activation, unloading and the forward overhead.

    .venv/bin/python benchmarks/lora_apply.py                          # the tiny model's experts, rank 16
    .venv/bin/python benchmarks/lora_apply.py --a14b-blocks 2 --rank 64  # A14B-width experts, 2 of 40 blocks
    .venv/bin/python benchmarks/lora_apply.py --a14b-blocks 40 --device cuda --dtype bfloat16   # on a GPU

The LoRA file is written in the original Wan layout (the usual one for Wan 2.2 LoRAs) with every attention and
FFN layer of every block, and served over loopback HTTP, so "uncached" includes a real download. Prints figures
(median of --repeat runs); asserts nothing. Load time grows with the number of blocks: with --a14b-blocks N
the last line scales it to the 40 blocks of the real model.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel

from wanserve.config import Settings
from wanserve.engine.lora import LoraAdapters
from wanserve.engine.tiny import TinyConfig, build_expert
from wanserve.files.local import LocalFileStore
from wanserve.lora.sources import LoraResolver, LoraUse

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from file_server import running_file_server  # the tests' loopback file server
from lora_files import random_factors, write_wan  # the one LoRA writer, shared with the tests

A14B_BLOCKS = 40


def a14b_expert(blocks: int, device: torch.device, dtype: torch.dtype) -> WanTransformer3DModel:
    """The Wan 2.2 A14B expert architecture with `blocks` blocks; weights left uninitialised (timing only)."""
    with torch.device("meta"):
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=40,
            attention_head_dim=128,
            in_channels=16,
            out_channels=16,
            text_dim=4096,
            freq_dim=256,
            ffn_dim=13824,
            num_layers=blocks,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            eps=1e-6,
            rope_max_seq_len=1024,
        )
    return model.to_empty(device=device).to(dtype).eval()


def timed(work: Callable[[], object], sync: Callable[[], None]) -> float:
    started = time.perf_counter()
    work()
    sync()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a14b-blocks", type=int, default=0, help="A14B-width experts with this many blocks")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    if args.a14b_blocks:
        high, low = (a14b_expert(args.a14b_blocks, device, dtype) for _ in range(2))
        shape = f"A14B-width experts, {args.a14b_blocks} of {A14B_BLOCKS} blocks"
    else:
        high, low = (build_expert(TinyConfig()).to(device, dtype).eval() for _ in range(2))
        shape = "tiny experts (2 blocks, width 24)"

    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        factors = random_factors(high, rank=args.rank)  # CPU tensors, with the experts' layer shapes
        lora_path = write_wan(tmp / "style.safetensors", factors, alpha=args.rank)
        size_mb = lora_path.stat().st_size / 1e6
        http = stack.enter_context(running_file_server())
        http.files["/style.safetensors"] = lora_path.read_bytes()
        url = http.url("/style.safetensors")

        rows: dict[str, list[float]] = {k: [] for k in ("uncached", "disk", "resident", "activate", "unload")}
        for i in range(args.repeat):
            settings = Settings(cache_dir=tmp / f"cache-{i}", allow_private_urls=True, lora_url_ttl_s=3600)
            resolver = LoraResolver(settings, LocalFileStore(tmp / "files", "http://bench.invalid"))
            adapters = LoraAdapters({"high": high, "low": low}, max_bytes=1 << 40)

            def apply(adapters: LoraAdapters = adapters, resolver: LoraResolver = resolver) -> None:
                file = resolver.resolve(url)
                adapters.load([LoraUse(file, 1.0, ("high", "low"), "style")])

            rows["uncached"].append(timed(apply, sync))
            adapters.unload_all()
            rows["disk"].append(timed(apply, sync))
            rows["resident"].append(timed(apply, sync))
            use = LoraUse(resolver.resolve(url), 1.0, ("high", "low"), "style")

            def activate(adapters: LoraAdapters = adapters, use: LoraUse = use) -> None:
                with adapters.active([use]):
                    pass

            rows["activate"].append(timed(activate, sync))
            rows["unload"].append(timed(adapters.unload_all, sync))

    print(
        f"LoRA apply on {shape}, {args.device} {args.dtype}; rank {args.rank}, {size_mb:.1f} MB file, "
        f"median of {args.repeat}"
    )
    labels = {
        "uncached": "uncached: download + hash + read + convert + check + load into both experts",
        "disk": "from the disk cache: read + convert + check + load into both experts",
        "resident": "resident in memory (a later request with the same LoRA)",
        "activate": "activate + deactivate for one request (set_adapters on both experts)",
        "unload": "unload from both experts (LRU eviction)",
    }
    for key, label in labels.items():
        print(f"  {statistics.median(rows[key]) * 1000:9.1f} ms  {label}")
    if args.a14b_blocks:
        scale = A14B_BLOCKS / args.a14b_blocks
        print(
            f"  {statistics.median(rows['disk']) * scale:9.2f} s   from the disk cache, scaled to {A14B_BLOCKS} blocks"
        )


if __name__ == "__main__":
    main()
