"""Distances between sets of samples: the toy demo's and the trainer's evaluation's."""

from __future__ import annotations

import torch
from torch import Tensor


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


def sample_distance(images, reference, pool: int = 4) -> dict[str, float]:
    """How far ``images`` are from ``reference`` made from the same prompts and noise: both float
    images [n, 3, H, W] in [0, 1], or both latents [n, ...] (a family without a decoder):

    - ``paired_rmse``: root mean squared difference between paired samples;
    - ``mmd``: squared MMD (Gaussian kernels at 0.5, 1 and 2 times the median pairwise distance of
      the reference) between the two sets of ``pool`` x ``pool`` average-pooled images (latents
      as they are): a distribution distance that does not need the pairing.
    """
    images, reference = images.double(), reference.double()
    if images.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(images.shape)} and {tuple(reference.shape)}")
    paired = float((images - reference).square().mean().sqrt())
    def features(x):
        return torch.nn.functional.avg_pool2d(x, pool).flatten(1) if x.dim() == 4 else x.flatten(1)

    a, b = features(images), features(reference)
    median = float(torch.cdist(b, b).median().clamp_min(1e-6))
    return {"paired_rmse": paired, "mmd": mmd_rbf(a, b, bandwidths=(0.5 * median, median, 2 * median))}


__all__ = ["mmd_rbf", "sample_distance"]
