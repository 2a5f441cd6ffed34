"""Tokenizers behind one small interface: texts -> padded ids and attention mask.

- :class:`SentencePieceTokenizer` — T5-style, directly on a sentencepiece model file (T5's
  ``spiece.model``): no ``transformers`` needed. T5 conventions: an EOS appended, truncation keeps
  ``max_length - 1`` pieces then the EOS, right padding with the pad id (0 for T5).
- :class:`HFTokenizer` — adapts any Hugging Face tokenizer (CLIP's, T5's fast tokenizer, ...) to
  the same interface; loads from local paths only.

FLUX.1 tokenizes prompts for T5 with ``max_length=512`` (256 for schnell) and for CLIP with 77,
both padded to ``max_length``.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Protocol, Sequence, runtime_checkable

import torch


class TokenizedBatch(NamedTuple):
    input_ids: torch.Tensor  # [b, L] int64
    attention_mask: torch.Tensor  # [b, L] bool, True for real tokens (EOS included)


@runtime_checkable
class Tokenizer(Protocol):
    """What the data layer and the text encoders need from a tokenizer."""

    max_length: int
    pad_id: int

    def __call__(self, texts: Sequence[str]) -> TokenizedBatch: ...


def pad_batch(
    ids: Sequence[Sequence[int]], pad_id: int, length: int | None = None
) -> TokenizedBatch:
    """Right-pads id lists to ``length`` (default: the longest)."""
    length = max((len(x) for x in ids), default=0) if length is None else length
    input_ids = torch.full((len(ids), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), length), dtype=torch.bool)
    for row, seq in enumerate(ids):
        n = min(len(seq), length)
        input_ids[row, :n] = torch.as_tensor(list(seq[:n]), dtype=torch.long)
        mask[row, :n] = True
    return TokenizedBatch(input_ids, mask)


class SentencePieceTokenizer:
    """A T5-style tokenizer on a sentencepiece model.

    Args:
        model_file: path to the ``.model`` file (T5's ``spiece.model``).
        max_length: pad / truncate to this many tokens, EOS included.
        padding: ``"max_length"`` (FLUX) or ``"longest"`` (pad to the longest in the batch).
        add_eos: append the EOS id (T5 does).
        pad_id, eos_id: override the model's ids; T5's model defines pad=0, eos=1. A model
            without a pad piece needs ``pad_id``.
    """

    def __init__(
        self,
        model_file: str | os.PathLike,
        max_length: int = 512,
        *,
        padding: str = "max_length",
        add_eos: bool = True,
        pad_id: int | None = None,
        eos_id: int | None = None,
    ) -> None:
        import sentencepiece

        if padding not in ("max_length", "longest"):
            raise ValueError(f"padding must be 'max_length' or 'longest', not {padding!r}")
        if max_length < (2 if add_eos else 1):
            raise ValueError(f"max_length {max_length} leaves no room for a token")
        self.processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self.max_length, self.padding, self.add_eos = max_length, padding, add_eos
        self.pad_id = self.processor.pad_id() if pad_id is None else pad_id
        self.eos_id = self.processor.eos_id() if eos_id is None else eos_id
        if self.pad_id < 0:
            raise ValueError(f"{model_file} defines no pad piece: pass pad_id")
        if add_eos and self.eos_id < 0:
            raise ValueError(f"{model_file} defines no EOS piece: pass eos_id or add_eos=False")

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Unpadded ids per text, truncated, EOS appended."""
        room = self.max_length - 1 if self.add_eos else self.max_length
        pieces = self.processor.encode(list(texts))
        return [p[:room] + ([self.eos_id] if self.add_eos else []) for p in pieces]

    def __call__(self, texts: Sequence[str]) -> TokenizedBatch:
        if isinstance(texts, str):
            texts = [texts]
        length = self.max_length if self.padding == "max_length" else None
        return pad_batch(self.encode(texts), self.pad_id, length)

    def decode(self, ids: Sequence[int]) -> str:
        specials = {self.pad_id, self.eos_id}
        return self.processor.decode([int(i) for i in ids if int(i) not in specials])


class HFTokenizer:
    """Any Hugging Face tokenizer behind :class:`Tokenizer` (e.g. CLIP's, ``max_length=77``).

    ``tokenizer`` is a ``transformers`` tokenizer object; :meth:`from_pretrained` loads one from a
    local directory (``local_files_only=True``: never downloads).
    """

    def __init__(self, tokenizer, max_length: int, *, padding: str = "max_length") -> None:
        if padding not in ("max_length", "longest"):
            raise ValueError(f"padding must be 'max_length' or 'longest', not {padding!r}")
        self.tokenizer, self.max_length, self.padding = tokenizer, max_length, padding
        if tokenizer.pad_token_id is None:
            raise ValueError(f"{type(tokenizer).__name__} has no pad token")
        self.pad_id = int(tokenizer.pad_token_id)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, max_length: int, *, padding: str = "max_length", **kwargs
    ) -> "HFTokenizer":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, **kwargs)
        return cls(tokenizer, max_length, padding=padding)

    def __call__(self, texts: Sequence[str]) -> TokenizedBatch:
        if isinstance(texts, str):
            texts = [texts]
        out = self.tokenizer(
            list(texts),
            padding=self.padding,
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        return TokenizedBatch(out["input_ids"].long(), out["attention_mask"].bool())
