"""Real images -> FLUX's packed latents: the ``x`` of ``z_t = (1 - t) x + t ε`` for
``meanflow.z_source=data``.

The convention is diffusers' FLUX pipelines' (diffusers 0.42, ``FluxImg2ImgPipeline.
_encode_vae_image`` and ``FluxPipeline._pack_latents``):

* ``latents = (vae.encode(images).latent_dist.sample(generator) - shift_factor) * scaling_factor``
  with images ``[b, 3, H, W]`` in [-1, 1]; the pipeline draws a *sample* of the encoder's Gaussian
  with its generator (``latent="mean"`` takes the Gaussian's mean instead: deterministic);
* 2x2 latent patches packed into tokens, ``[b, c, h, w] -> [b, (h/2)(w/2), 4c]``, row-major over
  patches, channel-major within a token (``c, dy, dx``) — the layout the transformer's
  ``x_embedder`` and the trainer's ``img_ids`` (row, column of each patch) expect.

The VAE is FLUX.1's ``AutoencoderKL`` (the ``vae`` folder of a FLUX.1 pipeline: 16 latent
channels, 8x downsampling, its own ``shift_factor`` / ``scaling_factor``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from mfmegatron.pixels import depth_to_space, space_to_depth

VAE_LATENTS = ("sample", "mean")
# The transformer packs 2x2 latent patches into one token.
PATCH = 2


def pack_latents(latents: Tensor) -> Tensor:
    """``[b, c, h, w] -> [b, (h/2)(w/2), 4c]``: 2x2 patches as tokens (diffusers' FLUX packing)."""
    # Contiguous, as a reshape would make it: a strided view sends convolutions and GEMMs to
    # other kernels, whose results differ from diffusers' in the last bits.
    return space_to_depth(latents, PATCH).flatten(2).transpose(1, 2).contiguous()


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """``pack_latents`` undone: ``[b, height * width, 4c] -> [b, c, 2 height, 2 width]`` (height,
    width: the token grid)."""
    b, _, packed = tokens.shape
    return depth_to_space(tokens.transpose(1, 2).reshape(b, packed, height, width), PATCH).contiguous()


class PixelImageEncoder:
    """``model.latent_space=pixels``: the images themselves, in [-1, 1], are the networks' x,
    packed in 2x2 patches like latents (``in_channels`` = 3 x 4 = 12)."""

    def __init__(self, in_channels: int):
        if in_channels != 3 * PATCH * PATCH:
            raise ValueError(
                f"model.latent_space=pixels needs in_channels {3 * PATCH * PATCH} (RGB in {PATCH}x{PATCH} "
                f"patches); the network has {in_channels} (set model.overrides.in_channels)"
            )

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return pack_latents(images.float())


class FluxImageEncoder:
    """FLUX's VAE as the trainer's image encoder: ``encoder(images, generator) -> x``.

    Args:
        vae: a diffusers ``AutoencoderKL`` on the device it should run on.
        latent: ``"sample"`` (diffusers' pipelines) or ``"mean"`` of the encoder's Gaussian.
        latent_channels: the channels the transformer unpacks (its ``in_channels / 4``); checked
            against the VAE so a mismatched VAE fails when it is loaded, not in the first step.
        downsample: pixels per latent cell the trainer assumes (FLUX: 8); checked likewise.
    """

    def __init__(self, vae, latent: str = "sample", *, latent_channels: int | None = None,
                 downsample: int | None = None):  # fmt: skip
        if latent not in VAE_LATENTS:
            raise ValueError(f"model.vae_latent must be one of {VAE_LATENTS}, not {latent!r}")
        config = vae.config
        if latent_channels is not None and config.latent_channels != latent_channels:
            raise ValueError(
                f"the VAE has {config.latent_channels} latent channels; the transformer takes "
                f"{latent_channels} (its in_channels / 4)"
            )
        vae_downsample = 2 ** (len(config.block_out_channels) - 1)
        if downsample is not None and vae_downsample != downsample:
            raise ValueError(f"the VAE downsamples by {vae_downsample}; FLUX's latents need {downsample}")
        # Run under no_grad; requires_grad stays as diffusers loads it: measured on CPU, frozen
        # weights take other convolution kernels, which differ from the pipeline's in the last bit.
        self.vae = vae.eval()
        self.latent = latent
        # FLUX.1's VAE has a shift (0.1159); VAEs without one (SD's) store None.
        self.shift = float(config.shift_factor or 0.0)
        self.scale = float(config.scaling_factor)

    @classmethod
    def from_pretrained(cls, path: str | Path, device, dtype: torch.dtype, latent: str = "sample",
                        **checks) -> "FluxImageEncoder":  # fmt: skip
        """A diffusers ``AutoencoderKL`` folder (e.g. FLUX.1-dev's ``vae``), loaded in ``dtype``."""
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(str(path), torch_dtype=dtype).to(device)
        return cls(vae, latent, **checks)

    @torch.no_grad()
    def latents(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``[b, 3, H, W]`` in [-1, 1] -> the VAE's scaled latents ``[b, c, H/8, W/8]`` (unpacked:
        what ``build_image_shards --vae`` stores). ``generator`` draws the posterior samples."""
        parameter = next(self.vae.parameters())
        posterior = self.vae.encode(images.to(parameter.device, parameter.dtype)).latent_dist
        latents = posterior.sample(generator) if self.latent == "sample" else posterior.mode()
        return (latents - self.shift) * self.scale

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``[b, 3, H, W]`` in [-1, 1] -> packed latents ``[b, (H/16)(W/16), 4c]`` in the VAE's
        dtype (the networks' input layout)."""
        return pack_latents(self.latents(images, generator))
