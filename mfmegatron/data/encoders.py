"""Text encoders: prompts -> (T5 token states, pooled CLIP vector), the FLUX conditioning.

The trainer calls a :class:`TextEncoder` when shards carry no precomputed embeddings; the shard
builder calls one to precompute them. Implementations:

- ``"dummy"`` — :class:`DummyTextEncoder`: deterministic pseudo-random token embeddings (a
  hashed word tokenizer, each token id mapped to a fixed pseudo-random vector, plus a positional
  term); needs no model files. For tests, pipeline checks and benchmarks, never for training.
- ``"hf"`` — :class:`HFTextEncoder`: ``transformers``' ``T5EncoderModel`` + ``CLIPTextModel``
  from local directories (``local_files_only=True``), tokenized and called as FLUX.1 does.

:class:`CachedTextEncoder` wraps any of them with an LRU cache keyed by prompt.
"""

from __future__ import annotations

import abc
import math
import os
import re
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch

from mfmegatron.data.order import mix64, stream_key
from mfmegatron.data.tokenizers import HFTokenizer, Tokenizer, pad_batch


class TextEmbeddings(NamedTuple):
    t5: torch.Tensor  # [b, s, d_t5] T5 encoder last hidden states (FLUX: s=512, d_t5=4096)
    pooled: torch.Tensor  # [b, d_clip] CLIP pooled output (FLUX: 768)
    t5_mask: torch.Tensor  # [b, s] bool, True for real tokens (EOS included)


class TextEncoder(abc.ABC):
    """Prompts -> :class:`TextEmbeddings`. Subclasses set ``t5_dim``, ``pooled_dim`` and
    ``max_length`` (the T5 sequence length they return)."""

    name: str = "text-encoder"
    t5_dim: int
    pooled_dim: int
    max_length: int

    @abc.abstractmethod
    def encode(self, prompts: Sequence[str]) -> TextEmbeddings: ...

    def __call__(self, prompts: Sequence[str]) -> TextEmbeddings:
        return self.encode(prompts)

    def describe(self) -> dict[str, Any]:
        """What produced the embeddings (recorded in the shard manifest)."""
        return {
            "name": self.name,
            "t5_dim": self.t5_dim,
            "pooled_dim": self.pooled_dim,
            "max_length": self.max_length,
        }


# ---------------------------------------------------------------------------------------------


_WORD = re.compile(r"\w+|[^\w\s]")


def _pseudo_random_rows(ids: np.ndarray, dim: int, key: int) -> np.ndarray:
    """A fixed vector in R^dim per id (zero mean, unit variance entries), float32."""
    ids = np.asarray(ids, dtype=np.uint64).reshape(-1, 1)
    h = mix64((ids * np.uint64(dim) + np.arange(dim, dtype=np.uint64)) ^ np.uint64(key))
    uniform = (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return ((uniform - 0.5) * math.sqrt(12.0)).astype(np.float32).reshape(-1, dim)


class DummyTextEncoder(TextEncoder):
    """Deterministic stand-in for T5 + CLIP (same on every machine and numpy version).

    Tokens are lower-cased words and punctuation hashed into ``buckets`` ids (or the ids of
    ``tokenizer`` when given), truncated to ``max_length - 1`` plus EOS and padded, as T5. Token
    ``i`` at position ``j`` gets ``E[i] + position_scale P[j]`` with fixed pseudo-random ``E``,
    ``P`` (so padding positions, like T5's, carry non-zero states); the pooled vector is ``tanh``
    of the mean over real tokens of another fixed vector per token. FLUX gives text tokens no
    RoPE position, so ``P`` is all a network learns word order from: the default 0.1 keeps it
    faint (near a bag of words); 1.0 makes it as strong as the token term.

    ``context_scale`` adds each token's neighbours, as n-gram features do: ``c (L[i_{j-1}] +
    R[i_{j+1}])`` with two more fixed tables (padding stands beyond either end). A word then
    carries the words beside it ("triangle" after "cyan" differs from "triangle" after
    "yellow"), the local context a trained encoder gives and a bag of words lacks. The default
    0 leaves the embeddings as they were without it.
    """

    name = "dummy"

    def __init__(
        self,
        t5_dim: int = 4096,
        pooled_dim: int = 768,
        max_length: int = 512,
        *,
        seed: int = 0,
        buckets: int = 32768,
        tokenizer: Tokenizer | None = None,
        position_scale: float = 0.1,
        context_scale: float = 0.0,
    ) -> None:
        self.t5_dim, self.pooled_dim, self.max_length = t5_dim, pooled_dim, max_length
        self.seed, self.buckets, self.tokenizer = seed, buckets, tokenizer
        self.position_scale = float(position_scale)
        self.context_scale = float(context_scale)

    def tokenize(self, prompts: Sequence[str]):
        if self.tokenizer is not None:
            return self.tokenizer(prompts)
        ids = []
        for text in prompts:
            words = _WORD.findall(text.lower())[: self.max_length - 1]
            ids.append([2 + zlib.crc32(w.encode()) % self.buckets for w in words] + [1])
        return pad_batch(ids, pad_id=0, length=self.max_length)

    def encode(self, prompts: Sequence[str]) -> TextEmbeddings:
        input_ids, mask = self.tokenize(prompts)
        ids = input_ids.numpy()
        unique, inverse = np.unique(ids, return_inverse=True)
        token = _pseudo_random_rows(unique, self.t5_dim, stream_key(self.seed, 0, 1))
        positions = np.arange(ids.shape[1])
        position = _pseudo_random_rows(positions, self.t5_dim, stream_key(self.seed, 0, 3))
        t5 = token[inverse.reshape(ids.shape)] + np.float32(self.position_scale) * position[None]
        if self.context_scale:
            pad = np.zeros((ids.shape[0], 1), dtype=ids.dtype)
            before = np.concatenate([pad, ids[:, :-1]], axis=1)
            after = np.concatenate([ids[:, 1:], pad], axis=1)
            left = _pseudo_random_rows(before, self.t5_dim, stream_key(self.seed, 0, 4))
            right = _pseudo_random_rows(after, self.t5_dim, stream_key(self.seed, 0, 5))
            t5 = t5 + np.float32(self.context_scale) * (left + right).reshape(t5.shape)
        pooled_rows = _pseudo_random_rows(unique, self.pooled_dim, stream_key(self.seed, 0, 2))
        per_token = pooled_rows[inverse.reshape(ids.shape)]
        weights = mask.numpy().astype(np.float32)[..., None]
        pooled = np.tanh((per_token * weights).sum(1) / np.maximum(weights.sum(1), 1.0))
        return TextEmbeddings(torch.from_numpy(t5), torch.from_numpy(pooled), mask)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "seed": self.seed, "buckets": self.buckets,
                "position_scale": self.position_scale, "context_scale": self.context_scale}


# ---------------------------------------------------------------------------------------------


class HFTextEncoder(TextEncoder):
    """T5 encoder + CLIP text model from local Hugging Face directories, used as FLUX.1 does.

    T5: ``max_length`` tokens padded to ``max_length`` (512 for FLUX.1-dev, 256 for schnell), last
    hidden states, by default with *no* attention mask passed to the encoder (as FLUX's pipeline;
    ``t5_attention_mask=True`` passes it). CLIP: 77 tokens padded, ``pooler_output``.
    Models load with ``local_files_only=True``; tokenizers default to the model directories.
    """

    name = "hf"

    def __init__(
        self,
        t5_path: str | os.PathLike,
        clip_path: str | os.PathLike,
        *,
        t5_tokenizer: Tokenizer | str | os.PathLike | None = None,
        clip_tokenizer: Tokenizer | str | os.PathLike | None = None,
        max_length: int = 512,
        clip_max_length: int = 77,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        t5_attention_mask: bool = False,
    ) -> None:
        from transformers import CLIPTextModel, T5EncoderModel

        self.device, self.dtype = torch.device(device), dtype
        self.t5_attention_mask = t5_attention_mask
        self.paths = {"t5": str(t5_path), "clip": str(clip_path)}
        self.t5 = T5EncoderModel.from_pretrained(str(t5_path), dtype=dtype, local_files_only=True)
        self.clip = CLIPTextModel.from_pretrained(str(clip_path), dtype=dtype, local_files_only=True)
        self.t5.to(self.device).eval().requires_grad_(False)
        self.clip.to(self.device).eval().requires_grad_(False)

        def tokenizer(given, default_path, length) -> Tokenizer:
            if given is None or isinstance(given, (str, os.PathLike)):
                return HFTokenizer.from_pretrained(given or default_path, length)
            return given

        self.t5_tokenizer = tokenizer(t5_tokenizer, t5_path, max_length)
        self.clip_tokenizer = tokenizer(clip_tokenizer, clip_path, clip_max_length)
        self.max_length = self.t5_tokenizer.max_length
        self.t5_dim = self.t5.config.d_model
        self.pooled_dim = self.clip.config.hidden_size

    @classmethod
    def from_flux_checkpoint(cls, root: str | os.PathLike, **kwargs) -> "HFTextEncoder":
        """From a diffusers-layout FLUX.1 directory (``text_encoder`` = CLIP, ``tokenizer``,
        ``text_encoder_2`` = T5, ``tokenizer_2``)."""
        root = Path(root)
        kwargs.setdefault("t5_tokenizer", root / "tokenizer_2")
        kwargs.setdefault("clip_tokenizer", root / "tokenizer")
        return cls(root / "text_encoder_2", root / "text_encoder", **kwargs)

    @torch.inference_mode()
    def encode(self, prompts: Sequence[str]) -> TextEmbeddings:
        t5_ids, t5_mask = self.t5_tokenizer(prompts)
        clip_ids, _ = self.clip_tokenizer(prompts)
        t5_ids, t5_mask = t5_ids.to(self.device), t5_mask.to(self.device)
        mask = t5_mask.long() if self.t5_attention_mask else None
        states = self.t5(input_ids=t5_ids, attention_mask=mask).last_hidden_state
        pooled = self.clip(input_ids=clip_ids.to(self.device)).pooler_output
        return TextEmbeddings(states, pooled, t5_mask)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            **self.paths,
            "dtype": str(self.dtype).removeprefix("torch."),
            "t5_attention_mask": self.t5_attention_mask,
        }


# ---------------------------------------------------------------------------------------------


class CachedTextEncoder(TextEncoder):
    """An LRU cache of another encoder's per-prompt embeddings, kept on ``cache_device``.

    Misses in a call are encoded together in one call of the wrapped encoder. Outputs are on
    ``cache_device``. A FLUX.1 entry (512 x 4096 in bf16) is 4 MiB: size ``max_entries``
    accordingly.
    """

    def __init__(
        self, encoder: TextEncoder, max_entries: int = 1024, cache_device: str | torch.device = "cpu"
    ) -> None:
        self.encoder, self.max_entries = encoder, max_entries
        self.cache_device = torch.device(cache_device)
        self.name = f"cached-{encoder.name}"
        self.t5_dim, self.pooled_dim = encoder.t5_dim, encoder.pooled_dim
        self.max_length = encoder.max_length
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()
        self.hits = self.misses = 0

    def encode(self, prompts: Sequence[str]) -> TextEmbeddings:
        prompts = list(prompts)
        found = {p: self._cache[p] for p in dict.fromkeys(prompts) if p in self._cache}
        missing = [p for p in dict.fromkeys(prompts) if p not in found]
        self.hits += sum(p in found for p in prompts)
        self.misses += len(prompts) - sum(p in found for p in prompts)
        if missing:
            out = self.encoder.encode(missing)
            for i, prompt in enumerate(missing):
                found[prompt] = tuple(x[i].detach().to(self.cache_device) for x in out)
        for prompt in dict.fromkeys(prompts):
            self._cache[prompt] = found[prompt]
            self._cache.move_to_end(prompt)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        rows = [found[p] for p in prompts]
        return TextEmbeddings(*(torch.stack([r[k] for r in rows]) for k in range(3)))

    def describe(self) -> dict[str, Any]:
        return self.encoder.describe()


def build_text_encoder(name: str, **options) -> TextEncoder:
    """``"dummy"`` -> :class:`DummyTextEncoder` (options: t5_dim, pooled_dim, max_length, seed,
    position_scale);
    ``"hf"`` -> :class:`HFTextEncoder` (options: t5_path + clip_path, or flux_path; max_length,
    device, dtype, ...)."""
    if name == "dummy":
        return DummyTextEncoder(**options)
    if name == "hf":
        flux_path = options.pop("flux_path", None)
        if flux_path is not None:
            return HFTextEncoder.from_flux_checkpoint(flux_path, **options)
        return HFTextEncoder(**options)
    raise ValueError(f"unknown text encoder {name!r}: choose 'dummy' or 'hf'")
