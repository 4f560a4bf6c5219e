"""The end of a video on a GPU, for the A14B's VAE (the Wan 2.1 architecture, random float32 weights), 81 frames:

1. the decode (`vae.decode_video`) with cuDNN's default choice of convolution algorithms against
   `torch.backends.cudnn.benchmark`, which times the algorithms of each convolution shape once and keeps the fastest
   (a video's 21 pieces repeat the same shapes): seconds, ratio, and how far the frames move (another algorithm
   sums in another order: a pixel on a rounding edge may move one level);
2. decode then encode (the whole video, then `encode_mp4`) against the streamed path the engine takes (each piece
   into `Mp4Writer`, encoded on its thread while the GPU decodes the next), with the faster of the two settings.

    python benchmarks/vae_gpu.py                          # 720p on CUDA
    python benchmarks/vae_gpu.py --size 480p --vae coarse --device cpu   # the same code on a tiny VAE (a smoke run)

Each timing follows an untimed run of the same shapes. Not part of `wanserve bench`: the engine keeps cuDNN's default
until this shows `benchmark` faster and the frames unchanged.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from diffusers import AutoencoderKLWan

from wanserve.engine.tiny import TinyConfig, build_vae
from wanserve.engine.vae import decode_video
from wanserve.engine.video import Mp4Writer, encode_mp4
from wanserve.schema import frame_size

T = TypeVar("T")


def timed(run: Callable[[], T], device: torch.device) -> tuple[float, T]:
    """`run()` once untimed (autotuning, allocator), then once timed."""
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="720p", choices=["480p", "580p", "720p"])
    parser.add_argument("--vae", default="full", choices=["full", "fast", "coarse", "wan2.1"],
                        help="full: the A14B's VAE; the others: the tiny model's layouts")  # fmt: skip
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKLWan() if args.vae == "full" else build_vae(TinyConfig(vae=args.vae))
    vae = vae.eval()  # made on the device, in float32 as the engine loads it
    width, height = frame_size(args.size, "16:9")
    s = int(vae.config.scale_factor_spatial)
    z = torch.randn(1, vae.config.z_dim, 21, height // s, width // s, device=device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.size} ({width}x{height}) x 81 frames, VAE '{args.vae}', {name}, torch {torch.__version__}")

    with torch.no_grad():
        times: dict[bool, float] = {}
        frames: dict[bool, np.ndarray] = {}
        for benchmark in (False, True):
            torch.backends.cudnn.benchmark = benchmark
            times[benchmark], frames[benchmark] = timed(lambda: decode_video(vae, z, 81), device)
        moved = np.abs(frames[True].astype(np.int16) - frames[False].astype(np.int16))
        print(f"decode: cuDNN default {times[False]:.3f} s, cudnn.benchmark {times[True]:.3f} s, "
              f"{times[False] / times[True]:.2f}x; frames differ on {float((moved > 0).mean()):.4%} of pixels, "
              f"by at most {int(moved.max())} level(s)")  # fmt: skip

        torch.backends.cudnn.benchmark = times[True] < times[False]
        with tempfile.TemporaryDirectory() as tmp:

            def one_after_the_other() -> None:
                encode_mp4(decode_video(vae, z, 81), Path(tmp) / "serial.mp4", fps=16)

            def streamed() -> None:
                with Mp4Writer(Path(tmp) / "streamed.mp4", fps=16) as writer:
                    decode_video(vae, z, 81, on_frames=writer.write)
                    writer.close()

            serial_s, _ = timed(one_after_the_other, device)
            streamed_s, _ = timed(streamed, device)
            same = (Path(tmp) / "serial.mp4").read_bytes() == (Path(tmp) / "streamed.mp4").read_bytes()
        setting = f"cudnn.benchmark {torch.backends.cudnn.benchmark}"
        print(f"decode + encode ({setting}): one after the other {serial_s:.3f} s, streamed {streamed_s:.3f} s, "
              f"{serial_s / streamed_s:.2f}x, identical mp4 {same}")  # fmt: skip


if __name__ == "__main__":
    main()
