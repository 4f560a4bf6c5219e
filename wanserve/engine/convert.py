"""`wanserve convert`: write an official Wan2.2 directory once in the diffusers layout (fast loads)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from wanserve.engine.loading import resolve_dtype
from wanserve.engine.model_dir import is_official_layout
from wanserve.engine.official import load_official_dir
from wanserve.errors import ModelLoadError


def convert_model(src: Path, dst: Path, dtype: str = "auto") -> Path:
    """Convert `src` into `dst` (created atomically). `auto` keeps the checkpoint's bf16 precision."""
    if not is_official_layout(src):
        raise ModelLoadError(f"{src} is not an official Wan2.2 directory (no high_noise_model/)")
    if dst.exists() and any(dst.iterdir()):
        raise ModelLoadError(f"destination {dst} exists and is not empty")
    torch_dtype = torch.bfloat16 if dtype == "auto" else resolve_dtype(dtype, torch.device("cpu"))
    pipe = load_official_dir(src, torch_dtype)
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}-", dir=dst.parent))
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        if dst.exists():
            dst.rmdir()
        os.rename(staging, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dst
