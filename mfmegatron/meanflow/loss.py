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
    elements_per_sample: int
    """Elements of one sample's `Δ` (the divisor of the "mean" reduction)."""
    reduction: str

    def output_gradient_norm(self) -> Tensor:
        """`[B]` the norm of `∂(w ||Δ||²)/∂u` for each sample: how hard the loss pulls on that
        sample's prediction (the batch mean's 1/B left out). "sum": `2 w ||Δ||₂`; "mean": the
        squared error is `||Δ||₂² / n`, so `2 w ||Δ||₂ / n`."""
        n = self.elements_per_sample if self.reduction == "mean" else 1
        return 2.0 * self.weight * (self.squared_error * n).sqrt() / n

    def stats(self, prefix: str = "", average_velocity: Tensor | None = None) -> dict[str, float]:
        """Batch means. With `average_velocity` (`[B]` bool, the samples with r < t) also each
        group's share of the squared error and of the output gradient norm, as sums over the
        group divided by the whole batch size, so that micro-batch and data-parallel means of
        them stay exact: in distillation the r = t samples start at zero error and their
        adaptive weight `1 / c` can make them dominate the step (`*_r_equals_t` against
        `*_r_below_t`)."""
        stats = {
            f"{prefix}loss": float(self.loss.detach()),
            f"{prefix}squared_error": float(self.squared_error.mean()),
            f"{prefix}weight_mean": float(self.weight.mean()),
        }
        if average_velocity is not None:
            gradient = self.output_gradient_norm()
            batch = self.squared_error.shape[0]
            for name, rows in (("r_below_t", average_velocity), ("r_equals_t", ~average_velocity)):
                stats[f"{prefix}squared_error_{name}"] = float(self.squared_error[rows].sum() / batch)
                stats[f"{prefix}output_gradient_{name}"] = float(gradient[rows].sum() / batch)
        return stats


def adaptive_weighted_loss(prediction: Tensor, target: Tensor, config: AdaptiveLossConfig) -> AdaptiveLossOutput:
    """Per-sample adaptive loss of `prediction` against `target` (the target is detached here)."""
    delta = prediction - target.detach()
    reduce = per_sample_sum if config.reduction == "sum" else per_sample_mean
    squared_error = reduce(delta.square())
    weight = 1.0 / (squared_error.detach() + config.c).pow(config.p)
    loss = (weight * squared_error).mean()
    return AdaptiveLossOutput(
        loss=loss, squared_error=squared_error.detach(), weight=weight,
        elements_per_sample=delta[0].numel(), reduction=config.reduction,
    )
