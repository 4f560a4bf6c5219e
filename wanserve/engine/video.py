"""Frames -> H.264 mp4 (yuv420p, +faststart), through PyAV's bundled FFmpeg/libx264."""

from __future__ import annotations

import os
import queue
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol

import av
import numpy as np
import torch


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    num_frames: int
    width: int
    height: int
    fps: float
    codec: str
    pix_fmt: str
    size_bytes: int


class FrameSink(Protocol):
    """Where a video's frames go as they are made: (n, height, width, 3) pieces, in order."""

    def write(self, frames: np.ndarray) -> None: ...


def pixels_to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """float pixels in [0, 1] -> uint8, rounding to nearest (half to even), on the tensor's own device: the engine
    converts each decoded piece on the GPU and copies a quarter of the bytes to the host. The same float operations
    as numpy's clip, x255, round, so the same bytes on any device (tests/test_video.py)."""
    return pixels.clamp(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """float frames in [0, 1] -> uint8, as `pixels_to_uint8`. Through torch's threaded kernels: numpy runs each of
    its four passes on one core (a 720p 81-frame clip on 2 cores: numpy 1.20 s, this 0.52 s, printed by
    benchmarks/mp4_frames.py; more cores, more gain)."""
    if frames.dtype == np.uint8:
        return frames
    return pixels_to_uint8(torch.from_numpy(np.ascontiguousarray(frames))).numpy()


class Mp4Writer:
    """An mp4 written as its frames arrive. libx264 encodes on this writer's thread (PyAV lets go of the GIL while
    it works), so the caller decodes the next frames meanwhile: a video's encode overlaps its VAE decode instead of
    following it. The file appears at `path` only when `close()` returns, whole and synced; `abort()` (or leaving
    the `with` block without `close()`) leaves nothing behind. An encoder error is raised by the next `write()` or
    by `close()`, as it was raised (a full disk keeps its errno)."""

    def __init__(self, path: Path, fps: int, crf: int = 18, preset: str = "veryfast", max_pending: int = 8) -> None:
        self.path = Path(path)
        self._fps, self._crf, self._preset = fps, crf, preset
        self._size: tuple[int, int] | None = None  # (height, width) of the first piece; every piece must match
        self._finished = False
        self._abandoned = threading.Event()
        self._error: BaseException | None = None
        # Bounded, so that a caller faster than the encoder waits instead of holding the whole video twice.
        self._pending: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=max_pending)
        # Made by the first write, not here: a writer is opened before the denoising starts, and a process killed
        # in those minutes should leave no temporary beside the output.
        self._tmp: Path | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.abort()  # nothing to do after close()

    def write(self, frames: np.ndarray) -> None:
        """Queue (n, height, width, 3) frames, floats in [0, 1] or uint8. The writer keeps the array: do not change
        it afterwards."""
        if self._finished:
            raise RuntimeError("this mp4 is already closed or aborted")
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"expected frames of shape (N, H, W, 3), got {frames.shape}")
        size = (frames.shape[1], frames.shape[2])
        if size[0] % 2 or size[1] % 2:
            raise ValueError("yuv420p needs even width and height")
        if self._size is not None and size != self._size:
            raise ValueError(f"frames of {size[1]}x{size[0]} after frames of {self._size[1]}x{self._size[0]}")
        self._raise_failure()
        if len(frames) == 0:  # nothing to encode: no file for it either
            return
        if self._thread is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=".", suffix=".mp4.part", dir=self.path.parent)
            os.close(fd)
            self._tmp = Path(tmp_name)
            thread = threading.Thread(target=self._encode, args=(self._tmp,), name="mp4-writer", daemon=True)
            thread.start()
            self._thread = thread  # only a started thread is ever joined
        self._size = size
        self._pending.put(to_uint8(frames))

    def close(self) -> VideoInfo:
        """Finish the encode and move the file into place; returns what the file holds."""
        if self._finished:
            raise RuntimeError("this mp4 is already closed or aborted")
        self._stop()
        if self._tmp is None:
            raise ValueError("an mp4 needs at least one frame")
        try:
            self._raise_failure()
            with open(self._tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(self._tmp, 0o666 & ~_umask())  # mkstemp's 0600 is for the temporary, not the video
            os.replace(self._tmp, self.path)
        finally:
            self._tmp.unlink(missing_ok=True)
        return probe_mp4(self.path)

    def abort(self) -> None:
        """Stop encoding and remove what was written (a no-op once closed)."""
        if not self._finished:
            self._abandoned.set()
            self._stop()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)

    def _stop(self) -> None:
        self._finished = True
        if self._thread is not None:
            self._pending.put(None)
            self._thread.join()

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise self._error

    def _encode(self, tmp: Path) -> None:
        ended = False  # the caller's end-of-frames marker was taken from the queue
        try:
            with av.open(str(tmp), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
                stream: av.VideoStream | None = None
                while (piece := self._pending.get()) is not None:
                    if self._abandoned.is_set():
                        continue
                    if stream is None:
                        stream = container.add_stream("libx264", rate=self._fps)
                        stream.height, stream.width = piece.shape[1], piece.shape[2]
                        stream.pix_fmt = "yuv420p"
                        stream.options = {"crf": str(self._crf), "preset": self._preset}
                    for frame in piece:
                        container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
                ended = True
                if stream is not None and not self._abandoned.is_set():
                    container.mux(stream.encode(None))
        except BaseException as exc:  # handed to the caller's thread, which raises it
            self._error = exc
            while not ended:  # take what the caller still queues, so that it never waits on a full queue
                ended = self._pending.get() is None


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def encode_mp4(frames: np.ndarray, path: Path, fps: int, crf: int = 18, preset: str = "veryfast") -> VideoInfo:
    """Write frames (N, H, W, 3) as an mp4. The file appears atomically: a crash never leaves half."""
    with Mp4Writer(path, fps, crf=crf, preset=preset) as writer:
        writer.write(frames)
        return writer.close()


def probe_mp4(path: Path) -> VideoInfo:
    """Read back an mp4's stream facts by decoding it (frame count is counted, not trusted)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        count = sum(1 for _ in container.decode(stream))
        return VideoInfo(
            path=Path(path),
            num_frames=count,
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            fps=float(stream.average_rate or stream.base_rate or 0),
            codec=stream.codec_context.name,
            pix_fmt=str(stream.codec_context.pix_fmt),
            size_bytes=Path(path).stat().st_size,
        )


def read_frames(path: Path) -> np.ndarray:
    """Decode an mp4 into uint8 RGB frames (N, H, W, 3)."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
