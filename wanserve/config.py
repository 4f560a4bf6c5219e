"""One typed settings object. Environment variables use the WANSERVE_ prefix; CLI flags override them."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "wanserve"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WANSERVE_", extra="ignore")

    model: str = Field("tiny", description="`tiny` (built-in test model) or a model directory.")
    device: str = Field("auto", description="`auto`, `cpu`, `cuda` or `cuda:N`.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights dtype of the experts and text encoder (auto: bf16 on GPU, fp32 on CPU)."
    )
    cache_dir: Path = Field(default_factory=_default_cache_dir, description="Where built models are cached.")
    video_crf: int = Field(18, ge=0, le=51, description="H.264 constant rate factor of output videos.")
    video_preset: str = Field("veryfast", description="x264 preset of output videos.")
