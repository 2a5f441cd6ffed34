"""Sampling of the MeanFlow time pair (t, r), 0 <= r <= t <= 1.

As the official MeanFlow recipe: draw two logit-normal times and sort them so that t >= r; then
each sample has r = t with probability `equal_fraction` (those samples train the instantaneous
velocity, i.e. plain flow matching of the teacher's velocity; the rest train average velocities).

The decision is per sample, not an exact count per batch: with an exact count a data-parallel
rank holding one or two samples would round `0.75 · B` up to B and never see r < t. In the
trainer the pairs of a whole global batch are drawn from one generator keyed by (seed, step)
(`global_batch_time_pair`), so a global sample gets the same (t, r) at any data-parallel size or
micro-batching.

Times are float32 (or float64) whatever the network's dtype: in bf16, 1000 · t moves in steps of
4 and t - r of short intervals rounds to 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

TIME_DTYPES = (torch.float32, torch.float64)


@dataclass
class TimeSamplerConfig:
    t_mean: float = -0.4
    """Mean of the normal whose sigmoid is the first time draw (official default -0.4)."""
    t_std: float = 1.0
    r_mean: float = -0.4
    """Mean of the normal for the second draw; after sorting the larger draw is t."""
    r_std: float = 1.0
    equal_fraction: float = 0.75
    """Probability that a sample has r = t (official default 0.75), decided per sample."""


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
    """Return `(t, r)`, each `[B]` in `dtype` (float32 or float64), with `t >= r` everywhere and
    `r == t` on each sample with probability `config.equal_fraction`."""
    if not 0.0 <= config.equal_fraction <= 1.0:
        raise ValueError(f"equal_fraction must be in [0, 1], got {config.equal_fraction}")
    if dtype not in TIME_DTYPES:
        raise ValueError(f"times are drawn in float32 or float64, not {dtype}")
    kwargs = dict(dtype=dtype, device=device)
    first = sample_logit_normal(batch_size, config.t_mean, config.t_std, generator, **kwargs)
    second = sample_logit_normal(batch_size, config.r_mean, config.r_std, generator, **kwargs)
    t = torch.maximum(first, second)
    r = torch.minimum(first, second)
    equal = torch.rand(batch_size, generator=generator, **kwargs) < config.equal_fraction
    return t, torch.where(equal, t, r)


def global_batch_time_pair(
    config: TimeSamplerConfig,
    seed: int,
    step: int,
    global_batch_size: int,
    rows: slice,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """The float32 `(t, r)` of the global samples `rows` of training step `step`.

    The whole global batch is drawn on the CPU from a generator keyed by (seed, step) and this
    rank's rows are taken, so a sample's times depend only on its index in the global batch:
    the same at any data-parallel size, micro-batching or device. (Drawing `global_batch_size`
    numbers is negligible next to a model evaluation.)
    """
    if not 0 <= rows.start < rows.stop <= global_batch_size:
        raise ValueError(f"rows {rows} outside a global batch of {global_batch_size}")
    generator = torch.Generator()
    generator.manual_seed((seed * 1_000_003 + step * 7_919 + 104_729) % (2**63 - 1))
    t, r = sample_time_pair(config, global_batch_size, generator)
    return t[rows].to(device), r[rows].to(device)
