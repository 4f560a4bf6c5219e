from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import WanPipeline
from diffusers.loaders.single_file_utils import (
    convert_wan_transformer_to_diffusers,
    convert_wan_vae_to_diffusers,
)
from official_layout import expert_to_official, vae_to_official, write_official_layout

from wanserve.cli import main as cli_main
from wanserve.engine.loading import load_pipeline
from wanserve.engine.official import T5_FILE, VAE_FILE
from wanserve.engine.pipeline import GenerationSpec, WanEngine
from wanserve.engine.tiny import TinyConfig, build_tiny_pipeline, ensure_tiny_model
from wanserve.errors import ModelLoadError

Spec = Callable[..., GenerationSpec]


@pytest.fixture(scope="module")
def standard_tiny() -> WanPipeline:
    """A tiny model with the exact block structure of the official checkpoints."""
    pipe = build_tiny_pipeline(TinyConfig(vae="wan2.1", seed=3))
    # The official T5 file is bf16: make the weights bf16-exact so both layouts hold the same numbers.
    with torch.no_grad():
        for p in pipe.text_encoder.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return pipe


@pytest.fixture(scope="module")
def layouts(standard_tiny: WanPipeline, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("layouts")
    standard_tiny.save_pretrained(root / "diffusers")
    write_official_layout(standard_tiny, root / "official")
    return root / "diffusers", root / "official"


def frames_of(path: Path | str, spec: GenerationSpec, cache: Path) -> np.ndarray:
    engine = WanEngine(load_pipeline(str(path), cache, torch.float32), torch.device("cpu"))
    return engine.generate(spec).frames


def test_inverse_maps_agree_with_diffusers_converters(standard_tiny: WanPipeline) -> None:
    expert = standard_tiny.transformer.state_dict()
    back = convert_wan_transformer_to_diffusers(expert_to_official(expert))
    assert back.keys() == expert.keys()
    vae = standard_tiny.vae.state_dict()
    back = convert_wan_vae_to_diffusers(vae_to_official(vae))
    assert back.keys() == vae.keys()
    assert all(torch.equal(back[k], vae[k]) for k in vae)


def test_official_layout_and_diffusers_layout_give_identical_frames(
    layouts: tuple[Path, Path], small_spec: Spec, tmp_path: Path
) -> None:
    diffusers_dir, official_dir = layouts
    spec = small_spec(width=64, height=48, num_frames=9, num_inference_steps=4)
    reference = frames_of(diffusers_dir, spec, tmp_path)
    assert np.array_equal(reference, frames_of(official_dir, spec, tmp_path))
    # Round trip through `wanserve convert`: a later load of the converted copy is the same model.
    converted = tmp_path / "converted"
    assert cli_main(["convert", str(official_dir), str(converted), "--dtype", "float32"]) == 0
    assert (converted / "model_index.json").is_file()
    assert np.array_equal(reference, frames_of(converted, spec, tmp_path))


def copy_of(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("missing", [VAE_FILE, T5_FILE, "low_noise_model", "google/umt5-xxl"])
def test_incomplete_official_dir_names_the_missing_file(
    layouts: tuple[Path, Path], tmp_path: Path, missing: str
) -> None:
    model = copy_of(layouts[1], tmp_path)
    target = model / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(ModelLoadError, match=missing.split("/")[-1]):
        load_pipeline(str(model), tmp_path, torch.float32)


def test_corrupt_official_weights_name_the_file(layouts: tuple[Path, Path], tmp_path: Path) -> None:
    model = copy_of(layouts[1], tmp_path)
    weights = model / "high_noise_model" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=r"corrupt weights file .*high_noise_model"):
        load_pipeline(str(model), tmp_path, torch.float32)
    weights.unlink()
    with pytest.raises(ModelLoadError, match=r"no \*.safetensors in .*high_noise_model"):
        load_pipeline(str(model), tmp_path, torch.float32)
    (model / VAE_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match=r"corrupt checkpoint .*Wan2.1_VAE.pth"):
        load_pipeline(str(model), tmp_path, torch.float32)


def test_incomplete_diffusers_dir_names_the_problem(layouts: tuple[Path, Path], tmp_path: Path) -> None:
    model = copy_of(layouts[0], tmp_path)
    shutil.rmtree(model / "vae")
    with pytest.raises(ModelLoadError, match="missing vae folder"):
        load_pipeline(str(model), tmp_path, torch.float32)

    model = copy_of(layouts[0], tmp_path / "b")
    (model / "transformer_2" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="transformer_2"):
        load_pipeline(str(model), tmp_path, torch.float32)

    model = copy_of(layouts[0], tmp_path / "c")
    (model / "model_index.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"corrupt .*model_index.json"):
        load_pipeline(str(model), tmp_path, torch.float32)

    index = json.loads((layouts[0] / "model_index.json").read_text())
    index["text_encoder"] = [None, None]
    model = copy_of(layouts[0], tmp_path / "d")
    (model / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="text_encoder"):
        load_pipeline(str(model), tmp_path, torch.float32)


def test_not_a_model_dir(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"neither model_index.json"):
        load_pipeline(str(tmp_path), tmp_path, torch.float32)
    with pytest.raises(ModelLoadError, match="not a directory"):
        load_pipeline(str(tmp_path / "nope"), tmp_path, torch.float32)


def test_tiny_build_is_deterministic(tmp_path: Path) -> None:
    a = build_tiny_pipeline()
    b = build_tiny_pipeline()
    for (name, pa), (_, pb) in zip(a.transformer.state_dict().items(), b.transformer.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name
    ids = a.tokenizer("A red fox, walking!").input_ids
    assert ids[-1] == a.tokenizer.eos_token_id and a.tokenizer.unk_token_id not in ids


def test_convert_refuses_bad_source_and_non_empty_destination(layouts: tuple[Path, Path], tmp_path: Path) -> None:
    from wanserve.engine.convert import convert_model

    with pytest.raises(ModelLoadError, match=r"not an official Wan2\.2 directory"):
        convert_model(layouts[0], tmp_path / "out")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ModelLoadError, match="not empty"):
        convert_model(layouts[1], busy)
    assert (busy / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("experts", [("transformer",), ("transformer", "transformer_2")])
def test_a_model_index_without_boundary_ratio_gets_one_only_with_two_experts(
    model_cache: Path, tmp_path: Path, experts: tuple[str, ...]
) -> None:
    """Wan 2.2's boundary (0.875) is the default of a two-expert directory; a one-expert (Wan 2.1-style) directory
    has none, as diffusers loads it, so `guidance_scale` applies to every step."""
    tiny = ensure_tiny_model(model_cache)
    model = tmp_path / "model"
    model.mkdir()
    for part in ("tokenizer", "text_encoder", "vae", "scheduler", *experts):
        (model / part).symlink_to(tiny / part)
    index = json.loads((tiny / "model_index.json").read_text())
    index.pop("boundary_ratio", None)
    if "transformer_2" not in experts:
        index["transformer_2"] = [None, None]
    (model / "model_index.json").write_text(json.dumps(index))
    pipe = load_pipeline(str(model), model_cache, torch.float32)
    assert pipe.config.boundary_ratio == (0.875 if len(experts) == 2 else None)
    assert (pipe.transformer_2 is None) == (len(experts) == 1)


def test_a_tiny_model_left_broken_in_the_cache_is_built_again(tmp_path: Path) -> None:
    """An older version could leave the text encoder's folder empty (a GPU group's rank > 0 built it): every command
    using the cache then failed. The next use builds it again."""
    tiny = ensure_tiny_model(tmp_path, TinyConfig(vae="coarse"))
    for file in (tiny / "text_encoder").iterdir():
        file.unlink()
    with pytest.raises(ModelLoadError, match=r"text_encoder folder .* has no weights"):
        load_pipeline(str(tiny), tmp_path, torch.float32)
    assert ensure_tiny_model(tmp_path, TinyConfig(vae="coarse")) == tiny
    load_pipeline(str(tiny), tmp_path, torch.float32)
    assert [p.name for p in tmp_path.iterdir()] == [tiny.name]  # nothing left aside


def test_a_tiny_model_saved_incompletely_never_reaches_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a torch.distributed rank other than 0, transformers saves no text encoder: the build says so and leaves
    no model behind (the GPU group's launcher builds it before starting the ranks)."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda *a, **k: 1)
    with pytest.raises(ModelLoadError, match=r"not saved completely: .*text_encoder"):
        ensure_tiny_model(tmp_path, TinyConfig(vae="coarse"))
    assert list(tmp_path.iterdir()) == []


def test_a_gpu_groups_launcher_builds_the_tiny_model_before_its_ranks_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from wanserve.config import Settings
    from wanserve.worker import group

    started: list[bool] = []

    class Group:
        def __init__(self, settings: Settings, *args: object, **kwargs: object) -> None:
            started.append(any(tmp_path.glob("tiny-*/text_encoder/config.json")))

        def run(self) -> int:
            return 0

    monkeypatch.setattr(group, "WorkerGroup", Group)
    settings = Settings(data_dir=tmp_path / "data", cache_dir=tmp_path, model="tiny")
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(group.run_worker_group(settings, "w", [0, 1])))
    thread.start()
    thread.join(120)
    assert result == [0] and started == [True]
