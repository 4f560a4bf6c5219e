"""Decoding latents with the Wan VAE.

diffusers' `AutoencoderKLWan` decodes one latent frame at a time through its causal decoder and grows the output
with a `torch.cat` per frame, which copies the whole video again for every frame (21 times at 81 frames). On a GPU
that is a few milliseconds; on a CPU it is half of the tiny models' decode time, which the demo, the service tests
and CPU deployments pay on every video. `decode_latents` runs the same decoder calls and joins the frames once.
Where diffusers' own decode does more (tiled decode, offload hooks that move the VAE) or the device is a GPU, it
is used unchanged.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify


def decode_latents(vae: AutoencoderKLWan, z: torch.Tensor) -> torch.Tensor:
    """The video of (unnormalised) latents `z`, (batch, channels, frames, height, width) in [-1, 1]: exactly what
    `vae.decode(z).sample` returns (tests compare the two bit for bit)."""
    hooked = getattr(vae, "_hf_hook", None) is not None or getattr(vae, "_diffusers_hook", None) is not None
    if z.device.type != "cpu" or vae.use_tiling or hooked:
        return vae.decode(z, return_dict=False)[0]
    vae.clear_cache()
    try:
        x = vae.post_quant_conv(z)
        chunks = []
        for i in range(x.shape[2]):
            vae._conv_idx = [0]
            chunks.append(
                vae.decoder(x[:, :, i : i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=i == 0)
            )
    finally:
        vae.clear_cache()
    out = torch.cat(chunks, 2)
    if vae.config.patch_size is not None:
        out = unpatchify(out, patch_size=vae.config.patch_size)
    return out.clamp(-1.0, 1.0)
