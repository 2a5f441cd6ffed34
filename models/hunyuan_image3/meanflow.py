"""The HunyuanImage 3.0 few-step student, initialised from the teacher.

The student is the teacher's architecture plus the Instruct-Distil embedders (``config.py``):
``guidance_emb`` (``cfg_distilled``, fed 1000·w) and ``timestep_r_emb`` (``use_meanflow``, fed
1000·σ_r). ``init_student_from_teacher`` copies every teacher parameter; the two new embedders keep
their initialisation, whose last linear layer is zero (``model._zero_last_linear``), so both
embeddings are exactly zero at init:

- ``student_conditioning="embedding"`` (added to ``<timestep>``'s row): the student at init *is*
  the conditional teacher, ``u(z, σ_r, σ; w) = v_T(z, σ | prompt)`` for every w and σ_r (bit for
  bit in float32);
- ``"tokens"`` (the official layout): the ``<guidance>`` / ``<timestep_r>`` rows are zero vectors
  but still tokens: they take attention mass (and their keys carry RoPE), so the student is close
  to the teacher, not equal (the distance is measured in the tests and stated in
  docs/architecture.md).
"""

from __future__ import annotations

import torch

from models.hunyuan_image3.model import HunyuanImage3Model

STUDENT_ONLY_PREFIXES = ("guidance_emb.", "timestep_r_emb.")


def lora_covers(module_name: str) -> bool:
    """Which linears the LoRA fake network adapts: the attention projections (QKV and output) of
    every layer. Not the MoE: routed experts are split over the expert-parallel group, which
    ``jvp/lora.py``'s tensor-parallel reductions do not cover, and the shared expert's SwiGLU input
    projection holds its gate and up halves per TP rank, which a LoRA factor split along it would
    store layout-dependently. Not ``lm_head`` (text only). The family, the memory count and the
    cost model all ask this one function."""
    return ".self_attention." in module_name


def init_student_from_teacher(student: HunyuanImage3Model, teacher: HunyuanImage3Model) -> None:
    """Copy every teacher parameter into the student (the same layout on this rank: the same
    pipeline stage, TP / EP shards). The student's ``guidance_emb`` / ``timestep_r_emb`` keep their
    zero-ended initialisation. A teacher parameter the student lacks, a student parameter (other
    than those two) the teacher lacks, or a shape mismatch raises ValueError naming it."""
    teacher_params = dict(teacher.named_parameters())
    student_params = dict(student.named_parameters())
    missing = sorted(set(teacher_params) - set(student_params))
    if missing:
        raise ValueError(f"the student lacks teacher parameters {missing[:3]}{' ...' if len(missing) > 3 else ''} "
                         "(build it with the teacher's config and layout)")
    with torch.no_grad():
        for name, param in student_params.items():
            if name.startswith(STUDENT_ONLY_PREFIXES):
                if name in teacher_params:  # a teacher that is itself a student: take its weights
                    _copy(name, param, teacher_params[name])
                continue
            source = teacher_params.get(name)
            if source is None:
                raise ValueError(f"student parameter {name} {tuple(param.shape)} has no teacher counterpart")
            _copy(name, param, source)


def _copy(name: str, param: torch.Tensor, source: torch.Tensor) -> None:
    if source.shape != param.shape:
        raise ValueError(f"student parameter {name} {tuple(param.shape)} does not match the teacher's "
                         f"{tuple(source.shape)} (a different layout on this rank?)")
    param.copy_(source)


__all__ = ["init_student_from_teacher", "STUDENT_ONLY_PREFIXES"]
