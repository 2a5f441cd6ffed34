"""Time-pair sampler statistics and the few-step / ODE samplers."""

import math

import pytest
import torch

from mfmegatron.meanflow import TimeSamplerConfig, global_batch_time_pair, sample_time_pair
from mfmegatron.sampling import check_time_grid, sample_student, sample_teacher, uniform_time_grid


def test_time_pair_ordering_and_equal_fraction():
    t, r = sample_time_pair(TimeSamplerConfig(), 100_000, torch.Generator().manual_seed(0))
    assert t.shape == r.shape == (100_000,) and t.dtype == r.dtype == torch.float32
    assert bool((t >= r).all()) and bool((t > 0).all()) and bool((t < 1).all()) and bool((r > 0).all())
    assert float((t == r).float().mean()) == pytest.approx(0.75, abs=0.01)
    t, r = sample_time_pair(TimeSamplerConfig(equal_fraction=0.3), 100_000, torch.Generator().manual_seed(1))
    assert float((t == r).float().mean()) == pytest.approx(0.3, abs=0.01)
    with pytest.raises(ValueError, match="float32 or float64"):
        sample_time_pair(TimeSamplerConfig(), 4, dtype=torch.bfloat16)


def test_small_per_rank_batches_still_train_average_velocities():
    # One or two samples per data-parallel rank: an exact count round(0.75 B) per rank would give
    # B = 1 or 2 samples with r = t every step. Per-sample decisions give r < t at 25% whatever B.
    config = TimeSamplerConfig()
    for per_rank in (1, 2):
        below = [
            bool((t > r).any())
            for step in range(400)
            for t, r in [global_batch_time_pair(config, 0, step, 8 * per_rank, slice(0, per_rank))]
        ]
        expected = 1 - 0.75**per_rank
        assert sum(below) / len(below) == pytest.approx(expected, abs=0.06), per_rank


def test_a_global_sample_gets_the_same_times_at_any_data_parallel_size():
    config = TimeSamplerConfig()
    whole = global_batch_time_pair(config, 7, 3, 8, slice(0, 8))
    for ranks in (2, 4, 8):
        per_rank = 8 // ranks
        parts = [global_batch_time_pair(config, 7, 3, 8, slice(i * per_rank, (i + 1) * per_rank)) for i in range(ranks)]
        assert torch.equal(torch.cat([p[0] for p in parts]), whole[0])
        assert torch.equal(torch.cat([p[1] for p in parts]), whole[1])
    assert whole[0].dtype == torch.float32
    other_step = global_batch_time_pair(config, 7, 4, 8, slice(0, 8))
    other_seed = global_batch_time_pair(config, 8, 3, 8, slice(0, 8))
    assert not torch.equal(other_step[0], whole[0]) and not torch.equal(other_seed[0], whole[0])


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
