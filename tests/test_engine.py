from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import WanPipeline
from engines import record_forwards

from wanserve.config import Settings
from wanserve.engine.loading import load_pipeline
from wanserve.engine.pipeline import GenerationSpec, StepProgress, WanEngine
from wanserve.engine.runner import EngineRunner
from wanserve.engine.sampling import Expert, reference_timesteps
from wanserve.engine.tiny import TinyConfig, build_vae
from wanserve.engine.vae import decode_latents, decode_video
from wanserve.engine.video import to_uint8
from wanserve.errors import GenerationCancelled, InvalidGenerationInput, NonFiniteOutput
from wanserve.schema import WanLoRAT2VRequest, WanT2VRequest

Spec = Callable[..., GenerationSpec]


def test_same_seed_same_frames_other_seed_differs(engine: WanEngine, small_spec: Spec) -> None:
    a = engine.generate(small_spec(seed=7))
    b = engine.generate(small_spec(seed=7))
    c = engine.generate(small_spec(seed=8))
    assert a.frames.shape == (9, 64, 96, 3)
    assert np.array_equal(a.frames, b.frames)
    assert not np.array_equal(a.frames, c.frames)
    assert a.seed == 7


def test_prompt_and_negative_prompt_matter(engine: WanEngine, small_spec: Spec) -> None:
    base = engine.generate(small_spec()).frames
    assert not np.array_equal(base, engine.generate(small_spec(prompt="a blue whale in the ocean")).frames)
    assert not np.array_equal(base, engine.generate(small_spec(negative_prompt="dark")).frames)


def test_experts_follow_the_boundary(engine: WanEngine, small_spec: Spec) -> None:
    spec = small_spec(num_inference_steps=8, shift=3.0)
    with record_forwards(engine) as calls:
        result = engine.generate(spec)
    expected_t = reference_timesteps(8, 3.0)
    assert [s.timestep for s in result.steps] == expected_t
    assert any(t >= 875 for t in expected_t) and any(t < 875 for t in expected_t)
    # Two forwards (cond + uncond) per step, by the expert that owns the timestep.
    assert [(e, t) for e, t, _ in calls] == [("high" if t >= 875 else "low", t) for t in expected_t for _ in range(2)]


@pytest.mark.parametrize(
    ("g1", "g2", "high_forwards", "low_forwards"),
    [(5.0, 1.0, 2, 1), (1.0, 4.0, 1, 2), (1.0, 1.0, 1, 1), (0.5, 3.0, 1, 2)],
)
def test_guidance_is_per_expert(
    engine: WanEngine, small_spec: Spec, g1: float, g2: float, high_forwards: int, low_forwards: int
) -> None:
    spec = small_spec(num_inference_steps=6, guidance_scale=g1, guidance_scale_2=g2)
    with record_forwards(engine) as calls:
        engine.generate(spec)
    timesteps = reference_timesteps(6, 5.0)
    high = [t for t in timesteps if t >= 875]
    low = [t for t in timesteps if t < 875]
    assert sum(1 for e, _, _ in calls if e == "high") == high_forwards * len(high)
    assert sum(1 for e, _, _ in calls if e == "low") == low_forwards * len(low)


def test_a_single_expert_model_runs_every_step_with_guidance_scale(model_cache: Path, small_spec: Spec) -> None:
    """A pipeline with one transformer and no boundary (Wan 2.1-style) runs it at every step with `guidance_scale`,
    as diffusers does; `guidance_scale_2` belongs to a second expert it does not have."""
    p = load_pipeline("tiny", model_cache, torch.float32)
    single = WanPipeline(tokenizer=p.tokenizer, text_encoder=p.text_encoder, vae=p.vae, scheduler=p.scheduler,
                         transformer=p.transformer, transformer_2=None, boundary_ratio=None)  # fmt: skip
    engine = WanEngine(single, torch.device("cpu"))
    result = engine.generate(small_spec(num_inference_steps=3, guidance_scale=5.0, guidance_scale_2=1.0))
    assert [(s.expert, s.guidance_scale) for s in result.steps] == [(Expert.HIGH, 5.0)] * 3
    other = engine.generate(small_spec(num_inference_steps=3, guidance_scale=9.0, guidance_scale_2=1.0))
    assert not np.array_equal(result.frames, other.frames)


def test_guidance_scale_values_change_the_output(engine: WanEngine, small_spec: Spec) -> None:
    base = engine.generate(small_spec()).frames
    assert not np.array_equal(base, engine.generate(small_spec(guidance_scale_2=2.0)).frames)
    assert not np.array_equal(base, engine.generate(small_spec(guidance_scale=3.0)).frames)
    assert not np.array_equal(base, engine.generate(small_spec(shift=9.0)).frames)


def test_frame_count_rule_and_exact_count(engine: WanEngine, small_spec: Spec) -> None:
    result = engine.generate(small_spec(num_frames=10, num_inference_steps=2))
    assert result.frames_generated == 13
    assert result.frames.shape[0] == 10


def test_reverse_video_reverses_frame_order(engine: WanEngine, small_spec: Spec) -> None:
    forward = engine.generate(small_spec(num_inference_steps=3)).frames
    backward = engine.generate(small_spec(num_inference_steps=3, reverse_video=True)).frames
    assert np.array_equal(backward, forward[::-1])
    assert not np.array_equal(backward, forward)


def test_progress_callback_reports_every_step(engine: WanEngine, small_spec: Spec) -> None:
    seen: list[StepProgress] = []
    engine.generate(small_spec(num_inference_steps=5, guidance_scale_2=1.0), on_step=seen.append)
    assert [p.step for p in seen] == [1, 2, 3, 4, 5]
    assert all(p.total == 5 for p in seen)
    assert seen[0].expert is Expert.HIGH and seen[-1].expert is Expert.LOW
    assert [p.forwards for p in seen] == [2 if p.expert is Expert.HIGH else 1 for p in seen]
    assert all(p.seconds > 0 for p in seen) and seen[-1].eta_seconds == 0
    assert seen[-1].elapsed >= sum(p.seconds for p in seen) * 0.99


def test_cancel_between_steps_skips_decode(engine: WanEngine, small_spec: Spec) -> None:
    steps: list[int] = []
    decoded: list[bool] = []
    original_decode = engine.pipe.vae.decode
    engine.pipe.vae.decode = lambda *a, **k: decoded.append(True) or original_decode(*a, **k)  # type: ignore[method-assign]
    try:
        with record_forwards(engine) as calls, pytest.raises(GenerationCancelled):
            engine.generate(
                small_spec(num_inference_steps=6),
                on_step=lambda p: steps.append(p.step),
                is_cancelled=lambda: len(steps) >= 2,
            )
    finally:
        del engine.pipe.vae.decode
    assert steps == [1, 2]
    assert len(calls) == 4  # two steps with CFG, nothing after the cancel
    assert decoded == []


def test_spec_from_request_uses_table_and_seed() -> None:
    req = WanT2VRequest(prompt="p", resolution="480p", aspect_ratio="9:16", num_frames=90, seed=42)
    spec = GenerationSpec.from_request(req)
    assert (spec.width, spec.height, spec.num_frames, spec.seed) == (480, 832, 90, 42)
    assert spec.reverse_video is False
    drawn = {GenerationSpec.from_request(WanT2VRequest(prompt="p")).seed for _ in range(5)}
    assert len(drawn) > 1 and all(0 <= s < 2**31 for s in drawn)
    assert GenerationSpec.from_request(WanLoRAT2VRequest(prompt="p", reverse_video=True)).reverse_video


def test_sizes_the_model_cannot_make_are_refused(engine: WanEngine, small_spec: Spec) -> None:
    with pytest.raises(InvalidGenerationInput, match="multiples of 16"):
        engine.generate(small_spec(width=100))


@pytest.mark.parametrize(("steps", "shift"), [(4, 12.0), (6, 5.0), (40, 12.0), (30, 5.0)])
def test_engine_feeds_the_model_reference_timesteps(
    engine: WanEngine, small_spec: Spec, steps: int, shift: float
) -> None:
    sigmas = np.linspace(float(np.float32(0.999)), 0, steps + 1)[:-1]  # DESIGN.md section 4
    expected = [int(t) for t in (shift * sigmas / (1 + (shift - 1) * sigmas) * 1000).astype(np.int64)]
    spec = small_spec(num_inference_steps=steps, shift=shift, guidance_scale=1.0, guidance_scale_2=1.0)
    with record_forwards(engine) as calls:
        engine.generate(spec)
    assert [t for _, t, _ in calls] == expected


@pytest.mark.parametrize("tiled", [False, True])
def test_decode_video_gives_diffusers_pixels_piece_by_piece(tiled: bool) -> None:
    """decode_video's uint8 frames are diffusers' float video through [-1, 1] -> [0, 1] -> uint8; each piece reaches
    the host as soon as it is decoded, and latent frames past the requested count are never decoded."""
    torch.manual_seed(0)
    vae = build_vae(TinyConfig(vae="fast")).eval()
    patch = vae.config.scale_factor_spatial
    z = torch.randn(1, 16, 5, 64 // patch, 96 // patch) * 2  # 17 frames
    with torch.no_grad():
        video = vae.decode(z, return_dict=False)[0]
        want = to_uint8((video[0].permute(1, 2, 3, 0) / 2 + 0.5).numpy())
        if tiled:  # diffusers' tiled decode (the offload policy's) makes the whole video at once: one piece
            vae.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32)
            want = to_uint8((vae.decode(z, return_dict=False)[0][0].permute(1, 2, 3, 0) / 2 + 0.5).numpy())
        height, width = want.shape[1:3]
        decoder_calls: list[int] = []
        vae.decoder.register_forward_hook(lambda *_: decoder_calls.append(1))
        pieces: list[tuple[int, np.ndarray]] = []
        got = decode_video(vae, z, 17, on_frames=lambda frames: pieces.append((len(decoder_calls), frames)))
        assert got.dtype == np.uint8 and got.shape == (17, height, width, 3)
        assert np.array_equal(got, want)
        assert np.array_equal(np.concatenate([frames for _, frames in pieces]), got)
        if tiled:
            assert len(pieces) == 1
        else:  # the first frame, then 4 per latent frame, each handed over right after its own decoder call
            assert [(calls, len(frames)) for calls, frames in pieces] == [(1, 1), (2, 4), (3, 4), (4, 4), (5, 4)]
            decoder_calls.clear()
            assert np.array_equal(decode_video(vae, z, 6), want[:6])
            assert len(decoder_calls) == 3  # frames 1-5 and 6-9 need latent frames 0-2; 3 and 4 are left alone


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR: out of memory"),  # a library's own allocation
    ],
)
def test_an_untiled_decode_out_of_gpu_memory_goes_on_tiled(error: Exception) -> None:
    """The per-decode memory forecast can be wrong: an out-of-memory error partway through an untiled decode
    finishes the video with the tiled decode, and the mp4 sink still gets every frame once, in order."""
    torch.manual_seed(0)
    vae = build_vae(TinyConfig(vae="fast")).eval()
    patch = vae.config.scale_factor_spatial
    z = torch.randn(1, 16, 5, 64 // patch, 96 // patch) * 2  # 17 frames
    with torch.no_grad():
        untiled = decode_video(vae, z, 17, tiled=False)
        vae.tile_sample_min_height = vae.tile_sample_min_width = 32  # so that tiling changes the pixels
        vae.tile_sample_stride_height = vae.tile_sample_stride_width = 16
        tiled = decode_video(vae, z, 17, tiled=True)
        assert not np.array_equal(tiled, untiled)
        decoder = vae.decoder.forward
        calls: list[bool] = []
        raised = [error]

        def runs_out_on_the_third_call(*args: Any, **kwargs: Any) -> Any:
            calls.append(vae.use_tiling)
            if len(calls) == 3:
                raise raised[0]
            return decoder(*args, **kwargs)

        vae.decoder.forward = runs_out_on_the_third_call
        pieces: list[np.ndarray] = []
        got = decode_video(vae, z, 17, on_frames=pieces.append, tiled=False)
    assert not vae.use_tiling  # as it was before
    assert [len(p) for p in pieces] == [1, 4, 12]  # two untiled pieces, then the rest of the tiled video
    assert np.array_equal(got, np.concatenate(pieces))
    assert np.array_equal(got[:5], untiled[:5]) and np.array_equal(got[5:], tiled[5:])
    assert calls[:3] == [False, False, False] and all(calls[3:])
    # A tiled decode that runs out has nothing smaller to fall back to.
    calls.clear()
    with torch.no_grad(), pytest.raises(type(error)):
        decode_video(vae, z, 17, tiled=True)
    # The mp4 writer running out of host memory is not the decode's failure: no fallback (it would skip frames).
    vae.decoder.forward = decoder

    sunk: list[int] = []

    def sink_out_of_memory_once(frames: np.ndarray) -> None:
        sunk.append(len(frames))
        if len(sunk) == 2:
            raise MemoryError

    with torch.no_grad(), pytest.raises(MemoryError):
        decode_video(vae, z, 17, on_frames=sink_out_of_memory_once, tiled=False)
    assert sunk == [1, 4]
    vae.decoder.forward = runs_out_on_the_third_call
    # Any other error is not an allocation failure: it fails the decode as before.
    calls.clear()
    raised[0] = RuntimeError("cuDNN error: CUDNN_STATUS_BAD_PARAM")
    with torch.no_grad(), pytest.raises(RuntimeError, match="BAD_PARAM"):
        decode_video(vae, z, 17, tiled=False)


def test_non_finite_latents_fail_with_a_reason(
    engine: WanEngine, small_spec: Spec, caplog: pytest.LogCaptureFixture
) -> None:
    """NaN would become black pixels in uint8 without a word: the engine refuses to decode it. The caller reads why;
    the engine's set-up (memory, kernels) goes to the operator's log only."""
    hooks = [
        expert.proj_out.register_forward_hook(lambda _m, _a, out: torch.full_like(out, float("nan")))
        for expert in (engine.pipe.transformer, engine.pipe.transformer_2)
    ]
    try:
        with pytest.raises(NonFiniteOutput, match="NaN or infinite") as raised, caplog.at_level("ERROR"):
            engine.generate(small_spec(num_inference_steps=2))
        assert engine.describe() not in str(raised.value)
        assert any(engine.describe() in record.getMessage() for record in caplog.records)
    finally:
        for hook in hooks:
            hook.remove()
    assert engine.generate(small_spec(num_inference_steps=2)).frames.any()


def test_a_failed_generation_leaves_no_video(
    engine: WanEngine, model_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mp4 writer starts before the engine does: an engine error (here after some frames reached it) leaves no
    file behind, neither the video nor the writer's temporary."""

    def half_a_video_then_fail(spec: GenerationSpec, *args: object, sink: Any = None, **kwargs: object) -> None:
        sink.write(np.zeros((5, spec.height, spec.width, 3), np.uint8))
        raise NonFiniteOutput("the denoised video holds NaN")

    monkeypatch.setattr(engine, "generate", half_a_video_then_fail)
    runner = EngineRunner(engine, Settings(cache_dir=model_cache))
    with pytest.raises(NonFiniteOutput):
        runner.generate_video(WanT2VRequest(prompt="a fox"), tmp_path / "v.mp4")
    assert list(tmp_path.iterdir()) == []


def test_sink_gets_the_frames_in_playback_order(engine: WanEngine, small_spec: Spec) -> None:
    """The mp4 writer is given every frame of the result, in order; a reversed video's only when all are decoded."""

    class Sink:
        def __init__(self) -> None:
            self.pieces: list[np.ndarray] = []

        def write(self, frames: np.ndarray) -> None:
            self.pieces.append(frames.copy())

    for reverse in (False, True):
        sink = Sink()
        result = engine.generate(small_spec(num_frames=10, num_inference_steps=2, reverse_video=reverse), sink=sink)
        assert result.frames.dtype == np.uint8 and result.frames.shape == (10, 64, 96, 3)
        assert np.array_equal(np.concatenate(sink.pieces), result.frames)
        assert [len(p) for p in sink.pieces] == ([10] if reverse else [1, 4, 4, 1])


@pytest.mark.parametrize("layout", ["fast", "coarse", "wan2.1"])
def test_our_vae_decode_is_diffusers_decode_bit_for_bit(layout: str) -> None:
    """decode_latents joins the frames once instead of once per frame; the values must not change at all."""
    torch.manual_seed(0)
    vae = build_vae(TinyConfig(vae=layout)).eval()
    patch = vae.config.scale_factor_spatial
    z = torch.randn(1, 16, 4, 64 // patch, 96 // patch) * 2
    with torch.no_grad():
        ours = decode_latents(vae, z)
        theirs = vae.decode(z, return_dict=False)[0]
        assert ours.shape == theirs.shape == (1, 3, 13, 64, 96)
        assert torch.equal(ours, theirs)
        assert ours.abs().max() > 0.1  # a real picture, not zeros
        vae.enable_tiling()  # what the tiled policy uses: diffusers' own decode
        assert torch.equal(decode_latents(vae, z), vae.decode(z, return_dict=False)[0])
