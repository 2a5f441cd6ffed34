"""Classifier-free guidance for every model family: the teacher's per-sample scale, prompt
dropout in flow-matching training, and the [cond; uncond] batch a guided teacher runs as one call.

A family marks its frozen teacher with ``classifier_free_guidance = True`` (``is_guided``); its
``stage_forward`` then runs the conditional and unconditional inputs as one batch of 2b rows and
returns ``combine_guidance`` of the result. Under pipeline parallelism the stage activation
``[s, 2b, h]`` travels as ``[2s, b, h]`` (``to_transport``), so megatron's schedule keeps one
micro-batch size for every network.
"""

from __future__ import annotations

import zlib

import torch


def keyed_uniforms(kind: str, count: int, draw: tuple[int, int, int]) -> list[float]:
    """``count`` uniforms in [0, 1): sample i's from a generator seeded by (kind, seed, step,
    first + i), so a global sample's draw does not depend on how the batch is split over ranks."""
    seed, step, first = draw
    values = []
    for index in range(first, first + count):
        generator = torch.Generator().manual_seed(zlib.crc32(f"{kind}/{seed}/{step}/{index}".encode()))
        values.append(float(torch.rand((), generator=generator, dtype=torch.float64)))
    return values


def guidance_scales(low: float, high: float, count: int, draw: tuple[int, int, int] | None) -> torch.Tensor:
    """Per-sample CFG scales [count] (float32), uniform in [low, high] (``keyed_uniforms``);
    ``draw`` None (evaluation): the middle of the range."""
    if draw is None:
        return torch.full((count,), (low + high) / 2, dtype=torch.float32)
    return torch.tensor([low + (high - low) * u for u in keyed_uniforms("guidance", count, draw)], dtype=torch.float32)


def dropped_prompts(fraction: float, count: int, draw: tuple[int, int, int] | None) -> torch.Tensor:
    """Which of ``count`` samples train unconditionally [count] (bool), each with probability
    ``fraction`` (``keyed_uniforms``, a stream of its own); ``draw`` None (evaluation): none."""
    if draw is None or fraction <= 0:
        return torch.zeros(count, dtype=torch.bool)
    return torch.tensor([u < fraction for u in keyed_uniforms("prompt_dropout", count, draw)], dtype=torch.bool)


def check_guidance_settings(model) -> None:
    """``model.prompt_dropout`` and ``model.guidance_range`` (when set), as one-line errors."""
    if not 0 <= model.prompt_dropout < 1:
        raise ValueError(f"model.prompt_dropout {model.prompt_dropout} must be in [0, 1)")
    if model.guidance_range is not None:
        low, high = model.guidance_range
        if not 0 < low <= high:
            raise ValueError(f"model.guidance_range {list(model.guidance_range)} must be [lo, hi] with 0 < lo <= hi")


def combine_guidance(v: torch.Tensor, scale) -> torch.Tensor:
    """``uncond + w·(cond − uncond)`` from v [2b, ...] of a [cond; uncond] batch; ``scale`` [b]
    (or a number): per-sample w. Computed in float32 at least (float64 stays float64)."""
    if v.shape[0] % 2:
        raise ValueError(f"combine_guidance needs a [cond; uncond] batch (even size), got {v.shape[0]}")
    wide = torch.promote_types(v.dtype, torch.float32)
    cond, uncond = v.to(wide).chunk(2)
    w = torch.as_tensor(scale, dtype=wide, device=v.device)
    if w.dim() == 0:
        w = w.expand(cond.shape[0])
    if w.shape != (cond.shape[0],):
        raise ValueError(f"guidance scale must be a number or [{cond.shape[0]}], got {tuple(w.shape)}")
    w = w.reshape(-1, *([1] * (cond.dim() - 1)))
    return uncond + w * (cond - uncond)


def is_guided(model) -> bool:
    """Whether ``model`` is a teacher its family runs with classifier-free guidance."""
    return getattr(model, "classifier_free_guidance", False)


def to_transport(x: torch.Tensor) -> torch.Tensor:
    """[s, 2b, h] (a [cond; uncond] batch) -> [2s, b, h] for the pipeline's fixed micro-batch."""
    return torch.cat(x.chunk(2, dim=1), dim=0)


def from_transport(x: torch.Tensor) -> torch.Tensor:
    """[2s, b, h] as a pipeline stage receives it -> the [cond; uncond] batch [s, 2b, h]."""
    return torch.cat(x.chunk(2, dim=0), dim=1)
