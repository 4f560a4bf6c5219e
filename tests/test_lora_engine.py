"""LoRAs on the tiny model's experts: every file layout, scales, per-expert targeting, isolation, memory bound."""

from __future__ import annotations

import copy
import json
import struct
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lora_files import (
    random_factors,
    scaled,
    write_diffusers,
    write_lightx2v,
    write_musubi,
    write_peft,
    write_wan,
)
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

from wanserve.engine.lora import LoraFormat, read_lora_file
from wanserve.engine.pipeline import GenerationSpec, WanEngine
from wanserve.engine.runner import describe_load
from wanserve.errors import FieldError
from wanserve.lora.cache import file_sha256
from wanserve.lora.sources import EXPERTS, LoraFile, LoraUse, SourceKind

Spec = Callable[..., GenerationSpec]


def use(path: Path, scale: float = 1.0, transformer: str = "both") -> LoraUse:
    file = LoraFile(path, file_sha256(path), path.stat().st_size, SourceKind.LOCAL, False, 0.0)
    return LoraUse(file, scale, EXPERTS[transformer], path.name)


def frames(engine: WanEngine, spec: GenerationSpec) -> np.ndarray:
    return engine.generate(spec).frames


def no_peft_layers(engine: WanEngine) -> bool:
    experts = (engine.pipe.transformer, engine.pipe.transformer_2)
    return not any(isinstance(m, LoraLayer) for e in experts for m in e.modules())


@pytest.fixture(autouse=True)
def clean_engine(engine: WanEngine) -> Iterator[None]:
    """The engine is shared by the whole session: every test leaves it with no LoRA loaded."""
    yield
    engine.loras.max_bytes = 4 * 1024**3
    engine.loras.unload_all()
    assert no_peft_layers(engine)


@pytest.fixture(scope="module")
def factors(engine: WanEngine) -> Any:
    return random_factors(engine.pipe.transformer, rank=4, seed=0)


@pytest.fixture
def spec(small_spec: Spec) -> GenerationSpec:
    return small_spec(num_inference_steps=4)


@pytest.fixture
def base(engine: WanEngine, spec: GenerationSpec) -> np.ndarray:
    return frames(engine, spec)


def with_loras(spec: GenerationSpec, *uses: LoraUse) -> GenerationSpec:
    return GenerationSpec(**{**spec.__dict__, "loras": tuple(uses)})


def write_reference(path: Path, factors: Any) -> Path:
    """The factors at scale 2 as diffusers keys with B doubled and no metadata: a layout none of the cases writes
    byte for byte, against which each layout (alpha 8 on rank 4, or B doubled) must mean the same."""
    save_file(
        {f"transformer.{m}.lora_{n}.weight": t.contiguous() for (_, m), (a, b) in scaled(factors, 2).items()
         for n, t in (("A", a), ("B", b))},
        path,
    )  # fmt: skip
    return path


def write_format(fmt: str, path: Path, factors: Any) -> Path:
    """The same effective LoRA (B @ A scaled by 2) in each layout: alpha 8 on rank 4, or B doubled."""
    if fmt == "wan":
        return write_wan(path, factors, alpha=8)
    if fmt == "comfyui":
        return write_wan(path, scaled(factors, 2), names="lora_A")
    if fmt == "musubi":
        return write_musubi(path, factors, alpha=8)
    if fmt == "diffusers":
        return write_diffusers(path, factors, alpha=8)
    if fmt == "peft":
        return write_peft(path, scaled(factors, 2))
    raise AssertionError(fmt)


FORMATS = ["wan", "comfyui", "musubi", "diffusers", "peft"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_layout_loads_changes_the_output_and_means_the_same(
    fmt: str, engine: WanEngine, factors: Any, base: np.ndarray, spec: GenerationSpec, tmp_path: Path
) -> None:
    expected = frames(engine, with_loras(spec, use(write_reference(tmp_path / "reference.safetensors", factors))))
    engine.loras.unload_all()
    path = write_format(fmt, tmp_path / f"{fmt}.safetensors", factors)
    got = frames(engine, with_loras(spec, use(path)))
    assert not np.array_equal(got, base)  # the LoRA changes the video (uint8 frames: any difference is one)
    # alpha folding and key renaming: every layout of the same factors gives the same video
    np.testing.assert_allclose(got.astype(int), expected.astype(int), atol=1)  # uint8: float noise may flip a level


def test_a_musubi_file_with_some_layers_of_some_blocks_means_the_same_as_the_wan_file(
    engine: WanEngine, factors: Any, base: np.ndarray, spec: GenerationSpec, tmp_path: Path
) -> None:
    """musubi-tuner writes only what it trained (attention only, a block range, here block 1's attention):
    diffusers' own musubi converter wanted every attention and FFN layer of blocks 0..n and refused these."""
    subset = {k: v for k, v in factors.items() if k[0].startswith("blocks.1.") and "attn" in k[0]}
    assert 0 < len(subset) < len(factors)
    wan = write_wan(tmp_path / "wan.safetensors", subset, alpha=8)
    expected = frames(engine, with_loras(spec, use(wan)))
    engine.loras.unload_all()
    musubi = write_musubi(tmp_path / "musubi.safetensors", subset, alpha=8)
    (load,) = engine.loras.load([use(musubi)])
    assert load.format is LoraFormat.MUSUBI and load.tensors == 2 * len(subset)
    got = frames(engine, with_loras(spec, use(musubi)))
    assert not np.array_equal(got, base)
    np.testing.assert_allclose(got.astype(int), expected.astype(int), atol=1)


def test_alphas_of_modules_outside_the_blocks_are_applied(
    engine: WanEngine, factors: Any, base: np.ndarray, spec: GenerationSpec, tmp_path: Path
) -> None:
    """kohya-style files carry an alpha for every module; diffusers' Wan converter reads those of block layers only
    and refused a file with one on the head or the text embedding."""
    expert = engine.pipe.transformer
    g = torch.Generator().manual_seed(4)
    extra = {}
    for wan, module in (("head.head", "proj_out"), ("text_embedding.0", "condition_embedder.text_embedder.linear_1")):
        layer = expert.get_submodule(module)
        extra[(wan, module)] = (torch.randn(4, layer.in_features, generator=g) * 0.1,
                                torch.randn(layer.out_features, 4, generator=g) * 0.1)  # fmt: skip
    every = {**dict(list(factors.items())[:4]), **extra}
    expected = frames(engine, with_loras(spec, use(write_reference(tmp_path / "reference.safetensors", every))))
    engine.loras.unload_all()
    for fmt, write in (("musubi", write_musubi), ("wan", write_wan)):
        path = write(tmp_path / f"{fmt}.safetensors", every, alpha=8)  # alpha 8 on rank 4: scale 2
        got = frames(engine, with_loras(spec, use(path)))
        assert not np.array_equal(got, base)
        np.testing.assert_allclose(got.astype(int), expected.astype(int), atol=1)
        engine.loras.unload_all()


def test_a_peft_adapter_is_scaled_by_the_alpha_of_its_config(
    engine: WanEngine, factors: Any, base: np.ndarray, spec: GenerationSpec, tmp_path: Path
) -> None:
    """peft's adapter_model.safetensors holds the factors; its alpha (lora_alpha / r scales them) is in the
    adapter_config.json beside it."""
    expected = frames(engine, with_loras(spec, use(write_reference(tmp_path / "reference.safetensors", factors))))
    engine.loras.unload_all()
    path = write_peft(tmp_path / "adapter_model.safetensors", factors)
    plain = use(path)
    configured = LoraUse(replace(plain.file, peft_config='{"r": 4, "lora_alpha": 8}'), 1.0, EXPERTS["both"], "peft")
    got = frames(engine, with_loras(spec, configured))
    np.testing.assert_allclose(got.astype(int), expected.astype(int), atol=1)  # alpha 8 on rank 4: scale 2
    assert not np.array_equal(frames(engine, with_loras(spec, plain)), got)  # without it: scale 1, another adapter
    # with lora_bias, peft scales B's bias too: B(A x) + b as a whole
    layer = engine.pipe.transformer.blocks[0].attn1.to_q
    g = torch.Generator().manual_seed(5)
    a, b, bias = (torch.randn(4, layer.in_features, generator=g), torch.randn(layer.out_features, 4, generator=g),
                  torch.randn(layer.out_features, generator=g))  # fmt: skip
    with_bias = tmp_path / "bias" / "adapter_model.safetensors"
    with_bias.parent.mkdir()
    stem = "base_model.model.blocks.0.attn1.to_q"
    save_file({f"{stem}.lora_A.weight": a, f"{stem}.lora_B.weight": b, f"{stem}.lora_B.bias": bias}, with_bias)
    biased = LoraUse(replace(use(with_bias).file, peft_config='{"r": 4, "lora_alpha": 16, "lora_bias": true}'), 1.0,
                     EXPERTS["both"], "peft bias")  # fmt: skip
    engine.loras.load([biased])
    wrapped = engine.pipe.transformer.blocks[0].attn1.to_q
    with torch.no_grad(), engine.loras.active([biased]):
        x = torch.randn(3, layer.in_features, generator=g)
        torch.testing.assert_close(wrapped(x), wrapped.base_layer(x) + 4.0 * (x @ a.T @ b.T + bias))
    engine.loras.unload_all()
    for config, fragment in (
        ('{"r": 4, "lora_alpha": 8, "rank_pattern": {"to_q": 8}}', "gives layer 'blocks.0.attn1.to_q' rank 8"),
        ('{"r": 4, "alpha_pattern": {"(": 2}}', "is no regular expression"),
        ('{"r": 4, "alpha_pattern": {"to_q": "2"}}', "not a positive number"),
        ('{"r": 4, "alpha_pattern": {"(?:(?:.|..|...|....)*)*(?<!.)": 2}}', "take more than 1 s"),
        ('{"r": 4, "use_dora": true}', "DoRA"),
        ('{"r": 0}', "positive numbers"),
        ("not json", "not valid JSON"),
    ):
        bad = LoraUse(replace(plain.file, peft_config=config), 1.0, EXPERTS["both"], "peft")
        with pytest.raises(FieldError, match=fragment):
            engine.generate(with_loras(spec, bad))


def test_a_peft_adapter_with_a_rank_and_alpha_per_layer_acts_as_in_peft(
    engine: WanEngine, spec: GenerationSpec, tmp_path: Path
) -> None:
    """rank_pattern and alpha_pattern give some layers a rank and alpha of their own (peft's `get_pattern_key`: the
    first pattern matching the end of the layer name). The adapter is made and saved by peft itself, and each
    layer must compute what peft's layer computes."""
    expert = copy.deepcopy(engine.pipe.transformer)
    config = LoraConfig(
        r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"],
        rank_pattern={"blocks.0.attn1.to_q": 8, "to_k": 2},
        alpha_pattern={"attn2.to_.": 16, "blocks.1.attn1.to_q": 2},
    )  # fmt: skip
    inject_adapter_in_model(config, expert)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in expert.modules():
            if isinstance(module, LoraLayer):
                module.lora_B["default"].weight.copy_(torch.randn(module.lora_B["default"].weight.shape, generator=g))
    weights = get_peft_model_state_dict(expert)
    path = tmp_path / "adapter_model.safetensors"
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in weights.items()}, path)
    configured = LoraUse(replace(use(path).file, peft_config=json.dumps(config.to_dict(), default=list)), 1.0,
                         EXPERTS["both"], "peft patterns")  # fmt: skip
    engine.loras.load([configured])
    checked = set()
    with torch.no_grad(), engine.loras.active([configured]):
        for name in ("blocks.0.attn1.to_q", "blocks.1.attn1.to_q", "blocks.0.attn1.to_k", "blocks.0.attn2.to_v",
                     "blocks.1.attn1.to_v"):  # fmt: skip
            theirs, ours = expert.get_submodule(name), engine.pipe.transformer.get_submodule(name)
            x = torch.randn(3, theirs.in_features, generator=g)
            torch.testing.assert_close(ours(x), theirs(x))
            checked.add(theirs.scaling["default"])
    assert checked == {0.5, 2.0, 4.0, 1.0}  # 4/8, 4/2, 16/4 and 2/4 ... and the default 4/4
    # a Conv3d layer's A factor is (r, in, kT, kH, kW): its rank is still the first dimension, and such a layer is
    # refused for what it is (no Linear layer), not for its rank
    conv = LoraConfig(r=4, lora_alpha=4, target_modules=["patch_embedding"])
    conv_expert = inject_adapter_in_model(conv, copy.deepcopy(engine.pipe.transformer))
    conv_path = tmp_path / "conv" / "adapter_model.safetensors"
    conv_path.parent.mkdir()
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in get_peft_model_state_dict(conv_expert).items()},
              conv_path)  # fmt: skip
    conv_use = LoraUse(replace(use(conv_path).file, peft_config=json.dumps(conv.to_dict(), default=list)), 1.0,
                       EXPERTS["both"], "conv")  # fmt: skip
    with pytest.raises(FieldError, match="no Linear layer 'patch_embedding'"):
        engine.loras.load([conv_use])
    assert not np.array_equal(frames(engine, with_loras(spec, configured)), frames(engine, spec))


def test_a_safetensors_header_whose_length_starts_like_a_pickle_is_read(tmp_path: Path) -> None:
    """The file starts with its header's length: 896 bytes is `\\x80\\x03...`, a pickle's magic."""
    path = tmp_path / "l.safetensors"
    tensors = {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.ones(4, 24)}
    for pad in range(900):
        save_file(tensors, path, metadata={"pad": "x" * pad})
        if struct.unpack("<Q", path.read_bytes()[:8])[0] == 0x380:
            break
    assert path.read_bytes()[:2] == b"\x80\x03"
    read, metadata = read_lora_file(path)
    assert list(read) == list(tensors) and metadata["pad"].startswith("x")


def test_distill_style_file_with_biases_head_delta_and_ignored_norm_deltas(
    engine: WanEngine, factors: Any, base: np.ndarray, spec: GenerationSpec, tmp_path: Path
) -> None:
    path = write_lightx2v(tmp_path / "lightx2v.safetensors", engine.pipe.transformer, factors)
    (load,) = engine.loras.load([use(path)])
    # diffusers' converter drops the patch embedding's and time projection's bias deltas without a word: counted
    assert load.format is LoraFormat.WAN and load.ignored == 5 and load.loaded_into == ("high", "low")
    assert "5 deltas no LoRA can apply ignored" in describe_load(0, 1, load)
    plain = write_wan(tmp_path / "plain.safetensors", factors, names="lora_A")
    with_extras = frames(engine, with_loras(spec, use(path)))
    without = frames(engine, with_loras(spec, use(plain)))
    assert not np.array_equal(with_extras, base)
    assert not np.array_equal(with_extras, without)  # the biases, head delta and text factors were applied


def test_distill_files_with_deltas_outside_the_blocks_and_mixed_factor_names_load(
    engine: WanEngine, factors: Any, spec: GenerationSpec, tmp_path: Path
) -> None:
    """Kijai's lightx2v files also carry a full patch-embedding delta and `blocks.N.diff_m`; others a time-embedding
    bias delta without factors, a head delta without its bias delta, or factors named both ways (merged files).
    Each used to be a 422 (or a KeyError from diffusers' converter)."""
    expert = engine.pipe.transformer
    sd = load_file(write_lightx2v(tmp_path / "lightx2v.safetensors", expert, factors))
    g = torch.Generator().manual_seed(3)
    sd["diffusion_model.patch_embedding.diff"] = torch.randn(*expert.patch_embedding.weight.shape, generator=g) * 0.01
    sd["diffusion_model.blocks.0.diff_m"] = torch.randn(1, 6, expert.proj_out.in_features, generator=g) * 0.01
    time_linear = expert.condition_embedder.time_embedder.linear_1
    sd["diffusion_model.time_embedding.0.diff_b"] = torch.randn(time_linear.out_features, generator=g) * 0.01
    del sd["diffusion_model.head.head.diff_b"]
    extras = tmp_path / "extras.safetensors"
    save_file(sd, extras)
    text = "diffusion_model.text_embedding.0"
    sd[f"{text}.lora_down.weight"], sd[f"{text}.lora_up.weight"] = (
        sd.pop(f"{text}.lora_A.weight"),
        sd.pop(f"{text}.lora_B.weight"),
    )
    mixed = tmp_path / "mixed.safetensors"
    save_file(sd, mixed)
    (load,) = engine.loras.load([use(extras)])
    assert load.ignored == 8  # the 5 of the plain distill file, and the patch delta, diff_m and time bias delta
    with_extras = frames(engine, with_loras(spec, use(extras)))
    assert np.isfinite(with_extras).all()
    np.testing.assert_array_equal(frames(engine, with_loras(spec, use(mixed))), with_extras)


def test_a_peft_adapter_without_its_config_says_its_alpha_was_assumed(
    engine: WanEngine, factors: Any, tmp_path: Path
) -> None:
    """Uploaded or fetched by URL, a PEFT adapter's weights come without the adapter_config.json that holds its
    alpha: the job log says alpha = rank was assumed instead of running it at another strength without a word."""
    (load,) = engine.loras.load([use(write_peft(tmp_path / "adapter_model.safetensors", factors))])
    assert load.format is LoraFormat.PEFT
    assert "no adapter_config.json came with it, so alpha = rank" in describe_load(0, 1, load)
    (load,) = engine.loras.load([use(write_diffusers(tmp_path / "d.safetensors", factors, alpha=8))])
    assert "alpha = rank" not in describe_load(0, 1, load)


def test_a_trainers_dropout_in_the_metadata_is_not_applied_at_inference(
    engine: WanEngine, factors: Any, spec: GenerationSpec, tmp_path: Path
) -> None:
    """PEFT builds a LoRA's dropout modules in training mode: with the file's dropout kept, one seed gave another
    video each time."""
    plain = use(write_diffusers(tmp_path / "plain.safetensors", factors, alpha=8))
    dropped = use(write_diffusers(tmp_path / "dropout.safetensors", factors, alpha=8, dropout=0.5))
    once = frames(engine, with_loras(spec, dropped))
    np.testing.assert_array_equal(frames(engine, with_loras(spec, dropped)), once)
    np.testing.assert_array_equal(frames(engine, with_loras(spec, plain)), once)


def test_a_scale_that_breaks_the_model_is_a_422_on_the_loras(
    engine: WanEngine, factors: Any, spec: GenerationSpec, tmp_path: Path
) -> None:
    """A finite scale can still make infinities (1e30 x the LoRA's update): the request's to change, not a 500."""
    path = write_wan(tmp_path / "l.safetensors", factors, alpha=4)
    with pytest.raises(FieldError, match="NaN or infinite") as raised:
        engine.generate(with_loras(spec, use(path, 1e30)))
    assert raised.value.http_status == 422 and raised.value.error_type == "invalid_lora"
    assert raised.value.detail()["loc"] == ["body", "loras"]
    assert np.isfinite(frames(engine, with_loras(spec, use(path, 1.0)))).all()


def test_scale_zero_is_exactly_no_lora_and_scale_two_differs(
    engine: WanEngine, factors: Any, base: np.ndarray, spec: GenerationSpec, tmp_path: Path
) -> None:
    path = write_wan(tmp_path / "l.safetensors", factors, alpha=4)
    zero = frames(engine, with_loras(spec, use(path, 0.0)))
    one = frames(engine, with_loras(spec, use(path, 1.0)))
    two = frames(engine, with_loras(spec, use(path, 2.0)))
    assert np.array_equal(zero, base)
    assert not np.array_equal(two, one) and not np.array_equal(one, base)


def test_isolation_base_then_lora_then_base_is_bit_identical(
    engine: WanEngine, factors: Any, base: np.ndarray, spec: GenerationSpec, tmp_path: Path
) -> None:
    path = write_musubi(tmp_path / "m.safetensors", factors, alpha=4)
    first = frames(engine, spec)
    lora = frames(engine, with_loras(spec, use(path)))
    last = frames(engine, spec)
    assert np.array_equal(first, base) and np.array_equal(last, first)
    assert not np.array_equal(lora, first)
    assert engine.loras.resident  # still loaded for the next request, but inactive
    engine.loras.unload_all()
    assert no_peft_layers(engine)  # plain Linear layers are back
    assert np.array_equal(frames(engine, spec), base)


def record_expert_calls(engine: WanEngine) -> tuple[list[tuple[str, dict[str, Any], torch.Tensor]], Callable[[], None]]:
    calls: list[tuple[str, dict[str, Any], torch.Tensor]] = []
    handles = []
    for role, module in (("high", engine.pipe.transformer), ("low", engine.pipe.transformer_2)):

        def hook(mod: torch.nn.Module, args: Any, kwargs: dict[str, Any], out: Any, role: str = role) -> None:
            calls.append((role, {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}, out[0].clone()))

        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    return calls, lambda: [h.remove() for h in handles]  # type: ignore[func-returns-value]


@pytest.mark.parametrize("transformer", ["high", "low", "both"])
def test_transformer_field_targets_only_that_experts_steps(
    transformer: str, engine: WanEngine, factors: Any, spec: GenerationSpec, tmp_path: Path
) -> None:
    path = write_wan(tmp_path / "l.safetensors", factors, alpha=8)
    calls, remove = record_expert_calls(engine)
    try:
        engine.generate(with_loras(spec, use(path, 1.0, transformer)))
    finally:
        remove()
    roles = {role for role, _, _ in calls}
    assert roles == {"high", "low"}
    experts = {"high": engine.pipe.transformer, "low": engine.pipe.transformer_2}
    with torch.no_grad():
        for role, kwargs, out in calls:  # the same inputs again, now with no adapter active
            plain = experts[role](**kwargs)[0]
            changed = not torch.equal(plain, out)
            assert changed == (role in EXPERTS[transformer]), (role, transformer)


def test_several_loras_combine_and_the_same_file_twice_adds_its_scales(
    engine: WanEngine, factors: Any, spec: GenerationSpec, tmp_path: Path
) -> None:
    a = write_wan(tmp_path / "a.safetensors", factors, alpha=4)
    b = write_wan(tmp_path / "b.safetensors", random_factors(engine.pipe.transformer, rank=8, seed=5), alpha=8)
    only_a = frames(engine, with_loras(spec, use(a)))
    only_b = frames(engine, with_loras(spec, use(b)))
    both = frames(engine, with_loras(spec, use(a), use(b, 0.7)))
    assert not np.array_equal(both, only_a) and not np.array_equal(both, only_b)
    halves = frames(engine, with_loras(spec, use(a, 0.5), use(a, 0.5)))
    np.testing.assert_allclose(halves.astype(int), only_a.astype(int), atol=1)
    assert len(engine.loras.resident) == 2


def test_resident_adapters_are_reused_and_bounded_least_recently_used_first(
    engine: WanEngine, base: np.ndarray, spec: GenerationSpec, tmp_path: Path
) -> None:
    expert = engine.pipe.transformer
    paths = [write_wan(tmp_path / f"{i}.safetensors", random_factors(expert, seed=i)) for i in range(3)]
    first = engine.loras.load([use(paths[0])])[0]
    assert first.loaded_into == ("high", "low") and first.tensors > 0
    again = engine.loras.load([use(paths[0])])[0]
    assert again.loaded_into == ()  # resident: no file read, no load
    one_adapter = engine.loras.resident_bytes
    engine.loras.max_bytes = 2 * one_adapter
    engine.loras.load([use(paths[1])])
    engine.loras.load([use(paths[0])])  # touch 0: now 1 is the least recently used
    engine.loras.load([use(paths[2])])
    assert engine.loras.resident == [file_sha256(paths[0]), file_sha256(paths[2])]
    # a request whose own LoRAs exceed the bound still runs; older ones make room
    engine.loras.max_bytes = 0
    out = frames(engine, with_loras(spec, use(paths[1]), use(paths[2])))
    assert not np.array_equal(out, base)
    engine.loras.load([])
    assert engine.loras.resident == []
    assert no_peft_layers(engine)
    assert np.array_equal(frames(engine, spec), base)


def test_high_only_then_both_loads_the_missing_expert_only(engine: WanEngine, factors: Any, tmp_path: Path) -> None:
    path = write_wan(tmp_path / "l.safetensors", factors)
    assert engine.loras.load([use(path, 1.0, "high")])[0].loaded_into == ("high",)
    assert engine.loras.load([use(path, 1.0, "both")])[0].loaded_into == ("low",)


def bad_file(kind: str, path: Path, factors: Any) -> tuple[Path, str]:
    """A broken LoRA file and a fragment of the error it must give."""
    if kind == "wrong shape":
        (wan, module), (a, b) = next(iter(factors.items()))
        broken = dict(factors)
        broken[(wan, module)] = (torch.randn(4, a.shape[1] * 2), b)
        return write_wan(path, broken), "blocks.0.attn1.to_q.lora_A.weight"
    if kind == "missing layer":
        a, b = next(iter(factors.values()))
        ghost = {("blocks.7.self_attn.q", "blocks.7.attn1.to_q"): (a.clone(), b.clone())}
        return write_wan(path, {**factors, **ghost}), "blocks.7.attn1.to_q"
    if kind == "garbage":
        path.write_bytes(b"\x13\x00\x00\x00\x00\x00\x00\x00not a safetensors file at all" * 10)
        return path, "not a valid safetensors file"
    if kind == "pickle":
        torch.save({"x": torch.zeros(2)}, path)
        return path, "pickle"
    if kind == "unknown keys":
        save_file({"encoder.layer.0.weight": torch.zeros(2, 2)}, path)
        return path, "'encoder.layer.0.weight'"
    if kind == "musubi unknown module":
        save_file({"lora_unet_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 24)}, path)
        return path, "names no Wan module"
    if kind == "no block":
        save_file({"lora_unet_head_head.lora_down.weight": torch.zeros(4, 24), "lora_unet_head_head.lora_up.weight":
                   torch.zeros(24, 4)}, path)  # fmt: skip
        return path, "no transformer block"
    if kind == "dora":
        sd = {"diffusion_model.blocks.0.self_attn.q.dora_scale": torch.ones(1, 24)}
        save_file(sd, path)
        return path, "DoRA"
    if kind == "full weight delta":
        save_file({"diffusion_model.blocks.0.self_attn.q.diff": torch.zeros(24, 24)}, path)
        return path, "blocks.0.self_attn.q.diff"
    if kind == "empty":
        save_file({}, path)
        return path, "no tensors"
    if kind == "rank zero":  # diffusers' converter divides alpha by the rank
        q = "diffusion_model.blocks.0.self_attn.q"
        save_file({f"{q}.lora_down.weight": torch.zeros(0, 24), f"{q}.lora_up.weight": torch.zeros(24, 0),
                   f"{q}.alpha": torch.tensor(1.0)}, path)  # fmt: skip
        return path, "ZeroDivisionError"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "wrong shape",
        "missing layer",
        "garbage",
        "pickle",
        "unknown keys",
        "musubi unknown module",
        "no block",
        "dora",
        "full weight delta",
        "empty",
        "rank zero",
    ],
)
def test_bad_files_fail_clearly_and_leave_the_model_as_it_was(
    kind: str, engine: WanEngine, factors: Any, base: np.ndarray, spec: GenerationSpec, tmp_path: Path
) -> None:
    good = write_wan(tmp_path / "good.safetensors", factors)
    with_good = frames(engine, with_loras(spec, use(good)))
    path, fragment = bad_file(kind, tmp_path / "bad.safetensors", factors)
    with pytest.raises(FieldError) as err:
        engine.generate(with_loras(spec, use(good), use(path)))
    assert err.value.loc == ("loras", 1, "path") and err.value.http_status == 422
    assert err.value.error_type == "invalid_lora" and fragment in str(err.value), str(err.value)
    assert engine.loras.resident == [file_sha256(good)]
    assert np.array_equal(frames(engine, spec), base)
    assert np.array_equal(frames(engine, with_loras(spec, use(good))), with_good)


def test_a_bias_delta_without_factors_adds_the_bias_alone(
    engine: WanEngine, factors: Any, spec: GenerationSpec, tmp_path: Path
) -> None:
    """`head.head.diff_b` with no `head.head.diff` nor factors: PEFT still makes that layer's factors, which were
    left uninitialised (the same request gave different videos, or NaN). Zero factors make it the bias alone."""
    tensors = load_file(write_wan(tmp_path / "plain.safetensors", factors))
    layer = engine.pipe.transformer.proj_out
    bias = torch.randn(layer.out_features, generator=torch.Generator().manual_seed(3)) * 0.1
    save_file({**tensors, "diffusion_model.head.head.diff_b": bias}, tmp_path / "bias.safetensors")
    lora = use(tmp_path / "bias.safetensors")
    first = frames(engine, with_loras(spec, lora))
    engine.loras.unload_all()
    assert np.array_equal(frames(engine, with_loras(spec, lora)), first)
    wrapped = engine.pipe.transformer.proj_out  # PEFT's wrapper around the layer now
    with torch.no_grad(), engine.loras.active([lora]):
        x = torch.randn(3, layer.in_features)
        torch.testing.assert_close(wrapped(x), layer(x) + bias)


def test_distilled_lora_settings_run_one_forward_per_step(
    engine: WanEngine, factors: Any, spec: GenerationSpec, tmp_path: Path
) -> None:
    """4 steps with guidance 1 on both experts (what a Lightning-style LoRA asks for): no unconditional pass."""
    path = write_lightx2v(tmp_path / "distill.safetensors", engine.pipe.transformer, factors)
    distilled = with_loras(spec, use(path))
    distilled = GenerationSpec(**{**distilled.__dict__, "guidance_scale": 1.0, "guidance_scale_2": 1.0})
    for run, forwards in ((distilled, 4), (with_loras(spec, use(path)), 8)):
        calls, remove = record_expert_calls(engine)
        try:
            engine.generate(run)
        finally:
            remove()
        assert len(calls) == forwards


def test_a_musubi_norm_bias_delta_is_counted_once(engine: WanEngine, factors: Any, tmp_path: Path) -> None:
    """Ignored on purpose (a norm delta) is not also 'dropped by the converter': the musubi key names the module
    with underscores, which the norm pattern reads only once the name is mapped."""
    from safetensors.torch import load_file

    path = write_musubi(tmp_path / "m.safetensors", factors, alpha=8)
    tensors = load_file(path)
    dim = engine.pipe.transformer.proj_out.in_features
    tensors["lora_unet_blocks_0_norm3.diff_b"] = torch.full((dim,), 0.01)
    save_file(tensors, path)
    (load,) = engine.loras.load([use(path)])
    assert load.ignored == 1
