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
    "hunyuan_image3": "models.hunyuan_image3.training:HunyuanImage3Family",
}


@dataclass
class Networks:
    """This rank's pipeline stage of each network, on its device (not yet wrapped in DDP).
    Flow-matching training has no teacher: ``student`` is the flow network being trained."""

    teacher: torch.nn.Module | None
    student: torch.nn.Module
    fake: torch.nn.Module | None = None


class ModelFamily(Protocol):
    """A backbone as the trainer sees it. ``cond`` is the family's own conditioning object."""

    def build_networks(self, config, device: torch.device, with_fake: bool) -> Networks: ...

    def build_flow_network(self, config, device: torch.device) -> torch.nn.Module:
        """The teacher architecture, trainable, for ``train.objective=flow_matching`` (from
        ``model.teacher_checkpoint`` when set, else freshly initialised)."""
        ...

    def latent_shape(self, config) -> tuple[int, ...]:
        """Per-sample shape of the latents the networks map (noise is drawn with it)."""

    def text_conditioning(self, config, device: torch.device, dtype: torch.dtype) -> Any:
        """What turns prompts into the networks' text inputs, built once when the trainer starts
        (before any network, so a recipe that cannot condition fails first, in one line): FLUX a
        text encoder (None: the shards' precomputed embeddings), HunyuanImage 3.0 its tokenizer.
        The trainer passes it back to ``condition`` as ``text``."""

    def condition(self, batch, config, device: torch.device, dtype: torch.dtype, text: Any = None,
                  draw: tuple[int, int, int] | None = None) -> Any:
        """The conditioning of a raw ``PromptBatch`` (the prompts as read from the shards, with
        whatever embeddings they carry), through ``text`` (``text_conditioning``'s object).
        ``draw``: (seed, step, global index of the batch's first sample) keying per-sample random
        conditioning (HunyuanImage 3.0's guidance scale), so a global sample gets the same draw at
        any data-parallel size; None (evaluation): a fixed value."""

    def condition_stats(self, cond: Any) -> dict[str, float]:
        """Numbers about a training batch's conditioning logged with the step (the same keys on
        every rank), e.g. the fraction of prompts flow-matching training dropped; {} for none."""

    def image_encoder(self, config, device: torch.device, dtype: torch.dtype) -> Any:
        """For ``meanflow.z_source=data``: a callable ``(images, generator) -> x`` from images
        ``[b, 3, H, W]`` in [-1, 1] to latents ``[b, *latent_shape]`` (the x of
        ``z_t = (1 - t) x + t ε``); ``generator`` draws whatever the encoder samples."""

    def pack_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The VAE's latents ``[b, c, h, w]`` (precomputed in the shards) -> the networks'
        latents ``[b, *latent_shape]``."""

    def slice_condition(self, cond: Any, rows: slice | torch.Tensor, batch_size: int | None) -> Any:
        """The conditioning of batch ``rows`` (a slice, or a tensor of row indices)."""

    def no_grad_activation_bytes_per_sample(self, config, with_tangent: bool) -> float:
        """Estimated activation peak of one no-grad forward per sample on one rank (sizes the
        no-grad micro-batches, ``parallel.no_grad_memory_gb``)."""

    def stage_forward(self, model, z, r, t, cond, tangents):
        """This stage's forward (``r`` None: a teacher-architecture network; a family may mark its
        teacher module to run with classifier-free guidance). On the last stage returns
        ``(output, output_tangent or None)``, else the activation sent downstream."""

    def pipeline_seq_length(self, model, cond, with_tangent: bool) -> int:
        """The sequence length megatron's schedules use for the stage activation's shape
        ``[seq, micro-batch, hidden]`` (tangent rows, or a CFG batch's unconditional half, travel
        on the sequence dim)."""

    def flops_per_sample_forward(self, config) -> float:
        """Estimated FLOPs of one network forward for one sample (for TFLOP/s logging)."""

    def decode_images(self, latents: torch.Tensor, config) -> torch.Tensor | None:
        """Networks' latents -> images [n, 3, H, W] in [0, 1] for evaluation; None when the
        family cannot decode (evaluation then compares latents)."""

    def save_sample_grid(self, samples: dict[int, torch.Tensor], path, config) -> None:
        """Write a picture of student samples ``{num_steps: latents [n, ...]}``."""

    def export_student(self, student: torch.nn.Module, directory, config) -> None:
        """Write the (whole, unsharded) student for users, e.g. as a diffusers folder."""

    def checkpoint_files(self, student: torch.nn.Module, with_ema: bool) -> dict[str, str]:
        """Small files (name -> text) saved in each training checkpoint, e.g. what the family's
        converter needs to export the checkpoint's EMA (``ema.*``) or student (``student.*``)."""

    def rank_parameter_counts(self, config) -> dict[str, float]:
        """Parameters one rank holds of the ``teacher``, the ``student`` and the LoRA fake
        network's factors (``lora``), for ``training/memory.py``. A mixture-of-experts family
        also gives the routed experts' part of each (``teacher_expert``, ``student_expert``,
        ``lora_expert``): their state is sharded over expert-data-parallel ranks."""

    def activation_bytes(self, config) -> tuple[float, str]:
        """Peak activation bytes of one rank in a training pass, and the formula in words."""

    # -- the planner (mfmegatron/planner.py, tools/plan, tools/bench_scaling) -------------------

    def network_flops(self, config, network: str):
        """FLOPs per sample of ``network`` ("teacher", "student", "fake" or "flow"): forward, the
        extra of a forward with a JVP, backward as the network trains (full, LoRA or frozen) and
        what activation recompute repeats (``models.flux.cost.NetworkFlops``)."""

    def pass_traffic(self, config, network: str, phase: str, rows: int, stage: int, with_backward: bool):
        """Collectives of one micro-batch of ``rows`` samples through ``network``'s pipeline
        ``stage`` (``phase`` "forward" or "forward_jvp"; the backward's too when
        ``with_backward``), as a ``planner.CollectiveVolume``."""

    def gradient_traffic(self, config, network: str, stage: int, data_parallel_size: int):
        """Collectives of one optimizer step of ``network`` on pipeline ``stage``'s ranks (TP sums
        of replicated weights' gradients, the data-parallel reduction of DDP's buffers)."""

    def layout_problem(self, config) -> str | None:
        """Why the recipe's layout cannot run, in one line, or None."""


def get_family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}")
    module_name, class_name = FAMILIES[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)()
