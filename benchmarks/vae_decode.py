"""VAE decode on a CPU: diffusers' `AutoencoderKLWan.decode` against `wanserve.engine.vae.decode_latents`, in one
process, on the same latents, for the built-in tiny VAE layouts at 480p x 81 frames.

    .venv/bin/python benchmarks/vae_decode.py                 # 1 thread (what each test worker gets), 3 repeats
    .venv/bin/python benchmarks/vae_decode.py --threads 2 --repeat 5

Prints the median seconds of each and their ratio, and checks that the two outputs are bit-identical (decode_latents
runs the same decoder calls and only joins the frames once instead of once per frame).
"""

from __future__ import annotations

import argparse

import torch
from timing import median_s  # benchmarks/timing.py, beside this script

from wanserve.engine.tiny import TinyConfig, build_vae
from wanserve.engine.vae import decode_latents
from wanserve.schema import frame_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--layouts", default="fast,coarse")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    width, height = frame_size("480p", "16:9")
    print(f"480p ({width}x{height}) x 81 frames, {args.threads} thread(s), median of {args.repeat}")
    print(f"{'layout':8} {'diffusers s':>12} {'ours s':>8} {'speedup':>8}  identical")
    for layout in args.layouts.split(","):
        torch.manual_seed(0)
        vae = build_vae(TinyConfig(vae=layout)).eval()  # type: ignore[arg-type]
        s = int(vae.config.scale_factor_spatial)
        z = torch.randn(1, vae.config.z_dim, 21, height // s, width // s)
        with torch.no_grad():
            theirs_s, theirs = median_s(lambda vae=vae, z=z: vae.decode(z, return_dict=False)[0], args.repeat)
            ours_s, ours = median_s(lambda vae=vae, z=z: decode_latents(vae, z), args.repeat)
        same = torch.equal(ours, theirs)
        print(f"{layout:8} {theirs_s:12.3f} {ours_s:8.3f} {theirs_s / ours_s:7.2f}x  {same}", flush=True)


if __name__ == "__main__":
    main()
