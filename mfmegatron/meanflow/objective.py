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

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
from torch import Tensor

from mfmegatron.flow_matching import interpolate, time_dtype
from mfmegatron.meanflow.alignment import StudentCleanEstimates, TrajectoryAlignment
from mfmegatron.meanflow.interface import FlowTeacher, MeanFlowStudent
from mfmegatron.meanflow.loss import AdaptiveLossConfig, adaptive_weighted_loss
from mfmegatron.meanflow.passes import TrainingPass, run_pass
from mfmegatron.meanflow.targets import (
    DiscreteTargetConfig,
    ResidualNormalizationConfig,
    SelectCondition,
    TargetOutput,
    differential_target,
    differential_target_from_jvp,
    discrete_target,
    meanflow_tangents,
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
    gap_interval: int = 50
    """Every N steps, measure the relative gap between the discrete and the differential target
    on the batch's r < t samples and log it as ``target_gap``, whatever the warm-up policy and
    phase (on those steps: the discrete target's teacher solves and one student JVP, no grad).
    The automatic warm-up's checks reuse the same measurement. 0: only on those checks."""


@dataclass
class StepPlan:
    phase: str
    """"discrete" or "differential": which MeanFlow target this step uses."""
    passes: list[TrainingPass]
    """The student passes with gradient; the step's loss is the sum of their weighted losses."""
    stats: dict[str, float]
    alignment_samples: StudentCleanEstimates | None = None
    """The student rollout of the alignment term (when active): the fake network's updates of
    this step train on it (`MeanFlowDistillation.fake_pass`)."""


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
        reduce_gap: combines the warm-up gap measured on this process's batch with the other
            data-parallel replicas' (the trainer averages it), so every replica switches at the
            same step. Default: this batch's gap alone.
        select_condition: `(cond, index) -> cond` of the batch rows `index`; lets the discrete
            target solve the teacher ODE only for the r < t rows. Without it (and a non-None
            cond) the whole batch is solved.
    """

    def __init__(
        self,
        teacher: FlowTeacher,
        student: MeanFlowStudent,
        config: MeanFlowDistillationConfig | None = None,
        warmup: WarmupSwitch | None = None,
        alignment: TrajectoryAlignment | None = None,
        reduce_gap: Callable[[float], float] | None = None,
        select_condition: SelectCondition | None = None,
        agree_max: Callable[[int], int] | None = None,
    ):
        self.reduce_gap = reduce_gap or (lambda gap: gap)
        # The maximum of an integer over the ranks whose network calls must match one for one
        # (expert-parallel ranks exchange tokens inside every forward): the few decisions that
        # depend on the batch (solve the discrete target, the solver's iterations, measure the
        # gap) are taken on it. None: every rank decides alone.
        self.agree_max = agree_max or (lambda value: value)
        self.teacher = teacher
        self.student = student
        self.config = config or MeanFlowDistillationConfig()
        self.warmup = warmup if warmup is not None else FixedStepWarmup(0)
        self.alignment = alignment
        self.select_condition = select_condition
        if self.config.align_weight > 0 and alignment is None:
            raise ValueError("align_weight > 0 needs a TrajectoryAlignment")

    # -- pieces -----------------------------------------------------------------------------

    @torch.no_grad()
    def make_z_t(self, noise: Tensor, t: Tensor, cond: Any, x: Tensor | None = None) -> Tensor:
        """z_t per `config.z_source` (see the module docstring), in float32 (or float64)."""
        state_dtype = time_dtype(noise.dtype)
        if self.config.z_source == "data":
            if x is None:
                raise ValueError("z_source='data' needs x in the batch")
            return interpolate(x.to(state_dtype), noise.to(state_dtype), t.to(state_dtype))
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

    def plan(
        self,
        step: int,
        noise: Tensor,
        cond: Any = None,
        x: Tensor | None = None,
        generator: torch.Generator | None = None,
        times: tuple[Tensor, Tensor] | None = None,
    ) -> StepPlan:
        """Everything of training step `step` that needs no gradient, and the passes that do.

        Samples (t, r) (or takes `times`, the trainer's draw keyed by global sample index),
        builds z_t, advances the warm-up switch once, computes the phase's target inputs (the
        discrete target; or the teacher velocity for the differential one) and, when active,
        the alignment target. Returns the student passes whose weighted losses sum to the step's
        generator loss (see `passes.py`). Times and z_t are float32 whatever the noise's dtype.
        """
        batch_size = noise.shape[0]
        if times is None:
            dtype = time_dtype(noise.dtype)
            times = sample_time_pair(self.config.time_sampling, batch_size, generator, dtype, noise.device)
        t, r = times
        z_t = self.make_z_t(noise, t, cond, x)

        # Each piece is computed at most once per step: the teacher velocity (every phase), the
        # discrete target (discrete phase and/or gap measurement) and the gap itself.
        cached: dict[str, Any] = {}

        def teacher_velocity() -> Tensor:
            if "velocity" not in cached:
                with torch.no_grad():
                    velocity = self.teacher.velocity(z_t, t, cond)
                    cached["velocity"] = velocity.to(time_dtype(velocity.dtype))
            return cached["velocity"]

        def get_discrete() -> TargetOutput:
            if "discrete" not in cached:
                cached["discrete"] = discrete_target(
                    self.teacher, z_t, r, t, cond, self.config.discrete, teacher_velocity(), self.select_condition,
                    self.agree_max,
                )
            return cached["discrete"]

        def measure_gap() -> float:
            if "gap" not in cached:
                gap = math.nan  # a batch without r < t samples has no gap (and costs nothing)
                if self.agree_max(int(bool((t > r).any()))):
                    with torch.no_grad():
                        differential = differential_target(
                            self.teacher, self.student, z_t, r, t, cond, teacher_velocity=teacher_velocity()
                        )
                    gap = relative_target_gap(get_discrete().target, differential.target, mask=t > r)
                # Every replica reduces, also those without a gap of their own.
                cached["gap"] = self.reduce_gap(gap)
            return cached["gap"]

        phase = self.warmup.advance(step, measure_gap)
        interval = self.config.gap_interval
        if interval and step % interval == 0:
            measure_gap()
        stats = dict(self.warmup.stats())
        if "gap" in cached:
            stats["target_gap"] = cached["gap"]
        stats["time_r_below_t_fraction"] = float((t > r).float().mean())
        stats["time_interval_mean"] = float((t - r).mean())
        if phase == DISCRETE:
            passes = [self._discrete_pass(z_t, r, t, get_discrete().target)]
        elif phase == DIFFERENTIAL:
            passes = [self._differential_pass(z_t, r, t, teacher_velocity())]
        else:
            raise ValueError(f"unknown phase {phase!r}")
        samples = None
        if self.alignment_active(step):
            align_noise = torch.randn(noise.shape, generator=generator, dtype=noise.dtype, device=noise.device)
            samples = self.alignment.rollout(self.student, align_noise, cond, generator)
            alignment = self.alignment.generator_pass(samples, cond, generator)
            alignment.weight = self.config.align_weight
            passes.append(alignment)
        return StepPlan(phase=phase, passes=passes, stats=stats, alignment_samples=samples)

    def _meanflow_loss(self, u: Tensor, u_target: Tensor, average_velocity: Tensor) -> tuple[Tensor, dict[str, float]]:
        u_target = normalize_residual(u_target, u, self.config.residual_normalization)
        meanflow = adaptive_weighted_loss(u, u_target, self.config.loss)
        stats = meanflow.stats(prefix="meanflow_", average_velocity=average_velocity)
        stats["target_norm"] = float(u_target.reshape(u_target.shape[0], -1).norm(dim=1).mean())
        return meanflow.loss, stats

    def _discrete_pass(self, z_t: Tensor, r: Tensor, t: Tensor, target: Tensor) -> TrainingPass:
        def loss_fn(u: Tensor, du: Tensor | None, rows: slice):
            return self._meanflow_loss(u, target[rows], t[rows] > r[rows])

        return TrainingPass(name="meanflow", network="student", z=z_t, r=r, t=t, loss_fn=loss_fn)

    def _differential_pass(self, z_t: Tensor, r: Tensor, t: Tensor, teacher_velocity: Tensor) -> TrainingPass:
        """The MeanFlow identity target needs the student's own JVP: the pass evaluates the
        student with the tangents, and its loss forms the target from the tangent output with
        `differential_target_from_jvp`, the formula `differential_target` uses."""

        def loss_fn(u: Tensor, du: Tensor, rows: slice):
            target = differential_target_from_jvp(teacher_velocity[rows], r[rows], t[rows], du)
            return self._meanflow_loss(u, target, t[rows] > r[rows])

        return TrainingPass(
            name="meanflow", network="student", z=z_t, r=r, t=t, loss_fn=loss_fn,
            tangents=meanflow_tangents(teacher_velocity, r, t),
        )

    def generator_loss(
        self,
        step: int,
        noise: Tensor,
        cond: Any = None,
        x: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> DistillationStepOutput:
        """The student's loss at training step `step`, evaluated directly (single-stage models)."""
        plan = self.plan(step, noise, cond, x, generator)
        total, stats = None, dict(plan.stats)
        for training_pass in plan.passes:
            loss, pass_stats = run_pass(training_pass, self.student, cond)
            stats.update(pass_stats)
            weighted = training_pass.weight * loss
            total = weighted if total is None else total + weighted
        stats["loss"] = float(total.detach())
        return DistillationStepOutput(loss=total, phase=plan.phase, stats=stats)

    def fake_pass(
        self, samples: StudentCleanEstimates, cond: Any = None, generator: torch.Generator | None = None
    ) -> TrainingPass:
        """The alignment's fake-network update as a pass on the fake network, on a rollout
        (`StepPlan.alignment_samples`)."""
        if self.alignment is None:
            raise ValueError("no TrajectoryAlignment configured")
        return self.alignment.fake_pass(samples, cond, generator)

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
