"""FLUX as MeanFlow teacher and student: the interval embedding and the student's JVP."""

from __future__ import annotations

import math

import pytest
import torch

from mfmegatron.parallel import run_on_ranks
from tests.flux_fixtures import BATCH, diffusers_flux, flux_batch


def _condition(batch, guidance=True):
    from models.flux.meanflow import FluxCondition

    return FluxCondition(
        encoder_hidden_states=batch["encoder_hidden_states"],
        pooled_projections=batch["pooled_projections"],
        img_ids=batch["img_ids"],
        txt_ids=batch["txt_ids"],
        guidance=batch["guidance"] if guidance else None,
    )


def _student_checks(teacher_state32, reference_state64, batch32, batch64, times, tangents):
    from mfmegatron.parallel import initialize_parallel
    from models.flux.meanflow import FluxMeanFlowStudent, FluxTeacher, init_student_from_teacher
    from models.flux.parallelize import build_flux_model, load_full_weights
    from models.flux.state_dict_adapter import to_megatron
    from models.flux.config import tiny_flux_config
    from tests.flux_fixtures import megatron_flux

    initialize_parallel(tensor_parallel_size=2)
    results = {}

    # 1. The student starts as the teacher, whatever r.
    teacher = megatron_flux(teacher_state32, tensor_model_parallel_size=2)
    student_model = build_flux_model(tiny_flux_config(tensor_model_parallel_size=2, mean_flow_student=True))
    init_student_from_teacher(student_model, teacher)
    t, r = times[0].float(), times[1].float()
    z = batch32["hidden_states"]
    cond = _condition(batch32)
    with torch.no_grad():
        results["teacher"] = FluxTeacher(teacher).velocity(z, t, cond)
        results["student_at_r"] = FluxMeanFlowStudent(student_model).mean_velocity(z, r, t, cond)
        results["student_at_zero"] = FluxMeanFlowStudent(student_model).mean_velocity(z, torch.zeros_like(r), t, cond)

    # 2. A trained-looking student (non-zero interval embedding) in float64: its JVP. The
    # reference's guidance embedder holds the interval weights and gets h = t - r as "guidance".
    config = tiny_flux_config(
        tensor_model_parallel_size=2, mean_flow_student=True, guidance_embeds=False, params_dtype=torch.float64
    )
    model = build_flux_model(config)
    full = dict(to_megatron(reference_state64.__getitem__, config))
    for layer in ("linear_1", "linear_2"):
        for suffix in ("weight", "bias"):
            full[f"interval_in.mlp.{layer}.{suffix}"] = reference_state64[
                f"time_text_embed.guidance_embedder.{layer}.{suffix}"
            ]
    load_full_weights(model, full.__getitem__)
    u, du = FluxMeanFlowStudent(model).mean_velocity_jvp(
        batch64["hidden_states"], times[1], times[0], _condition(batch64, guidance=False), tangents
    )
    results["u"], results["du"] = u.detach(), du
    results["u_requires_grad"], results["du_requires_grad"] = u.requires_grad, du.requires_grad
    return results


@pytest.fixture(scope="module")
def student_results():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    teacher32 = diffusers_flux(torch.float32)
    reference64 = diffusers_flux(torch.float64, seed=3)
    batch32, batch64 = flux_batch(torch.float32), flux_batch(torch.float64)
    g = torch.Generator().manual_seed(9)
    t = torch.rand(BATCH, generator=g, dtype=torch.float64) * 0.5 + 0.5
    r = t * torch.rand(BATCH, generator=g, dtype=torch.float64)
    # MeanFlow's tangents: (v, 0, 1) in (z, r, t), here with a random v and a non-zero r tangent
    # too so every path is exercised.
    tangent_z = torch.randn(batch64["hidden_states"].shape, generator=g, dtype=torch.float64)
    tangent_r = torch.full((BATCH,), 0.3, dtype=torch.float64)
    tangent_t = torch.ones(BATCH, dtype=torch.float64)

    def velocity(z, timestep, interval):
        return reference64(**{**batch64, "hidden_states": z, "timestep": timestep, "guidance": interval}).sample

    with sdpa_kernel(SDPBackend.MATH):
        expected_u, expected_du = torch.func.jvp(
            velocity, (batch64["hidden_states"], t, t - r), (tangent_z, tangent_t, tangent_t - tangent_r)
        )
    ranks = run_on_ranks(
        _student_checks,
        2,
        teacher32.state_dict(),
        reference64.state_dict(),
        batch32,
        batch64,
        (t, r),
        (tangent_z, tangent_r, tangent_t),
        timeout=300,
    )
    return {"ranks": ranks, "expected_u": expected_u, "expected_du": expected_du}


def test_student_at_initialisation_reproduces_the_teacher(student_results):
    for rank in student_results["ranks"]:
        torch.testing.assert_close(rank["student_at_r"], rank["teacher"], rtol=0, atol=0)
        torch.testing.assert_close(rank["student_at_zero"], rank["teacher"], rtol=0, atol=0)


def test_student_mean_velocity_jvp_matches_torch_func_jvp(student_results):
    for rank in student_results["ranks"]:
        torch.testing.assert_close(rank["u"], student_results["expected_u"], rtol=1e-7, atol=1e-7)
        torch.testing.assert_close(rank["du"], student_results["expected_du"], rtol=1e-6, atol=1e-6)
        assert rank["u_requires_grad"] and not rank["du_requires_grad"]


def _trainer_path_targets(reference_state64, batch64, noise, times):
    """The differential target as the trainer forms it: objective plan -> the student pass run by
    the trainer's NetworkRunner (megatron's schedule) -> the target handed to the loss. The
    student is the diffusers reference with its guidance embedder as the interval embedding (see
    `_student_checks`); the teacher the same trunk without it."""
    from mfmegatron.meanflow import MeanFlowDistillation, MeanFlowDistillationConfig
    from mfmegatron.meanflow.warmup import FixedStepWarmup
    from mfmegatron.parallel import initialize_parallel
    from mfmegatron.training.runner import NetworkRunner
    from models.flux.config import tiny_flux_config
    from models.flux.parallelize import build_flux_model, load_full_weights
    from models.flux.state_dict_adapter import to_megatron
    from models.flux.training import FluxFamily

    initialize_parallel()
    networks = []
    for student in (False, True):
        config = tiny_flux_config(mean_flow_student=student, guidance_embeds=False, params_dtype=torch.float64)
        model = build_flux_model(config)
        full = dict(to_megatron(reference_state64.__getitem__, config))
        if student:
            for layer in ("linear_1", "linear_2"):
                for suffix in ("weight", "bias"):
                    full[f"interval_in.mlp.{layer}.{suffix}"] = reference_state64[
                        f"time_text_embed.guidance_embedder.{layer}.{suffix}"
                    ]
        load_full_weights(model, full.__getitem__)
        networks.append(model)
    teacher, student = networks
    teacher.requires_grad_(False)
    objective = MeanFlowDistillation(
        NetworkRunner(FluxFamily(), teacher, 1), NetworkRunner(FluxFamily(), student, 1),
        MeanFlowDistillationConfig(z_ode_steps=2), FixedStepWarmup(0),
    )
    seen = {}
    meanflow_loss = objective._meanflow_loss

    def record(u, u_target, average_velocity):
        seen["u"], seen["target"] = u.detach(), u_target
        return meanflow_loss(u, u_target, average_velocity)

    objective._meanflow_loss = record
    cond = _condition(batch64, guidance=False)
    plan = objective.plan(0, noise, cond, times=times)
    (meanflow,) = plan.passes
    loss, _ = objective.student.run_pass(meanflow, cond)
    with torch.no_grad():
        velocity = objective.teacher.velocity(meanflow.z, meanflow.t, cond)
    return {
        "loss": loss, "target": seen["target"], "u": seen["u"], "z": meanflow.z, "t": meanflow.t,
        "r": meanflow.r, "v": velocity, "has_grads": any(p.grad is not None for p in student.parameters()),
    }


def test_the_trainers_differential_target_matches_torch_func_jvp_through_diffusers():
    # One formula (targets.differential_target_from_jvp), checked where the trainer uses it.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    reference64 = diffusers_flux(torch.float64, seed=3)
    batch64 = flux_batch(torch.float64)
    noise = torch.randn(batch64["hidden_states"].shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    times = (torch.tensor([0.9, 0.6], dtype=torch.float64), torch.tensor([0.3, 0.6], dtype=torch.float64))
    result = run_on_ranks(_trainer_path_targets, 1, reference64.state_dict(), batch64, noise, times, timeout=300)[0]
    assert result["has_grads"] and math.isfinite(result["loss"])
    z, t, r, v = result["z"], result["t"], result["r"], result["v"]

    def student(z_in, t_in):  # u(z, r, t): the guidance embedder takes h = t - r
        return reference64(**{**batch64, "hidden_states": z_in, "timestep": t_in, "guidance": t_in - r}).sample

    with sdpa_kernel(SDPBackend.MATH):
        u, du = torch.func.jvp(student, (z, t), (v, torch.ones_like(t)))
    torch.testing.assert_close(result["u"], u, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(result["target"], v - (t - r)[:, None, None] * du, rtol=1e-6, atol=1e-6)
    # Where r = t (the second sample) the target is the teacher's velocity.
    torch.testing.assert_close(result["target"][1], v[1], rtol=0, atol=0)
