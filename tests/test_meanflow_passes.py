"""Training passes: evaluated in micro-batches, the loss and gradient equal the whole batch's."""

import copy

import pytest
import torch

from mfmegatron.meanflow import (
    AlignmentConfig,
    FixedStepWarmup,
    MeanFlowDistillation,
    MeanFlowDistillationConfig,
    TrajectoryAlignment,
    run_pass,
)
from models.toy import ToyFlowConfig, ToyFlowTeacher, ToyMeanFlowStudent


def _objective(switch_step):
    torch.manual_seed(0)
    teacher = ToyFlowTeacher(ToyFlowConfig(width=32, depth=2)).requires_grad_(False)
    student = ToyMeanFlowStudent.from_teacher(teacher)
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    fake = copy.deepcopy(teacher).requires_grad_(True)
    with torch.no_grad():
        fake.trunk.output_proj.bias.add_(0.2)
    config = MeanFlowDistillationConfig(z_ode_steps=2, align_weight=0.5, align_start_step=0)
    alignment = TrajectoryAlignment(teacher, fake, AlignmentConfig(num_rollout_steps=2))
    return MeanFlowDistillation(teacher, student, config, FixedStepWarmup(switch_step), alignment), student


def _grads(module):
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])


@pytest.mark.parametrize("phase_switch", [10, 0], ids=["discrete", "differential"])
def test_micro_batched_passes_equal_the_whole_batch(phase_switch):
    objective, student = _objective(phase_switch)
    plan = objective.plan(1, torch.randn(16, 2), None, generator=torch.Generator().manual_seed(3))
    assert [p.name for p in plan.passes] == ["meanflow", "alignment"]
    for training_pass in plan.passes:
        student.zero_grad()
        whole, _ = run_pass(training_pass, student, None)
        whole.backward()
        whole_grads = _grads(student)
        student.zero_grad()
        halves = []
        for rows in (slice(0, 8), slice(8, 16)):
            z, r, t = training_pass.z[rows], training_pass.r[rows], training_pass.t[rows]
            if training_pass.tangents is None:
                u, du = student.mean_velocity(z, r, t, None), None
            else:
                u, du = student.mean_velocity_jvp(z, r, t, None, tuple(x[rows] for x in training_pass.tangents))
            loss, _ = training_pass.loss_fn(u, du, rows)
            (loss / 2).backward()
            halves.append(loss.detach())
        # float32 sums in another order: a wrong micro-batch weighting is off by O(1), not 1e-5.
        torch.testing.assert_close(sum(halves) / 2, whole.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(_grads(student), whole_grads, rtol=1e-4, atol=1e-6)
