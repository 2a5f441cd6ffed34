"""Prompts -> HunyuanImage 3.0 token ids: the model's Hugging Face ``tokenizer.json`` and the
official resolution buckets (``<img_size_*>`` / ``<img_ratio_*>`` tokens).

The special tokens' names are the official tokenizer wrapper's (``tokenizer_wrapper.py``):
``<boi>``, ``<eoi>``, ``<img>``, ``<timestep>``, ``<cfg>``, ``<guidance>``, ``<timestep_r>``,
``<pad>``, ``<img_size_{base}>`` and ``<img_ratio_{index}>``. The begin-of-sequence token is the
tokenizer's own (``bos_token`` of a ``tokenizer_config.json`` beside the file, else
``BOS_TOKEN``).

Resolution buckets (the official ``ResolutionGroup``, re-derived here): around a base size b with
step b/16, the square (b, b), then heights growing by a step while widths shrink by one (clamped
to [b/2, 2b]) until (2b, b/2), and the reverse until (b/2, 2b); sorted by height / width. An image's
ratio token is the index of the bucket whose ratio is nearest its own (the first on a tie).
"""

from __future__ import annotations

import json
from pathlib import Path

from models.hunyuan_image3.sequence import ImageTokens

# The VAE downsamples by 16 and the image path embeds one token per latent pixel (patch size 1).
PIXELS_PER_LATENT = 16
SPECIAL_TOKENS = ("<boi>", "<eoi>", "<img>", "<timestep>", "<cfg>", "<guidance>", "<timestep_r>", "<pad>")
BOS_TOKEN = "<|startoftext|>"


def resolution_buckets(base: int) -> list[tuple[int, int]]:
    """The (height, width) buckets around ``base``, sorted by height / width (the ratio index)."""
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


def ratio_index(height: int, width: int, base: int) -> int:
    """The ``<img_ratio_*>`` index of an image (its nearest bucket by height / width)."""
    ratios = [h / w for h, w in resolution_buckets(base)]
    target = height / width
    return min(range(len(ratios)), key=lambda i: abs(ratios[i] - target))


def check_image_size(height: int, width: int, base: int) -> tuple[int, int]:
    """The latent grid (h, w) of an image size, or a one-line error: sizes must be multiples of
    16 px and one of the buckets around ``base``."""
    if height % PIXELS_PER_LATENT or width % PIXELS_PER_LATENT:
        raise ValueError(f"model.image_size {height}x{width} is not a multiple of {PIXELS_PER_LATENT} px "
                         "(the VAE's downsampling)")
    buckets = resolution_buckets(base)
    if (height, width) not in buckets:
        squares = [h for h, w in buckets if h == w]
        raise ValueError(f"model.image_size {height}x{width} is not one of HunyuanImage 3.0's resolution buckets "
                         f"around model.image_base_size {base} (the square one is {squares[0]}x{squares[0]})")
    return height // PIXELS_PER_LATENT, width // PIXELS_PER_LATENT


class PromptTokenizer:
    """A ``tokenizer.json`` (the ``tokenizers`` library) with HunyuanImage 3.0's special tokens.

    ``image_tokens(h, w)``: the special ids of an image of h×w pixels; ``encode(prompts, budget)``:
    the prompts' ids without special tokens (a prompt over ``budget`` tokens is an error: the
    sequence length is fixed, and truncating would train on prompts nobody wrote).
    """

    def __init__(self, path, image_base_size: int):
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
        ratios = len(resolution_buckets(image_base_size))
        names = [self.bos_token, *SPECIAL_TOKENS, f"<img_size_{image_base_size}>"]
        names += [f"<img_ratio_{i}>" for i in range(ratios)]
        missing = [name for name in names if self.tokenizer.token_to_id(name) is None]
        if missing:
            shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
            raise ValueError(f"data.text_tokenizer {path} lacks HunyuanImage 3.0's special tokens {shown} "
                             "(the model's own tokenizer.json has them)")

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
            ratio=self.id(f"<img_ratio_{ratio_index(height, width, self.base)}>"), cfg=self.id("<cfg>"),
            guidance=self.id("<guidance>"), timestep_r=self.id("<timestep_r>"),
        )

    def encode(self, prompts: list[str], budget: int) -> list[list[int]]:
        encodings = self.tokenizer.encode_batch(list(prompts), add_special_tokens=False)
        ids = [encoding.ids for encoding in encodings]
        for prompt, row in zip(prompts, ids):
            if len(row) > budget:
                shown = prompt if len(prompt) <= 40 else prompt[:40] + "..."
                raise ValueError(f"the prompt {shown!r} is {len(row)} tokens; model.text_tokens allows {budget}")
        return ids


def write_word_level_tokenizer(texts: list[str], path, image_base_size: int) -> int:
    """A small stand-in ``tokenizer.json`` for tiny models (tests, the tiny recipe): one id per
    word (and punctuation mark) of ``texts``, plus ``<unk>`` and every special token the prompt
    tokenizer needs. Not HunyuanImage 3.0's vocabulary. Returns the vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    pre = pre_tokenizers.Whitespace()
    words = sorted({word for text in texts for word, _ in pre.pre_tokenize_str(text)})
    specials = ["<unk>", BOS_TOKEN, *SPECIAL_TOKENS, f"<img_size_{image_base_size}>"]
    specials += [f"<img_ratio_{i}>" for i in range(len(resolution_buckets(image_base_size)))]
    vocab = {token: index for index, token in enumerate(specials + [w for w in words if w not in specials])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre
    tokenizer.add_special_tokens(specials)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return len(vocab)


__all__ = ["PromptTokenizer", "write_word_level_tokenizer", "resolution_buckets", "ratio_index", "check_image_size", "SPECIAL_TOKENS",
           "PIXELS_PER_LATENT"]
