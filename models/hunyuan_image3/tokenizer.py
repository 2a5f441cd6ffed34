"""Prompts -> HunyuanImage 3.0 token ids: the model's Hugging Face ``tokenizer.json`` and the
official resolution buckets (``<img_size_*>`` / ``<img_ratio_*>`` tokens).

The special tokens' names are the official tokenizer wrapper's (``tokenizer_wrapper.py``):
``<boi>``, ``<eoi>``, ``<img>``, ``<timestep>``, ``<cfg>``, ``<guidance>``, ``<timestep_r>``,
``<pad>``, ``<img_size_{base}>`` and ``<img_ratio_{index}>``. The begin-of-sequence token is the
tokenizer's own (``bos_token`` of a ``tokenizer_config.json`` beside the file, else
``BOS_TOKEN``).

Sequence templates (the official tokenizer's ``sequence_template``, chosen per checkpoint by its
``generation_config.json``): ``pretrain`` (the base model: the prompt alone) and ``instruct``
(HunyuanImage-3.0-Instruct and Instruct-Distil): an optional system prompt and ``"\n\n"``, then
``"User: "``, the prompt, ``"\n\n"``, ``"Assistant: "``, ``<answer>``, the image section and
``</answer>`` ``"\n\n"``. The official tokenizer encodes each of those pieces on its own (a
section each), so ``PromptTokenizer.template`` does too; only the prompt's ids become ``<cfg>``
in the unconditional sequence.

Resolution buckets (the official ``ResolutionGroup``, re-derived here): around a base size b with
step b/16, the square (b, b), then heights growing by a step while widths shrink by one (clamped
to [b/2, 2b]) until (2b, b/2), and the reverse until (b/2, 2b); sorted by height / width. An image's
ratio token is the index of the bucket whose ratio is nearest its own (the first on a tie). The
Instruct release (HunyuanImage-3.0-Instruct, Instruct-Distil; the ``instruct`` template here) appends
four fixed sizes after those, as its image processor's ``extra_resolutions``: 1024x768, 1280x720,
768x1024 and 720x1280 (height x width, ``<img_ratio_33>`` to ``<img_ratio_36>``; one whose ratio a
bucket already has is skipped), and they take part in the nearest-ratio choice.
"""

from __future__ import annotations

import json
from pathlib import Path

from models.hunyuan_image3.sequence import PRETRAIN, SEQUENCE_TEMPLATES, ImageTokens, TextTemplate

# The VAE downsamples by 16 and the image path embeds one token per latent pixel (patch size 1).
PIXELS_PER_LATENT = 16
# model.latent_space=pixels: pixels per side of one image token. 4 keeps a 32 px image at 64
# tokens (the tiny VAE-latent recipe's order of magnitude) with 48 values per token; 2 would make
# 256 tokens of 12, whose attention costs 16x on the CPU the shapes world trains on.
PIXEL_PATCH = 4
SPECIAL_TOKENS = ("<boi>", "<eoi>", "<img>", "<timestep>", "<cfg>", "<guidance>", "<timestep_r>", "<pad>")
BOS_TOKEN = "<|startoftext|>"
# The official conversation template ("hunyuan-image-3"): roles "User" / "Assistant" with a
# ": " after the name, turns separated by a blank line.
TURN_SEPARATOR = "\n\n"
USER_PREFIX, ASSISTANT_PREFIX = "User: ", "Assistant: "
ANSWER_TOKENS = ("<answer>", "</answer>")


# The Instruct release's extra buckets (height, width), in their ratio-index order after the others.
INSTRUCT_EXTRA_BUCKETS = ((1024, 768), (1280, 720), (768, 1024), (720, 1280))


def resolution_buckets(base: int, sequence_template: str = "pretrain") -> list[tuple[int, int]]:
    """The (height, width) buckets around ``base`` in ratio-index order: sorted by height / width,
    then, for the ``instruct`` template's release, ``INSTRUCT_EXTRA_BUCKETS`` whose ratio is new."""
    buckets = _stepped_buckets(base)
    if sequence_template == "instruct":
        for h, w in INSTRUCT_EXTRA_BUCKETS:
            if all(h / w != bh / bw for bh, bw in buckets):
                buckets.append((h, w))
    return buckets


def _stepped_buckets(base: int) -> list[tuple[int, int]]:
    step, low, high = base // 16, base // 2, base * 2
    if step < 1:
        raise ValueError(f"the resolution buckets' base must be at least 16 px, got {base}")
    buckets = [(base, base)]
    h = w = base
    while not (h >= high and w <= low):  # taller
        h, w = min(h + step, high), max(w - step, low)
        buckets.append((h, w))
    h = w = base
    while not (h <= low and w >= high):  # wider
        h, w = max(h - step, low), min(w + step, high)
        buckets.append((h, w))
    return sorted(buckets, key=lambda hw: hw[0] / hw[1])


def ratio_index(height: int, width: int, base: int, sequence_template: str = "pretrain") -> int:
    """The ``<img_ratio_*>`` index of an image (its nearest bucket by height / width)."""
    ratios = [h / w for h, w in resolution_buckets(base, sequence_template)]
    target = height / width
    return min(range(len(ratios)), key=lambda i: abs(ratios[i] - target))


def pixels_per_cell(config) -> int:
    """Image pixels per side of one latent-grid cell (one image token) for the recipe's
    ``model.latent_space``."""
    return PIXEL_PATCH if config.model.latent_space == "pixels" else PIXELS_PER_LATENT


def check_image_size(height: int, width: int, base: int, pixels_per_cell: int = PIXELS_PER_LATENT,
                     sequence_template: str = "pretrain") -> tuple[int, int]:
    """The latent grid (h, w) of an image size, or a one-line error: sizes must be multiples of
    ``pixels_per_cell`` (the VAE's 16, or a pixel-space grid's patch side) and one of the buckets
    around ``base`` (with the template's release's extra buckets)."""
    if height % pixels_per_cell or width % pixels_per_cell:
        reason = "the VAE's downsampling" if pixels_per_cell == PIXELS_PER_LATENT else "the pixel patch side"
        raise ValueError(f"model.image_size {height}x{width} is not a multiple of {pixels_per_cell} px ({reason})")
    buckets = resolution_buckets(base, sequence_template)
    if (height, width) not in buckets:
        squares = [h for h, w in buckets if h == w]
        raise ValueError(f"model.image_size {height}x{width} is not one of HunyuanImage 3.0's resolution buckets "
                         f"around model.image_base_size {base} (the square one is {squares[0]}x{squares[0]})")
    return height // pixels_per_cell, width // pixels_per_cell


class PromptTokenizer:
    """A ``tokenizer.json`` (the ``tokenizers`` library) with HunyuanImage 3.0's special tokens.

    ``image_tokens(h, w)``: the special ids of an image of h×w pixels; ``template``: the ids of
    ``sequence_template``'s text (``TextTemplate``); ``encode(prompts, budget)``: the prompts' ids
    without special tokens (a prompt that with the template's text is over ``budget`` tokens is an
    error: the sequence length is fixed, and truncating would train on prompts nobody wrote).
    """

    def __init__(self, path, image_base_size: int, sequence_template: str = "pretrain",
                 system_prompt: str | None = None):
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"data.text_tokenizer {path} does not exist (HunyuanImage 3.0's tokenizer.json)")
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # the library's own message, on one line
            raise ValueError(f"data.text_tokenizer {path} is not a tokenizer.json: {str(error).splitlines()[0]}") from None
        self.path, self.base = path, image_base_size
        self.vocab_size = self.tokenizer.get_vocab_size()
        self.bos_token = self._bos_token(path)
        ratios = len(resolution_buckets(image_base_size, sequence_template))
        names = [self.bos_token, *SPECIAL_TOKENS, f"<img_size_{image_base_size}>"]
        names += [f"<img_ratio_{i}>" for i in range(ratios)]
        if sequence_template == "instruct":
            names += ANSWER_TOKENS
        missing = [name for name in names if self.tokenizer.token_to_id(name) is None]
        if missing:
            shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
            raise ValueError(f"data.text_tokenizer {path} lacks HunyuanImage 3.0's special tokens {shown} "
                             "(the model's own tokenizer.json has them)")
        self.sequence_template, self.system_prompt = sequence_template, system_prompt
        self.template = text_template(self.tokenizer, sequence_template, system_prompt)

    @staticmethod
    def _bos_token(path: Path) -> str:
        config = path.with_name("tokenizer_config.json")
        if config.is_file():
            bos = json.loads(config.read_text()).get("bos_token")
            if isinstance(bos, dict):
                bos = bos.get("content")
            if bos:
                return bos
        return BOS_TOKEN

    def id(self, name: str) -> int:
        return self.tokenizer.token_to_id(name)

    def image_tokens(self, height: int, width: int) -> ImageTokens:
        return ImageTokens(
            bos=self.id(self.bos_token), pad=self.id("<pad>"), boi=self.id("<boi>"), eoi=self.id("<eoi>"),
            img=self.id("<img>"), timestep=self.id("<timestep>"), size=self.id(f"<img_size_{self.base}>"),
            ratio=self.id(f"<img_ratio_{ratio_index(height, width, self.base, self.sequence_template)}>"),
            cfg=self.id("<cfg>"),
            guidance=self.id("<guidance>"), timestep_r=self.id("<timestep_r>"),
        )

    def prompt_budget(self, budget: int) -> int:
        """The prompt's share of ``budget`` text tokens (the template's text takes the rest)."""
        allowed = budget - self.template.length
        if allowed < 1:
            raise ValueError(f"model.text_tokens {budget} leaves no room for a prompt: the {self.sequence_template} "
                             f"template's text (with the system prompt) is {self.template.length} tokens")
        return allowed

    def encode(self, prompts: list[str], budget: int) -> list[list[int]]:
        encodings = self.tokenizer.encode_batch(list(prompts), add_special_tokens=False)
        ids = [encoding.ids for encoding in encodings]
        allowed = self.prompt_budget(budget)
        for prompt, row in zip(prompts, ids):
            if len(row) > allowed:
                shown = prompt if len(prompt) <= 40 else prompt[:40] + "..."
                used = f" ({self.template.length} of them are the template's text)" if self.template.length else ""
                raise ValueError(f"the prompt {shown!r} is {len(row)} tokens; model.text_tokens allows {budget}{used}")
        return ids


def text_template(tokenizer, sequence_template: str, system_prompt: str | None = None) -> TextTemplate:
    """The ids of ``sequence_template``'s text in ``tokenizer`` (a ``tokenizers.Tokenizer``), each
    piece encoded alone as the official tokenizer's sections are; an empty system prompt is none,
    as in the official code."""
    if sequence_template not in SEQUENCE_TEMPLATES:
        raise ValueError(f"the sequence template must be one of {', '.join(SEQUENCE_TEMPLATES)}, got {sequence_template!r}")

    def ids(text: str) -> tuple[int, ...]:
        return tuple(tokenizer.encode(text, add_special_tokens=False).ids)

    system = ids(system_prompt) if system_prompt else ()
    if sequence_template == "pretrain":
        return TextTemplate(before_prompt=system) if system else PRETRAIN
    answer, end_of_answer = (tokenizer.token_to_id(name) for name in ANSWER_TOKENS)
    if answer is None or end_of_answer is None:
        raise ValueError(f"the instruct template needs the tokenizer's {' and '.join(ANSWER_TOKENS)} tokens")
    separator = ids(TURN_SEPARATOR)
    return TextTemplate(
        before_prompt=(system + separator if system else ()) + ids(USER_PREFIX),
        before_image=separator + ids(ASSISTANT_PREFIX) + (answer,),
        after_image=(end_of_answer,) + separator,
    )


def write_word_level_tokenizer(texts: list[str], path, image_base_size: int) -> int:
    """A small stand-in ``tokenizer.json`` for tiny models (tests, the tiny recipe): one id per
    word (and punctuation mark) of ``texts`` and of the instruct template's role text, the turn
    separator ``"\n\n"`` as one token (a byte-level BPE has one for it; whitespace would
    otherwise vanish here), plus ``<unk>`` and every special token the prompt tokenizer needs. Not
    HunyuanImage 3.0's vocabulary. Returns the vocabulary size."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    pre = pre_tokenizers.Whitespace()
    texts = [*texts, USER_PREFIX, ASSISTANT_PREFIX]
    words = sorted({word for text in texts for word, _ in pre.pre_tokenize_str(text)})
    specials = ["<unk>", BOS_TOKEN, *SPECIAL_TOKENS, *ANSWER_TOKENS, f"<img_size_{image_base_size}>"]
    ratios = len(resolution_buckets(image_base_size))
    specials += [f"<img_ratio_{i}>" for i in range(ratios)]
    # The Instruct release's extra ratio tokens go last, so that files written before they were
    # added keep their ids (the shapes world's trained teacher reads one).
    extra = [f"<img_ratio_{i}>" for i in range(ratios, len(resolution_buckets(image_base_size, "instruct")))]
    words = [TURN_SEPARATOR] + [w for w in words if w not in specials + extra]
    vocab = {token: index for index, token in enumerate(specials + words + extra)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre
    tokenizer.add_special_tokens(specials + extra)
    tokenizer.add_tokens([AddedToken(TURN_SEPARATOR, normalized=False)])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return len(vocab)


__all__ = ["PromptTokenizer", "write_word_level_tokenizer", "resolution_buckets", "INSTRUCT_EXTRA_BUCKETS", "ratio_index",
           "check_image_size", "SPECIAL_TOKENS", "PIXELS_PER_LATENT", "PIXEL_PATCH", "pixels_per_cell", "text_template"]
