"""Where a model lives on disk and in which layout, found without torch: `wanserve serve` checks `--model` with this
before starting its workers, and the API process never loads torch."""

from __future__ import annotations

from pathlib import Path

from wanserve.errors import ModelLoadError


def is_official_layout(path: Path) -> bool:
    return (path / "high_noise_model").is_dir() or (path / "low_noise_model").is_dir()


def model_dir(source: str) -> Path:
    """The directory of a model `source` other than `tiny`, in a layout `loading.load_pipeline` reads;
    ModelLoadError saying what is wrong otherwise. Cheap (no weights read)."""
    path = Path(source).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"model path {path} is not a directory (use `tiny` for the built-in model)")
    if not (path / "model_index.json").is_file() and not is_official_layout(path):
        raise ModelLoadError(
            f"not a model directory: {path} has neither model_index.json (diffusers layout) nor "
            "high_noise_model/ and low_noise_model/ (official Wan2.2 layout)"
        )
    return path
