from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from wanserve.engine.loading import load_pipeline
from wanserve.engine.pipeline import GenerationSpec, WanEngine

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def engine(model_cache: Path) -> WanEngine:
    """The built-in tiny model, loaded through the same code path as a real checkpoint."""
    return WanEngine(load_pipeline("tiny", model_cache, torch.float32), torch.device("cpu"))


@pytest.fixture
def small_spec() -> Callable[..., GenerationSpec]:
    """A spec at a small size (engine tests): the behaviour is size-independent, the cost is not."""

    def make(**overrides: object) -> GenerationSpec:
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

    return make
