"""Model loading: a diffusers-format directory, the official Wan2.2 layout, or the built-in `tiny`.

Components are loaded one by one so that a missing or corrupt file fails with a message naming it,
and always with `local_files_only`: nothing is ever fetched from a model hub.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from diffusers.utils import logging as diffusers_logging
from transformers import AutoTokenizer, UMT5EncoderModel
from transformers.utils import logging as transformers_logging

from wanserve.engine.model_dir import model_dir
from wanserve.engine.sampling import BOUNDARY_RATIO
from wanserve.errors import ModelLoadError

# Our own logs report loading; library progress bars would only clutter worker logs and the CLI.
diffusers_logging.disable_progress_bar()
transformers_logging.disable_progress_bar()

T = TypeVar("T")

DIFFUSERS_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def device_problem(device: str) -> str | None:
    """Why `device` (a setting) cannot run here, in words; None when it can. Checked at a worker's start: torch
    itself would fail at the first CUDA call with an error that names neither the setting nor the GPU."""
    if device in ("auto", "cpu"):
        return None
    try:
        wanted = torch.device(device)
    except RuntimeError as exc:
        return f"device {device!r} is not a device torch knows ({exc})"
    if wanted.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return f"device {device} was asked for (--device or --gpus), but torch sees no CUDA GPU on this machine"
    count = torch.cuda.device_count()
    if wanted.index is not None and wanted.index >= count:
        return f"device {device} was asked for (--device or --gpus), but this machine has {count} GPU(s)"
    return None


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]


def load_component(name: str, path: Path, load: Callable[[], T]) -> T:
    """Run one loader; any failure becomes a ModelLoadError naming the component and its path."""
    try:
        return load()
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot load {name} from {path}: {type(exc).__name__}: {exc}") from exc


def _require_weights(name: str, folder: Path) -> None:
    if not folder.is_dir():
        raise ModelLoadError(f"model directory is incomplete: missing {name} folder {folder}")
    if not any((folder / w).is_file() for w in DIFFUSERS_WEIGHT_NAMES):
        raise ModelLoadError(
            f"model directory is incomplete: {name} folder {folder} has no weights "
            f"(expected one of {', '.join(DIFFUSERS_WEIGHT_NAMES[:2])})"
        )
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"model directory is incomplete: missing {folder / 'config.json'}")


def check_diffusers_dir(path: Path) -> tuple[dict[str, Any], list[str]]:
    """The model index of a complete diffusers-format Wan directory and its experts' folder names; ModelLoadError
    naming what is missing otherwise."""
    index_file = path / "model_index.json"
    try:
        index: dict[str, Any] = json.loads(index_file.read_text())
    except FileNotFoundError as exc:
        raise ModelLoadError(f"not a model directory: {index_file} is missing") from exc
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"corrupt {index_file}: {exc}") from exc

    def present(name: str) -> bool:
        entry = index.get(name)
        return isinstance(entry, list) and entry[0] is not None

    for required in ("tokenizer", "text_encoder", "vae", "scheduler"):
        if not present(required):
            raise ModelLoadError(f"{index_file} does not declare a {required}")
    experts = [name for name in ("transformer", "transformer_2") if present(name)]
    if not experts:
        raise ModelLoadError(f"{index_file} declares no transformer")
    for name in ("text_encoder", "vae", *experts):
        _require_weights(name, path / name)
    if not (path / "tokenizer").is_dir():
        raise ModelLoadError(f"model directory is incomplete: missing tokenizer folder {path / 'tokenizer'}")
    return index, experts


def load_diffusers_dir(path: Path, dtype: torch.dtype) -> WanPipeline:
    index, experts = check_diffusers_dir(path)

    kw: dict[str, Any] = {"local_files_only": True}
    tokenizer = load_component(
        "tokenizer", path / "tokenizer", lambda: AutoTokenizer.from_pretrained(path / "tokenizer", **kw)
    )
    text_encoder = load_component(
        "text_encoder",
        path / "text_encoder",
        lambda: UMT5EncoderModel.from_pretrained(path / "text_encoder", dtype=dtype, **kw),
    )
    # The VAE stays in float32: the reference decodes in float32 and bf16 decoding visibly bands.
    vae = load_component(
        "vae",
        path / "vae",
        lambda: AutoencoderKLWan.from_pretrained(path / "vae", torch_dtype=torch.float32, **kw),
    )
    scheduler = load_component(
        "scheduler",
        path / "scheduler",
        lambda: UniPCMultistepScheduler.from_pretrained(path / "scheduler", **kw),
    )

    def load_expert(folder: Path) -> WanTransformer3DModel:
        return WanTransformer3DModel.from_pretrained(folder, torch_dtype=dtype, **kw)

    loaded = {name: load_component(name, path / name, partial(load_expert, path / name)) for name in experts}
    # A two-expert model without the key is Wan 2.2 A14B's layout (0.875); a one-expert model has no boundary
    # (diffusers leaves it None): guidance_scale on every step, as in Wan 2.1.
    boundary = index.get("boundary_ratio", BOUNDARY_RATIO if len(experts) == 2 else None)
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder.eval(),
        vae=vae.eval(),
        scheduler=scheduler,
        transformer=loaded.get("transformer"),
        transformer_2=loaded.get("transformer_2"),
        boundary_ratio=boundary,
    )


def load_pipeline(source: str, cache_dir: Path, dtype: torch.dtype) -> WanPipeline:
    """Load `tiny`, a diffusers-format directory or an official Wan2.2 directory (converted on load)."""
    if source == "tiny":
        from wanserve.engine.tiny import ensure_tiny_model

        return load_diffusers_dir(ensure_tiny_model(cache_dir), dtype)
    path = model_dir(source)
    if (path / "model_index.json").is_file():
        return load_diffusers_dir(path, dtype)
    from wanserve.engine.official import load_official_dir

    return load_official_dir(path, dtype)
