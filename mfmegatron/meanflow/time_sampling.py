"""Sampling of the MeanFlow time pair (t, r), 0 <= r <= t <= 1.

As the official MeanFlow recipe: draw two logit-normal times, sort them so that t >= r, then
set r = t for a fixed fraction of the batch (those samples train the instantaneous velocity, i.e.
plain flow matching of the teacher's velocity; the rest train average velocities).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TimeSamplerConfig:
    t_mean: float = -0.4
    """Mean of the normal whose sigmoid is the first time draw (official default -0.4)."""
    t_std: float = 1.0
    r_mean: float = -0.4
    """Mean of the normal for the second draw; after sorting the larger draw is t."""
    r_std: float = 1.0
    equal_fraction: float = 0.75
    """Fraction of the batch with r = t (official default 0.75). The count is exact:
    `round(equal_fraction * B)` samples, at random positions."""


def sample_logit_normal(
    batch_size: int, mean: float, std: float, generator: torch.Generator | None = None, **tensor_kwargs
) -> Tensor:
    normal = torch.randn(batch_size, generator=generator, **tensor_kwargs)
    return torch.sigmoid(normal * std + mean)


def sample_time_pair(
    config: TimeSamplerConfig,
    batch_size: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """Return `(t, r)`, each `[B]`, with `t >= r` everywhere and `r == t` exactly on
    `round(config.equal_fraction * B)` samples."""
    if not 0.0 <= config.equal_fraction <= 1.0:
        raise ValueError(f"equal_fraction must be in [0, 1], got {config.equal_fraction}")
    kwargs = dict(dtype=dtype, device=device)
    first = sample_logit_normal(batch_size, config.t_mean, config.t_std, generator, **kwargs)
    second = sample_logit_normal(batch_size, config.r_mean, config.r_std, generator, **kwargs)
    t = torch.maximum(first, second)
    r = torch.minimum(first, second)

    num_equal = round(config.equal_fraction * batch_size)
    equal_positions = torch.randperm(batch_size, generator=generator, device=device)[:num_equal]
    r = r.clone()
    r[equal_positions] = t[equal_positions]
    return t, r
