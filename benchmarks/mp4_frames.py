"""The mp4 phase of a video on a CPU: float frames to uint8 (numpy's four single-threaded passes against
`wanserve.engine.video.to_uint8`, through torch's threaded kernels), then the H.264 encode, for 81 frames at a
resolution of the wire schema, in one process on the same frames.

    .venv/bin/python benchmarks/mp4_frames.py                     # 720p, torch's default thread count, 3 repeats
    .venv/bin/python benchmarks/mp4_frames.py --size 480p --threads 2

Prints the median seconds of each conversion, their ratio, whether the bytes are identical, and the encode's time.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from timing import median_s, video_bench_args  # benchmarks/timing.py, beside this script

from wanserve.engine.video import encode_mp4, to_uint8
from wanserve.schema import frame_size


def numpy_uint8(frames: np.ndarray) -> np.ndarray:
    """What to_uint8 did before: the reference bytes."""
    return (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args = video_bench_args(parser, default_size="720p")
    width, height = frame_size(args.size, "16:9")
    # A smooth gradient with a little noise: like decoded video, not incompressible random pixels.
    rng = np.random.default_rng(0)
    ramp = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, None, :, None]
    frames = np.broadcast_to(ramp, (81, height, width, 3)) + rng.normal(0, 0.02, (81, height, width, 3))
    frames = frames.astype(np.float32)
    print(
        f"{args.size} ({width}x{height}) x 81 frames, torch threads {torch.get_num_threads()}, median of {args.repeat}"
    )
    numpy_s, want = median_s(lambda: numpy_uint8(frames), args.repeat)
    torch_s, got = median_s(lambda: to_uint8(frames), args.repeat)
    print(f"to uint8: numpy {numpy_s:.3f} s, ours {torch_s:.3f} s, {numpy_s / torch_s:.2f}x, "
          f"identical {np.array_equal(want, got)}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        encode_s, _ = median_s(lambda: encode_mp4(got, Path(tmp) / "clip.mp4", fps=16) and got, 1)
    print(f"H.264 encode (veryfast, crf 18) of the uint8 frames: {encode_s:.3f} s")


if __name__ == "__main__":
    main()
