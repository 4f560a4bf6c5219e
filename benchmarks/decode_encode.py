"""The end of a video on a CPU: VAE decode then H.264 encode, one after the other (as the engine did: the whole
float video, then uint8, then the encode) against decoded pieces streamed into `Mp4Writer` (as it does now: each
latent frame's pixels go to uint8 as they are decoded and are encoded on the writer's thread while the next
decodes), in one process, on the same latents of a built-in tiny VAE layout.

    .venv/bin/python benchmarks/decode_encode.py          # 480p, 81 frames, the tiny model's "fast" VAE, 3 repeats
    .venv/bin/python benchmarks/decode_encode.py --size 720p --layout coarse --repeat 1

Prints the median seconds of each, their ratio, and whether the two mp4 files are byte-identical. On a GPU the VAE
works on the GPU while the encoder works on the CPU, so the overlap hides more of the encode than here, where both
share the CPU's cores.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from timing import median_s, video_bench_args  # benchmarks/timing.py, beside this script

from wanserve.engine.tiny import TinyConfig, build_vae
from wanserve.engine.vae import decode_latents, decode_video
from wanserve.engine.video import Mp4Writer, encode_mp4, to_uint8
from wanserve.schema import frame_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", default="fast", choices=["fast", "coarse", "wan2.1"])
    args = video_bench_args(parser, default_size="480p")
    width, height = frame_size(args.size, "16:9")
    torch.manual_seed(0)
    vae = build_vae(TinyConfig(vae=args.layout)).eval()
    s = int(vae.config.scale_factor_spatial)
    z = torch.randn(1, vae.config.z_dim, 21, height // s, width // s)
    print(f"{args.size} ({width}x{height}) x 81 frames, tiny VAE '{args.layout}', torch threads "
          f"{torch.get_num_threads()}, median of {args.repeat}")  # fmt: skip

    def one_after_the_other(out: Path) -> None:
        video = decode_latents(vae, z)
        frames = (video[0].permute(1, 2, 3, 0) / 2 + 0.5).numpy()
        encode_mp4(to_uint8(frames), out, fps=16)

    def streamed(out: Path) -> None:
        with Mp4Writer(out, fps=16) as writer:
            decode_video(vae, z, 81, on_frames=writer.write)
            writer.close()

    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        before, after = Path(tmp) / "before.mp4", Path(tmp) / "after.mp4"
        serial_s, _ = median_s(lambda: one_after_the_other(before), args.repeat)
        streamed_s, _ = median_s(lambda: streamed(after), args.repeat)
        same = before.read_bytes() == after.read_bytes()
    print(f"decode + encode: one after the other {serial_s:.3f} s, streamed {streamed_s:.3f} s, "
          f"{serial_s / streamed_s:.2f}x, identical mp4 {same}")  # fmt: skip


if __name__ == "__main__":
    main()
