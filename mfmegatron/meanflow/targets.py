"""MeanFlow regression targets for the student's average velocity `u_θ(z_t, r, t)`.

Two targets, both stop-gradient:

- **discrete** (the warm-up target): solve the teacher ODE from t to r and take the average
  velocity of that solution, `u_tgt = (z_t - z_r) / (t - r)`. No student term at all, so an
  undertrained student cannot corrupt its own target. Cost: N (Euler) or 2N (Heun) teacher
  forwards, no JVP.
- **differential** (the MeanFlow identity): `u_tgt = v_T(z_t, t) - (t - r) · d/dt u_θ(z_t, r, t)`,
  where the total derivative along the teacher's flow is the JVP of the student with tangents
  `(t_z, t_r, t_t) = (v_T, 0, 1)`. Cost: one teacher forward and one student JVP.

Both give exactly `v_T(z_t, t)` where r = t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from mfmegatron.flow_matching import broadcast_time, time_dtype
from mfmegatron.meanflow.interface import FlowTeacher, MeanFlowStudent
from mfmegatron.sampling.ode import OdeSolver, integrate_ode


@dataclass
class DiscreteTargetConfig:
    solver: OdeSolver = "heun"
    num_steps: int = 8
    """Teacher ODE steps from t to r (the maximum when `scale_steps_with_interval`)."""
    scale_steps_with_interval: bool = False
    """If True, sample i takes `clamp(ceil(num_steps * (t_i - r_i)), 1, num_steps)` steps, i.e.
    `num_steps` for the full interval [0, 1] and proportionally fewer for short intervals. The
    batch still runs `max_i` iterations (per-sample step sizes, finished samples masked)."""


@dataclass
class TargetOutput:
    target: Tensor
    """`[B, ...]` stop-gradient target `u_tgt` (detached)."""
    teacher_velocity: Tensor
    """`[B, ...]` `v_T(z_t, t)` (detached), reused by callers (e.g. as the JVP tangent)."""
    student_mean_velocity: Tensor | None = None
    """`[B, ...]` `u_θ(z_t, r, t)` *with* graph when the target computation already produced it
    (the differential target does, via the JVP), else None."""


def discrete_step_counts(t: Tensor, r: Tensor, config: DiscreteTargetConfig) -> Tensor:
    """Per-sample number of teacher ODE steps for the discrete target (`[B]` long)."""
    if not config.scale_steps_with_interval:
        return torch.full_like(t, config.num_steps, dtype=torch.long)
    scaled = torch.ceil(config.num_steps * (t - r).to(torch.float64) - 1e-9).to(torch.long)
    return scaled.clamp(1, config.num_steps)


# select_condition(cond, index) -> the conditioning of the batch rows `index` ([k] long tensor).
SelectCondition = Callable[[Any, Tensor], Any]


@torch.no_grad()
def discrete_target(
    teacher: FlowTeacher,
    z_t: Tensor,
    r: Tensor,
    t: Tensor,
    cond: Any,
    config: DiscreteTargetConfig,
    teacher_velocity: Tensor | None = None,
    select_condition: SelectCondition | None = None,
    agree_max: Callable[[int], int] | None = None,
) -> TargetOutput:
    """Average velocity of the teacher ODE solution from t to r, in float32.

    Where `r == t` the target is `v_T(z_t, t)` exactly (one teacher evaluation of the whole
    batch, which the differential target and the warm-up gap reuse). The ODE from t to r is
    solved only for the rows with r < t when `select_condition` can take those rows out of the
    opaque `cond` (or `cond` is None); otherwise over the whole batch, as if every row moved.
    The integrator returns the mean of its step increments instead of `(z_t - z_r) / (t - r)`,
    so there is no cancellation for small `t - r`.

    Args:
        teacher_velocity: `v_T(z_t, t)` if the caller already has it.
        select_condition: `(cond, index) -> cond` of the rows `index`.
        agree_max: the maximum of an integer over the ranks that must call the teacher alike
            (see `MeanFlowDistillation`): whether to solve, and the solver's iteration count, are
            then agreed, so a batch without r < t rows still takes part in the others' calls.
    """
    if teacher_velocity is None:
        teacher_velocity = teacher.velocity(z_t, t, cond)
    teacher_velocity = teacher_velocity.to(time_dtype(teacher_velocity.dtype)).detach()
    target = teacher_velocity.clone()
    moving = torch.nonzero(t > r).squeeze(1)
    agree = agree_max or (lambda value: value)
    if agree(int(moving.numel() > 0)):
        if moving.numel() > 0 and (cond is None or select_condition is not None):
            rows = moving
            rows_cond = cond if cond is None else select_condition(cond, rows)
        else:
            rows, rows_cond = torch.arange(z_t.shape[0], device=z_t.device), cond
        steps = discrete_step_counts(t[rows], r[rows], config)
        solution = integrate_ode(
            teacher.velocity, z_t[rows], t[rows], r[rows], rows_cond, steps, config.solver,
            first_velocity=teacher_velocity[rows], iterations=agree(int(steps.max())),
        )
        target[moving] = solution.mean_velocity.to(target.dtype)[torch.isin(rows, moving)]
    return TargetOutput(target=target, teacher_velocity=teacher_velocity)


@dataclass
class ResidualNormalizationConfig:
    """rCM-style normalisation of the regression residual (off by default).

    What is normalised: the per-sample residual `g = sg(u_θ) - u_tgt` (the direction the loss
    pulls `u_θ` in), over all non-batch dims with the plain L2 norm: `ĝ = g / (||g||_2 + c)`. The
    normalised target is then `u_tgt' = sg(u_θ) - ĝ`, so the loss gradient points exactly as before
    but its size per sample is at most 1. This bounds a JVP term that blows up (large `d/dt u_θ`)
    without changing where the fixed point is (ĝ = 0 iff g = 0).
    """

    enabled: bool = False
    c: float = 0.1


def normalize_residual(target: Tensor, student_mean_velocity: Tensor, config: ResidualNormalizationConfig) -> Tensor:
    """Apply `ResidualNormalizationConfig` to a target (returns it unchanged when disabled)."""
    if not config.enabled:
        return target
    prediction = student_mean_velocity.detach()
    residual = prediction - target
    norm = residual.reshape(residual.shape[0], -1).norm(dim=1)
    return (prediction - residual / broadcast_time(norm + config.c, residual)).detach()


def differential_target_from_jvp(teacher_velocity: Tensor, r: Tensor, t: Tensor, student_du: Tensor) -> Tensor:
    """The MeanFlow identity `u_tgt = v_T - (t - r) · du`, formed in float32 (detached).

    `student_du` is the JVP of the student along `(v_T, 0, 1)`. The one place this formula
    lives: `differential_target` and the trainer's differential pass both call it.
    """
    dtype = time_dtype(student_du.dtype)
    interval = broadcast_time((t - r).to(dtype), student_du)
    return (teacher_velocity.to(dtype) - interval * student_du.to(dtype)).detach()


def differential_target(
    teacher: FlowTeacher,
    student: MeanFlowStudent,
    z_t: Tensor,
    r: Tensor,
    t: Tensor,
    cond: Any,
    teacher_velocity: Tensor | None = None,
) -> TargetOutput:
    """MeanFlow identity target `v_T - (t - r) · JVP(u_θ; tangents (v_T, 0, 1))`.

    The z-tangent is the *teacher's* velocity at `(z_t, t)` (guided, if the teacher is guided):
    the total derivative is taken along the teacher's flow, the same flow whose average velocity
    the student learns. Returns the student's `u_θ(z_t, r, t)` with graph as well, so the loss
    needs no second student forward.

    Args:
        teacher_velocity: `v_T(z_t, t)` if the caller already has it (saves a teacher forward).
    """
    if teacher_velocity is None:
        with torch.no_grad():
            teacher_velocity = teacher.velocity(z_t, t, cond)
    teacher_velocity = teacher_velocity.to(time_dtype(teacher_velocity.dtype)).detach()
    student_u, student_du = student.mean_velocity_jvp(z_t, r, t, cond, meanflow_tangents(teacher_velocity, r, t))
    target = differential_target_from_jvp(teacher_velocity, r, t, student_du)
    return TargetOutput(target=target, teacher_velocity=teacher_velocity, student_mean_velocity=student_u)


def meanflow_tangents(teacher_velocity: Tensor, r: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The JVP tangents `(t_z, t_r, t_t) = (v_T, 0, 1)` of the total derivative d/dt along the
    teacher's flow."""
    return teacher_velocity, torch.zeros_like(r), torch.ones_like(t)


def relative_target_gap(target_a: Tensor, target_b: Tensor, mask: Tensor | None = None) -> float:
    """`Σ ||a - b||² / Σ ||a||²` over the (masked) batch: the scale-free gap between two targets.

    Used by the automatic warm-up switch with a = discrete, b = differential, masked to r < t.
    Returns NaN when the mask selects nothing.
    """
    if mask is not None:
        target_a, target_b = target_a[mask], target_b[mask]
    if target_a.shape[0] == 0:
        return math.nan
    numerator = (target_a - target_b).double().square().sum()
    denominator = target_a.double().square().sum().clamp_min(1e-30)
    return float(numerator / denominator)
