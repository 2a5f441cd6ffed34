"""Pixel-space networks (``model.latent_space=pixels``): the RGB image in [-1, 1] is the x of
``z_t = (1 - t) x + t ε``, folded space-to-depth so a small world's image is a short sequence.

One definition for every family: FLUX packs 2x2 pixel patches into tokens, HunyuanImage 3.0
keeps a grid of ``factor``x``factor`` patches (its image path embeds one token per grid cell).
The channel order within a cell is channel-major (``c, dy, dx``), torch's ``pixel_unshuffle``
and diffusers' FLUX packing alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def space_to_depth(images: Tensor, factor: int) -> Tensor:
    """``[b, c, H, W] -> [b, c·factor², H/factor, W/factor]`` (exactly invertible)."""
    height, width = images.shape[-2:]
    if height % factor or width % factor:
        raise ValueError(f"a {height}x{width} grid is not divisible into {factor}x{factor} patches")
    return F.pixel_unshuffle(images, factor)


def depth_to_space(grid: Tensor, factor: int) -> Tensor:
    """``space_to_depth`` undone: ``[b, c·factor², h, w] -> [b, c, h·factor, w·factor]``."""
    return F.pixel_shuffle(grid, factor)


def to_unit_range(pixels: Tensor) -> Tensor:
    """A network's pixels in [-1, 1] (a sample may overshoot) -> an image in [0, 1]."""
    return ((pixels + 1) / 2).clamp(0, 1)


__all__ = ["space_to_depth", "depth_to_space", "to_unit_range"]
