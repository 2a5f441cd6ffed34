"""Per-step batches for the trainer, with optional background prefetch that keeps resumption exact.

Use :class:`PromptBatchLoader` rather than a multi-worker ``torch.utils.data.DataLoader``: its
workers would each hold part of the position and run ahead of what the trainer consumed. Here one
background thread reads ahead (tar reads release the GIL) and each batch carries the reader state
*after* it, so :meth:`PromptBatchLoader.state_dict` is the position of the last batch the trainer
received, however far the thread has read.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch

from mfmegatron.data.encoders import TextEncoder
from mfmegatron.data.reader import PromptSample, PromptShardReader
from mfmegatron.data.tokenizers import TokenizedBatch, Tokenizer


@dataclass
class PromptBatch:
    """One data-parallel rank's batch for one step (all tensors batch-first, on CPU).

    ``t5`` / ``t5_mask`` / ``pooled`` are set when every sample carries precomputed embeddings
    (else None: call :func:`ensure_embeddings`). ``t5_tokens`` / ``clip_tokens`` are set when the
    loader was given tokenizers.
    """

    keys: list[str]
    prompts: list[str]
    meta: list[dict[str, Any] | None]
    shards: list[str]
    epochs: list[int]
    positions: list[int]
    t5: torch.Tensor | None = None  # [b, s, d_t5]
    t5_mask: torch.Tensor | None = None  # [b, s] bool
    pooled: torch.Tensor | None = None  # [b, d_clip]
    t5_tokens: TokenizedBatch | None = None
    clip_tokens: TokenizedBatch | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> "PromptBatch":
        """Tensors moved to ``device`` (embeddings also cast to ``dtype`` when given)."""

        def move(x, cast=False):
            if x is None:
                return None
            return x.to(device, dtype=dtype if cast and dtype is not None else None)

        def move_tokens(t):
            if t is None:
                return None
            return TokenizedBatch(t.input_ids.to(device), t.attention_mask.to(device))

        return replace(
            self,
            t5=move(self.t5, cast=True),
            t5_mask=move(self.t5_mask),
            pooled=move(self.pooled, cast=True),
            t5_tokens=move_tokens(self.t5_tokens),
            clip_tokens=move_tokens(self.clip_tokens),
        )


def collate_prompts(
    samples: Sequence[PromptSample],
    *,
    t5_seq_len: int | None = None,
    embed_dtype: torch.dtype | None = None,
    t5_tokenizer: Tokenizer | None = None,
    clip_tokenizer: Tokenizer | None = None,
) -> PromptBatch:
    """Stacks samples. Stored T5 states are truncated / zero-padded (mask False) to
    ``t5_seq_len`` (default: the longest in the batch); ``embed_dtype`` casts the embeddings."""
    prompts = [s.prompt for s in samples]
    batch = PromptBatch(
        keys=[s.key for s in samples],
        prompts=prompts,
        meta=[s.meta for s in samples],
        shards=[s.shard for s in samples],
        epochs=[s.epoch for s in samples],
        positions=[s.position for s in samples],
    )
    if samples and all(s.t5 is not None for s in samples):
        length = t5_seq_len or max(s.t5.shape[0] for s in samples)
        dim = samples[0].t5.shape[1]
        dtype = embed_dtype or samples[0].t5.dtype
        t5 = torch.zeros((len(samples), length, dim), dtype=dtype)
        mask = torch.zeros((len(samples), length), dtype=torch.bool)
        for row, s in enumerate(samples):
            n = min(s.t5.shape[0], length)
            t5[row, :n] = s.t5[:n]
            mask[row, :n] = s.t5_mask[:n]
        batch.t5, batch.t5_mask = t5, mask
    if samples and all(s.pooled is not None for s in samples):
        pooled = torch.stack([s.pooled for s in samples])
        batch.pooled = pooled.to(embed_dtype) if embed_dtype is not None else pooled
    if t5_tokenizer is not None:
        batch.t5_tokens = t5_tokenizer(prompts)
    if clip_tokenizer is not None:
        batch.clip_tokens = clip_tokenizer(prompts)
    return batch


def ensure_embeddings(batch: PromptBatch, encoder: TextEncoder) -> PromptBatch:
    """The batch with ``t5`` / ``t5_mask`` / ``pooled`` filled in by ``encoder`` where missing
    (tensors then live where the encoder puts them)."""
    if batch.t5 is not None and batch.pooled is not None:
        return batch
    out = encoder.encode(batch.prompts)
    return replace(
        batch,
        t5=batch.t5 if batch.t5 is not None else out.t5,
        t5_mask=batch.t5_mask if batch.t5 is not None else out.t5_mask,
        pooled=batch.pooled if batch.pooled is not None else out.pooled,
    )


_END = object()


class PromptBatchLoader:
    """Batches of ``batch_size`` from a :class:`PromptShardReader`, resumable at batch granularity.

    ``prefetch`` batches are read ahead by a background thread (0: read in the caller's thread).
    A finite reader (``epochs`` set) ends with a last, possibly smaller, batch. The collate
    options are :func:`collate_prompts`'s.
    """

    def __init__(
        self,
        reader: PromptShardReader,
        batch_size: int,
        *,
        prefetch: int = 2,
        t5_seq_len: int | None = None,
        embed_dtype: torch.dtype | None = None,
        t5_tokenizer: Tokenizer | None = None,
        clip_tokenizer: Tokenizer | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.reader, self.batch_size, self.prefetch = reader, batch_size, prefetch
        self._collate_options = dict(
            t5_seq_len=t5_seq_len,
            embed_dtype=embed_dtype,
            t5_tokenizer=t5_tokenizer,
            clip_tokenizer=clip_tokenizer,
        )
        self._delivered_state = reader.state_dict()
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._exhausted = False

    # -- producing ----------------------------------------------------------------------------

    def _make_batch(self) -> PromptBatch | None:
        samples = self.reader.take(self.batch_size)
        if not samples:
            return None
        return collate_prompts(samples, **self._collate_options)

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                batch = self._make_batch()
                item = (batch if batch is not None else _END, self.reader.state_dict())
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if batch is None:
                    return
        except BaseException as error:  # noqa: BLE001  (re-raised in the consumer)
            self._queue.put((error, None))

    def _start(self) -> None:
        self._stop.clear()
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(target=self._produce, name="prompt-prefetch", daemon=True)
        self._thread.start()

    def _halt(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()
        self._thread = self._queue = None

    # -- consuming ----------------------------------------------------------------------------

    def __iter__(self) -> "PromptBatchLoader":
        return self

    def __next__(self) -> PromptBatch:
        if self._exhausted:
            raise StopIteration
        if self.prefetch <= 0:
            batch = self._make_batch()
            state = self.reader.state_dict()
        else:
            if self._thread is None:
                self._start()
            batch, state = self._queue.get()
            if isinstance(batch, BaseException):
                self._thread.join()
                self._thread = self._queue = None
                raise batch
        if batch is None or batch is _END:
            self._exhausted = True
            self._halt()
            raise StopIteration
        self._delivered_state = state
        return batch

    @property
    def counters(self) -> dict[str, int]:
        """The reader's counters as of the last delivered batch."""
        counters = dict(self._delivered_state["counters"])
        counters["bad_shards"] = len(self._delivered_state["bad_shards"])
        return counters

    def state_dict(self) -> dict[str, Any]:
        """The reader's state as of the last batch returned (not as far as prefetch has read)."""
        return dict(self._delivered_state)

    def load_state_dict(self, state: dict[str, Any] | Sequence[dict[str, Any]]) -> None:
        self._halt()
        self.reader.load_state_dict(state)
        self._delivered_state = self.reader.state_dict()
        self._exhausted = False

    def close(self) -> None:
        self._halt()
        self.reader.close()
