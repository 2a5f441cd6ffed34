"""Trajectory distribution alignment: gradients, and the fake network's loss."""

import copy

import torch

from mfmegatron.meanflow import AlignmentConfig, TrajectoryAlignment
from models.toy import ToyFlowConfig, ToyFlowTeacher, ToyMeanFlowStudent


def make_models(seed=0):
    torch.manual_seed(seed)
    teacher = ToyFlowTeacher(ToyFlowConfig(width=32, depth=2)).requires_grad_(False)
    student = ToyMeanFlowStudent.from_teacher(teacher)
    with torch.no_grad():  # a student that differs from the teacher
        for parameter in student.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return teacher, student


def student_gradients(student, alignment, seed=0):
    student.zero_grad(set_to_none=False)
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(seed))
    output = alignment.generator_loss(student, noise, None, torch.Generator().manual_seed(seed + 1))
    output.loss.backward()
    return torch.cat([p.grad.flatten() for p in student.parameters()]), output


def test_generator_gradient_vanishes_when_fake_equals_teacher():
    teacher, student = make_models()
    for fake in (teacher, copy.deepcopy(teacher)):
        for steps in (1, 2, 4):
            alignment = TrajectoryAlignment(teacher, fake, AlignmentConfig(num_rollout_steps=steps))
            gradient, output = student_gradients(student, alignment)
            assert torch.count_nonzero(gradient) == 0
            assert output.loss.item() == 0.0


def test_generator_gradient_is_nonzero_when_fake_differs():
    teacher, student = make_models()
    fake = copy.deepcopy(teacher)
    with torch.no_grad():
        fake.trunk.output_proj.bias.add_(torch.tensor([0.3, -0.2]))
    alignment = TrajectoryAlignment(teacher, fake, AlignmentConfig(num_rollout_steps=2))
    gradient, output = student_gradients(student, alignment)
    assert gradient.abs().sum() > 0
    assert output.loss.item() > 0
    # Only the student is trained by the generator loss.
    assert all(p.grad is None for p in fake.parameters())


def test_generator_loss_moves_samples_along_fake_minus_teacher():
    # Fake clean estimate shifted by +δ relative to the teacher's -> the loss gradient w.r.t. x̂ is
    # +δ/n (descent moves x̂ by -δ, towards the teacher).
    teacher, student = make_models()

    class ShiftedFake:
        def velocity(self, z, t, cond):
            # x̂_fake = z - t v_fake = x̂_teacher + delta  <=>  v_fake = v_teacher - delta / t
            return teacher.velocity(z, t) - torch.tensor([0.1, 0.0]) / t[:, None]

    alignment = TrajectoryAlignment(teacher, ShiftedFake(), AlignmentConfig(num_rollout_steps=1))
    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(6)
    training_pass = alignment.generator_pass(alignment.rollout(student, noise, None, generator), None, generator)
    # The loss is a function of the student's output u at the pass inputs; x̂ = z - t u, so the
    # gradient w.r.t. x̂ is -(d loss / d u) / t.
    u = student.mean_velocity(training_pass.z, training_pass.r, training_pass.t, None).detach().requires_grad_()
    loss, _ = training_pass.loss_fn(u, None, slice(0, 8))
    loss.backward()
    gradient = -u.grad / training_pass.t[:, None]
    assert (gradient[:, 0] > 0).all()
    torch.testing.assert_close(gradient[:, 1], torch.zeros(8), atol=1e-7, rtol=0)


def test_fake_loss_trains_only_the_fake():
    teacher, student = make_models()
    fake = copy.deepcopy(teacher).requires_grad_(True)
    alignment = TrajectoryAlignment(teacher, fake, AlignmentConfig(num_rollout_steps=2))
    output = alignment.fake_loss(student, torch.randn(32, 2), None)
    output.loss.backward()
    assert all(p.grad is None for p in student.parameters())
    assert sum(float(p.grad.abs().sum()) for p in fake.parameters()) > 0


def test_segments_cover_the_rollout_grid():
    teacher, student = make_models()
    alignment = TrajectoryAlignment(teacher, teacher, AlignmentConfig(time_grid=[1.0, 0.6, 0.2, 0.0]))
    samples = alignment.student_clean_estimates(
        student, torch.randn(300, 2), None, torch.Generator().manual_seed(0), with_grad=False
    )
    pairs = set(zip(samples.segment_start.tolist(), samples.segment_end.tolist()))
    assert {(round(a, 6), round(b, 6)) for a, b in pairs} == {(1.0, 0.6), (0.6, 0.2), (0.2, 0.0)}


def test_objective_adds_alignment_from_its_start_step_and_needs_x_for_data_source():
    import pytest

    from mfmegatron.meanflow import FixedStepWarmup, MeanFlowDistillation, MeanFlowDistillationConfig

    teacher, student = make_models()
    fake = copy.deepcopy(teacher).requires_grad_(True)
    alignment = TrajectoryAlignment(teacher, fake, AlignmentConfig(num_rollout_steps=2))
    config = MeanFlowDistillationConfig(z_ode_steps=2, align_weight=0.5, align_start_step=3)
    objective = MeanFlowDistillation(teacher, student, config, FixedStepWarmup(2), alignment)
    for step in range(5):
        output = objective.generator_loss(step, torch.randn(16, 2), None, generator=torch.Generator().manual_seed(step))
        assert ("align_loss" in output.stats) == (step >= 3)
        if step >= 3:
            expected = output.stats["meanflow_loss"] + 0.5 * output.stats["align_loss"]
            assert output.stats["loss"] == pytest.approx(expected, rel=1e-5)
    assert "fake_loss" in objective.fake_loss(torch.randn(16, 2)).stats

    with pytest.raises(ValueError):
        MeanFlowDistillation(teacher, student, MeanFlowDistillationConfig(align_weight=1.0))
    data_objective = MeanFlowDistillation(teacher, student, MeanFlowDistillationConfig(z_source="data"))
    with pytest.raises(ValueError):
        data_objective.generator_loss(0, torch.randn(4, 2))
    assert torch.isfinite(data_objective.generator_loss(0, torch.randn(4, 2), x=torch.randn(4, 2)).loss)
