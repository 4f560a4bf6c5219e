"""Full-size videos from the tiny model: the mp4 the user gets is what the request asked for."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from wanserve.config import Settings
from wanserve.engine.loading import load_pipeline
from wanserve.engine.pipeline import WanEngine
from wanserve.engine.runner import EngineRunner
from wanserve.engine.video import Mp4Writer, encode_mp4, probe_mp4, read_frames, to_uint8
from wanserve.schema import WanLoRAT2VRequest


@pytest.fixture(scope="module")
def runner(model_cache: Path, coarse_model: Path) -> EngineRunner:
    """The `coarse` tiny model: frame counts, sizes and rates do not depend on the VAE's cost (a third here)."""
    engine = WanEngine(load_pipeline(str(coarse_model), model_cache, torch.float32), torch.device("cpu"))
    return EngineRunner(engine, Settings(cache_dir=model_cache))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("num_frames", "aspect_ratio", "fps", "size"),
    [
        (81, "16:9", 16, (832, 480)),
        (82, "9:16", 24, (480, 832)),
        (100, "1:1", 4, (640, 640)),
        (121, "16:9", 10, (832, 480)),
    ],
)
def test_mp4_has_exact_frames_fps_and_size(
    runner: EngineRunner, tmp_path: Path, num_frames: int, aspect_ratio: str, fps: int, size: tuple[int, int]
) -> None:
    request = WanLoRAT2VRequest(
        prompt="a red fox walks through snow",
        resolution="480p",
        aspect_ratio=aspect_ratio,
        num_frames=num_frames,
        frames_per_second=fps,
        num_inference_steps=1,
        guidance_scale=1.0,
        seed=5,
    )
    result = runner.generate_video(request, tmp_path / "v.mp4")
    info = probe_mp4(tmp_path / "v.mp4")
    assert info.num_frames == num_frames == result.video.num_frames
    assert (info.width, info.height) == size
    assert info.fps == fps
    assert info.codec == "h264" and info.pix_fmt == "yuv420p"
    assert result.generation.frames_generated == num_frames + (-(num_frames - 1)) % 4
    assert result.seed == 5


def test_encode_is_h264_faststart_and_faithful(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    # Smooth gradients (encodable) with a per-frame brightness ramp so frame order is visible.
    y, x = np.mgrid[0:64, 0:96]
    frames = np.stack([np.dstack([x / 96, y / 64, np.full_like(x, i / 12.0, dtype=float)]) for i in range(12)])
    frames = (frames + rng.normal(0, 0.01, frames.shape)).astype(np.float32)
    info = encode_mp4(frames, tmp_path / "a.mp4", fps=8, crf=10)
    assert (info.num_frames, info.width, info.height, info.fps) == (12, 96, 64, 8.0)
    data = (tmp_path / "a.mp4").read_bytes()
    # +faststart: the moov atom comes before the media data, so browsers can start playing at once.
    assert 0 < data.find(b"moov") < data.find(b"mdat")
    decoded = read_frames(tmp_path / "a.mp4").astype(np.float32) / 255
    assert np.abs(decoded - frames).mean() < 0.03
    blue = decoded[..., 2].mean(axis=(1, 2))
    assert np.all(np.diff(blue) > 0)  # frame order preserved
    assert not list(tmp_path.glob(".*.part"))  # no temporary left behind


def test_encode_rejects_bad_shapes(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        encode_mp4(np.zeros((3, 63, 64, 3), np.float32), tmp_path / "x.mp4", fps=8)
    with pytest.raises(ValueError):
        encode_mp4(np.zeros((3, 64, 64), np.float32), tmp_path / "x.mp4", fps=8)
    assert not (tmp_path / "x.mp4").exists()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_to_uint8_rounds_as_numpy_does(dtype: type) -> None:
    """The threaded conversion gives numpy's bytes: clip to [0, 1], x255, round half to even."""
    halves = (np.arange(256) + 0.5) / 255.0  # each value lands on k + 0.5 (or next to it in float)
    edges = np.array([0.0, 1.0, -0.1, 1.2, 1e-9, 0.999999, 0.5, 2 / 255, 254.5 / 255])
    rng = np.random.default_rng(3)
    values = np.concatenate([halves, edges, rng.uniform(-0.2, 1.2, 3 * 64 * 2 - 265)]).astype(dtype)
    frames = values.reshape(2, 8, 8, 3)
    want = (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    got = to_uint8(frames)
    assert got.dtype == np.uint8 and np.array_equal(got, want)
    reversed_view = frames[::-1]  # negative strides, as a reversed video is before it is copied
    assert np.array_equal(to_uint8(reversed_view), want[::-1])
    assert to_uint8(want) is want


def _noisy_frames(count: int, height: int = 64, width: int = 96) -> np.ndarray:
    return (np.random.default_rng(count).random((count, height, width, 3)) * 255).astype(np.uint8)


def _moving_frames(count: int, height: int = 64, width: int = 96) -> np.ndarray:
    """Smooth frames (what an encoder keeps) whose content moves frame to frame, so that a lost, doubled or
    swapped frame shows."""
    y, x = np.mgrid[0:height, 0:width]
    frames = [np.dstack([(x + 5 * i) % width / width, y / height, np.full(x.shape, i / count)]) for i in range(count)]
    return to_uint8(np.stack(frames).astype(np.float32))


def test_writer_in_pieces_makes_the_same_video(tmp_path: Path) -> None:
    """Pieces written as the VAE decodes them give the video one write of the whole video gives."""
    frames = _moving_frames(13)
    whole = encode_mp4(frames, tmp_path / "whole.mp4", fps=8)
    with Mp4Writer(tmp_path / "pieces.mp4", fps=8) as writer:
        for start, stop in [(0, 1), (1, 5), (5, 9), (9, 13)]:
            writer.write(frames[start:stop])
        assert not (tmp_path / "pieces.mp4").exists()  # only close() puts it in place
        info = writer.close()
    assert (info.num_frames, info.width, info.height) == (whole.num_frames, 96, 64) == (13, 96, 64)
    # Not bit for bit: libx264's output for the same frames was seen to differ between two encodes in a long
    # CI run (neither bytes nor decoded frames were repeatable there). What must hold: every frame, in order,
    # as close to its source as the whole-video encode is.
    pieces, whole_frames = (read_frames(tmp_path / name).astype(np.float32) for name in ("pieces.mp4", "whole.mp4"))
    source = frames.astype(np.float32)
    distance = np.abs(pieces[:, None] - source[None]).mean(axis=(2, 3, 4))  # decoded frame x source frame
    assert list(distance.argmin(axis=1)) == list(range(13))
    error_of_pieces, error_of_whole = np.abs(pieces - source).mean(), np.abs(whole_frames - source).mean()
    assert error_of_pieces < 4.0 and error_of_pieces < 1.1 * error_of_whole  # levels of 255
    assert np.abs(pieces - whole_frames).mean() < 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pieces.mp4", "whole.mp4"]
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "pieces.mp4").stat().st_mode) == 0o666 & ~mask  # as any new file, not 0600
    with pytest.raises(RuntimeError, match="already closed"):
        writer.write(frames)


def test_writer_leaves_nothing_when_aborted_or_left(tmp_path: Path) -> None:
    with Mp4Writer(tmp_path / "a.mp4", fps=8) as writer:
        writer.write(_noisy_frames(5))
        writer.abort()
    with pytest.raises(KeyError), Mp4Writer(tmp_path / "b.mp4", fps=8) as writer:  # the safety checker raising
        writer.write(_noisy_frames(5))
        raise KeyError("flagged")
    with Mp4Writer(tmp_path / "c.mp4", fps=8) as writer, pytest.raises(ValueError, match="at least one frame"):
        assert list(tmp_path.iterdir()) == []  # nothing on disk before the first frames (a kill while denoising)
        writer.write(_noisy_frames(0))  # an empty piece is no frame
        writer.close()
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_pieces_of_another_size(tmp_path: Path) -> None:
    with Mp4Writer(tmp_path / "a.mp4", fps=8) as writer:
        writer.write(_noisy_frames(2))
        with pytest.raises(ValueError, match="96x64"):
            writer.write(_noisy_frames(2, 64, 64))
        with pytest.raises(ValueError, match="even"):
            writer.write(_noisy_frames(2, 63, 96))
        assert writer.close().num_frames == 2


def test_writer_hands_the_encoders_error_to_the_caller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error on the encoding thread (here a full disk in the third piece) reaches the caller as raised, errno and
    all, by a later write or by close(); a caller still writing never waits on the dead encoder; nothing is left."""
    real = av.VideoFrame.from_ndarray
    calls = 0

    def full_disk_on_ninth(frame: np.ndarray, format: str) -> av.VideoFrame:
        nonlocal calls
        calls += 1
        if calls == 9:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(frame, format=format)

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", full_disk_on_ninth)
    with Mp4Writer(tmp_path / "a.mp4", fps=8, max_pending=1) as writer:
        with pytest.raises(OSError) as raised:
            for _ in range(200):  # far more pieces than the queue holds: a blocked put would hang here
                writer.write(_noisy_frames(4))
        assert raised.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as again:
            writer.close()
        assert again.value is raised.value
    assert list(tmp_path.iterdir()) == []
