"""The official Wan2.2 checkpoint layout, converted to diffusers components on load.

    high_noise_model/   config.json + *.safetensors (original key names)  -> transformer
    low_noise_model/    config.json + *.safetensors                        -> transformer_2
    models_t5_umt5-xxl-enc-bf16.pth                                        -> text_encoder (UMT5)
    Wan2.1_VAE.pth                                                         -> vae
    google/umt5-xxl/    tokenizer files                                    -> tokenizer

The experts and the VAE go through diffusers' own single-file converters. The T5 checkpoint has no
converter anywhere, so its key mapping lives here (`t5_key_pairs`). Model sizes are read from the
weights themselves, so the same code loads the 14B experts and the tiny test model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
from diffusers.loaders.single_file_utils import (
    convert_wan_transformer_to_diffusers,
    convert_wan_vae_to_diffusers,
)
from safetensors.torch import load_file
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

from wanserve.engine.loading import load_component
from wanserve.engine.sampling import BOUNDARY_RATIO
from wanserve.engine.tiny import build_scheduler
from wanserve.errors import ModelLoadError

EXPERT_DIRS = {"transformer": "high_noise_model", "transformer_2": "low_noise_model"}
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
VAE_FILE = "Wan2.1_VAE.pth"
TOKENIZER_DIR = "google/umt5-xxl"


def t5_key_pairs(num_layers: int) -> Iterator[tuple[str, str]]:
    """(official key, transformers UMT5EncoderModel key) for every weight of the encoder."""
    yield "token_embedding.weight", "shared.weight"
    yield "token_embedding.weight", "encoder.embed_tokens.weight"
    for i in range(num_layers):
        src, dst = f"blocks.{i}.", f"encoder.block.{i}.layer."
        yield src + "norm1.weight", dst + "0.layer_norm.weight"
        for proj in "qkvo":
            yield src + f"attn.{proj}.weight", dst + f"0.SelfAttention.{proj}.weight"
        # UMT5: every block has its own relative position bias.
        yield src + "pos_embedding.embedding.weight", dst + "0.SelfAttention.relative_attention_bias.weight"
        yield src + "norm2.weight", dst + "1.layer_norm.weight"
        yield src + "ffn.gate.0.weight", dst + "1.DenseReluDense.wi_0.weight"
        yield src + "ffn.fc1.weight", dst + "1.DenseReluDense.wi_1.weight"
        yield src + "ffn.fc2.weight", dst + "1.DenseReluDense.wo.weight"
    yield "norm.weight", "encoder.final_layer_norm.weight"


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelLoadError(f"official Wan2.2 layout is incomplete: missing {path}")
    try:
        try:
            # mmap: a 10 GiB T5 checkpoint is paged in, not read into memory twice.
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as exc:
        raise ModelLoadError(f"corrupt checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"corrupt checkpoint {path}: expected a state dict of tensors")
    return state


def _load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    result = module.load_state_dict(state, strict=False, assign=True)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ModelLoadError(f"{source} does not match the model: {detail}")


def _num_blocks(state: dict[str, torch.Tensor], prefix: str = "blocks.") -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def load_text_encoder(path: Path, dtype: torch.dtype) -> UMT5EncoderModel:
    state = _torch_load(path)
    try:
        vocab, d_model = state["token_embedding.weight"].shape
        num_layers = _num_blocks(state)
        buckets, heads = state["blocks.0.pos_embedding.embedding.weight"].shape
        inner = state["blocks.0.attn.q.weight"].shape[0]
        d_ff = state["blocks.0.ffn.fc1.weight"].shape[0]
    except KeyError as exc:
        raise ModelLoadError(f"{path} is not a UMT5 encoder checkpoint: no key {exc}") from exc
    config = UMT5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=inner // heads,
        d_ff=d_ff,
        num_layers=num_layers,
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    mapped: dict[str, torch.Tensor] = {}
    for src, dst in t5_key_pairs(num_layers):
        if src not in state:
            raise ModelLoadError(f"{path} is incomplete: no key {src}")
        mapped[dst] = state[src].to(dtype)
    # Parameters on the meta device (no allocation); buffers such as rope tables stay real.
    with init_empty_weights():
        model = UMT5EncoderModel(config)
    _load_strict(model, mapped, path)
    return model.eval()


def _expert_config(folder: Path, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    cfg_file = folder / "config.json"
    try:
        raw = json.loads(cfg_file.read_text())
    except FileNotFoundError as exc:
        raise ModelLoadError(f"official Wan2.2 layout is incomplete: missing {cfg_file}") from exc
    except ValueError as exc:
        raise ModelLoadError(f"corrupt {cfg_file}: {exc}") from exc
    try:
        dim, heads = int(raw["dim"]), int(raw["num_heads"])
        patch = tuple(state["patch_embedding.weight"].shape[2:])
        # `text_dim` is not stored by the official config (always 4096): read it off the weights.
        text_dim = state["text_embedding.0.weight"].shape[1]
        return {
            "patch_size": patch,
            "num_attention_heads": heads,
            "attention_head_dim": dim // heads,
            "in_channels": int(raw.get("in_dim", 16)),
            "out_channels": int(raw.get("out_dim", 16)),
            "text_dim": int(text_dim),
            "freq_dim": int(raw.get("freq_dim", 256)),
            "ffn_dim": int(raw["ffn_dim"]),
            "num_layers": int(raw["num_layers"]),
            "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads",
            "eps": float(raw.get("eps", 1e-6)),
            "rope_max_seq_len": 1024,
        }
    except KeyError as exc:
        raise ModelLoadError(f"{cfg_file} or its weights lack {exc}") from exc


def _read_expert_weights(folder: Path) -> dict[str, torch.Tensor]:
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        try:
            shards = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
        except (ValueError, KeyError) as exc:
            raise ModelLoadError(f"corrupt {index[0]}: {exc}") from exc
        files = [folder / s for s in shards]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"official Wan2.2 layout is incomplete: no *.safetensors in {folder}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise ModelLoadError(f"official Wan2.2 layout is incomplete: missing shard {f}")
        try:
            state.update(load_file(f))
        except Exception as exc:
            raise ModelLoadError(f"corrupt weights file {f}: {type(exc).__name__}: {exc}") from exc
    return state


def load_expert(folder: Path, dtype: torch.dtype) -> WanTransformer3DModel:
    if not folder.is_dir():
        raise ModelLoadError(f"official Wan2.2 layout is incomplete: missing folder {folder}")
    state = _read_expert_weights(folder)
    config = _expert_config(folder, state)
    converted = {k: v.to(dtype) for k, v in convert_wan_transformer_to_diffusers(state).items()}
    with init_empty_weights():
        model = WanTransformer3DModel(**config)
    _load_strict(model, converted, folder)
    return model.eval()


def load_vae(path: Path) -> AutoencoderKLWan:
    state = _torch_load(path)
    try:
        base_dim = state["decoder.head.2.weight"].shape[1]
        z_dim = state["conv2.weight"].shape[0]
    except KeyError as exc:
        raise ModelLoadError(f"{path} is not a Wan 2.1 VAE checkpoint: no key {exc}") from exc
    converted = {k: v.float() for k, v in convert_wan_vae_to_diffusers(state).items()}
    with init_empty_weights():
        model = AutoencoderKLWan(base_dim=int(base_dim), z_dim=int(z_dim))
    _load_strict(model, converted, path)
    return model.eval()


def load_official_dir(root: Path, dtype: torch.dtype) -> WanPipeline:
    tok_dir = root / TOKENIZER_DIR
    if not tok_dir.is_dir():
        raise ModelLoadError(f"official Wan2.2 layout is incomplete: missing tokenizer folder {tok_dir}")
    tokenizer = load_component(
        "tokenizer", tok_dir, lambda: AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    )
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=load_text_encoder(root / T5_FILE, dtype),
        vae=load_vae(root / VAE_FILE),
        scheduler=build_scheduler(),
        transformer=load_expert(root / EXPERT_DIRS["transformer"], dtype),
        transformer_2=load_expert(root / EXPERT_DIRS["transformer_2"], dtype),
        boundary_ratio=BOUNDARY_RATIO,
    )
