"""Flow-matching conventions shared by `mfmegatron.meanflow` and `mfmegatron.sampling`.

As FLUX: `z_t = (1 - t) x + t ε`, t = 1 is noise, velocity `v = ε - x`, sampling runs from t = 1
to t = 0. Tensors are batch-first `[B, ...]`; times are `[B]` float tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor


def time_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of times, ODE states and targets for values of `dtype`: float32, or float64
    when the values are. Only networks run in bf16 (in bf16, 1000 · t moves in steps of 4)."""
    return torch.promote_types(dtype, torch.float32)


def broadcast_time(time: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample time `[B]` to `[B, 1, ..., 1]` so it broadcasts against `like`.

    Never lowers the time's precision: against a bf16 `like` a float32 time stays float32 (so
    `t · v` promotes to float32 instead of rounding t to bf16)."""
    if time.dim() != 1 or time.shape[0] != like.shape[0]:
        raise ValueError(f"expected a time of shape [{like.shape[0]}], got {tuple(time.shape)}")
    return time.reshape(time.shape[0], *([1] * (like.dim() - 1))).to(torch.promote_types(time.dtype, like.dtype))


def interpolate(x: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """`z_t = (1 - t) x + t ε`."""
    t = broadcast_time(t, x)
    return (1 - t) * x + t * noise


def clean_estimate(z: Tensor, t: Tensor, velocity: Tensor) -> Tensor:
    """The clean sample implied by a velocity at time t: `x̂ = z_t - t v` (exact for `v = ε - x`)."""
    return z - broadcast_time(t, z) * velocity


def per_sample_sum(x: Tensor) -> Tensor:
    """Sum over every dimension but the batch one: `[B, ...] -> [B]`."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


def per_sample_mean(x: Tensor) -> Tensor:
    """Mean over every dimension but the batch one: `[B, ...] -> [B]`."""
    return x.reshape(x.shape[0], -1).mean(dim=1)
