"""The built-in tiny Wan 2.2 model: random weights, the real architecture classes, built in code.

Nothing is downloaded: the tokenizer is a Unigram model whose vocabulary is written here, the text
encoder is a 2-layer `UMT5EncoderModel`, the two experts are 2-layer `WanTransformer3DModel`s and the
VAE is an `AutoencoderKLWan`. Everything is seeded, so the same build gives the same weights.

Two VAE layouts exist:
- `fast` (the built-in `tiny`): a 4x pixel patch, two (spatio-temporal) down stages and 2-4 channels, so the decoder
  never runs a convolution at full resolution. A 480p, 81-frame video decodes in a few seconds on a
  laptop CPU, which is what makes the demo and the service tests practical. Latents are 16x smaller
  spatially than the pixels, so the experts use a 1x1x1 patch to keep the real token count.
- `coarse`: the `fast` layout with an 8x pixel patch: 32x smaller latents, so a video costs a fraction
  of `fast` (about 1 s at 480p). Only sizes divisible by 32 (480p, 580p) fit; the queue load tests use it.
- `wan2.1`: the exact block structure of the official `Wan2.1_VAE.pth` (only narrower) with the
  standard 1x2x2 expert patch: the layout that `Wan2.1_VAE.pth` and diffusers' converter expect. Tests
  use it to round-trip a tiny model through the official Wan2.2 directory layout.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from wanserve.engine.sampling import BOUNDARY_RATIO
from wanserve.errors import ModelLoadError

log = logging.getLogger(__name__)

# Bump when anything below changes, so cached builds are rebuilt.
TINY_VERSION = 3
TEXT_MAX_LENGTH = 512

_WORDS = (
    "a an the of in on at to with and or is are was by for from into over under through while as cat "
    "dog fox bird fish horse woman man girl boy child people city street forest river ocean sea "
    "mountain snow rain sun moon sky cloud light night day fire water tree flower car train boat "
    "walks runs flies swims jumps dances looks stands sits moves slowly quickly gently red green "
    "blue yellow black white gray golden bright dark warm cold neon glowing stylish long small big "
    "old young beautiful cinematic camera shot close-up wide colors overexposed static blurred "
    "details subtitles style artwork painting picture still overall worst quality low jpeg "
    "compression residue ugly incomplete extra fingers poorly drawn hands faces deformed disfigured "
    "malformed limbs fused cluttered background three legs many walking backwards tokyo filled "
    "animated signage she he wears leather jacket dress boots carries purse "
).split()
_CHARS = [chr(c) for c in range(33, 127)]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A small T5-style Unigram tokenizer (lower-cases, splits on whitespace with a ▁ marker)."""
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [("▁" + w, -2.0) for w in _WORDS]
    vocab += [(c, -8.0) for c in _CHARS] + [("▁" + c, -9.0) for c in _CHARS]
    seen: set[str] = set()
    unique = [(p, s) for p, s in vocab if not (p in seen or seen.add(p))]  # type: ignore[func-returns-value]
    tok = Tokenizer(models.Unigram(unique, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=TEXT_MAX_LENGTH,
    )


@dataclass(frozen=True)
class TinyConfig:
    vae: Literal["fast", "coarse", "wan2.1"] = "fast"
    text_dim: int = 32
    heads: int = 2
    head_dim: int = 12
    ffn_dim: int = 64
    layers: int = 2
    seed: int = 0

    @property
    def expert_patch(self) -> tuple[int, int, int]:
        return (1, 2, 2) if self.vae == "wan2.1" else (1, 1, 1)


def build_text_encoder(cfg: TinyConfig, vocab_size: int) -> UMT5EncoderModel:
    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=cfg.text_dim,
        d_kv=8,
        d_ff=cfg.text_dim * 2,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return UMT5EncoderModel(config)


def build_expert(cfg: TinyConfig) -> WanTransformer3DModel:
    return WanTransformer3DModel(
        patch_size=cfg.expert_patch,
        num_attention_heads=cfg.heads,
        attention_head_dim=cfg.head_dim,
        in_channels=16,
        out_channels=16,
        text_dim=cfg.text_dim,
        freq_dim=256,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,
    )


def build_vae(cfg: TinyConfig) -> AutoencoderKLWan:
    if cfg.vae == "wan2.1":
        return AutoencoderKLWan(base_dim=4, z_dim=16)
    patch = 8 if cfg.vae == "coarse" else 4
    return AutoencoderKLWan(
        base_dim=2,
        z_dim=16,
        dim_mult=[1, 2, 2],
        num_res_blocks=0,
        temperal_downsample=[True, True],
        patch_size=patch,
        in_channels=3 * patch * patch,
        out_channels=3 * patch * patch,
        scale_factor_spatial=4 * patch,
        scale_factor_temporal=4,
    )


def build_scheduler() -> UniPCMultistepScheduler:
    # flow_shift is a placeholder: the engine builds a fresh scheduler with the request's shift.
    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0, num_train_timesteps=1000
    )


def _reinit(module: torch.nn.Module, std: float) -> None:
    """Random weights big enough that every layer visibly matters (defaults zero some of them)."""
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            torch.nn.init.normal_(p, std=std)
        elif "norm" in name or "gamma" in name or name.endswith("weight"):
            torch.nn.init.normal_(p, mean=1.0, std=0.1)
        else:
            torch.nn.init.normal_(p, std=std)


def build_tiny_pipeline(cfg: TinyConfig | None = None) -> WanPipeline:
    """A complete Wan 2.2 T2V pipeline with tiny random float32 weights, deterministic in cfg.seed."""
    cfg = cfg or TinyConfig()
    with torch.random.fork_rng(devices=[]):  # seed locally: callers' RNG state is left alone
        torch.manual_seed(cfg.seed)
        return _build(cfg)


def _build(cfg: TinyConfig) -> WanPipeline:
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(cfg, len(tokenizer))
    _reinit(text_encoder, 0.5)
    transformer = build_expert(cfg)
    _reinit(transformer, 0.2)
    transformer_2 = build_expert(cfg)
    _reinit(transformer_2, 0.2)
    vae = build_vae(cfg)
    # Small weights keep the decoded noise low-contrast: a 480p test video is ~2 MB, not ~10 MB.
    _reinit(vae, 0.1)
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder.eval(),
        vae=vae.eval(),
        scheduler=build_scheduler(),
        transformer=transformer.eval(),
        transformer_2=transformer_2.eval(),
        boundary_ratio=BOUNDARY_RATIO,
    )


def ensure_tiny_model(cache_dir: Path, cfg: TinyConfig | None = None) -> Path:
    """Build the tiny model once into `cache_dir` in diffusers layout and return its directory.

    The model is then loaded by the same code that loads a real checkpoint. The directory appears
    atomically (built in a temporary sibling, checked complete, then renamed), so concurrent workers never see
    half. One found incomplete (left by an older version) is built again.
    """
    from wanserve.engine.loading import check_diffusers_dir

    cfg = cfg or TinyConfig()
    target = cache_dir / f"tiny-v{TINY_VERSION}-{cfg.vae}-s{cfg.seed}"
    if (target / "model_index.json").is_file():
        try:
            check_diffusers_dir(target)
            return target
        except ModelLoadError as exc:
            log.warning("the built-in tiny model in %s is broken (%s): building it again", target, exc)
            _remove_dir(target, cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=cache_dir))
    try:
        build_tiny_pipeline(cfg).save_pretrained(staging, safe_serialization=True)
        try:
            check_diffusers_dir(staging)
        except ModelLoadError as exc:
            # transformers writes no text encoder on a torch.distributed rank other than 0 (a GPU group's ranks):
            # the launcher builds the model before it starts them.
            raise ModelLoadError(f"the built-in tiny model was not saved completely: {exc}") from None
        try:
            os.rename(staging, target)
        except OSError:
            # Another process finished first; theirs is identical.
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _remove_dir(path: Path, parent: Path) -> None:
    """Takes `path` out of the way in one rename (a process loading it now sees it whole or not at all), then
    deletes it. Another process doing the same first is fine."""
    aside = Path(tempfile.mkdtemp(prefix=".broken-", dir=parent)) / path.name
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        pass
    finally:
        shutil.rmtree(aside.parent, ignore_errors=True)
