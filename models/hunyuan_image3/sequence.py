"""Text-to-image sequences for HunyuanImage 3.0: token ids, the image slot, 2-D RoPE positions.

One sample is the official generation template (``tokenizer_wrapper.py``, the ``gen_image``
section with the front ``<boi>``, the image shape tokens and the ``<timestep>`` token)::

    <bos> prompt <boi> <img_size_*> <img_ratio_*> <timestep> <img> × (h·w) <eoi>

``<timestep>``'s input embedding is replaced by ``timestep_emb(t)`` and the ``<img>`` slots by the
patch-embedded latents (row-major, token ``k = i·w + j``); the image head reads the hidden states
of the ``<img>`` slots.

Positions (official ``build_2d_rope``): a text token at index ``n`` has ``y = x = n``; the image
starting at index ``L`` puts token ``k = i·w + j`` at ``y = L + (h·w − h)//2 + i``,
``x = L + (h·w − w)//2 + j`` (the official code builds a float grid from ``L + (h·w − h)/2`` and
truncates: the same integers for non-negative values); tokens after the image continue at
``L + h·w`` (``<eoi>`` there).

Batching: prompts of different lengths are right-padded after ``<eoi>`` with ``pad`` (the official
layout), and every sample keeps its own image span and positions. Attention runs one set of calls
per distinct span (``model.mixed_attention_jvp``): a batch of equal-length prompts (and the
[cond; uncond] CFG pair, the same length by construction) costs one set; a training
micro-batch of 1–2 sequences of ~4k tokens costs at most two, each large enough to keep the fused
kernels busy. The padding is exact: a real token never attends to a pad (pads come after every
real token and the image block ends before ``<eoi>``), so a padded sample's outputs equal the
sample's alone. Bucketing by prompt length would save the pad tokens' compute; at ~4k image
tokens per sample the pads are a few percent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ImageTokens:
    """Special token ids (the tokenizer's; tests choose tiny ones). ``size`` and ``ratio`` are the
    ids of this image's ``<img_size_{base}>`` and ``<img_ratio_{k}>`` (the official tokenizer
    picks ``k`` from the aspect-ratio bucket of the latent grid)."""

    bos: int
    pad: int
    boi: int
    eoi: int
    img: int
    timestep: int
    size: int
    ratio: int


@dataclass
class ImageSequence:
    """A batch of text-to-image sequences.

    input_ids [b, s]; image_spans: per sample ``(start, end)`` of the ``<img>`` tokens;
    timestep_positions: per sample the ``<timestep>`` index (``start − 1``); positions_y,
    positions_x [b, s] (2-D RoPE); latent_hw: the latent grid (h, w), the same for the batch;
    lengths: per sample the real length (through ``<eoi>``).
    """

    input_ids: torch.Tensor
    image_spans: list[tuple[int, int]]
    timestep_positions: list[int]
    positions_y: torch.Tensor
    positions_x: torch.Tensor
    latent_hw: tuple[int, int]
    lengths: list[int]

    def sample(self, index: int) -> "ImageSequence":
        """Sample ``index`` alone, without its padding."""
        length = self.lengths[index]
        return ImageSequence(
            self.input_ids[index:index + 1, :length], [self.image_spans[index]],
            [self.timestep_positions[index]], self.positions_y[index:index + 1, :length],
            self.positions_x[index:index + 1, :length], self.latent_hw, [length],
        )

    def to(self, device) -> "ImageSequence":
        return ImageSequence(
            self.input_ids.to(device), self.image_spans, self.timestep_positions,
            self.positions_y.to(device), self.positions_x.to(device), self.latent_hw, self.lengths,
        )


def image_rope_positions(length: int, image_start: int, latent_hw: tuple[int, int]):
    """(y, x) positions [length] of one sequence whose image starts at ``image_start``."""
    h, w = latent_hw
    y = torch.arange(length)
    x = torch.arange(length)
    rows = torch.arange(h).repeat_interleave(w)  # token k = i·w + j -> i
    cols = torch.arange(w).repeat(h)  # -> j
    image = slice(image_start, image_start + h * w)
    y[image] = image_start + (h * w - h) // 2 + rows
    x[image] = image_start + (h * w - w) // 2 + cols
    return y, x


def build_image_sequences(prompts: list[list[int]], latent_hw: tuple[int, int], tokens: ImageTokens,
                          length: int | None = None) -> ImageSequence:
    """Sequences for prompt token ids (without ``<bos>``) and one latent grid size, right-padded to
    the longest (or to ``length``)."""
    h, w = latent_hw
    if h < 1 or w < 1:
        raise ValueError(f"the latent grid must be at least 1×1, got {h}×{w}")
    rows, spans, lengths = [], [], []
    for prompt in prompts:
        prefix = [tokens.bos, *prompt, tokens.boi, tokens.size, tokens.ratio, tokens.timestep]
        rows.append(prefix + [tokens.img] * (h * w) + [tokens.eoi])
        spans.append((len(prefix), len(prefix) + h * w))
        lengths.append(len(rows[-1]))
    total = max(lengths) if length is None else length
    if total < max(lengths):
        raise ValueError(f"length {total} is shorter than the longest sequence ({max(lengths)})")
    input_ids = torch.tensor([row + [tokens.pad] * (total - len(row)) for row in rows], dtype=torch.long)
    positions = [image_rope_positions(total, start, latent_hw) for start, _ in spans]
    return ImageSequence(
        input_ids=input_ids,
        image_spans=spans,
        timestep_positions=[start - 1 for start, _ in spans],
        positions_y=torch.stack([y for y, _ in positions]),
        positions_x=torch.stack([x for _, x in positions]),
        latent_hw=(h, w),
        lengths=lengths,
    )


__all__ = ["ImageTokens", "ImageSequence", "build_image_sequences", "image_rope_positions"]
