"""The engine equals diffusers' own WanPipeline once that is given the reference sigma grid."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler, WanPipeline

import wanserve.engine.vae as vae_module
from wanserve.engine.pipeline import GenerationSpec, WanEngine
from wanserve.engine.sampling import reference_sigmas
from wanserve.engine.video import pixels_to_uint8, to_uint8

Spec = Callable[..., GenerationSpec]


def run_diffusers(engine: WanEngine, spec: GenerationSpec, reference_grid: bool) -> np.ndarray:
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=spec.shift)
    if reference_grid:
        stock_set_timesteps = scheduler.set_timesteps

        def set_reference_timesteps(num_inference_steps: int, device: object = None, **kw: object) -> None:
            stock_set_timesteps(sigmas=reference_sigmas(num_inference_steps), device=device)

        scheduler.set_timesteps = set_reference_timesteps  # type: ignore[method-assign]
    p = engine.pipe
    pipe = WanPipeline(
        tokenizer=p.tokenizer,
        text_encoder=p.text_encoder,
        vae=p.vae,
        scheduler=scheduler,
        transformer=p.transformer,
        transformer_2=p.transformer_2,
        boundary_ratio=p.config.boundary_ratio,
    )
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt=spec.prompt,
        negative_prompt=spec.negative_prompt,
        height=spec.height,
        width=spec.width,
        num_frames=spec.num_frames,
        num_inference_steps=spec.num_inference_steps,
        guidance_scale=spec.guidance_scale,
        guidance_scale_2=spec.guidance_scale_2,
        generator=torch.Generator("cpu").manual_seed(spec.seed),
        output_type="np",
        max_sequence_length=512,
    )
    return np.asarray(out.frames[0], dtype=np.float32)


@pytest.mark.parametrize(("steps", "shift", "frames"), [(6, 5.0, 13), (4, 12.0, 9)])
def test_engine_is_bit_exact_with_wanpipeline_on_reference_grid(
    engine: WanEngine, small_spec: Spec, steps: int, shift: float, frames: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = small_spec(
        num_inference_steps=steps, shift=shift, num_frames=frames, guidance_scale=4.0, guidance_scale_2=3.0
    )
    # The engine's frames are uint8; the float pixels it rounds (as the VAE decoded them) are compared too.
    pixels: list[torch.Tensor] = []

    def keep_pixels(piece: torch.Tensor) -> torch.Tensor:
        pixels.append(piece.clone())
        return pixels_to_uint8(piece)

    monkeypatch.setattr(vae_module, "pixels_to_uint8", keep_pixels)
    ours = engine.generate(spec).frames
    ours_float = torch.cat(pixels, 1).permute(1, 2, 3, 0)[:frames].numpy()
    theirs = run_diffusers(engine, spec, reference_grid=True)
    assert ours.shape == theirs.shape == ours_float.shape == (frames, spec.height, spec.width, 3)
    assert np.array_equal(ours_float, theirs)
    assert np.array_equal(ours, to_uint8(theirs))
    # Stock diffusers (its own sigma grid) is measurably different: the comparison above has teeth.
    stock = run_diffusers(engine, spec, reference_grid=False)
    assert np.abs(stock - ours_float).max() > 1e-3
