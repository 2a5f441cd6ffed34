"""Text-to-image sequences for HunyuanImage 3.0: token ids, the image slot, 2-D RoPE positions.

One sample is the official generation template (``tokenizer_wrapper.py``, the ``gen_image``
section with the front ``<boi>``, the image shape tokens and the ``<timestep>`` token)::

    <bos> prompt <boi> <img_size_*> <img_ratio_*> <timestep> <img> × (h·w) <eoi>

That is the base model's ``pretrain`` template. The Instruct models' ``instruct`` template puts
role text around the prompt and the image (``TextTemplate``)::

    <bos> [system "\n\n"] "User: " prompt "\n\n" "Assistant: " <answer> <boi> … <eoi> </answer> "\n\n"

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

import dataclasses
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
    # ``<cfg>`` (replaces each user-prompt token in the unconditional CFG sequence), ``<guidance>``
    # and ``<timestep_r>`` (the few-step student's, right after ``<timestep>``); None: the
    # tokenizer's ids are not given (the sequences that need them raise).
    cfg: int | None = None
    guidance: int | None = None
    timestep_r: int | None = None


@dataclass(frozen=True)
class TextTemplate:
    """Token ids the template puts around the prompt and the image (``PromptTokenizer.template``
    builds them from the template's text). ``before_prompt`` follows ``<bos>`` (a system prompt,
    the user's role prefix), ``before_image`` precedes ``<boi>`` (the turn separator, the
    assistant's role prefix, ``<answer>``), ``after_image`` follows ``<eoi>`` (``</answer>``, the
    separator). All empty: the base model's ``pretrain`` template. The unconditional CFG sequence
    keeps them (the official tokenizer marks only the prompt's text for ``<cfg>``)."""

    before_prompt: tuple[int, ...] = ()
    before_image: tuple[int, ...] = ()
    after_image: tuple[int, ...] = ()

    @property
    def length(self) -> int:
        return len(self.before_prompt) + len(self.before_image) + len(self.after_image)


PRETRAIN = TextTemplate()
SEQUENCE_TEMPLATES = ("pretrain", "instruct")  # the official tokenizer's names


@dataclass
class ImageSequence:
    """A batch of text-to-image sequences.

    input_ids [b, s]; image_spans: per sample ``(start, end)`` of the ``<img>`` tokens;
    timestep_positions: per sample the ``<timestep>`` index (``start − 1``); positions_y,
    positions_x [b, s] (2-D RoPE); latent_hw: the latent grid (h, w), the same for the batch;
    lengths: per sample the real length (through ``<eoi>`` and the template's text after it); prompt_spans: per sample
    ``(start, end)`` of the user-prompt tokens (what ``unconditional_sequences`` replaces by
    ``<cfg>``); guidance_positions, timestep_r_positions: per sample the index of ``<guidance>``
    and ``<timestep_r>`` (None: a sequence without the student's tokens).
    """

    input_ids: torch.Tensor
    image_spans: list[tuple[int, int]]
    timestep_positions: list[int]
    positions_y: torch.Tensor
    positions_x: torch.Tensor
    latent_hw: tuple[int, int]
    lengths: list[int]
    prompt_spans: list[tuple[int, int]]
    guidance_positions: list[int] | None = None
    timestep_r_positions: list[int] | None = None

    @property
    def has_student_tokens(self) -> bool:
        return self.guidance_positions is not None or self.timestep_r_positions is not None

    def sample(self, index: int) -> "ImageSequence":
        """Sample ``index`` alone, without its padding."""
        length = self.lengths[index]

        def pick(positions):
            return None if positions is None else [positions[index]]

        return ImageSequence(
            self.input_ids[index:index + 1, :length], [self.image_spans[index]],
            [self.timestep_positions[index]], self.positions_y[index:index + 1, :length],
            self.positions_x[index:index + 1, :length], self.latent_hw, [length], [self.prompt_spans[index]],
            pick(self.guidance_positions), pick(self.timestep_r_positions),
        )

    def to(self, device) -> "ImageSequence":
        return dataclasses.replace(
            self, input_ids=self.input_ids.to(device), positions_y=self.positions_y.to(device),
            positions_x=self.positions_x.to(device),
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
                          length: int | None = None, student_tokens=False,
                          template: TextTemplate = PRETRAIN) -> ImageSequence:
    """Sequences for prompt token ids (without ``<bos>``) and one latent grid size, right-padded to
    the longest (or to ``length``), in ``template`` (default the base model's ``pretrain``).

    ``student_tokens``: the few-step student's layout (the Instruct-Distil tokenizer appends the
    image meta tokens as size, ratio, ``<timestep>``, then ``<guidance>``, then ``<timestep_r>``;
    read in public ports of it)::

        <bos> prompt <boi> <img_size> <img_ratio> <timestep> <guidance> <timestep_r> <img>×(h·w) <eoi>

    The two tokens are text tokens for the 2-D RoPE (y = x = index) and the image starts two
    tokens later (its positions follow its start, the official rule). ``student_tokens`` may also
    name one of them, ``("guidance",)`` or ``("timestep_r",)``: a student built with only
    ``cfg_distilled`` or only ``use_meanflow`` (the official tokenizer's two flags are
    independent)."""
    h, w = latent_hw
    if h < 1 or w < 1:
        raise ValueError(f"the latent grid must be at least 1×1, got {h}×{w}")
    names = _student_token_names(student_tokens)
    ids = {"guidance": tokens.guidance, "timestep_r": tokens.timestep_r}
    if any(ids[name] is None for name in names):
        raise ValueError(f"student_tokens={student_tokens!r} needs the {' and '.join(f'<{n}>' for n in names)} ids: "
                         f"ImageTokens({', '.join(f'{n}=...' for n in names)}) (got guidance={tokens.guidance}, "
                         f"timestep_r={tokens.timestep_r})")
    extra = [ids[name] for name in names]
    rows, spans, lengths, prompt_spans = [], [], [], []
    prompt_start = 1 + len(template.before_prompt)
    for prompt in prompts:
        prefix = [tokens.bos, *template.before_prompt, *prompt, *template.before_image, tokens.boi, tokens.size,
                  tokens.ratio, tokens.timestep, *extra]
        rows.append(prefix + [tokens.img] * (h * w) + [tokens.eoi, *template.after_image])
        spans.append((len(prefix), len(prefix) + h * w))
        lengths.append(len(rows[-1]))
        prompt_spans.append((prompt_start, prompt_start + len(prompt)))
    total = max(lengths) if length is None else length
    if total < max(lengths):
        raise ValueError(f"length {total} is shorter than the longest sequence ({max(lengths)})")
    input_ids = torch.tensor([row + [tokens.pad] * (total - len(row)) for row in rows], dtype=torch.long)
    positions = [image_rope_positions(total, start, latent_hw) for start, _ in spans]
    before = len(extra)  # special rows between <timestep> and the image
    return ImageSequence(
        input_ids=input_ids,
        image_spans=spans,
        timestep_positions=[start - 1 - before for start, _ in spans],
        positions_y=torch.stack([y for y, _ in positions]),
        positions_x=torch.stack([x for _, x in positions]),
        latent_hw=(h, w),
        lengths=lengths,
        prompt_spans=prompt_spans,
        guidance_positions=_positions(names, "guidance", spans),
        timestep_r_positions=_positions(names, "timestep_r", spans),
    )


STUDENT_TOKEN_NAMES = ("guidance", "timestep_r")  # their order in the sequence


def _student_token_names(student_tokens) -> list[str]:
    """False -> none, True -> both, or the named ones (in sequence order)."""
    if student_tokens is True:
        return list(STUDENT_TOKEN_NAMES)
    if student_tokens is False or student_tokens is None:
        return []
    names = [student_tokens] if isinstance(student_tokens, str) else list(student_tokens)
    unknown = sorted(set(names) - set(STUDENT_TOKEN_NAMES))
    if unknown or not names:
        raise ValueError(f"student_tokens must be True, False or names from {STUDENT_TOKEN_NAMES}, got {student_tokens!r}")
    return [name for name in STUDENT_TOKEN_NAMES if name in names]


def _positions(names: list[str], name: str, spans) -> list[int] | None:
    """Index of token ``name`` per sample: the student's tokens end right before the image."""
    if name not in names:
        return None
    offset = len(names) - names.index(name)
    return [start - offset for start, _ in spans]


# --------------------------------------------------------------------------- classifier-free guidance


def unconditional_sequences(sequence: ImageSequence, tokens: ImageTokens) -> ImageSequence:
    """The official CFG's unconditional sequences: the same length and layout, each user-prompt
    token replaced by ``<cfg>`` (the tokenizer's ``uncond`` text); everything else (``<bos>``,
    the image tokens, the student's tokens, padding, positions, spans) unchanged."""
    if tokens.cfg is None:
        raise ValueError("unconditional sequences need the <cfg> id: ImageTokens(cfg=...)")
    input_ids = sequence.input_ids.clone()
    for sample, (start, end) in enumerate(sequence.prompt_spans):
        input_ids[sample, start:end] = tokens.cfg
    return dataclasses.replace(sequence, input_ids=input_ids)


def cfg_batch(cond: ImageSequence, uncond: ImageSequence) -> ImageSequence:
    """[cond; uncond] along the batch (the official CFG batch); both must share the length and grid."""
    if cond.input_ids.shape[1] != uncond.input_ids.shape[1] or cond.latent_hw != uncond.latent_hw:
        raise ValueError(
            f"cfg_batch: cond {tuple(cond.input_ids.shape)} grid {cond.latent_hw} and uncond "
            f"{tuple(uncond.input_ids.shape)} grid {uncond.latent_hw} must share the length and grid"
        )
    if (cond.guidance_positions is None) != (uncond.guidance_positions is None) or (
            cond.timestep_r_positions is None) != (uncond.timestep_r_positions is None):
        raise ValueError("cfg_batch: one sequence has the student's tokens and the other does not")

    def join(a, b):
        return None if a is None else a + b

    return ImageSequence(
        input_ids=torch.cat([cond.input_ids, uncond.input_ids]),
        image_spans=cond.image_spans + uncond.image_spans,
        timestep_positions=cond.timestep_positions + uncond.timestep_positions,
        positions_y=torch.cat([cond.positions_y, uncond.positions_y]),
        positions_x=torch.cat([cond.positions_x, uncond.positions_x]),
        latent_hw=cond.latent_hw,
        lengths=cond.lengths + uncond.lengths,
        prompt_spans=cond.prompt_spans + uncond.prompt_spans,
        guidance_positions=join(cond.guidance_positions, uncond.guidance_positions),
        timestep_r_positions=join(cond.timestep_r_positions, uncond.timestep_r_positions),
    )


__all__ = [
    "ImageTokens",
    "TextTemplate",
    "PRETRAIN",
    "SEQUENCE_TEMPLATES",
    "ImageSequence",
    "build_image_sequences",
    "image_rope_positions",
    "STUDENT_TOKEN_NAMES",
    "unconditional_sequences",
    "cfg_batch",
]
