"""Discrete and differential MeanFlow targets against independent references."""

import math

import pytest
import torch

from mfmegatron.meanflow import (
    ClassifierFreeGuidanceTeacher,
    DiscreteTargetConfig,
    ResidualNormalizationConfig,
    differential_target,
    discrete_step_counts,
    discrete_target,
    guided_velocity,
    normalize_residual,
)
from mfmegatron.sampling import integrate_ode
from models.toy import ToyFlowConfig, ToyFlowTeacher, ToyMeanFlowStudent
from tests.meanflow_gaussian import GaussianFlow

DTYPE = torch.float64


def gaussian_flow():
    return GaussianFlow(mean=torch.tensor([0.5, -1.0], dtype=DTYPE), std=0.3)


def perturbed_toy_pair(time_scale: float, seed: int = 0):
    """A toy teacher and a student whose interval embedding is no longer zero (so u depends on r)."""
    torch.manual_seed(seed)
    teacher = ToyFlowTeacher(ToyFlowConfig(width=32, depth=2, time_scale=time_scale)).to(DTYPE)
    student = ToyMeanFlowStudent.from_teacher(teacher)
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return teacher.requires_grad_(False), student


def random_batch(batch_size=16, seed=1):
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(batch_size, 2, generator=generator, dtype=DTYPE)
    t = 0.2 + 0.75 * torch.rand(batch_size, generator=generator, dtype=DTYPE)
    r = t * torch.rand(batch_size, generator=generator, dtype=DTYPE)
    return z, r, t


@pytest.mark.parametrize("time_scale", [1.0, 1000.0])
def test_differential_target_matches_central_finite_difference(time_scale):
    teacher, student = perturbed_toy_pair(time_scale)
    z, r, t = random_batch()
    output = differential_target(teacher, student, z, r, t, None)

    # Reference: central finite difference of the student's *forward* along (v_T, 0, 1).
    v = teacher.velocity(z, t)
    h = 1e-6 if time_scale == 1.0 else 1e-8
    with torch.no_grad():
        forward_plus = student.mean_velocity(z + h * v, r, t + h)
        forward_minus = student.mean_velocity(z - h * v, r, t - h)
    total_derivative = (forward_plus - forward_minus) / (2 * h)
    reference = v - (t - r)[:, None] * total_derivative

    torch.testing.assert_close(output.target, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.teacher_velocity, v)
    # The student's u comes back with its graph, equal to a plain forward.
    assert output.student_mean_velocity.requires_grad
    torch.testing.assert_close(output.student_mean_velocity, student.mean_velocity(z, r, t))
    assert not output.target.requires_grad


def test_student_jvp_matches_torch_func_jvp_for_general_tangents():
    _, student = perturbed_toy_pair(time_scale=1000.0)
    z, r, t = random_batch()
    generator = torch.Generator().manual_seed(3)
    tangents = (
        torch.randn(z.shape, generator=generator, dtype=DTYPE),
        torch.randn(r.shape, generator=generator, dtype=DTYPE),
        torch.randn(t.shape, generator=generator, dtype=DTYPE),
    )
    u, du = student.mean_velocity_jvp(z, r, t, None, tangents)
    ref_u, ref_du = torch.func.jvp(lambda a, b, c: student.mean_velocity(a, b, c), (z, r, t), tangents)
    torch.testing.assert_close(u, ref_u)
    torch.testing.assert_close(du, ref_du)
    assert u.requires_grad and not du.requires_grad
    u.sum().backward()
    assert student.interval_embed.mlp[-1].weight.grad is not None


def test_differential_target_is_exact_for_the_exact_average_velocity():
    # MeanFlow identity: with u = u*, v - (t - r) d/dt u* = u*. Reference: closed-form Gaussian flow.
    flow = gaussian_flow()
    z, r, t = random_batch(batch_size=64)
    output = differential_target(flow, flow, z, r, t, None)
    torch.testing.assert_close(output.target, flow.mean_velocity(z, r, t), rtol=1e-10, atol=1e-10)
    # and u* itself is the average velocity of the exact flow map
    exact = (z - flow.flow_map(z, r, t)) / (t - r)[:, None]
    torch.testing.assert_close(flow.mean_velocity(z, r, t), exact, rtol=1e-10, atol=1e-10)


def _discrete_error(flow, z, r, t, solver, num_steps):
    target = discrete_target(flow, z, r, t, None, DiscreteTargetConfig(solver=solver, num_steps=num_steps)).target
    return float((target - flow.mean_velocity(z, r, t)).norm(dim=1).max())


def _log_slope(xs, ys):
    lx = [math.log(x) for x in xs]
    ly = [math.log(y) for y in ys]
    mean_x, mean_y = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mean_x) * (b - mean_y) for a, b in zip(lx, ly)) / sum((a - mean_x) ** 2 for a in lx)


@pytest.mark.parametrize("solver, order", [("euler", 1), ("heun", 2)])
def test_discrete_target_converges_with_solver_order_in_steps(solver, order):
    flow = gaussian_flow()
    z, _, _ = random_batch(batch_size=32)
    t = torch.full((32,), 0.95, dtype=DTYPE)
    r = torch.full((32,), 0.05, dtype=DTYPE)
    steps = [4, 8, 16, 32, 64]
    errors = [_discrete_error(flow, z, r, t, solver, n) for n in steps]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert _log_slope(steps, errors) == pytest.approx(-order, abs=0.25), errors


@pytest.mark.parametrize("solver, order", [("euler", 1), ("heun", 2)])
def test_discrete_target_approaches_differential_as_interval_shrinks(solver, order):
    # One solver step over [r, t]: local error of the average velocity is O((t - r)^order).
    flow = gaussian_flow()
    z, _, _ = random_batch(batch_size=32)
    t = torch.full((32,), 0.7, dtype=DTYPE)
    gaps = [0.1, 0.05, 0.025, 0.0125, 0.00625]
    errors = []
    for gap in gaps:
        r = t - gap
        discrete = discrete_target(flow, z, r, t, None, DiscreteTargetConfig(solver=solver, num_steps=1)).target
        differential = differential_target(flow, flow, z, r, t, None).target
        errors.append(float((discrete - differential).norm(dim=1).max()))
    assert _log_slope(gaps, errors) == pytest.approx(order, abs=0.25), errors


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_r_equal_t_gives_teacher_velocity_exactly(solver):
    teacher, student = perturbed_toy_pair(time_scale=1000.0)
    z, r, t = random_batch()
    r[::2] = t[::2]
    velocity = teacher.velocity(z, t)
    equal = r == t
    discrete = discrete_target(teacher, z, r, t, None, DiscreteTargetConfig(solver=solver, num_steps=5)).target
    differential = differential_target(teacher, student, z, r, t, None).target
    assert torch.equal(discrete[equal], velocity[equal])
    assert torch.equal(differential[equal], velocity[equal])
    assert not torch.allclose(discrete[~equal], velocity[~equal])


def test_scaled_step_counts_and_batch_consistency():
    config = DiscreteTargetConfig(solver="heun", num_steps=8, scale_steps_with_interval=True)
    t = torch.tensor([1.0, 0.9, 0.5, 0.3, 0.3], dtype=DTYPE)
    r = torch.tensor([0.0, 0.8, 0.1, 0.3, 0.2999], dtype=DTYPE)
    assert discrete_step_counts(t, r, config).tolist() == [8, 1, 4, 1, 1]

    # A batch with mixed per-sample step counts equals integrating each sample alone.
    flow = gaussian_flow()
    z = torch.randn(5, 2, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    batched = discrete_target(flow, z, r, t, None, config).target
    for i in range(5):
        alone = discrete_target(flow, z[i : i + 1], r[i : i + 1], t[i : i + 1], None, config).target
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=1e-12, atol=1e-12)


def test_integrate_ode_reaches_exact_flow_map_and_counts_evaluations():
    flow = gaussian_flow()
    z, r, t = random_batch(batch_size=8)
    calls = []

    def counting_velocity(z_in, time, cond):
        calls.append(1)
        return flow.velocity(z_in, time)

    solution = integrate_ode(counting_velocity, z, t, r, None, 200, "heun")
    assert len(calls) == 400
    # Heun with h <= 1/200: global error ~1e-5 here.
    torch.testing.assert_close(solution.z_end, flow.flow_map(z, r, t), rtol=0, atol=1e-4)
    torch.testing.assert_close(solution.mean_velocity, flow.mean_velocity(z, r, t), rtol=0, atol=1e-4)
    # and the mean velocity is consistent with the end point it produced
    torch.testing.assert_close(solution.mean_velocity, (z - solution.z_end) / (t - r)[:, None])


def test_residual_normalization_bounds_the_step_and_keeps_its_direction():
    generator = torch.Generator().manual_seed(0)
    prediction = torch.randn(6, 3, generator=generator, dtype=DTYPE)
    target = prediction + 10 * torch.randn(6, 3, generator=generator, dtype=DTYPE)
    config = ResidualNormalizationConfig(enabled=True, c=0.1)
    normalized = normalize_residual(target, prediction, config)
    raw_residual = prediction - target
    new_residual = prediction - normalized
    raw_norm = raw_residual.norm(dim=1)
    torch.testing.assert_close(new_residual.norm(dim=1), raw_norm / (raw_norm + 0.1))
    torch.testing.assert_close(new_residual / new_residual.norm(dim=1, keepdim=True), raw_residual / raw_norm[:, None])
    assert normalize_residual(target, prediction, ResidualNormalizationConfig(enabled=False)) is target


def test_classifier_free_guidance_teacher():
    class LinearTeacher:
        def velocity(self, z, t, cond):
            return z * cond

    guided = ClassifierFreeGuidanceTeacher(LinearTeacher(), guidance_scale=3.0, make_uncond=lambda cond: 0.0 * cond + 1.0)
    z = torch.ones(2, 2)
    t = torch.ones(2)
    cond = torch.tensor(2.0)
    # v_c = 2, v_u = 1 -> 1 + 3 (2 - 1) = 4
    torch.testing.assert_close(guided.velocity(z, t, cond), torch.full((2, 2), 4.0))
    torch.testing.assert_close(guided_velocity(torch.tensor(2.0), torch.tensor(1.0), 1.0), torch.tensor(2.0))


class CountingTeacher:
    """A toy teacher whose velocity depends on a per-row condition; counts the rows it sees."""

    def __init__(self, teacher):
        self.teacher = teacher
        self.rows = 0

    def velocity(self, z, t, cond):
        self.rows += z.shape[0]
        return self.teacher.velocity(z, t) * cond[:, None]


def test_discrete_target_solves_the_teacher_ode_only_where_r_is_below_t():
    teacher, _ = perturbed_toy_pair(time_scale=1.0)
    z, r, t = random_batch(batch_size=12)
    r[::3] = t[::3]  # 4 rows with r = t, 8 moving
    cond = torch.linspace(0.5, 1.5, 12, dtype=DTYPE)
    config = DiscreteTargetConfig(solver="heun", num_steps=3)
    selective = CountingTeacher(teacher)
    target = discrete_target(selective, z, r, t, cond, config, select_condition=lambda c, index: c[index]).target
    # v_T on all 12 rows once, then 3 Heun steps (6 evaluations, the first reused) on the 8.
    assert selective.rows == 12 + 5 * 8
    whole = CountingTeacher(teacher)
    reference = discrete_target(whole, z, r, t, cond, config).target  # cond not selectable
    assert whole.rows == 12 + 5 * 12
    torch.testing.assert_close(target, reference, rtol=1e-12, atol=1e-12)
    assert torch.equal(target[::3], whole.teacher.velocity(z, t)[::3] * cond[::3, None])


class Bf16Network:
    """A toy network evaluated in bf16: it rounds its own inputs and returns bf16."""

    def __init__(self, model):
        self.model = model.to(torch.bfloat16)

    def velocity(self, z, t, cond=None):
        return self.model.velocity(z.to(torch.bfloat16), t.to(torch.bfloat16))

    def mean_velocity(self, z, r, t, cond=None):
        return self.model.mean_velocity(z.to(torch.bfloat16), r.to(torch.bfloat16), t.to(torch.bfloat16))

    def mean_velocity_jvp(self, z, r, t, cond, tangents):
        bf16 = [x.to(torch.bfloat16) for x in (z, r, t, *tangents)]
        return self.model.mean_velocity_jvp(*bf16[:3], None, tuple(bf16[3:]))


def test_time_arithmetic_is_float32_whatever_the_network_dtype():
    # bf16 networks, bf16 noise: times, ODE states, step sizes and targets must still be float32,
    # so the targets equal the same computation in float64 up to the network's own bf16 rounding
    # (which both share: the network sees the same rounded inputs).
    from mfmegatron.meanflow import MeanFlowDistillation, MeanFlowDistillationConfig
    from mfmegatron.meanflow.warmup import FixedStepWarmup

    torch.manual_seed(0)
    teacher_model, student_model = perturbed_toy_pair(time_scale=1000.0)
    teacher, student = Bf16Network(teacher_model.float()), Bf16Network(student_model.float())
    config = MeanFlowDistillationConfig(z_ode_steps=4, discrete=DiscreteTargetConfig(solver="heun", num_steps=4))
    noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    seen = {}

    def record(u, u_target, average_velocity):
        seen["target"] = u_target
        return torch.zeros(()), {}

    for phase_start, phase in ((None, "discrete"), (0, "differential")):
        objective = MeanFlowDistillation(teacher, student, config, FixedStepWarmup(phase_start))
        objective._meanflow_loss = record
        plan = objective.plan(0, noise, generator=torch.Generator().manual_seed(1))
        (meanflow,) = plan.passes
        assert plan.phase == phase and meanflow.t.dtype == meanflow.z.dtype == torch.float32
        t, r = meanflow.t.double(), meanflow.r.double()
        assert bool((t > r).any()) and bool((t == r).any())

        # float64 reference: the teacher ODE from 1 to t (Euler), then the phase's target.
        z = noise.double()
        for k in range(4):
            start, end = 1 - k * (1 - t) / 4, 1 - (k + 1) * (1 - t) / 4
            z = z - ((start - end)[:, None] * teacher.velocity(z, start).double())
        torch.testing.assert_close(meanflow.z.double(), z, rtol=1e-5, atol=1e-5)
        v = teacher.velocity(meanflow.z, meanflow.t).double()
        if phase == "discrete":
            expected, state, h = v.clone(), z.clone(), (t - r) / 4
            increments = torch.zeros_like(z)
            for k in range(4):
                now = t - k * h
                first = teacher.velocity(state, now).double()
                second = teacher.velocity(state - h[:, None] * first, now - h).double()
                increments += 0.5 * (first + second)
                state = state - h[:, None] * 0.5 * (first + second)
            expected[t > r] = (increments / 4)[t > r]
            meanflow.loss_fn(torch.zeros_like(meanflow.z), None, slice(0, 256))
        else:
            tangents = (v.float(), torch.zeros_like(meanflow.r), torch.ones_like(meanflow.t))
            u, du = student.mean_velocity_jvp(meanflow.z, meanflow.r, meanflow.t, None, tangents)
            expected = v - (t - r)[:, None] * du.double()
            meanflow.loss_fn(u, du, slice(0, 256))
        assert seen["target"].dtype == torch.float32
        # Far below bf16's resolution (2^-8 relative): only float32 rounding separates them.
        scale = expected.abs().max()
        torch.testing.assert_close(seen["target"].double(), expected, rtol=0, atol=float(scale) * 1e-4)
