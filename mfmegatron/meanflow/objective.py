"""One MeanFlow distillation step: time sampling, z_t, the phase's target, adaptive loss and the
optional trajectory alignment term.

Where z_t comes from (an open choice in METHOD.md; ours, configurable via `z_source`):

- `"teacher_ode"` (default, data-free): draw ε, integrate the teacher ODE from t = 1 down to each
  sample's t with `z_ode_steps` (coarse, Euler by default) steps. The batch needs only noise and
  cond. z_t then lies on the teacher's own probability-flow trajectories — the trajectories whose
  average velocities the student learns, and the states the student visits when sampling (pure
  noise at t = 1, then its own jump end points). This is also the only construction that is right
  for a CFG teacher: the guided ODE's marginals are not the interpolation marginals of any data
  set, so `(1 - t) x + t ε` with real images would train off the guided trajectories. The
  targets are exact functions of whatever z_t is, so the coarse ODE only decides *where* we
  train, never *what* the target is. Cost: `z_ode_steps` no-grad teacher forwards per step.
- `"data"`: `z_t = (1 - t) x + t ε` from samples x given in the batch (real data, or a cache of
  teacher samples). Cheaper (no teacher ODE), but z_t follows the data's interpolation marginals,
  which match the teacher's only for an exact, unguided teacher.

Total loss: `L = L_meanflow + λ_align · L_align`, the alignment term from `align_start_step` on
(its fake network is trained separately with `fake_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from mfmegatron.flow_matching import interpolate
from mfmegatron.meanflow.alignment import TrajectoryAlignment
from mfmegatron.meanflow.interface import FlowTeacher, MeanFlowStudent
from mfmegatron.meanflow.loss import AdaptiveLossConfig, adaptive_weighted_loss
from mfmegatron.meanflow.targets import (
    DiscreteTargetConfig,
    ResidualNormalizationConfig,
    TargetOutput,
    differential_target,
    discrete_target,
    normalize_residual,
    relative_target_gap,
)
from mfmegatron.meanflow.time_sampling import TimeSamplerConfig, sample_time_pair
from mfmegatron.meanflow.warmup import DIFFERENTIAL, DISCRETE, FixedStepWarmup, WarmupSwitch
from mfmegatron.sampling.ode import OdeSolver, integrate_ode


@dataclass
class MeanFlowDistillationConfig:
    time_sampling: TimeSamplerConfig = field(default_factory=TimeSamplerConfig)
    z_source: Literal["teacher_ode", "data"] = "teacher_ode"
    z_ode_steps: int = 8
    z_ode_solver: OdeSolver = "euler"
    discrete: DiscreteTargetConfig = field(default_factory=DiscreteTargetConfig)
    residual_normalization: ResidualNormalizationConfig = field(default_factory=ResidualNormalizationConfig)
    loss: AdaptiveLossConfig = field(default_factory=AdaptiveLossConfig)
    align_weight: float = 0.0
    """λ_align; 0 disables the alignment term."""
    align_start_step: int = 0


@dataclass
class DistillationStepOutput:
    loss: Tensor
    """Total generator loss (with graph)."""
    phase: str
    """"discrete" or "differential": which MeanFlow target this step used."""
    stats: dict[str, float]


class MeanFlowDistillation:
    """Computes the student's loss for one training step.

    Args:
        teacher: frozen `FlowTeacher` (wrap a CFG teacher in `ClassifierFreeGuidanceTeacher`).
        student: `MeanFlowStudent` being trained.
        config: `MeanFlowDistillationConfig`.
        warmup: the warm-up switch (default: differential from step 0). Its state is part of
            `state_dict()`.
        alignment: optional `TrajectoryAlignment` (needs `config.align_weight > 0` to be used).
    """

    def __init__(
        self,
        teacher: FlowTeacher,
        student: MeanFlowStudent,
        config: MeanFlowDistillationConfig | None = None,
        warmup: WarmupSwitch | None = None,
        alignment: TrajectoryAlignment | None = None,
    ):
        self.teacher = teacher
        self.student = student
        self.config = config or MeanFlowDistillationConfig()
        self.warmup = warmup if warmup is not None else FixedStepWarmup(0)
        self.alignment = alignment
        if self.config.align_weight > 0 and alignment is None:
            raise ValueError("align_weight > 0 needs a TrajectoryAlignment")

    # -- pieces -----------------------------------------------------------------------------

    @torch.no_grad()
    def make_z_t(self, noise: Tensor, t: Tensor, cond: Any, x: Tensor | None = None) -> Tensor:
        """z_t per `config.z_source` (see the module docstring)."""
        if self.config.z_source == "data":
            if x is None:
                raise ValueError("z_source='data' needs x in the batch")
            return interpolate(x, noise, t)
        if self.config.z_source != "teacher_ode":
            raise ValueError(f"unknown z_source {self.config.z_source!r}")
        ones = torch.ones_like(t)
        solution = integrate_ode(
            self.teacher.velocity, noise, ones, t, cond, self.config.z_ode_steps, self.config.z_ode_solver
        )
        return solution.z_end

    def alignment_active(self, step: int) -> bool:
        return self.alignment is not None and self.config.align_weight > 0 and step >= self.config.align_start_step

    # -- the step ---------------------------------------------------------------------------

    def generator_loss(
        self,
        step: int,
        noise: Tensor,
        cond: Any = None,
        x: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> DistillationStepOutput:
        """The student's loss at training step `step` (advances the warm-up switch once)."""
        batch_size = noise.shape[0]
        t, r = sample_time_pair(self.config.time_sampling, batch_size, generator, noise.dtype, noise.device)
        z_t = self.make_z_t(noise, t, cond, x)

        # The discrete target is computed at most once per step: for the loss in the discrete
        # phase and/or for the warm-up's gap measurement on check steps.
        cached: dict[str, TargetOutput] = {}

        def get_discrete() -> TargetOutput:
            if "discrete" not in cached:
                cached["discrete"] = discrete_target(self.teacher, z_t, r, t, cond, self.config.discrete)
            return cached["discrete"]

        def measure_gap() -> float:
            discrete = get_discrete()
            with torch.no_grad():
                differential = differential_target(
                    self.teacher, self.student, z_t, r, t, cond, teacher_velocity=discrete.teacher_velocity
                )
            return relative_target_gap(discrete.target, differential.target, mask=t > r)

        phase = self.warmup.advance(step, measure_gap)

        if phase == DISCRETE:
            target = get_discrete()
            student_u = self.student.mean_velocity(z_t, r, t, cond)
        elif phase == DIFFERENTIAL:
            target = differential_target(self.teacher, self.student, z_t, r, t, cond)
            student_u = target.student_mean_velocity
        else:
            raise ValueError(f"unknown phase {phase!r}")

        u_target = normalize_residual(target.target, student_u, self.config.residual_normalization)
        meanflow = adaptive_weighted_loss(student_u, u_target, self.config.loss)
        total = meanflow.loss
        stats = meanflow.stats(prefix="meanflow_")
        stats.update(self.warmup.stats())
        stats["target_norm"] = float(u_target.reshape(batch_size, -1).norm(dim=1).mean())

        if self.alignment_active(step):
            align_noise = torch.randn(noise.shape, generator=generator, dtype=noise.dtype, device=noise.device)
            alignment = self.alignment.generator_loss(self.student, align_noise, cond, generator)
            total = total + self.config.align_weight * alignment.loss
            stats.update(alignment.stats)

        stats["loss"] = float(total.detach())
        return DistillationStepOutput(loss=total, phase=phase, stats=stats)

    def fake_loss(self, noise: Tensor, cond: Any = None, generator: torch.Generator | None = None):
        """Flow-matching loss of the alignment's fake network on fresh student samples."""
        if self.alignment is None:
            raise ValueError("no TrajectoryAlignment configured")
        return self.alignment.fake_loss(self.student, noise, cond, generator)

    # -- checkpointing ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"warmup": self.warmup.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.warmup.load_state_dict(state["warmup"])
