"""Teacher ODE integration with per-sample start/end times and per-sample step counts.

One integrator serves three callers: the teacher sampler (noise at t = 1 to data at t = 0), the
discrete MeanFlow target (teacher ODE from t to r) and the data-free construction of `z_t`
(teacher ODE from noise at 1 down to t).

Batching rule: every sample i goes from `t_start[i]` to `t_end[i]` in `num_steps[i]` equal steps
of size `(t_start[i] - t_end[i]) / num_steps[i]`. The loop runs `max(num_steps)` iterations and
always evaluates the velocity on the *whole* batch it is given (a sample that has finished keeps
its state: its update is masked), which keeps shapes static for big sharded backbones. `cond` is
opaque here; a caller that can take rows out of it (the discrete target) passes only the rows
that need integrating.

Besides the end state the integrator returns the *average velocity* actually used,
`Σ_k h_k · incr_k / (t_start - t_end)`. With equal steps this is a plain mean of the step
increments, so it is well defined, and exactly `v(z, t_start)` (Euler) when `t_start == t_end`:
no `(z_t - z_r) / (t - r)` cancellation and no 0/0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from torch import Tensor

from mfmegatron.flow_matching import broadcast_time, time_dtype

VelocityFn = Callable[[Tensor, Tensor, Any], Tensor]
OdeSolver = Literal["euler", "heun"]


@dataclass
class OdeSolution:
    z_end: Tensor
    """State at `t_end`, `[B, ...]`."""
    mean_velocity: Tensor
    """Average of the velocity increments used, `(z_start - z_end) / (t_start - t_end)` without
    the subtraction; equals the first velocity where `t_start == t_end`."""
    first_velocity: Tensor
    """`v(z_start, t_start)`, the first evaluation (free, and often needed by callers)."""


def _as_step_counts(num_steps: int | Tensor, batch_size: int, device: torch.device) -> Tensor:
    if isinstance(num_steps, int):
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        return torch.full((batch_size,), num_steps, dtype=torch.long, device=device)
    steps = num_steps.to(device=device, dtype=torch.long)
    if steps.shape != (batch_size,) or bool((steps < 1).any()):
        raise ValueError("per-sample num_steps must be a [B] tensor of integers >= 1")
    return steps


def integrate_ode(
    velocity_fn: VelocityFn,
    z_start: Tensor,
    t_start: Tensor,
    t_end: Tensor,
    cond: Any,
    num_steps: int | Tensor,
    solver: OdeSolver = "euler",
    first_velocity: Tensor | None = None,
    iterations: int | None = None,
) -> OdeSolution:
    """Integrate `dz/dt = v(z, t)` from `t_start` to `t_end` per sample (either direction).

    The times, step sizes, the state and the increments are kept in float32 (float64 if z is)
    whatever dtype the velocity comes back in: a bf16 network is only ever *evaluated* in bf16.
    The state is handed to `velocity_fn` in float32; the network casts its inputs itself.

    Args:
        velocity_fn: `(z, t, cond) -> v`, e.g. `teacher.velocity`. Called on the full batch.
        z_start: `[B, ...]` state at `t_start`.
        t_start, t_end: `[B]` times.
        num_steps: an int (same for all samples) or a `[B]` long tensor of per-sample counts.
        solver: "euler" (1 evaluation per step) or "heun" (2 per step, 2nd order).
        first_velocity: `v(z_start, t_start)` if the caller has it (saves one evaluation).
        iterations: loop iterations (default `max(num_steps)`); more leave every sample in place
            after its last step, so ranks that must evaluate alike can agree on one count.
    """
    if solver not in ("euler", "heun"):
        raise ValueError(f"unknown ODE solver {solver!r}; use 'euler' or 'heun'")
    state_dtype = time_dtype(z_start.dtype)
    batch_size = z_start.shape[0]
    steps = _as_step_counts(num_steps, batch_size, z_start.device)
    max_steps = int(steps.max()) if iterations is None else max(iterations, int(steps.max()))
    t_start, t_end = t_start.to(state_dtype), t_end.to(state_dtype)
    # Per-sample signed step size (positive when integrating towards smaller t).
    step_size = (t_start - t_end) / steps.to(state_dtype)

    def velocity(z_now: Tensor, t_now: Tensor) -> Tensor:
        return velocity_fn(z_now, t_now, cond).to(state_dtype)

    z = z_start.to(state_dtype)
    increment_sum = torch.zeros_like(z)
    first = None if first_velocity is None else first_velocity.to(state_dtype)
    for k in range(max_steps):
        active = k < steps
        t_now = t_start - k * step_size
        # Land exactly on t_end at each sample's last step (no accumulated rounding).
        t_next = torch.where(k + 1 == steps, t_end, t_start - (k + 1) * step_size)
        if k == 0 and first is not None:
            v_now = first
        else:
            v_now = velocity(z, t_now)
        if first is None:
            first = v_now
        if solver == "euler":
            increment = v_now
        else:
            z_predict = z - broadcast_time(t_now - t_next, z) * v_now
            v_next = velocity(z_predict, t_next)
            increment = 0.5 * (v_now + v_next)
        active_mask = broadcast_time(active.to(z.dtype), z).bool()
        z = torch.where(active_mask, z - broadcast_time(t_now - t_next, z) * increment, z)
        increment_sum = torch.where(active_mask, increment_sum + increment, increment_sum)

    mean_velocity = increment_sum / broadcast_time(steps.to(z.dtype), z)
    return OdeSolution(z_end=z, mean_velocity=mean_velocity, first_velocity=first)


def sample_teacher(
    teacher,
    noise: Tensor,
    cond: Any = None,
    num_steps: int = 50,
    solver: OdeSolver = "euler",
) -> Tensor:
    """Teacher ODE sampler: integrate `teacher.velocity` from noise at t = 1 to t = 0 on a uniform
    grid of `num_steps` steps (Euler: `num_steps` evaluations, Heun: `2 num_steps`)."""
    ones = torch.ones(noise.shape[0], dtype=time_dtype(noise.dtype), device=noise.device)
    with torch.no_grad():
        return integrate_ode(teacher.velocity, noise, ones, torch.zeros_like(ones), cond, num_steps, solver).z_end
