"""One loaded model plus the video encoder: what the CLI and the worker call to make an mp4."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from wanserve.config import Settings
from wanserve.engine.loading import load_pipeline, resolve_device, resolve_dtype
from wanserve.engine.pipeline import (
    CancelCheck,
    GenerationResult,
    GenerationSpec,
    StepCallback,
    WanEngine,
)
from wanserve.engine.video import VideoInfo, encode_mp4
from wanserve.schema import WanT2VRequest


@dataclass
class VideoResult:
    seed: int
    video: VideoInfo
    generation: GenerationResult


class EngineRunner:
    def __init__(self, engine: WanEngine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings

    @classmethod
    def from_settings(cls, settings: Settings) -> EngineRunner:
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        pipe = load_pipeline(settings.model, settings.cache_dir, dtype)
        return cls(WanEngine(pipe, device), settings)

    def generate_video(
        self,
        request: WanT2VRequest,
        output: Path,
        on_step: StepCallback | None = None,
        is_cancelled: CancelCheck | None = None,
        on_phase: Callable[[str], None] | None = None,
    ) -> VideoResult:
        """`on_phase` is told (in words) when the work moves on to a stage without steps (the mp4 encode)."""
        spec = GenerationSpec.from_request(request)
        result = self.engine.generate(spec, on_step=on_step, is_cancelled=is_cancelled)
        if on_phase is not None:
            on_phase(f"Encoding {len(result.frames)} frames to H.264 mp4")
        video = encode_mp4(
            result.frames,
            output,
            fps=spec.frames_per_second,
            crf=self.settings.video_crf,
            preset=self.settings.video_preset,
        )
        return VideoResult(seed=result.seed, video=video, generation=result)
