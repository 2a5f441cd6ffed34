"""The small model interface that the MeanFlow objectives talk to.

The objectives in this package never look inside a network. They need exactly two things:

- a frozen **flow teacher** that returns an instantaneous velocity `v_T(z_t, t, cond)`, and
- a **MeanFlow student** that returns an average velocity `u_θ(z_t, r, t, cond)` and, for the
  differential target, its Jacobian-vector product along given tangents.

Big backbones (FLUX, HunyuanImage 3.0) implement these protocols on top of their own megatron
modules; the toy 2-D models in `models/toy` implement them with plain `torch.nn` and
`torch.func.jvp`. Conventions (see METHOD.md): `z_t = (1 - t) x + t ε`, t = 1 is noise, velocity
`v = ε - x`, a student jump is `z_r = z_t - (t - r) u_θ(z_t, r, t)`. Tensors are batch-first
`[B, ...]`; `t` and `r` are float tensors of shape `[B]`. `cond` is opaque to this package: it is
passed through unchanged and may be None.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

from torch import Tensor

from mfmegatron.flow_matching import broadcast_time, clean_estimate, per_sample_mean, per_sample_sum


@runtime_checkable
class FlowTeacher(Protocol):
    """A frozen flow-matching model: `velocity(z, t, cond) -> v_T(z_t, t)`.

    `z` is `[B, ...]`, `t` is `[B]`. The objectives call it under `torch.no_grad()` (teacher
    outputs are always targets), except the *fake* network of trajectory alignment, which follows
    the same protocol and is trained.

    A guidance-distilled teacher such as FLUX.1-dev takes its guidance scale as an input embedding,
    so it lives inside `cond` and the teacher handles it. A classifier-free-guidance teacher is
    wrapped in `ClassifierFreeGuidanceTeacher` so the objectives see one guided velocity.
    """

    def velocity(self, z: Tensor, t: Tensor, cond: Any) -> Tensor: ...


@runtime_checkable
class MeanFlowStudent(Protocol):
    """A MeanFlow student `u_θ(z_t, r, t, cond)`, the average velocity over `[r, t]`.

    `mean_velocity` returns `u` with its autograd graph to the student's parameters.

    `mean_velocity_jvp(z, r, t, cond, tangents)` with `tangents = (t_z, t_r, t_t)` returns
    `(u, du)`: `u` exactly as `mean_velocity` (with graph, so the loss needs no second forward) and
    `du = ∂_z u · t_z + ∂_r u · t_r + ∂_t u · t_t` *without* graph (it only ever enters a
    stop-gradient target). Big backbones implement it with their own explicit `forward_jvp`
    (torch forward-mode AD does not pass through megatron's parallel layers or fused attention);
    toy models may use `torch.func.jvp`.
    """

    def mean_velocity(self, z: Tensor, r: Tensor, t: Tensor, cond: Any) -> Tensor: ...

    def mean_velocity_jvp(
        self, z: Tensor, r: Tensor, t: Tensor, cond: Any, tangents: tuple[Tensor, Tensor, Tensor]
    ) -> tuple[Tensor, Tensor]: ...


def guided_velocity(v_cond: Tensor, v_uncond: Tensor, guidance_scale: float) -> Tensor:
    """Classifier-free guidance: `v_u + w (v_c - v_u)` (w = 1 gives the conditional velocity)."""
    return v_uncond + guidance_scale * (v_cond - v_uncond)


class ClassifierFreeGuidanceTeacher:
    """Wraps a conditional teacher into one that returns the CFG-guided velocity.

    The wrapped teacher is evaluated twice (conditional and unconditional) per call. The guided
    velocity is the one that must be used everywhere in distillation: as the ODE velocity of the
    discrete target, as the `v_T` of the differential target *and* as its z-tangent (using another
    velocity for the tangent than for the target gives a wrong target).

    Args:
        teacher: a `FlowTeacher` whose `cond` carries the conditioning.
        guidance_scale: w in `v_u + w (v_c - v_u)`.
        make_uncond: maps a `cond` to its unconditional counterpart (e.g. the empty-prompt
            embedding of the same batch size). Kept a callable because `cond` is opaque here.
    """

    def __init__(self, teacher: FlowTeacher, guidance_scale: float, make_uncond: Callable[[Any], Any]):
        self.teacher = teacher
        self.guidance_scale = guidance_scale
        self.make_uncond = make_uncond

    def velocity(self, z: Tensor, t: Tensor, cond: Any) -> Tensor:
        v_cond = self.teacher.velocity(z, t, cond)
        v_uncond = self.teacher.velocity(z, t, self.make_uncond(cond))
        return guided_velocity(v_cond, v_uncond, self.guidance_scale)


__all__ = [
    "FlowTeacher",
    "MeanFlowStudent",
    "ClassifierFreeGuidanceTeacher",
    "guided_velocity",
    "broadcast_time",
    "clean_estimate",
    "per_sample_sum",
    "per_sample_mean",
]
