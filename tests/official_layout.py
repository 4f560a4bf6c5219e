"""Write a diffusers-format Wan pipeline in the official Wan2.2 layout (original key names).

Tests only: a real official checkpoint cannot be downloaded here, so we make one from a tiny model.
The inverse key maps below are checked against diffusers' own forward converters in test_loading.py,
so a wrong inverse fails there rather than silently agreeing with itself.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
from safetensors.torch import save_file

from wanserve.engine.official import EXPERT_DIRS, T5_FILE, TOKENIZER_DIR, VAE_FILE, t5_key_pairs

_EXPERT_RENAMES = [
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn1", "self_attn"),
    ("attn2", "cross_attn"),
    (".to_out.0.", ".o."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    ("proj_out", "head.head"),
]


def expert_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        new = key
        if new == "scale_shift_table":
            new = "head.modulation"
        new = new.replace(".scale_shift_table", ".modulation")
        for a, b in _EXPERT_RENAMES:
            new = new.replace(a, b)
        # diffusers' norm2 is the original norm3 (cross-attention norm) and vice versa.
        new = re.sub(r"\.norm2\.", ".norm__x.", new).replace(".norm3.", ".norm2.").replace(".norm__x.", ".norm3.")
        out[new] = value.contiguous()
    return out


def _resnet_to_official(rest: str) -> str:
    for a, b in [
        ("norm1.gamma", "residual.0.gamma"),
        ("conv1.", "residual.2."),
        ("norm2.gamma", "residual.3.gamma"),
        ("conv2.", "residual.6."),
        ("conv_shortcut.", "shortcut."),
    ]:
        if rest.startswith(a):
            return b + rest[len(a) :]
    return rest


def vae_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of diffusers' convert_wan_vae_to_diffusers for the standard Wan 2.1 VAE structure."""
    out = {}
    fixed = {
        "encoder.conv_in.": "encoder.conv1.",
        "decoder.conv_in.": "decoder.conv1.",
        "encoder.norm_out.": "encoder.head.0.",
        "encoder.conv_out.": "encoder.head.2.",
        "decoder.norm_out.": "decoder.head.0.",
        "decoder.conv_out.": "decoder.head.2.",
        "quant_conv.": "conv1.",
        "post_quant_conv.": "conv2.",
    }
    for key, value in state.items():
        new = None
        for a, b in fixed.items():
            if key.startswith(a):
                new = b + key[len(a) :]
        if new is None and (m := re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d)\.(.*)", key)):
            side, kind, idx, rest = m.groups()
            pos = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[(kind, idx)]
            rest = _resnet_to_official(rest) if kind == "resnets" else rest
            new = f"{side}.middle.{pos}.{rest}"
        if new is None and (m := re.match(r"encoder\.down_blocks\.(\d+)\.(.*)", key)):
            new = f"encoder.downsamples.{m.group(1)}.{_resnet_to_official(m.group(2))}"
        if new is None and (m := re.match(r"decoder\.up_blocks\.(\d)\.resnets\.(\d)\.(.*)", key)):
            block, res, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            new = f"decoder.upsamples.{4 * block + res}.{_resnet_to_official(rest)}"
        if new is None and (m := re.match(r"decoder\.up_blocks\.(\d)\.upsamplers\.0\.(.*)", key)):
            new = f"decoder.upsamples.{4 * int(m.group(1)) + 3}.{m.group(2)}"
        out[new or key] = value.contiguous()
    return out


def t5_to_official(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    return {src: state[dst].contiguous() for src, dst in t5_key_pairs(num_layers)}


def write_official_layout(pipe: WanPipeline, root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    experts: dict[str, WanTransformer3DModel] = {
        "transformer": pipe.transformer,
        "transformer_2": pipe.transformer_2,
    }
    for name, model in experts.items():
        folder = root / EXPERT_DIRS[name]
        folder.mkdir()
        c = model.config
        dim = c.num_attention_heads * c.attention_head_dim
        config = {
            "_class_name": "WanModel",
            "model_type": "t2v",
            "dim": dim,
            "ffn_dim": c.ffn_dim,
            "freq_dim": c.freq_dim,
            "in_dim": c.in_channels,
            "out_dim": c.out_channels,
            "num_heads": c.num_attention_heads,
            "num_layers": c.num_layers,
            "eps": c.eps,
            "text_len": 512,
        }
        (folder / "config.json").write_text(json.dumps(config))
        save_file(expert_to_official(model.state_dict()), folder / "diffusion_pytorch_model.safetensors")
    vae: AutoencoderKLWan = pipe.vae
    torch.save(vae_to_official(vae.state_dict()), root / VAE_FILE)
    te = pipe.text_encoder
    torch.save(
        {k: v.to(torch.bfloat16) for k, v in t5_to_official(te.state_dict(), te.config.num_layers).items()},
        root / T5_FILE,
    )
    pipe.tokenizer.save_pretrained(root / TOKENIZER_DIR)
    return root
