"""Training a flow network (a teacher) from data by flow matching: ``train.objective=flow_matching``.

The loss is the rectified-flow / FLUX one, ``E ||v(z_t, t) - (ε - x)||²`` with
``z_t = (1 - t) x + t ε`` (``mfmegatron.flow_matching``), x the batch's images (or latents), t
drawn by the recipe's time sampler (its r is not used). The trainer runs it like a MeanFlow step:
one pass with gradient through the same runner, optimizer, EMA, checkpoints and export, so a
teacher is trained by the same code that later distils it (the shapes world's teacher).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mfmegatron.flow_matching import interpolate, per_sample_mean, time_dtype
from mfmegatron.meanflow.objective import StepPlan
from mfmegatron.meanflow.passes import TrainingPass

FLOW_MATCHING = "flow_matching"


class FlowMatchingTraining:
    """The step plan of flow-matching training: one "flow" pass of the trained network."""

    def plan(
        self,
        step: int,
        noise: Tensor,
        cond: Any = None,
        x: Tensor | None = None,
        generator: torch.Generator | None = None,
        times: tuple[Tensor, Tensor] | None = None,
    ) -> StepPlan:
        if x is None:
            raise ValueError("flow-matching training needs data: set meanflow.z_source=data (image shards)")
        if times is None:
            raise ValueError("flow-matching training needs the step's times")
        t = times[0].to(time_dtype(noise.dtype))
        x = x.to(t.dtype)
        z_t = interpolate(x, noise, t)
        target = noise - x

        def loss_fn(v: Tensor, dv: Tensor | None, rows: slice):
            loss = per_sample_mean((v.to(target.dtype) - target[rows]).square()).mean()
            return loss, {"flow_matching_loss": float(loss.detach())}

        stats = {"time_mean": float(t.mean())}
        return StepPlan(FLOW_MATCHING, [TrainingPass(FLOW_MATCHING, "flow", z_t, None, t, loss_fn)], stats)

    # The trainer checkpoints its objective's state; this one has none.
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


__all__ = ["FLOW_MATCHING", "FlowMatchingTraining"]
