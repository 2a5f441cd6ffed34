"""Sample-based distances between 2-D point sets (float64 internally)."""

from __future__ import annotations

import torch
from torch import Tensor


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


def mmd_rbf(
    a: Tensor, b: Tensor, bandwidths: tuple[float, ...] = (0.05, 0.2, 1.0), max_samples: int = 1000
) -> float:
    """Biased (V-statistic) squared MMD with a sum of Gaussian kernels `exp(-d² / (2 σ²))`, on at
    most the first `max_samples` points of each set (the cost is quadratic)."""
    a, b = a[:max_samples].double(), b[:max_samples].double()

    def kernel(x: Tensor, y: Tensor) -> Tensor:
        # |x - y|² via one matmul (torch.cdist is much slower here in float64 on CPU).
        squared_distance = (x.square().sum(1)[:, None] + y.square().sum(1)[None, :] - 2 * x @ y.T).clamp_min(0)
        return sum(torch.exp(-squared_distance / (2 * sigma**2)) for sigma in bandwidths)

    return float(kernel(a, a).mean() + kernel(b, b).mean() - 2 * kernel(a, b).mean())
