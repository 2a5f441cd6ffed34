"""The toy MeanFlow student starts as an exact copy of its teacher."""

import torch

from mfmegatron.meanflow import FlowTeacher, MeanFlowStudent
from mfmegatron.sampling import sample_student, sample_teacher
from models.toy import ToyFlowConfig, ToyFlowTeacher, ToyMeanFlowStudent


def make_teacher(seed=0):
    torch.manual_seed(seed)
    teacher = ToyFlowTeacher(ToyFlowConfig(width=32, depth=2))
    # Randomise every weight (the default init has zero biases in places).
    with torch.no_grad():
        for parameter in teacher.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return teacher.requires_grad_(False)


def test_toy_models_implement_the_interface():
    teacher = make_teacher()
    assert isinstance(teacher, FlowTeacher)
    assert isinstance(ToyMeanFlowStudent.from_teacher(teacher), MeanFlowStudent)


def test_student_at_initialisation_reproduces_teacher_for_every_r():
    teacher = make_teacher()
    student = ToyMeanFlowStudent.from_teacher(teacher)
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(64, 2, generator=generator)
    t = torch.rand(64, generator=generator)
    r = t * torch.rand(64, generator=generator)
    r[:16] = t[:16]
    velocity = teacher.velocity(z, t)
    assert torch.equal(student.mean_velocity(z, t, t), velocity)
    assert torch.equal(student.mean_velocity(z, r, t), velocity)
    # the interval embedding is exactly zero, but it is trainable
    assert torch.count_nonzero(student.interval_embed(t - r)) == 0
    assert student.interval_embed.mlp[-1].weight.requires_grad


def test_untrained_student_sampler_equals_teacher_euler_sampler():
    teacher = make_teacher()
    student = ToyMeanFlowStudent.from_teacher(teacher)
    noise = torch.randn(32, 2, generator=torch.Generator().manual_seed(2))
    for num_steps in (1, 2, 4):
        torch.testing.assert_close(
            sample_student(student, noise, num_steps=num_steps), sample_teacher(teacher, noise, None, num_steps, "euler")
        )


def test_student_weights_are_a_copy_not_shared():
    teacher = make_teacher()
    student = ToyMeanFlowStudent.from_teacher(teacher)
    with torch.no_grad():
        student.trunk.output_proj.bias.add_(1.0)
    assert not torch.equal(student.trunk.output_proj.bias, teacher.trunk.output_proj.bias)
