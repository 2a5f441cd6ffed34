"""Trajectory distribution alignment: an auxiliary, data-free distribution-matching loss.

MeanFlow regresses a deterministic target, so at 1-2 steps a student with finite capacity smooths
the sharp parts of the teacher's flow map and puts samples *between* modes ("mean-seeking bias").
Alignment adds a distribution-level signal in the spirit of DMD / TDM:

1. Roll the student out from noise for K jumps on its sampling grid `1 = t_0 > ... > t_K = 0`
   (no gradient), keeping the states `z_{t_k}`.
2. Pick a segment k per sample and take the student's clean estimate there with gradient,
   `x̂ = z_{t_k} - t_k u_θ(z_{t_k}, 0, t_k)` (its one-jump-to-zero prediction from that state;
   for k = 0 this is the 1-step sample, for k = K - 1 the last jump of the K-step sampler).
3. Re-noise it to a time s drawn uniformly inside the segment, `z_s = (1 - s) x̂ + s ε'`.
4. Compare the clean estimates of a *fake* flow network `v_φ` (trained with flow matching on the
   student's x̂, see `fake_loss`) and of the teacher at `(z_s, s)`:
   `d = x̂_fake - x̂_teacher`, both `z_s - s v(z_s, s)`. `d` estimates the difference between the
   scores of the student's and the teacher's noised distributions (up to a positive factor), so
   moving x̂ along `-d` moves the student's distribution towards the teacher's.
5. Generator loss `0.5 · mean((x̂ - sg(x̂ - d / n))²)` with the per-sample normaliser
   `n = mean|x̂ - x̂_teacher|` (DMD's scale-free normalisation); its gradient w.r.t. x̂ is `d / n`
   divided by the number of elements.

When the fake network equals the teacher, `d = 0` and the generator gradient vanishes exactly.

Model-agnostic: the fake network is anything with `velocity(z, t, cond)` — a full trainable copy
of the teacher (toy) or LoRA adapters on the frozen teacher weights (big backbones). Only the
last student jump (step 2) carries gradient; the rollout before it is detached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from mfmegatron.flow_matching import broadcast_time, clean_estimate, per_sample_mean
from mfmegatron.meanflow.interface import FlowTeacher, MeanFlowStudent
from mfmegatron.meanflow.passes import TrainingPass, run_pass
from mfmegatron.sampling.few_step import check_time_grid, uniform_time_grid


@dataclass
class AlignmentConfig:
    num_rollout_steps: int = 2
    """K, the student's sampling steps the alignment targets (e.g. the deployment NFE)."""
    time_grid: Sequence[float] | None = None
    """Custom rollout grid (K + 1 decreasing points); overrides `num_rollout_steps`."""
    renoise_min: float = 0.02
    renoise_max: float = 0.98
    """Renoising times s are clamped to [renoise_min, renoise_max] (s = 0 carries no signal,
    s = 1 erases x̂)."""
    normalizer_eps: float = 1e-8


@dataclass
class StudentCleanEstimates:
    x_hat: Tensor
    """`[B, ...]` clean estimates (with graph when requested)."""
    segment_start: Tensor
    """`[B]` t_k of each sample's segment."""
    segment_end: Tensor
    """`[B]` t_{k+1}."""
    z_segment: Tensor
    """`[B, ...]` the state z_{t_k} the clean estimate jumps from."""


@dataclass
class AlignmentOutput:
    loss: Tensor
    stats: dict[str, float]


class TrajectoryAlignment:
    """Generator and fake-network losses of trajectory distribution alignment.

    Args:
        teacher: the frozen teacher (guided, if guidance is used in distillation).
        fake: the fake flow network, same `velocity` protocol; its parameters are trained by
            `fake_loss` with the caller's optimizer. Initialise it from the teacher.
    """

    def __init__(self, teacher: FlowTeacher, fake: FlowTeacher, config: AlignmentConfig | None = None):
        self.teacher = teacher
        self.fake = fake
        self.config = config or AlignmentConfig()
        grid = self.config.time_grid
        self.time_grid = check_time_grid(grid) if grid is not None else uniform_time_grid(self.config.num_rollout_steps)

    def _renoise_times(self, samples: StudentCleanEstimates, generator: torch.Generator | None) -> Tensor:
        low = samples.segment_end.clamp(self.config.renoise_min, self.config.renoise_max)
        high = samples.segment_start.clamp(self.config.renoise_min, self.config.renoise_max)
        uniform = torch.rand(low.shape, generator=generator, dtype=low.dtype, device=low.device)
        return low + (high - low) * uniform

    def student_clean_estimates(
        self,
        student: MeanFlowStudent,
        noise: Tensor,
        cond: Any,
        generator: torch.Generator | None = None,
        with_grad: bool = True,
    ) -> StudentCleanEstimates:
        """Steps 1-2: roll out (no grad), pick a random segment per sample, jump to zero."""
        batch_size = noise.shape[0]
        num_segments = len(self.time_grid) - 1
        grid = torch.tensor(self.time_grid, dtype=noise.dtype, device=noise.device)
        segment = torch.randint(0, num_segments, (batch_size,), generator=generator, device=noise.device)

        # States at the start of every segment (the last jump is never needed).
        states = [noise]
        with torch.no_grad():
            z = noise
            for k in range(num_segments - 1):
                t = grid[k].expand(batch_size)
                r = grid[k + 1].expand(batch_size)
                z = z - broadcast_time(t - r, z) * student.mean_velocity(z, r, t, cond)
                states.append(z)
        states = torch.stack(states)  # [num_segments, B, ...]
        z_segment = states[segment, torch.arange(batch_size, device=noise.device)]
        t_segment = grid[segment]

        zero = torch.zeros_like(t_segment)
        with torch.set_grad_enabled(with_grad):
            u = student.mean_velocity(z_segment, zero, t_segment, cond)
            x_hat = clean_estimate(z_segment, t_segment, u)
        return StudentCleanEstimates(
            x_hat=x_hat, segment_start=t_segment, segment_end=grid[segment + 1], z_segment=z_segment
        )

    def _renoise(self, samples: StudentCleanEstimates, generator: torch.Generator | None):
        """The clean estimates (detached) renoised inside their segments: returns
        (x̂, s, the renoising noise ε', z_s = (1 - s) x̂ + s ε'). Each call draws its own s, ε'."""
        x_hat = samples.x_hat.detach()
        s = self._renoise_times(samples, generator)
        renoise = torch.randn(x_hat.shape, generator=generator, dtype=x_hat.dtype, device=x_hat.device)
        z_s = (1 - broadcast_time(s, x_hat)) * x_hat + broadcast_time(s, x_hat) * renoise
        return x_hat, s, renoise, z_s

    def rollout(
        self, student: MeanFlowStudent, noise: Tensor, cond: Any, generator: torch.Generator | None = None
    ) -> StudentCleanEstimates:
        """The student's clean estimates without gradient: what `generator_pass` and `fake_pass`
        take. One rollout serves both the generator term and the fake network's updates of a
        training step (the fake network learns from the samples the generator term pushes)."""
        return self.student_clean_estimates(student, noise, cond, generator, with_grad=False)

    def generator_pass(
        self,
        samples: StudentCleanEstimates,
        cond: Any,
        generator: torch.Generator | None = None,
    ) -> TrainingPass:
        """The generator term as a `TrainingPass` on the student (see `passes.py`).

        `samples` is a `rollout`. The regression target is computed first without gradient; the
        pass then re-evaluates the student's last jump with gradient (same inputs, same x̂) and
        regresses x̂ on the target. One more student forward than a fused version, so that the
        pass can run through a pipeline schedule.
        """
        x_hat, s, _, z_s = self._renoise(samples, generator)
        with torch.no_grad():
            x_teacher = clean_estimate(z_s, s, self.teacher.velocity(z_s, s, cond))
            x_fake = clean_estimate(z_s, s, self.fake.velocity(z_s, s, cond))
            direction = x_fake - x_teacher
            normalizer = per_sample_mean((x_hat - x_teacher).abs())
            step = direction / broadcast_time(normalizer + self.config.normalizer_eps, direction)
            regression_target = x_hat - step
            direction_norm = float(per_sample_mean(direction.square()).sqrt().mean())
        z_segment, t_segment = samples.z_segment, samples.segment_start

        def loss_fn(u: Tensor, du: Tensor | None, rows: slice):
            x_hat_with_grad = clean_estimate(z_segment[rows], t_segment[rows], u)
            loss = 0.5 * per_sample_mean((x_hat_with_grad - regression_target[rows]).square()).mean()
            stats = {
                "align_loss": float(loss.detach()),
                "align_direction_norm": direction_norm,
                "align_normalizer": float(normalizer.mean()),
            }
            return loss, stats

        return TrainingPass(
            name="alignment", network="student", z=z_segment, r=torch.zeros_like(t_segment),
            t=t_segment, loss_fn=loss_fn,
        )

    def generator_loss(
        self,
        student: MeanFlowStudent,
        noise: Tensor,
        cond: Any,
        generator: torch.Generator | None = None,
    ) -> AlignmentOutput:
        """Alignment loss for the student from a fresh rollout (gradient flows into the student
        only)."""
        samples = self.rollout(student, noise, cond, generator)
        loss, stats = run_pass(self.generator_pass(samples, cond, generator), student, cond)
        return AlignmentOutput(loss=loss, stats=stats)

    def fake_pass(
        self,
        samples: StudentCleanEstimates,
        cond: Any,
        generator: torch.Generator | None = None,
    ) -> TrainingPass:
        """Flow matching of the fake network on the student's clean estimates of a `rollout`
        (no student gradient), renoised at fresh times inside the same segments the generator
        term uses."""
        x_hat, s, fresh_noise, z_s = self._renoise(samples, generator)
        velocity_target = fresh_noise - x_hat

        def loss_fn(v: Tensor, dv: Tensor | None, rows: slice):
            loss = per_sample_mean((v - velocity_target[rows]).square()).mean()
            return loss, {"fake_loss": float(loss.detach())}

        return TrainingPass(name="fake", network="flow", z=z_s, r=None, t=s, loss_fn=loss_fn)

    def fake_loss(
        self,
        student: MeanFlowStudent,
        noise: Tensor,
        cond: Any,
        generator: torch.Generator | None = None,
    ) -> AlignmentOutput:
        samples = self.rollout(student, noise, cond, generator)
        loss, stats = run_pass(self.fake_pass(samples, cond, generator), self.fake, cond)
        return AlignmentOutput(loss=loss, stats=stats)
