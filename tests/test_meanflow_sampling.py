"""Time-pair sampler statistics and the few-step / ODE samplers."""

import math

import pytest
import torch

from mfmegatron.meanflow import TimeSamplerConfig, sample_time_pair
from mfmegatron.sampling import check_time_grid, sample_student, sample_teacher, uniform_time_grid


def test_time_pair_ordering_and_equal_fraction():
    t, r = sample_time_pair(TimeSamplerConfig(), 1000, torch.Generator().manual_seed(0))
    assert t.shape == r.shape == (1000,)
    assert bool((t >= r).all()) and bool((t > 0).all()) and bool((t < 1).all()) and bool((r > 0).all())
    assert int((t == r).sum()) == 750
    t, r = sample_time_pair(TimeSamplerConfig(equal_fraction=0.3), 10, torch.Generator().manual_seed(1))
    assert int((t == r).sum()) == 3


def test_time_pair_marginals_are_sorted_logit_normals():
    config = TimeSamplerConfig(equal_fraction=0.0)
    t, r = sample_time_pair(config, 200_000, torch.Generator().manual_seed(0), dtype=torch.float64)
    # logit(t) is the max of two N(-0.4, 1) draws: mean -0.4 + 1/sqrt(pi); logit(r) the min.
    logit_t, logit_r = torch.logit(t), torch.logit(r)
    assert float(logit_t.mean()) == pytest.approx(-0.4 + 1 / math.sqrt(math.pi), abs=0.01)
    assert float(logit_r.mean()) == pytest.approx(-0.4 - 1 / math.sqrt(math.pi), abs=0.01)
    # Shifting the means moves them.
    t2, _ = sample_time_pair(TimeSamplerConfig(t_mean=1.0, r_mean=1.0, equal_fraction=0.0), 50_000,
                             torch.Generator().manual_seed(1), dtype=torch.float64)
    assert float(torch.logit(t2).mean()) == pytest.approx(1.0 + 1 / math.sqrt(math.pi), abs=0.02)


class RecordingStudent:
    def __init__(self):
        self.calls = []

    def mean_velocity(self, z, r, t, cond):
        self.calls.append((float(t[0]), float(r[0])))
        return torch.ones_like(z)


@pytest.mark.parametrize("num_steps", [1, 2, 4])
def test_student_sampler_uses_one_evaluation_per_step_on_the_uniform_grid(num_steps):
    student = RecordingStudent()
    noise = torch.zeros(3, 2)
    out, trajectory = sample_student(student, noise, num_steps=num_steps, return_trajectory=True)
    grid = uniform_time_grid(num_steps)
    assert student.calls == [pytest.approx((a, b)) for a, b in zip(grid[:-1], grid[1:])]
    assert len(trajectory) == num_steps + 1
    # u = 1 everywhere: z_0 = noise - (1 - 0) * 1
    torch.testing.assert_close(out, torch.full((3, 2), -1.0))


def test_student_sampler_custom_grid_and_validation():
    student = RecordingStudent()
    sample_student(student, torch.zeros(2, 2), time_grid=[1.0, 0.8, 0.3, 0.0])
    assert student.calls == [pytest.approx(p) for p in [(1.0, 0.8), (0.8, 0.3), (0.3, 0.0)]]
    with pytest.raises(ValueError):
        check_time_grid([1.0, 0.5, 0.5, 0.0])
    with pytest.raises(ValueError):
        check_time_grid([1.0])
    with pytest.raises(ValueError):
        sample_student(student, torch.zeros(2, 2), num_steps=2, time_grid=[1.0, 0.0])


@pytest.mark.parametrize("solver, evaluations_per_step", [("euler", 1), ("heun", 2)])
def test_teacher_sampler_evaluation_count(solver, evaluations_per_step):
    calls = []

    class Teacher:
        def velocity(self, z, t, cond):
            calls.append(float(t[0]))
            return -z  # dz/dt = -z  ->  z(0) = z(1) * e

    z1 = torch.ones(2, 2, dtype=torch.float64)
    out = sample_teacher(Teacher(), z1, None, num_steps=50, solver=solver)
    assert len(calls) == 50 * evaluations_per_step
    assert calls[0] == 1.0
    tolerance = 0.05 if solver == "euler" else 1e-4
    torch.testing.assert_close(out, z1 * math.e, rtol=tolerance, atol=0)
