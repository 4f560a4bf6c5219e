"""One loaded model plus the video encoder: what the CLI and the worker call to make an mp4."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from wanserve.config import Settings
from wanserve.engine.loading import load_pipeline, resolve_device, resolve_dtype
from wanserve.engine.lora import LoraFormat, LoraLoad
from wanserve.engine.parallel import ParallelContext
from wanserve.engine.pipeline import (
    CancelCheck,
    EngineOptions,
    GenerationResult,
    GenerationSpec,
    StepCallback,
    WanEngine,
)
from wanserve.engine.video import Mp4Writer, VideoInfo
from wanserve.lora.sources import PEFT_CONFIG, LoraUse
from wanserve.schema import Resolution, WanT2VRequest


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
    def from_settings(cls, settings: Settings, parallel: ParallelContext | None = None) -> EngineRunner:
        """`parallel`: this process's share of a multi-GPU worker (wanserve.worker.group)."""
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        pipe = load_pipeline(settings.model, settings.cache_dir, dtype)
        return cls(WanEngine(pipe, device, engine_options(settings), parallel=parallel), settings)

    def warm_up(self, on_phase: Callable[[str], None] | None = None) -> list[str]:
        """Run the settings' warm-up resolutions once so that compilation happens now rather than in a request:
        81 frames, 2 steps, one per expert, the first with CFG (batch 2) and the second without (batch 1, the
        distilled-LoRA shape; the experts share compiled graphs), then the VAE. Returns the resolutions warmed."""
        resolutions = warmup_resolutions(self.settings.warmup, self.engine.speed.compile)
        for resolution in resolutions:
            if on_phase is not None:
                on_phase(f"Warm-up: {resolution}, 81 frames ({self.engine.describe()})")
            request = WanT2VRequest.model_validate(
                {
                    "prompt": "warm-up",
                    "resolution": resolution,
                    "num_inference_steps": 2,
                    "guidance_scale_2": 1.0,
                    "seed": 0,
                }
            )
            self.engine.generate(GenerationSpec.from_request(request))
        return resolutions

    def generate_video(
        self,
        request: WanT2VRequest,
        output: Path,
        on_step: StepCallback | None = None,
        is_cancelled: CancelCheck | None = None,
        on_phase: Callable[[str], None] | None = None,
        loras: Sequence[LoraUse] = (),
        check_frames: Callable[[np.ndarray], None] | None = None,
    ) -> VideoResult:
        """`on_phase` is told (in words) when the work moves on to a stage without steps (LoRA loading, the
        mp4's last frames). `loras` are the request's LoRAs resolved to files. `check_frames` (the safety checker)
        sees the frames before the video is made, and raises to stop it: the mp4, encoded as the frames were
        decoded, never appears at `output`."""
        if loras:
            loads = self.engine.loras.load(loras)
            if on_phase is not None:
                for i, load in enumerate(loads):
                    on_phase(describe_load(i, len(loads), load))
        spec = GenerationSpec.from_request(request, loras=tuple(loras))
        s = self.settings
        with Mp4Writer(output, fps=spec.frames_per_second, crf=s.video_crf, preset=s.video_preset) as writer:
            result = self.engine.generate(spec, on_step=on_step, is_cancelled=is_cancelled, sink=writer)
            if check_frames is not None:
                if on_phase is not None:
                    on_phase("Safety checker: checking the video's frames")
                check_frames(result.frames)
            if on_phase is not None:
                on_phase(f"Encoding: finishing the H.264 mp4 of {len(result.frames)} frames")
            video = writer.close()
        return VideoResult(seed=result.seed, video=video, generation=result)


def describe_load(index: int, count: int, load: LoraLoad) -> str:
    """One log line on how LoRA `index` of a request was made ready."""
    head = f"LoRA {index + 1}/{count} ({load.use.label})"
    if not load.loaded_into:
        return f"{head}: already loaded in memory, applied at scale {load.use.scale:g}"
    experts = " and ".join(load.loaded_into)
    ignored = f", {load.ignored} deltas no LoRA can apply ignored" if load.ignored else ""
    # A PEFT adapter's alpha lives in its adapter_config.json, found only beside a local or Hub file: a URL or an
    # upload of the weights alone runs at alpha = rank, which may be another strength than it was trained at.
    unscaled = (
        f"; no {PEFT_CONFIG} came with it, so alpha = rank: if it was trained with another alpha, give it from a "
        f"Hugging Face repo or a server folder holding that file, or save it in diffusers' format (alpha inside)"
        if load.format is LoraFormat.PEFT and load.use.file.peft_config is None
        else ""
    )
    return (
        f"{head}: loaded into the {experts}-noise expert{'s' if len(load.loaded_into) > 1 else ''} in "
        f"{load.seconds:.2f}s ({load.format} format, {load.tensors} tensors{ignored}), scale {load.use.scale:g}"
        f"{unscaled}"
    )


def engine_options(settings: Settings) -> EngineOptions:
    return EngineOptions(
        preset=settings.preset,
        memory_policy=settings.memory_policy,
        compile=settings.compile,
        attention=settings.attention,
        compile_cache_dir=settings.resolved_compile_cache_dir(),
        step_cache_threshold=settings.step_cache_threshold,
        lora_memory_bytes=settings.lora_memory_bytes,
    )


def warmup_resolutions(setting: Sequence[str], compiling: bool) -> list[str]:
    """`auto` means the common sizes when compiling (a first request would otherwise compile) and none when not."""
    out: list[str] = []
    for item in setting:
        common = [Resolution.P480.value, Resolution.P720.value] if compiling else []
        for resolution in common if item == "auto" else [item]:
            if resolution not in out:
                out.append(resolution)
    return out
