"""LoRA adapters on the two experts, never fused into the base weights.

A LoRA file is read with safetensors (never pickle), its keys are brought to diffusers naming by diffusers'
own converters, every tensor is checked against the expert it goes into (the first key that does not fit is
named, before anything is loaded) and the result is loaded as a PEFT adapter named by the file's content
hash. Loaded adapters stay resident for later requests up to a memory bound; the least recently used are
unloaded first, and an expert left with none gets its plain Linear layers back. A request activates exactly
its own adapters at its own scales and deactivates them afterwards, so a request without LoRAs runs the
unmodified model: its output is bit-identical to the output before any LoRA was ever loaded.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TypeGuard

import regex
import torch
from diffusers import WanPipeline, WanTransformer3DModel
from diffusers.hooks.group_offloading import _maybe_remove_and_reapply_group_offloading
from safetensors import SafetensorError, safe_open

from wanserve.errors import FieldError, LoraError
from wanserve.lora.sources import PEFT_CONFIG, ExpertName, LoraUse

log = logging.getLogger("wanserve.engine.lora")

# peft warns on every load after the first that the model already has a `peft_config`: expected here.
warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")

PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
# Full-weight deltas of norms and modulation (lightx2v and Kijai files carry them, a block's modulation also as
# `blocks.N.diff_m`), and of the patch embedding's Conv3d: LoRA cannot express them and diffusers drops them too.
# They are small corrections; the file is used without them and the log says so. A full delta of a Linear layer
# (other than the head's, which diffusers applies) is no correction: such a file is refused.
IGNORED_DELTA = re.compile(
    r"(^|\.)(norm\w*|modulation)\.diff(_b)?$|^diffusion_model\.blocks\.\d+\.diff_m$"
    r"|^diffusion_model\.patch_embedding\.diff$"
)
# Bias deltas of the text and time embeddings, which diffusers' Wan converter reads only beside factors of the same
# layer (a KeyError on one alone): without factors they are ignored and counted, as the converter drops the patch
# embedding's and the time projection's itself.
UNPAIRED_BIAS_DELTA = re.compile(r"^diffusion_model\.(?P<layer>(text_embedding|time_embedding)\.\d+)\.diff_b$")
DIFFUSERS_KEY = re.compile(r"^transformer\.(?P<module>.+)\.lora_(?P<part>A\.weight|B\.weight|B\.bias)$")
WAN_BARE_PREFIXES = ("blocks.", "head.", "text_embedding.", "time_embedding.", "time_projection.", "img_emb.")
# musubi-tuner/kohya flatten a Wan module name with underscores (`lora_unet_blocks_0_cross_attn_k_img`); these are
# the Wan module names a LoRA can target, so the dots can be put back unambiguously.
MUSUBI_MODULE = re.compile(
    r"^lora_unet_(?:"
    r"blocks_(?P<block>\d+)_(?:(?P<attn>self_attn|cross_attn)_(?P<proj>q|k|v|o|k_img|v_img|norm_q|norm_k|norm_k_img)"
    r"|ffn_(?P<ffn>\d+)|(?P<block_norm>norm3|modulation))"
    r"|(?P<embedding>text_embedding|time_embedding|time_projection)_(?P<embedding_layer>\d+)"
    r"|img_emb_proj_(?P<img_emb>\d+)|(?P<head>head_head)"
    r")\.(?P<rest>.+)$"
)


class LoraFormat(StrEnum):
    DIFFUSERS = "diffusers"
    PEFT = "peft"
    WAN = "wan"  # the original Wan layout, as ComfyUI, Kijai and lightx2v files use it
    MUSUBI = "musubi/kohya"


@dataclass(frozen=True)
class ConvertedLora:
    state_dict: dict[str, torch.Tensor]  # diffusers naming, `transformer.` prefix
    format: LoraFormat
    metadata: dict[str, object] | None  # PEFT adapter config (lora_alpha...) stored in a diffusers file
    ignored: list[str]  # keys that were dropped: norm and modulation deltas, bias deltas diffusers cannot place


@dataclass(frozen=True)
class LoraLoad:
    """What making one LoRA of a request resident took."""

    use: LoraUse
    loaded_into: tuple[ExpertName, ...]  # experts it was newly loaded into; () when it was resident already
    format: LoraFormat | None
    tensors: int
    ignored: int
    seconds: float


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """A safetensors file starts with its JSON header's length (u64, little-endian), then the header's `{`. The
    length's first bytes can equal a pickle magic (a header of 896 bytes starts `\\x80\\x03`): this tells them
    apart."""
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return 2 <= header_len <= size - 8 and head[8:9] == b"{"


def read_lora_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a safetensors file. Pickle checkpoints are refused: loading one runs code."""
    try:
        with path.open("rb") as f:
            head, size = f.read(9), os.fstat(f.fileno()).st_size
    except OSError as exc:
        raise LoraError(f"cannot read the LoRA file: {exc.strerror}") from None
    if not _looks_like_safetensors(head, size) and head.startswith(PICKLE_MAGIC):
        raise LoraError(
            "pickle checkpoints (.pt, .bin, .ckpt) are refused because loading one can run code; "
            "convert the LoRA to .safetensors"
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise LoraError(f"not a valid safetensors file: {str(exc)[:200]}") from None
    if not tensors:
        raise LoraError("the LoRA file holds no tensors")
    return tensors, metadata


def _family(key: str) -> tuple[LoraFormat, str] | None:
    """The format a key belongs to and the key as diffusers' converters expect it."""
    if key.startswith("transformer."):
        return LoraFormat.DIFFUSERS, key
    if key.startswith("base_model.model."):
        return LoraFormat.PEFT, "transformer." + key[len("base_model.model.") :]
    if key.startswith("lora_unet_"):
        # given to diffusers' Wan converter under the dotted Wan name: its own musubi converter wants every
        # attention and FFN layer of blocks 0..n, and an alpha for each, so it refuses partial files
        match = MUSUBI_MODULE.match(key)
        return (LoraFormat.MUSUBI, "diffusion_model." + _musubi_module(match) + "." + match["rest"]) if match else None
    if key.startswith("diffusion_model."):
        return LoraFormat.WAN, key
    if key.startswith("model.diffusion_model."):
        return LoraFormat.WAN, key[len("model.") :]
    if key.startswith(WAN_BARE_PREFIXES):
        return LoraFormat.WAN, "diffusion_model." + key
    return None


def _unpaired_biases(renamed: Mapping[str, torch.Tensor]) -> list[str]:
    """The (renamed) bias deltas of UNPAIRED_BIAS_DELTA whose layer has no factors in the file."""
    with_factors = {key.split(".lora_", 1)[0] for key in renamed if ".lora_" in key}
    return [
        key
        for key in renamed
        if (match := UNPAIRED_BIAS_DELTA.match(key)) and f"diffusion_model.{match['layer']}" not in with_factors
    ]


def _musubi_module(match: re.Match[str]) -> str:
    if match["block"] is not None:
        block = f"blocks.{match['block']}"
        if match["attn"]:
            return f"{block}.{match['attn']}.{match['proj']}"
        return f"{block}.ffn.{match['ffn']}" if match["ffn"] is not None else f"{block}.{match['block_norm']}"
    if match["embedding"]:
        return f"{match['embedding']}.{match['embedding_layer']}"
    return f"img_emb.proj.{match['img_emb']}" if match["img_emb"] is not None else "head.head"


def _fold_alphas(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each module's alpha/rank folded into its down factor, and the alpha dropped: diffusers' Wan converter reads
    alphas of block layers only and refuses a file with one anywhere else (the head, the text or time embedding),
    which kohya-style trainers write for every module."""
    out = dict(state_dict)
    for key in [k for k in state_dict if k.endswith(".alpha")]:
        stem = key.removesuffix(".alpha")
        down_key = next((f"{stem}.{n}.weight" for n in ("lora_down", "lora_A") if f"{stem}.{n}.weight" in out), None)
        if down_key is None or out[down_key].ndim != 2 or out[down_key].shape[0] == 0 or out[key].numel() != 1:
            continue  # left to the converter, which says what is wrong
        out[down_key] = _scaled(out[down_key], float(out.pop(key)) / out[down_key].shape[0])
    return out


def _one_factor_naming(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Factors named one way: diffusers' Wan converter picks `lora_A/lora_B` or `lora_down/lora_up` for the whole
    file and leaves the other's keys over (a file merged from two tools' layers mixes them)."""
    if not any(".lora_A.weight" in key for key in state_dict):
        return state_dict
    return {key.replace(".lora_down.weight", ".lora_A.weight").replace(".lora_up.weight", ".lora_B.weight"): tensor
            for key, tensor in state_dict.items()}  # fmt: skip


def _scaled(tensor: torch.Tensor, scale: float) -> torch.Tensor:
    """`tensor * scale`, computed in float32 and kept in the tensor's dtype (a bf16 or fp16 file's factors)."""
    return (tensor.float() * scale).to(tensor.dtype)


@dataclass(frozen=True)
class PeftScaling:
    """The scale PEFT applies to each layer's factors, which its weights file does not carry: lora_alpha / r of
    the adapter_config.json (or / sqrt(r) with rsLoRA), with a layer's own rank or alpha where rank_pattern or
    alpha_pattern names it."""

    rank: float
    alpha: float
    rslora: bool = False
    rank_pattern: tuple[tuple[regex.Pattern[str], float], ...] = ()  # compiled as peft matches them (`_patterns`)
    alpha_pattern: tuple[tuple[regex.Pattern[str], float], ...] = ()

    def of(self, module: str, deadline: float) -> tuple[float, float]:
        """(rank, scale) of the layer `module` (its name in the transformer, `blocks.0.attn1.to_q`). The patterns
        are matched until `deadline` (time.monotonic()) at most."""
        rank = _pattern_value(self.rank_pattern, module, self.rank, deadline)
        alpha = _pattern_value(self.alpha_pattern, module, self.alpha, deadline)
        return rank, alpha / (math.sqrt(rank) if self.rslora else rank)


# A pattern names layers by a regular expression from the config file, which may come from anyone's Hub repo: all
# of a file's matching shares one time limit (the `regex` module's), so a pathological pattern cannot hang the worker.
PATTERN_MATCH_BUDGET_S = 1.0
MAX_PATTERNS = 4096
MAX_PATTERN_CHARS = 512


def _pattern_value(
    patterns: tuple[tuple[regex.Pattern[str], float], ...], module: str, default: float, deadline: float
) -> float:
    """The value of the first pattern that matches `module`."""
    for pattern, value in patterns:
        try:
            matched = pattern.match(module, timeout=max(deadline - time.monotonic(), 1e-3))
        except TimeoutError:
            raise LoraError(
                f"{PEFT_CONFIG}: its layer patterns take more than {PATTERN_MATCH_BUDGET_S:g} s to match the layer "
                f"names (at {pattern.pattern[:80]!r})"
            ) from None
        if matched:
            return value
    return default


def _peft_scaling(config_text: str) -> PeftScaling:
    """The adapter_config.json's scaling, checked: what it cannot express as a scale per layer is refused."""
    try:
        config = json.loads(config_text)
    except ValueError:
        raise LoraError(f"the {PEFT_CONFIG} beside the LoRA is not valid JSON") from None
    if not isinstance(config, dict):
        raise LoraError(f"the {PEFT_CONFIG} beside the LoRA is not a JSON object")
    if config.get("use_dora"):
        raise LoraError(f"DoRA LoRAs are not supported ({PEFT_CONFIG} sets use_dora)")
    rank, alpha = config.get("r", 8), config.get("lora_alpha", 8)  # peft's LoraConfig defaults
    if not (_positive(rank) and _positive(alpha)):
        raise LoraError(f"{PEFT_CONFIG} needs positive numbers r and lora_alpha (has r={rank!r}, lora_alpha={alpha!r})")
    return PeftScaling(
        float(rank),
        float(alpha),
        bool(config.get("use_rslora")),
        _patterns(config, "rank_pattern"),
        _patterns(config, "alpha_pattern"),
    )


def _patterns(config: dict[str, object], name: str) -> tuple[tuple[regex.Pattern[str], float], ...]:
    """The config's patterns, each compiled once as peft's rule (`get_pattern_key`) matches it: the end of the layer
    name, at a dot boundary."""
    patterns = config.get(name) or {}
    if not isinstance(patterns, dict) or len(patterns) > MAX_PATTERNS:
        raise LoraError(f"{PEFT_CONFIG}: {name} must be an object of at most {MAX_PATTERNS} layer patterns")
    checked = []
    for pattern, value in patterns.items():
        if len(pattern) > MAX_PATTERN_CHARS or not _positive(value):
            raise LoraError(f"{PEFT_CONFIG}: {name} entry {pattern[:80]!r}: {value!r} is not a positive number")
        try:
            checked.append((regex.compile(rf"(.*\.)?({pattern})$"), float(value)))
        except regex.error as exc:
            raise LoraError(f"{PEFT_CONFIG}: {name} entry {pattern[:80]!r} is no regular expression: {exc}") from None
    return tuple(checked)


def _positive(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < 1e6


def _apply_peft_scaling(renamed: dict[str, torch.Tensor], scaling: PeftScaling) -> None:
    """Folds each layer's scale into its factors. peft scales B(A x) as a whole, B's bias (lora_bias) included:
    A and that bias take the scale. A layer whose factors' rank is not the config's says so, rather than load
    scaled wrong (peft itself would refuse the file)."""
    deadline = time.monotonic() + PATTERN_MATCH_BUDGET_S
    for key in [k for k in renamed if k.endswith(".lora_A.weight")]:
        module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
        rank, scale = scaling.of(module, deadline)
        # A's first dimension is the rank: (r, in) for a Linear, (r, in, kT, kH, kW) for the patch embedding's Conv3d
        if renamed[key].ndim < 2 or renamed[key].shape[0] != rank:
            got = f"factors of rank {renamed[key].shape[0]}" if renamed[key].ndim >= 2 else "a factor that is no matrix"
            raise LoraError(f"{PEFT_CONFIG} gives layer {module!r} rank {rank:g}, but it has {got}")
        renamed[key] = _scaled(renamed[key], scale)
        bias = key.replace(".lora_A.weight", ".lora_B.bias")
        if bias in renamed:
            renamed[bias] = _scaled(renamed[bias], scale)


def convert_lora(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], peft_config: str | None = None
) -> ConvertedLora:
    """Brings any supported LoRA layout to diffusers naming, or fails naming the first key that does not fit.
    `peft_config`: the adapter_config.json found beside a PEFT adapter, whose alpha scales it."""
    renamed: dict[str, torch.Tensor] = {}
    fmt: LoraFormat | None = None
    first_key = ""
    ignored: list[str] = []
    source: dict[str, str] = {}  # each renamed key's key in the file
    for key, tensor in tensors.items():
        if "dora_scale" in key or "lora_magnitude_vector" in key:
            raise LoraError(f"DoRA LoRAs are not supported (key {key!r})")
        family = _family(key)
        if family is None and key.startswith("lora_unet_"):
            raise LoraError(f"musubi/kohya key {key!r} names no Wan module a LoRA can target")
        if family is None:
            raise LoraError(
                f"unrecognized LoRA key {key!r}: expected diffusers (transformer.*), PEFT (base_model.model.*), "
                "Wan/ComfyUI (diffusion_model.*) or musubi/kohya (lora_unet_*) keys"
            )
        if fmt is None:
            fmt, first_key = family[0], key
        elif family[0] is not fmt:
            raise LoraError(f"the file mixes LoRA formats: key {first_key!r} is {fmt}, key {key!r} is {family[0]}")
        if IGNORED_DELTA.search(family[1]):
            ignored.append(key)
            continue
        if family[1].endswith(".diff") and not family[1].endswith("head.head.diff"):
            raise LoraError(f"unsupported full-weight delta key {key!r}: only LoRA factors can be applied")
        renamed[family[1]] = tensor
        source[family[1]] = key
    for key in _unpaired_biases(renamed):
        del renamed[key]
        ignored.append(source[key])
    assert fmt is not None
    if not renamed:
        raise LoraError("the LoRA file has no LoRA factors (only norm or modulation deltas)")
    if fmt in (LoraFormat.WAN, LoraFormat.MUSUBI):
        if not any(key.startswith("diffusion_model.blocks.") for key in renamed):
            # diffusers' Wan converter finds the layers block by block (a bare `min() arg is an empty sequence`)
            raise LoraError("the LoRA has factors for no transformer block (only head or embeddings): not supported")
        renamed = _one_factor_naming(_fold_alphas(renamed))
        head = "diffusion_model.head.head"
        if f"{head}.diff" in renamed and f"{head}.diff_b" not in renamed:
            # diffusers' converter reads the head's bias delta beside its weight delta (a KeyError without it)
            weight = renamed[f"{head}.diff"]
            renamed[f"{head}.diff_b"] = torch.zeros(weight.shape[0], dtype=weight.dtype)
    if fmt is LoraFormat.PEFT and peft_config is not None:
        _apply_peft_scaling(renamed, _peft_scaling(peft_config))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converted = WanPipeline.lora_state_dict(renamed)
    except MemoryError:
        raise
    except Exception as exc:  # diffusers' converters fail on odd files in many ways (ZeroDivisionError for rank 0)
        raise LoraError(f"the {fmt} LoRA keys could not be converted: {type(exc).__name__}: {str(exc)[:300]}") from None
    assert isinstance(converted, dict)
    for key in converted:
        if not DIFFUSERS_KEY.match(key):
            raise LoraError(f"unexpected LoRA key {key!r} (after conversion to diffusers naming)")
    ignored += _bias_deltas_dropped(tensors, converted, already=set(ignored))
    if any(key.endswith(".lora_B.bias") for key in converted):
        # Once one layer carries a LoRA bias, PEFT gives every layer of the adapter one: those the file lacks
        # must be zeros, not left uninitialised.
        for key in [k for k in converted if k.endswith(".lora_B.weight")]:
            out_features = converted[key].shape[0]
            converted.setdefault(key[: -len("weight")] + "bias", torch.zeros(out_features, dtype=converted[key].dtype))
    peft_metadata = None
    if "lora_adapter_metadata" in metadata:  # a diffusers file keeps lora_alpha there; without it alpha = rank
        try:
            peft_metadata = json.loads(metadata["lora_adapter_metadata"])
        except ValueError:
            raise LoraError("the file's lora_adapter_metadata is not valid JSON") from None
    if isinstance(peft_metadata, dict):
        # A trainer's dropout (0.05-0.1 is common) is for training: PEFT would build its dropout modules in training
        # mode, and the same seed would give another video each time. (diffusers writes `transformer.lora_dropout`.)
        for name in [k for k in peft_metadata if k.rpartition(".")[2] == "lora_dropout"]:
            peft_metadata[name] = 0.0
    return ConvertedLora(converted, fmt, peft_metadata if isinstance(peft_metadata, dict) else None, ignored)


def _bias_deltas_dropped(
    tensors: Mapping[str, torch.Tensor], converted: Mapping[str, torch.Tensor], already: set[str]
) -> list[str]:
    """The file's bias deltas (`.diff_b`) that diffusers' converter left out without a word: those of layers it has
    no LoRA place for (`patch_embedding`, `time_projection` without factors). Each delta that was kept is a LoRA
    bias of the same values, whatever the layer's new name, so what has no equal among those was dropped."""

    def fingerprint(t: torch.Tensor) -> tuple[tuple[int, ...], bytes]:
        return tuple(t.shape), t.detach().float().contiguous().numpy().tobytes()  # float32 holds bf16/fp16 exactly

    # A set, not a comparison of every delta with every bias: a distill file has hundreds of each.
    kept = {fingerprint(b) for key, b in converted.items() if key.endswith(".lora_B.bias")}
    return [key for key, delta in tensors.items() if key.endswith("diff_b") and key not in already
            and fingerprint(delta) not in kept]  # fmt: skip


def _target_layer(modules: Mapping[str, torch.nn.Module], key: str) -> tuple[str, str, torch.nn.Linear]:
    match = DIFFUSERS_KEY.match(key)
    assert match is not None  # convert_lora checked every key
    name, part = match["module"], match["part"]
    layer = modules.get(name)
    layer = getattr(layer, "base_layer", layer)  # already wrapped by another adapter
    if not isinstance(layer, torch.nn.Linear):
        raise LoraError(f"key {key!r}: the model has no Linear layer {name!r}")
    return name, part, layer


def check_fits(state_dict: Mapping[str, torch.Tensor], modules: Mapping[str, torch.nn.Module]) -> None:
    """Every tensor must target an existing Linear layer (in `modules`, an expert's named modules) with matching
    sizes, and A and B must agree on the rank."""
    ranks: dict[str, tuple[str, int]] = {}
    for key, tensor in state_dict.items():
        name, part, layer = _target_layer(modules, key)
        expected: tuple[int | None, ...] = {
            "A.weight": (None, layer.in_features),
            "B.weight": (layer.out_features, None),
            "B.bias": (layer.out_features,),
        }[part]
        shape = tuple(tensor.shape)
        if len(shape) != len(expected) or any(e is not None and e != s for e, s in zip(expected, shape, strict=True)):
            raise LoraError(
                f"key {key!r}: shape {shape} does not fit layer {name} of shape {tuple(layer.weight.shape)}"
            )
        if part != "B.bias":
            rank = shape[0] if part == "A.weight" else shape[1]
            other = ranks.setdefault(name, (key, rank))
            if other[1] != rank:
                raise LoraError(f"key {key!r}: rank {rank} does not match rank {other[1]} of {other[0]!r}")
    for name in ranks:
        for part in ("lora_A", "lora_B"):
            if f"transformer.{name}.{part}.weight" not in state_dict:
                raise LoraError(f"layer {name} has no {part} weight")


def placed_for(
    state_dict: Mapping[str, torch.Tensor],
    modules: Mapping[str, torch.nn.Module],
    device: torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """A copy of the factors on `device` (default: each target layer's device) in the layer's compute dtype (an
    FP8 layer's `compute_dtype`). PEFT then adopts these tensors as the adapter's own (no throwaway random init),
    and no two experts ever share an adapter's storage. `device` is the GPU when the base weights are swapped or
    offloaded to host memory between forwards: adapters are small and stay where the forward runs."""
    out = {}
    for key, tensor in state_dict.items():
        layer = _target_layer(modules, key)[2]
        dtype = getattr(layer, "compute_dtype", layer.weight.dtype)
        out[key] = tensor.to(device=device or layer.weight.device, dtype=dtype, copy=True)
    for key in [k for k in out if k.endswith(".lora_B.bias")]:
        stem = key.removesuffix("lora_B.bias")
        if stem + "lora_A.weight" not in out:
            # A bias delta alone (a `diff_b` with no factors): PEFT makes the layer's factors anyway and, adopting
            # the given tensors as they are, would leave them uninitialised. Zero factors of rank 1 add the bias
            # alone (alpha = rank: scaled by the request's scale only).
            layer, bias = _target_layer(modules, key)[2], out[key]
            out[stem + "lora_A.weight"] = bias.new_zeros(1, layer.in_features)
            out[stem + "lora_B.weight"] = bias.new_zeros(layer.out_features, 1)
    return out


def _scales_as_tensors(module: torch.nn.Module) -> None:
    """PEFT keeps each layer's scale (request scale x alpha / rank) as a Python float, which a compiled block takes
    as a constant: every new scale would compile the block again. As a 0-d tensor (on the host: a scalar operand
    wherever the layer runs) it is an input of the graph instead."""
    for layer in module.modules():
        scaling = getattr(layer, "scaling", None)  # a PEFT LoRA layer's (peft is not imported where none load)
        if isinstance(scaling, dict) and hasattr(layer, "lora_A"):
            for name, value in scaling.items():
                if isinstance(value, float | int):
                    scaling[name] = torch.tensor(float(value), dtype=torch.float32)


def _factors(module: torch.nn.Module, name: str) -> list[tuple[str, torch.nn.Parameter]]:
    """Adapter `name`'s parameters in `module` (PEFT names them `<layer>.lora_A.<name>.weight`)."""
    return [(n, t) for n, t in module.named_parameters() if f".{name}." in f"{n}."]


def _has_adapters(module: torch.nn.Module) -> bool:
    return bool(getattr(module, "peft_config", None))


@dataclass
class _Resident:
    name: str  # the PEFT adapter name: no dots, never a prefix of a module name
    bytes_on: dict[int, int] = field(default_factory=dict)  # id(expert module) -> bytes it holds there

    @property
    def nbytes(self) -> int:
        return sum(self.bytes_on.values())


class LoraAdapters:
    """The adapters resident on a pipeline's experts, and which of them a request activates."""

    def __init__(
        self,
        experts: Mapping[ExpertName, WanTransformer3DModel],
        max_bytes: int,
        device: torch.device | None = None,
    ) -> None:
        # "high" and "low" may be one module (a single-expert model): adapters are tracked per module.
        self.experts = dict(experts)
        self.max_bytes = max_bytes
        self.device = device  # where adapters live (default: beside each layer's weight)
        self._resident: OrderedDict[str, _Resident] = OrderedDict()  # by LoraFile.identity, least recently used first

    def _modules(self, roles: Sequence[ExpertName]) -> list[WanTransformer3DModel]:
        unique: dict[int, WanTransformer3DModel] = {}
        for role in roles:
            unique.setdefault(id(self.experts[role]), self.experts[role])
        return list(unique.values())

    def _roles_of(self, module: WanTransformer3DModel) -> tuple[ExpertName, ...]:
        return tuple(role for role, m in self.experts.items() if m is module)

    @property
    def resident(self) -> list[str]:
        """The identities (content hash; with a PEFT config, of both) of the resident LoRAs, least recently used
        first."""
        return list(self._resident)

    @property
    def resident_bytes(self) -> int:
        return sum(r.nbytes for r in self._resident.values())

    def load(self, uses: Sequence[LoraUse]) -> list[LoraLoad]:
        """Makes every LoRA of a request resident on its experts. A LoRA that cannot be loaded fails with a
        `FieldError` naming its index; what was resident before stays as it was."""
        needed = {use.file.identity for use in uses}
        self._evict(protect=needed)  # make room first: the bound then holds while the new ones load
        reports = []
        for i, use in enumerate(uses):
            try:
                reports.append(self._load_one(use))
            except LoraError as exc:
                raise FieldError(("loras", i, "path"), exc, use.label) from exc
        self._evict(protect=needed)
        return reports

    def _load_one(self, use: LoraUse) -> LoraLoad:
        started = time.perf_counter()
        sha = use.file.identity
        entry = self._resident.get(sha) or _Resident(name=f"lora_{sha[:16]}")
        missing = [m for m in self._modules(use.experts) if id(m) not in entry.bytes_on]
        if not missing:
            self._resident.move_to_end(sha)
            return LoraLoad(use, (), None, 0, 0, time.perf_counter() - started)
        converted = convert_lora(*read_lora_file(use.file.path), use.file.peft_config)
        layers = {id(m): dict(m.named_modules()) for m in missing}
        for module in missing:  # every expert is checked before any is touched
            check_fits(converted.state_dict, layers[id(module)])
        loaded_into: list[ExpertName] = []
        for module in missing:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    module.load_lora_adapter(
                        placed_for(converted.state_dict, layers[id(module)], self.device),
                        prefix="transformer",
                        adapter_name=entry.name,
                        metadata=converted.metadata,
                        low_cpu_mem_usage=True,  # takes the placed tensors as they are
                    )
                unset = [n for n, t in _factors(module, entry.name) if t.is_meta]
                if unset:  # a factor the file did not provide would be garbage (or a crash) at the forward
                    raise LoraError(f"the LoRA leaves {len(unset)} adapter tensors unset (first: {unset[0]})")
                self._place(module, entry.name)
            except Exception as exc:
                self._remove(module, entry.name)
                if entry.bytes_on:
                    self._resident[sha] = entry
                if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
                    raise  # the server's limit, not the LoRA's fault: not a 422
                raise LoraError(f"cannot load the LoRA: {type(exc).__name__}: {str(exc)[:300]}") from exc
            itemsize = next(module.parameters()).element_size()
            entry.bytes_on[id(module)] = sum(t.numel() for t in converted.state_dict.values()) * itemsize
            loaded_into.extend(self._roles_of(module))
        self._resident[sha] = entry
        self._resident.move_to_end(sha)
        return LoraLoad(
            use,
            tuple(loaded_into),
            converted.format,
            len(converted.state_dict),
            len(converted.ignored),
            time.perf_counter() - started,
        )

    def _place(self, module: WanTransformer3DModel, name: str) -> None:
        """Puts adapter `name`'s factors where adapters live, and tells group offloading about them."""
        if self.device is not None:
            # PEFT put each factor beside its layer's weight, which for an expert swapped out is host memory that
            # the swap never uploads (it moves only the weights it adopted). PEFT's own move, to our device.
            for layer in module.modules():
                if name in getattr(layer, "lora_A", ()) and hasattr(layer, "_move_adapter_to_device_of_base_layer"):
                    layer._move_adapter_to_device_of_base_layer(name, device=self.device)
        # Group offloading (with CUDA streams) keeps a host copy of each parameter it knew when it was applied, and
        # looks every parameter up in it at each upload: applied again, it knows the new factors.
        _maybe_remove_and_reapply_group_offloading(module)

    def _remove(self, module: WanTransformer3DModel, name: str) -> None:
        peft_config = getattr(module, "peft_config", None) or {}
        if name in peft_config:
            module.delete_adapters(name)
        if not _has_adapters(module) and hasattr(module, "unload_lora"):
            # a failed load can leave PEFT wrappers behind even with no adapter: put the plain Linears back
            module.unload_lora()

    def _evict(self, protect: set[str]) -> None:
        while self.resident_bytes > self.max_bytes:
            victim = next((sha for sha in self._resident if sha not in protect), None)
            if victim is None:
                break  # the request's own LoRAs alone exceed the bound: they stay until the next request
            self.unload(victim)

    def unload(self, sha: str) -> None:
        entry = self._resident.pop(sha)
        for module in self._modules(list(self.experts)):
            if id(module) in entry.bytes_on:
                self._remove(module, entry.name)
        log.info("unloaded LoRA %s (%.1f MB)", sha[:12], entry.nbytes / 1e6)

    def unload_all(self) -> None:
        for sha in list(self._resident):
            self.unload(sha)

    @contextmanager
    def active(self, uses: Sequence[LoraUse]) -> Iterator[None]:
        """Activates exactly `uses` (already loaded) at their scales on their experts, for the `with` block.
        Scale 0 leaves a LoRA out; the same file twice on one expert adds its scales."""
        modules = self._modules(list(self.experts))
        weights: dict[int, dict[str, float]] = {id(m): {} for m in modules}
        for use in uses:
            if use.scale == 0:
                continue
            name = self._resident[use.file.identity].name
            for module in self._modules(use.experts):
                on = weights[id(module)]
                on[name] = on.get(name, 0.0) + use.scale
        try:
            for module in modules:
                if _has_adapters(module):
                    chosen = weights[id(module)]
                    module.set_adapters(list(chosen), list(chosen.values()))
                    _scales_as_tensors(module)
            yield
        finally:
            for module in modules:
                if _has_adapters(module):
                    module.set_adapters([], [])
