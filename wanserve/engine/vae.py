"""Decoding latents with the Wan VAE, a piece of the video at a time.

diffusers' `AutoencoderKLWan` decodes one latent frame at a time through its causal decoder (each piece depends
only on the latent frames before it) and grows the output with a `torch.cat` per frame, which copies the whole
video again for every frame (21 times at 81 frames). `decoded_pieces` runs the same decoder calls and hands each
piece over as it is made: `decode_video` turns it into uint8 on the VAE's device and gives it to the mp4 writer,
which encodes it while the next piece decodes; only uint8 frames cross to the host (a quarter of float32's bytes),
and the GPU holds one piece of float output instead of the whole video. Where diffusers' decode does more (a tiled
decode, offload hooks that move the VAE), it runs unchanged and its whole video is the one piece.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Iterator
from contextlib import closing, contextmanager

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

from wanserve.engine.video import pixels_to_uint8
from wanserve.errors import is_out_of_memory

log = logging.getLogger(__name__)


def decoded_pieces(vae: AutoencoderKLWan, z: torch.Tensor) -> Generator[torch.Tensor, None, None]:
    """The video of (unnormalised) latents `z`, (batch, channels, frames, height, width) in [-1, 1], in pieces
    along time: joined, exactly what `vae.decode(z).sample` returns (tests compare the two bit for bit)."""
    hooked = getattr(vae, "_hf_hook", None) is not None or getattr(vae, "_diffusers_hook", None) is not None
    if vae.use_tiling or hooked:
        yield vae.decode(z, return_dict=False)[0]
        return
    vae.clear_cache()
    try:
        x = vae.post_quant_conv(z)
        for i in range(x.shape[2]):
            vae._conv_idx = [0]
            piece = vae.decoder(
                x[:, :, i : i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=i == 0
            )
            if vae.config.patch_size is not None:  # a spatial rearrangement: frame by frame as on the whole video
                piece = unpatchify(piece, patch_size=vae.config.patch_size)
            yield piece.clamp(-1.0, 1.0)
    finally:  # also when the caller stops early: the causal cache holds a piece's worth of activations
        vae.clear_cache()


def decode_latents(vae: AutoencoderKLWan, z: torch.Tensor) -> torch.Tensor:
    """The whole video of `z` at once, as `vae.decode(z).sample`."""
    return torch.cat(list(decoded_pieces(vae, z)), 2)


@contextmanager
def tiling(vae: AutoencoderKLWan, tiled: bool) -> Iterator[None]:
    """`vae` decodes tiled (diffusers' tiled decode, default tile sizes) or not within the block."""
    before = vae.use_tiling
    vae.use_tiling = tiled
    try:
        yield
    finally:
        vae.use_tiling = before


def decode_video(
    vae: AutoencoderKLWan,
    z: torch.Tensor,
    num_frames: int,
    on_frames: Callable[[np.ndarray], None] | None = None,
    tiled: bool | None = None,
) -> np.ndarray:
    """The first `num_frames` frames of `z`'s video (batch 1) as uint8 RGB, (num_frames, height, width, 3).
    `on_frames` gets each piece as soon as it is on the host. Latent frames past `num_frames` are not decoded.
    `tiled` (None: as the VAE is set) picks diffusers' tiled decode. An untiled decode that runs out of GPU memory
    (the memory forecast was wrong) goes on tiled: `on_frames` still sees every frame once, in order."""
    pieces: list[np.ndarray] = []
    kept = 0

    def take(piece: torch.Tensor, skip: int = 0) -> bool:
        nonlocal kept
        # [-1, 1] -> [0, 1] as diffusers' VideoProcessor does (its clamp is pixels_to_uint8's), then uint8 on the
        # VAE's device; (channels, frames, h, w) -> (frames, h, w, channels) in uint8, a quarter of the bytes.
        pixels = pixels_to_uint8(piece[0, :, skip:] / 2 + 0.5).permute(1, 2, 3, 0).contiguous()
        frames = pixels[: num_frames - kept].cpu().numpy()
        pieces.append(frames)
        kept += len(frames)
        if on_frames is not None:
            on_frames(frames)
        return kept >= num_frames

    tiled = vae.use_tiling if tiled is None else tiled
    out_of_memory = False
    with tiling(vae, tiled), closing(decoded_pieces(vae, z)) as decoded:
        while True:
            try:
                piece = next(decoded, None)
            except Exception as exc:  # the decode's own failure (not the sink's): any kind of allocation failure
                if tiled or not is_out_of_memory(exc):
                    raise
                out_of_memory = True
            if out_of_memory or piece is None or take(piece):
                break
    if not out_of_memory:
        return np.concatenate(pieces)
    # Out of the except block, so that the failed attempt's tensors (held by its traceback) are freed first.
    log.warning("the VAE decode ran out of GPU memory after %d frames; decoding the rest in tiles", kept)
    if z.is_cuda:
        torch.cuda.empty_cache()
    with tiling(vae, True):
        take(vae.decode(z, return_dict=False)[0], skip=kept)
    return np.concatenate(pieces)
