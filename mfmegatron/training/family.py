"""What the trainer needs from a backbone, and the registry that finds one by name.

``models/`` imports ``mfmegatron``, never the reverse: a family is registered here by the import
path of its class and imported when a recipe asks for it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Protocol

import torch

# name -> "module:Class"
FAMILIES = {
    "flux": "models.flux.training:FluxFamily",
}


@dataclass
class Networks:
    """This rank's pipeline stage of each network, on its device (not yet wrapped in DDP)."""

    teacher: torch.nn.Module
    student: torch.nn.Module
    fake: torch.nn.Module | None


class ModelFamily(Protocol):
    """A backbone as the trainer sees it. ``cond`` is the family's own conditioning object."""

    def build_networks(self, config, device: torch.device, with_fake: bool) -> Networks: ...

    def latent_shape(self, config) -> tuple[int, ...]:
        """Per-sample shape of the latents the networks map (noise is drawn with it)."""

    def condition(self, batch, config, device: torch.device, dtype: torch.dtype) -> Any:
        """The conditioning of a ``PromptBatch`` (embeddings already present)."""

    def slice_condition(self, cond: Any, rows: slice, batch_size: int) -> Any: ...

    def stage_forward(self, model, z, r, t, cond, tangents):
        """This stage's forward (``r`` None: a teacher-architecture network). On the last stage
        returns ``(output, output_tangent or None)``, else the activation sent downstream."""

    def pipeline_seq_length(self, model, cond, with_tangent: bool) -> int: ...

    def flops_per_sample_forward(self, config) -> float:
        """Estimated FLOPs of one network forward for one sample (for TFLOP/s logging)."""

    def text_encoder_dims(self, config) -> tuple[int, int]:
        """(token-embedding width, pooled width) the networks expect."""

    def save_sample_grid(self, samples: dict[int, torch.Tensor], path, config) -> None:
        """Write a picture of student samples ``{num_steps: latents [n, ...]}``."""

    def export_student(self, student: torch.nn.Module, directory, config) -> None:
        """Write the (whole, unsharded) student for users, e.g. as a diffusers folder."""

    def checkpoint_files(self, student: torch.nn.Module, with_ema: bool) -> dict[str, str]:
        """Small files (name -> text) saved in each training checkpoint, e.g. what the family's
        converter needs to export the checkpoint's EMA (``ema.*``) or student (``student.*``)."""

    def rank_parameter_counts(self, config) -> dict[str, float]:
        """Parameters one rank holds of the ``teacher``, the ``student`` and the LoRA fake
        network's factors (``lora``), for ``training/memory.py``."""

    def activation_bytes(self, config) -> tuple[float, str]:
        """Peak activation bytes of one rank in a training pass, and the formula in words."""


def get_family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}")
    module_name, class_name = FAMILIES[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)()
