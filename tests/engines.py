"""Tiny engines and small generation specs for the engine tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from wanserve.engine.loading import load_pipeline
from wanserve.engine.pipeline import EngineOptions, GenerationSpec, WanEngine


def tiny_engine(model_cache: Path, **options: object) -> WanEngine:
    """A fresh tiny pipeline per engine: presets and memory policies change the experts in place."""
    pipe = load_pipeline("tiny", model_cache, torch.float32)
    return WanEngine(pipe, torch.device("cpu"), EngineOptions(**options))  # type: ignore[arg-type]


def rel_error(got: torch.Tensor | np.ndarray, want: torch.Tensor | np.ndarray) -> float:
    """||got - want|| / ||want||, in float64: frames are uint8, whose differences would wrap around."""
    a = got.detach().double().numpy() if isinstance(got, torch.Tensor) else np.asarray(got, dtype=np.float64)
    b = want.detach().double().numpy() if isinstance(want, torch.Tensor) else np.asarray(want, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def small_spec(**overrides: object) -> GenerationSpec:
    """A spec at a small size: engine behaviour is size-independent, the cost is not. 6 steps at shift 5 by
    default; CFG on both experts."""
    base: dict[str, object] = dict(
        prompt="a red fox walks through snow",
        negative_prompt="blurred, static",
        width=96,
        height=64,
        num_frames=9,
        num_inference_steps=6,
        guidance_scale=5.0,
        guidance_scale_2=4.0,
        shift=5.0,
        seed=1234,
    )
    base.update(overrides)
    return GenerationSpec(**base)  # type: ignore[arg-type]


@contextmanager
def record_forwards(engine: WanEngine) -> Iterator[list[tuple[str, int, int]]]:
    """Record (expert, timestep, batch size) of every real forward call of either expert."""
    calls: list[tuple[str, int, int]] = []
    handles = []
    for name, model in (("high", engine.pipe.transformer), ("low", engine.pipe.transformer_2)):

        def hook(_m: torch.nn.Module, _args: tuple, kwargs: dict, name: str = name) -> None:
            calls.append((name, int(kwargs["timestep"][0]), int(kwargs["hidden_states"].shape[0])))

        handles.append(model.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()
