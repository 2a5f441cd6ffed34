"""Few-step sampler for a MeanFlow student.

From noise at `t_0 = 1` the student jumps along a decreasing time grid
`1 = t_0 > t_1 > ... > t_K = 0` with `z_{k+1} = z_k - (t_k - t_{k+1}) u_θ(z_k, t_{k+1}, t_k)`:
K network evaluations for K steps.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from mfmegatron.flow_matching import broadcast_time, time_dtype


def uniform_time_grid(num_steps: int) -> list[float]:
    """`[1, 1 - 1/K, ..., 0]`, K + 1 points."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return [1.0 - k / num_steps for k in range(num_steps + 1)]


def check_time_grid(time_grid: Sequence[float]) -> list[float]:
    """Validate a custom grid: at least two points, strictly decreasing, inside [0, 1]."""
    grid = [float(t) for t in time_grid]
    if len(grid) < 2:
        raise ValueError("a time grid needs at least two points (one step)")
    if any(not 0.0 <= t <= 1.0 for t in grid):
        raise ValueError(f"time grid points must lie in [0, 1], got {grid}")
    if any(a <= b for a, b in zip(grid[:-1], grid[1:])):
        raise ValueError(f"time grid must be strictly decreasing, got {grid}")
    return grid


def sample_student(
    student,
    noise: Tensor,
    cond: Any = None,
    num_steps: int | None = None,
    time_grid: Sequence[float] | None = None,
    return_trajectory: bool = False,
) -> Tensor | tuple[Tensor, list[Tensor]]:
    """Sample with a MeanFlow student in `num_steps` uniform jumps or along a custom `time_grid`.

    Exactly one of `num_steps` / `time_grid` must be given. Runs without gradient. With
    `return_trajectory=True` also returns the K + 1 states `[z_{t_0} = noise, ..., z_{t_K}]`.
    """
    if (num_steps is None) == (time_grid is None):
        raise ValueError("give exactly one of num_steps or time_grid")
    grid = uniform_time_grid(num_steps) if time_grid is None else check_time_grid(time_grid)
    batch_size = noise.shape[0]
    # State and times in float32 (or float64) whatever the network's dtype.
    state_dtype = time_dtype(noise.dtype)
    z = noise.to(state_dtype)
    trajectory = [z]
    with torch.no_grad():
        for t_now, t_next in zip(grid[:-1], grid[1:]):
            t = torch.full((batch_size,), t_now, dtype=state_dtype, device=noise.device)
            r = torch.full((batch_size,), t_next, dtype=state_dtype, device=noise.device)
            u = student.mean_velocity(z, r, t, cond).to(state_dtype)
            z = z - broadcast_time(t - r, z) * u
            trajectory.append(z)
    return (z, trajectory) if return_trajectory else z
