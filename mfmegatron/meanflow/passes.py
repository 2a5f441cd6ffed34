"""A trained network's evaluation, described rather than executed.

The objectives decide *what* a step evaluates with gradient (which network, at which inputs, with
which tangents) and *how the output becomes a loss*; the caller decides *how it runs*: directly
(`run_pass`, toy models and single-stage backbones) or through megatron's pipeline schedules in
micro-batches (the trainer). Everything a loss needs that does not come from the pass itself
(teacher velocities, discrete targets, alignment targets) is computed before, without gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from torch import Tensor

# loss_fn(output, output_tangent or None, rows) -> (mean loss over those rows, stats)
LossFunction = Callable[[Tensor, Tensor | None, slice], tuple[Tensor, dict[str, float]]]


@dataclass
class TrainingPass:
    """One evaluation with gradient whose loss is a function of the network's output.

    ``network`` is "student" (``u(z, r, t)``, or ``(u, du)`` with ``tangents``) or "flow" (a flow
    network ``v(z, t)``: the alignment's fake network, or a teacher trained by flow matching;
    ``r`` is ignored). ``loss_fn`` receives the output
    for the batch rows ``rows`` — all of them when run directly, one micro-batch's under pipeline
    parallelism — and returns the *mean* loss over those rows, so that averaging equal
    micro-batches gives the batch loss. ``weight`` multiplies the loss in the total.
    """

    name: str
    network: Literal["student", "flow"]
    z: Tensor
    r: Tensor | None
    t: Tensor
    loss_fn: LossFunction
    tangents: tuple[Tensor, Tensor, Tensor] | None = None
    weight: float = 1.0


def run_pass(training_pass: TrainingPass, network: Any, cond: Any) -> tuple[Tensor, dict[str, float]]:
    """Evaluate ``network`` (a MeanFlowStudent, or a FlowTeacher-like flow network) on the whole
    batch."""
    p = training_pass
    rows = slice(0, p.z.shape[0])
    if p.network == "flow":
        return p.loss_fn(network.velocity(p.z, p.t, cond), None, rows)
    if p.tangents is None:
        return p.loss_fn(network.mean_velocity(p.z, p.r, p.t, cond), None, rows)
    u, du = network.mean_velocity_jvp(p.z, p.r, p.t, cond, p.tangents)
    return p.loss_fn(u, du, rows)


def slice_rows(value: Any, rows: slice, batch_size: int) -> Any:
    """``value[rows]`` for per-sample tensors (leading dim = batch), unchanged otherwise."""
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch_size:
        return value[rows]
    return value
