"""`wanserve convert`: write an official Wan2.2 directory once in the diffusers layout (fast loads)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from wanserve.engine.loading import is_official_layout, resolve_dtype
from wanserve.engine.official import load_official_dir
from wanserve.errors import ModelLoadError


def convert_model(src: Path, dst: Path, dtype: str | None = None) -> Path:
    if not is_official_layout(src):
        raise ModelLoadError(f"{src} is not an official Wan2.2 directory (no high_noise_model/)")
    if dst.exists() and any(dst.iterdir()):
        raise ModelLoadError(f"destination {dst} exists and is not empty")
    torch_dtype = resolve_dtype(dtype or "auto", __import__("torch").device("cpu"))
    if dtype in (None, "auto"):
        # Keep the checkpoint's own precision rather than CPU-default float32.
        torch_dtype = __import__("torch").bfloat16
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
