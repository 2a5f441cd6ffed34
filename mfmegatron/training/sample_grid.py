"""The trainer's sample grids: student samples as a picture, without decoding latents."""

from __future__ import annotations

from pathlib import Path

import torch

from mfmegatron.pixels import to_unit_range


def save_sample_grid(samples: dict[int, torch.Tensor], path, pixels: bool = False) -> None:
    """Rows: number of student steps; columns: samples. ``samples``: ``{num_steps: [n, C, H, W]}``
    on the latent (or pixel) grid. Pixels in [-1, 1] are shown as they are; latents by their first
    three channels, each image normalised to its own range (no VAE decode)."""
    from PIL import Image

    rows = []
    side = None
    for steps in sorted(samples):
        grid = samples[steps].float().cpu()[:, :3]
        side = grid.shape[-1]
        if pixels:
            grid = to_unit_range(grid)
        else:
            low = grid.amin(dim=(1, 2, 3), keepdim=True)
            high = grid.amax(dim=(1, 2, 3), keepdim=True)
            grid = (grid - low) / (high - low + 1e-8)
        rows.append(torch.cat(list(grid), dim=2))
    picture = torch.cat(rows, dim=1)  # [3, rows*H, n*W]
    scale = max(1, 256 // (2 * side))
    picture = picture.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    array = (picture.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
