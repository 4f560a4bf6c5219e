"""LoRA files for tests, written from random factors with the shapes of a given expert, in every layout
the server accepts. The same factors can be written in several layouts, so tests can check that the
layouts mean the same thing (alpha folding, key renaming) and not only that each one loads."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import WanPipeline, WanTransformer3DModel
from peft import LoraConfig
from safetensors.torch import save_file

ATTENTION = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0"}
# wan name -> diffusers module name, for every block layer a Wan LoRA usually targets
Factors = dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]


def block_layers(expert: WanTransformer3DModel) -> list[tuple[str, str]]:
    out = []
    for i in range(len(expert.blocks)):
        for side, attn in (("self_attn", "attn1"), ("cross_attn", "attn2")):
            out += [(f"blocks.{i}.{side}.{w}", f"blocks.{i}.{attn}.{d}") for w, d in ATTENTION.items()]
        out += [(f"blocks.{i}.ffn.0", f"blocks.{i}.ffn.net.0.proj"), (f"blocks.{i}.ffn.2", f"blocks.{i}.ffn.net.2")]
    return out


def random_factors(expert: WanTransformer3DModel, rank: int = 4, seed: int = 0, std: float = 0.3) -> Factors:
    """(A, B) per layer: A is (rank, in), B is (out, rank)."""
    g = torch.Generator().manual_seed(seed)
    factors: Factors = {}
    for wan, diffusers in block_layers(expert):
        out_features, in_features = expert.get_submodule(diffusers).weight.shape
        a = torch.randn(rank, in_features, generator=g) * std
        b = torch.randn(out_features, rank, generator=g) * std
        factors[(wan, diffusers)] = (a, b)
    return factors


def scaled(factors: Factors, factor: float) -> Factors:
    return {k: (a, b * factor) for k, (a, b) in factors.items()}


def write_wan(path: Path, factors: Factors, alpha: float | None = None, names: str = "lora_down") -> Path:
    """The original Wan layout (`diffusion_model.`), lora_down/lora_up (+ alpha) or ComfyUI's lora_A/lora_B."""
    down, up = ("lora_down", "lora_up") if names == "lora_down" else ("lora_A", "lora_B")
    sd: dict[str, torch.Tensor] = {}
    for (wan, _), (a, b) in factors.items():
        sd[f"diffusion_model.{wan}.{down}.weight"] = a.contiguous()
        sd[f"diffusion_model.{wan}.{up}.weight"] = b.contiguous()
        if alpha is not None:
            sd[f"diffusion_model.{wan}.alpha"] = torch.tensor(float(alpha))
    save_file(sd, path)
    return path


def write_musubi(path: Path, factors: Factors, alpha: float) -> Path:
    """musubi-tuner / kohya: `lora_unet_blocks_0_self_attn_q.lora_down.weight`, alpha on every module."""
    sd: dict[str, torch.Tensor] = {}
    for (wan, _), (a, b) in factors.items():
        name = "lora_unet_" + wan.replace(".", "_")
        sd[f"{name}.lora_down.weight"] = a.contiguous()
        sd[f"{name}.lora_up.weight"] = b.contiguous()
        sd[f"{name}.alpha"] = torch.tensor(float(alpha))
    save_file(sd, path)
    return path


def write_diffusers(path: Path, factors: Factors, alpha: float, dropout: float = 0.0) -> Path:
    """What diffusers' own `WanPipeline.save_lora_weights` writes (alpha, and the trainer's dropout, kept in the
    file's metadata)."""
    rank = next(iter(factors.values()))[0].shape[0]
    layers = {}
    for (_, module), (a, b) in factors.items():
        layers[f"{module}.lora_A.weight"] = a.contiguous()
        layers[f"{module}.lora_B.weight"] = b.contiguous()
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=sorted({m for _, m in factors}))
    with tempfile.TemporaryDirectory() as tmp:
        WanPipeline.save_lora_weights(
            tmp, transformer_lora_layers=layers, transformer_lora_adapter_metadata=config.to_dict()
        )
        path.write_bytes((Path(tmp) / "pytorch_lora_weights.safetensors").read_bytes())
    return path


def write_peft(path: Path, factors: Factors) -> Path:
    """peft's `save_pretrained` layout (`base_model.model.` keys; its alpha lives in adapter_config.json)."""
    sd = {}
    for (_, module), (a, b) in factors.items():
        sd[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        sd[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    save_file(sd, path)
    return path


def write_lightx2v(path: Path, expert: WanTransformer3DModel, factors: Factors, seed: int = 1) -> Path:
    """A lightx2v/Kijai distill-style file: lora_A/lora_B plus `diff_b` biases, a full `head.head` delta, text
    embedding factors, and deltas no LoRA can apply, which are ignored: norm/modulation deltas, and bias deltas of the
    patch embedding and of the time projection (no factors there)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for (wan, module), (a, b) in factors.items():
        sd[f"diffusion_model.{wan}.lora_A.weight"] = a.contiguous()
        sd[f"diffusion_model.{wan}.lora_B.weight"] = b.contiguous()
        if wan.endswith(".q"):
            sd[f"diffusion_model.{wan}.diff_b"] = torch.randn(expert.get_submodule(module).out_features, generator=g)
    head = expert.proj_out.weight
    sd["diffusion_model.head.head.diff"] = torch.randn(*head.shape, generator=g) * 0.05
    sd["diffusion_model.head.head.diff_b"] = torch.randn(head.shape[0], generator=g) * 0.05
    text = expert.condition_embedder.text_embedder.linear_1
    sd["diffusion_model.text_embedding.0.lora_A.weight"] = torch.randn(4, text.in_features, generator=g) * 0.1
    sd["diffusion_model.text_embedding.0.lora_B.weight"] = torch.randn(text.out_features, 4, generator=g) * 0.1
    dim = expert.proj_out.in_features
    sd["diffusion_model.blocks.0.norm3.diff"] = torch.randn(dim, generator=g) * 0.01
    sd["diffusion_model.blocks.0.self_attn.norm_q.diff"] = torch.randn(dim, generator=g) * 0.01
    sd["diffusion_model.blocks.0.modulation.diff"] = torch.randn(1, 6, dim, generator=g) * 0.01
    sd["diffusion_model.patch_embedding.diff_b"] = torch.randn(dim, generator=g) * 0.01
    sd["diffusion_model.time_projection.1.diff_b"] = torch.randn(6 * dim, generator=g) * 0.01
    save_file(sd, path)
    return path
