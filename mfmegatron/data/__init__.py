"""Prompt data for data-free distillation: tokenizers and text encoders."""

from mfmegatron.data.encoders import (
    CachedTextEncoder,
    DummyTextEncoder,
    HFTextEncoder,
    TextEmbeddings,
    TextEncoder,
    build_text_encoder,
)
from mfmegatron.data.tokenizers import (
    HFTokenizer,
    SentencePieceTokenizer,
    TokenizedBatch,
    Tokenizer,
)

__all__ = [
    "CachedTextEncoder",
    "DummyTextEncoder",
    "HFTextEncoder",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "TextEmbeddings",
    "TextEncoder",
    "TokenizedBatch",
    "Tokenizer",
    "build_text_encoder",
]
