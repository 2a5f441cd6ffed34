"""Sample-based distances between 2-D point sets (float64 internally). ``mmd_rbf`` is
``mfmegatron.metrics``'s (the trainer's evaluation uses it too)."""

from __future__ import annotations

import torch
from torch import Tensor

from mfmegatron.metrics import mmd_rbf

__all__ = ["mmd_rbf", "sliced_wasserstein"]


def sliced_wasserstein(a: Tensor, b: Tensor, num_projections: int = 128, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between two equally sized point sets: the root mean, over
    random unit directions, of the squared 1-D W2 (sorted projections matched in order)."""
    if a.shape != b.shape:
        raise ValueError(f"sliced_wasserstein needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(a.shape[1], num_projections, generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=0, keepdim=True)
    projected_a = torch.sort(a.double() @ directions, dim=0).values
    projected_b = torch.sort(b.double() @ directions, dim=0).values
    return float((projected_a - projected_b).square().mean().sqrt())
