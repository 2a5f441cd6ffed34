"""FLUX as the MeanFlow teacher and student (the interface in ``mfmegatron.meanflow``).

The teacher is a frozen FLUX; the student is the same architecture with
``config.mean_flow_student=True``: a second, zero-initialised time embedding of ``h = t - r``
added to the conditioning, so at initialisation ``u(z, r, t) = v_T(z, t)`` for every r.
Latents are FLUX's packed latents ``[b, s_img, c]``; times are sigmas in [0, 1] of shape [b].

These wrappers run a whole model (no pipeline parallelism); under pipeline parallelism the
trainer drives ``FluxModel.forward_jvp`` through megatron's schedules instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.flux.model import FluxInputs, FluxModel, FluxTangents


@dataclass
class FluxCondition:
    """Everything but the latents and the times: the prompt's encodings and positions."""

    encoder_hidden_states: torch.Tensor  # [b, s_txt, joint_attention_dim]
    pooled_projections: torch.Tensor  # [b, pooled_projection_dim]
    img_ids: torch.Tensor  # [s_img, 3]
    txt_ids: torch.Tensor  # [s_txt, 3]
    guidance: torch.Tensor | None = None  # [b], guidance-distilled teachers (FLUX.1-dev)
    # Classifier-free guidance of a teacher without a guidance embedding: the empty prompt's
    # encodings (the unconditional input), per row, and each row's scale w.
    unconditional_hidden_states: torch.Tensor | None = None  # [b, s_txt, joint_attention_dim]
    unconditional_pooled: torch.Tensor | None = None  # [b, pooled_projection_dim]
    guidance_scale: torch.Tensor | None = None  # [b]
    dropped: torch.Tensor | None = None  # [b] bool: rows flow matching trains on the empty prompt

    def inputs(self, latents, t, r=None) -> FluxInputs:
        return FluxInputs(
            latents=latents,
            encoder_hidden_states=self.encoder_hidden_states,
            pooled_projections=self.pooled_projections,
            timestep=t,
            img_ids=self.img_ids,
            txt_ids=self.txt_ids,
            guidance=self.guidance,
            timestep_r=r,
        )

    def cfg_batch(self) -> FluxCondition:
        """[cond; uncond] along the batch (2b rows): one call of the guided teacher."""
        if self.unconditional_hidden_states is None:
            raise ValueError("this conditioning has no unconditional input (set model.guidance_range)")
        return FluxCondition(
            encoder_hidden_states=torch.cat([self.encoder_hidden_states, self.unconditional_hidden_states]),
            pooled_projections=torch.cat([self.pooled_projections, self.unconditional_pooled]),
            img_ids=self.img_ids,
            txt_ids=self.txt_ids,
            guidance=None if self.guidance is None else torch.cat([self.guidance, self.guidance]),
        )


def _whole_model(model: FluxModel) -> FluxModel:
    if not (model.pre_process and model.post_process):
        raise ValueError(
            "the MeanFlow wrappers need the whole FLUX model on this rank; with pipeline "
            "parallelism run FluxModel.forward_jvp through megatron's schedules"
        )
    return model


class FluxTeacher:
    """``velocity(z, t, cond)``: the frozen flow-matching teacher."""

    def __init__(self, model: FluxModel):
        self.model = _whole_model(model)

    def velocity(self, z, t, cond: FluxCondition):
        return self.model(cond.inputs(z, t))


class FluxMeanFlowStudent:
    """``mean_velocity(z, r, t, cond)`` and its JVP through our forward-mode path."""

    def __init__(self, model: FluxModel):
        if not model.config.mean_flow_student:
            raise ValueError("build the student with FluxConfig(mean_flow_student=True)")
        self.model = _whole_model(model)

    def mean_velocity(self, z, r, t, cond: FluxCondition):
        return self.model(cond.inputs(z, t, r))

    def mean_velocity_jvp(self, z, r, t, cond: FluxCondition, tangents):
        """(u, du) for tangents (t_z, t_r, t_t); u has the graph, du none (stop-gradient)."""
        tangent_z, tangent_r, tangent_t = tangents
        return self.model.forward_jvp(
            cond.inputs(z, t, r),
            FluxTangents(latents=tangent_z, timestep=_per_sample(tangent_t, t), timestep_r=_per_sample(tangent_r, r)),
        )


def _per_sample(tangent, like: torch.Tensor) -> torch.Tensor:
    """Scalar tangents (``1`` for d/dt) broadcast to the batch."""
    if torch.is_tensor(tangent) and tangent.shape == like.shape:
        return tangent.to(like.dtype)
    return torch.as_tensor(tangent, dtype=like.dtype, device=like.device).expand_as(like).clone()


def init_student_from_teacher(student: FluxModel, teacher: FluxModel) -> None:
    """Copy every teacher parameter into the student (same layout on this rank).

    The student's interval embedding has no counterpart and keeps its zero initialisation. So
    does a guidance embedding the teacher lacks (the student of a classifier-free-guided teacher
    learns w through one): its output layer is zeroed, so the student starts as the conditional
    teacher at every w.
    """
    teacher_params = dict(teacher.named_parameters())
    # Only the first pipeline stage has embedders.
    new_guidance = getattr(student, "guidance_in", None) is not None and getattr(teacher, "guidance_in", None) is None
    with torch.no_grad():
        if new_guidance:
            torch.nn.init.zeros_(student.guidance_in.mlp.linear_2.weight)
            torch.nn.init.zeros_(student.guidance_in.mlp.linear_2.bias)
        for name, param in student.named_parameters():
            if name.startswith("interval_in.") or (new_guidance and name.startswith("guidance_in.")):
                continue
            source = teacher_params.get(name)
            if source is None or source.shape != param.shape:
                raise ValueError(
                    f"student parameter {name} {tuple(param.shape)} has no teacher counterpart "
                    f"of the same shape ({None if source is None else tuple(source.shape)})"
                )
            param.copy_(source)
