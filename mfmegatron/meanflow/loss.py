"""Adaptive weighted MeanFlow regression loss.

`L = mean_i  w_i ||Δ_i||²`, `Δ_i = u_θ(z_t, r, t)_i - sg(u_tgt)_i`, `w_i = 1 / sg(||Δ_i||² + c)^p`.

With p = 1 each sample contributes `||Δ||² / (||Δ||² + c)`, a robust (≈ log-like) loss whose
gradient is the plain L2 one rescaled by `1 / (||Δ||² + c)`: samples with huge errors (rare large
targets, early JVP noise) cannot dominate the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from mfmegatron.flow_matching import per_sample_mean, per_sample_sum


@dataclass
class AdaptiveLossConfig:
    c: float = 1e-3
    """Offset in the weight (official 1e-3; METHOD.md allows up to 1e-2)."""
    p: float = 1.0
    """Power of the weight; p = 0 gives the plain squared error."""
    reduction: Literal["sum", "mean"] = "sum"
    """How `||Δ||²` reduces over the non-batch dims. "sum" (the official MeanFlow choice) makes c
    relatively smaller for large latents; "mean" makes c mean the same at any latent size."""


@dataclass
class AdaptiveLossOutput:
    loss: Tensor
    """Scalar: batch mean of `w ||Δ||²` (has graph)."""
    squared_error: Tensor
    """`[B]` `||Δ||²`, detached."""
    weight: Tensor
    """`[B]` adaptive weights, detached."""

    def stats(self, prefix: str = "") -> dict[str, float]:
        return {
            f"{prefix}loss": float(self.loss.detach()),
            f"{prefix}squared_error": float(self.squared_error.mean()),
            f"{prefix}weight_mean": float(self.weight.mean()),
        }


def adaptive_weighted_loss(prediction: Tensor, target: Tensor, config: AdaptiveLossConfig) -> AdaptiveLossOutput:
    """Per-sample adaptive loss of `prediction` against `target` (the target is detached here)."""
    delta = prediction - target.detach()
    reduce = per_sample_sum if config.reduction == "sum" else per_sample_mean
    squared_error = reduce(delta.square())
    weight = 1.0 / (squared_error.detach() + config.c).pow(config.p)
    loss = (weight * squared_error).mean()
    return AdaptiveLossOutput(loss=loss, squared_error=squared_error.detach(), weight=weight)
