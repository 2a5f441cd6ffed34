"""Image batches for ``z_source="data"``: the common loader interface, the Pillow backend and the
one factory that picks a backend.

Both backends read through :class:`~mfmegatron.data.images.reader.ImageShardReader` by default
(the prompt reader's computed order: per-data-parallel-rank, seeded, exactly resumable), plan
each image's resize and crop with :mod:`~mfmegatron.data.images.geometry`, and normalise with the
same function, so for the same shards, seed and rank they deliver the same samples in the same
order with pixels equal to rounding (see :mod:`~mfmegatron.data.images.transforms`), and their
states are interchangeable.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Sequence

import numpy as np
import torch

from mfmegatron.data.batching import PromptBatch, PromptBatchLoader, collate_prompts
from mfmegatron.data.images.geometry import CROPS, CropPlan, normalize_size
from mfmegatron.data.images.reader import ImageSample, ImageShardReader
from mfmegatron.data.images.transforms import check_filter, pil_transform, to_unit_range
from mfmegatron.data.reader import data_parallel_rank_and_size

BACKENDS = ("auto", "pil", "dali")
OUTPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class ImageBatch(PromptBatch):
    """A :class:`PromptBatch` (keys, prompts, metadata, positions, optional text embeddings) with
    the images: ``[b, 3, H, W]`` in [-1, 1] (RGB, ``x / 127.5 - 1``), on the CPU or, with DALI's
    GPU decoding, on ``cuda:device_id``. Encoding them to FLUX latents with the VAE is the
    trainer's job.

    ``crops`` holds each image's :class:`CropPlan` (source size after EXIF orientation, resized
    size, crop window), or None where the backend does not know it (DALI's own reader).
    ``latents`` ``[b, c, h, w]`` (float32) are the images' precomputed VAE latents, set instead of
    ``images`` by :class:`LatentBatchLoader`.
    """

    images: torch.Tensor | None = None
    crops: list[CropPlan | None] = field(default_factory=list)
    latents: torch.Tensor | None = None

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> "ImageBatch":
        """Images, latents and text tensors moved to ``device``; ``dtype`` casts them (not the
        masks)."""
        moved = super().to(device, dtype)
        images = self.images.to(device, dtype=dtype) if self.images is not None else None
        latents = self.latents.to(device, dtype=dtype) if self.latents is not None else None
        return replace(moved, images=images, latents=latents)


def collate_images(
    samples: Sequence[ImageSample],
    windows: torch.Tensor,
    crops: Sequence[CropPlan | None],
    *,
    dtype: torch.dtype = torch.float32,
    **collate_options,
) -> ImageBatch:
    """Samples and their ``[b, H, W, 3]`` uint8 windows -> an :class:`ImageBatch`
    (``collate_options`` are :func:`~mfmegatron.data.collate_prompts`')."""
    text = collate_prompts(samples, **collate_options)
    values = {f.name: getattr(text, f.name) for f in fields(PromptBatch)}
    return ImageBatch(**values, images=to_unit_range(windows, dtype), crops=list(crops))


class ImageBatchLoader:
    """What every image loader does: iterate :class:`ImageBatch` es of ``batch_size`` for one
    data-parallel rank, report ``counters``, and save / restore its position with
    ``state_dict`` / ``load_state_dict`` (the position of the last batch returned, however far
    prefetching has read). Build one with :func:`build_image_loader`.
    """

    backend: str = "?"
    device: torch.device = torch.device("cpu")

    def _set_options(
        self,
        batch_size: int,
        size,
        crop: str,
        filter: str,
        dtype: torch.dtype,
        seed: int,
        rank: int | None,
        world_size: int | None,
    ) -> tuple[int, int]:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, not {crop!r}")
        if dtype not in OUTPUT_DTYPES:
            raise ValueError(f"dtype must be one of {OUTPUT_DTYPES}, not {dtype}")
        self.size = normalize_size(size)
        self.crop, self.filter, self.dtype = crop, check_filter(filter), dtype
        self.batch_size, self.seed = batch_size, seed
        if rank is None or world_size is None:
            dp_rank, dp_size = data_parallel_rank_and_size()
            rank = dp_rank if rank is None else rank
            world_size = dp_size if world_size is None else world_size
        return rank, world_size

    def __iter__(self) -> "ImageBatchLoader":
        return self

    def __next__(self) -> ImageBatch:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def counters(self) -> dict[str, int]:  # pragma: no cover - interface
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError

    def load_state_dict(self, state) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def __enter__(self) -> "ImageBatchLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PILImageBatchLoader(PromptBatchLoader, ImageBatchLoader):
    """The pure-Pillow backend: decode, resize and crop in one background thread (``prefetch``
    batches ahead; 0 reads in the caller's thread). For CPU users and tests; DALI is the fast
    path. Undecodable images are skipped and counted like any damaged sample. Its state is
    :class:`~mfmegatron.data.PromptShardReader`'s: exact, per rank or merged across ranks
    (:func:`~mfmegatron.data.gather_state_dict`) to resume at another data-parallel size.
    """

    backend = "pil"

    def __init__(
        self,
        source,
        batch_size: int,
        *,
        size: int | tuple[int, int],
        crop: str = "center",
        filter: str = "bilinear",
        dtype: torch.dtype = torch.float32,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        window_shards: int | None = 16,
        epochs: int | None = None,
        load_embeddings: bool = True,
        prefetch: int = 2,
        **collate_options,
    ) -> None:
        rank, world_size = self._set_options(
            batch_size, size, crop, filter, dtype, seed, rank, world_size
        )
        reader = ImageShardReader(
            source, rank=rank, world_size=world_size, seed=seed, shuffle=shuffle,
            window_shards=window_shards, epochs=epochs, load_embeddings=load_embeddings,
            prepare=self._prepare,
        )  # fmt: skip
        super().__init__(reader, batch_size, prefetch=prefetch, **collate_options)

    def _prepare(self, sample: ImageSample) -> tuple[np.ndarray, CropPlan]:
        window, plan = pil_transform(
            sample.image, self.size, crop=self.crop, filter=self.filter, seed=self.seed,
            position=sample.position,
        )  # fmt: skip
        sample.image = b""  # decoded: the bytes are no longer needed
        return window, plan

    def _make_batch(self) -> ImageBatch | None:
        samples = self.reader.take(self.batch_size)
        if not samples:
            return None
        windows = torch.from_numpy(np.stack([s.prepared[0] for s in samples]))
        crops = [s.prepared[1] for s in samples]
        return collate_images(samples, windows, crops, dtype=self.dtype, **self._collate_options)


class LatentBatchLoader(PromptBatchLoader, ImageBatchLoader):
    """Batches of the images' precomputed VAE latents (``KEY.latent.npy``, written by
    :func:`~mfmegatron.data.images.build_image_shards` with a latent encoder) instead of pixels:
    :class:`ImageBatch` with ``latents`` ``[b, c, h, w]`` (float32) and no ``images``. Nothing is
    decoded; order, state (exact, mergeable across ranks) and damaged-sample handling are the
    Pillow backend's, so the two loaders' states are interchangeable. The arguments are
    :class:`PILImageBatchLoader`'s without the geometry, which the builder fixed.
    """

    backend = "latents"

    def __init__(
        self,
        source,
        batch_size: int,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        window_shards: int | None = 16,
        epochs: int | None = None,
        load_embeddings: bool = True,
        prefetch: int = 2,
        **collate_options,
    ) -> None:
        if rank is None or world_size is None:
            dp_rank, dp_size = data_parallel_rank_and_size()
            rank = dp_rank if rank is None else rank
            world_size = dp_size if world_size is None else world_size
        reader = ImageShardReader(
            source, rank=rank, world_size=world_size, seed=seed, shuffle=shuffle,
            window_shards=window_shards, epochs=epochs, load_embeddings=load_embeddings, latents=True,
        )  # fmt: skip
        super().__init__(reader, batch_size, prefetch=prefetch, **collate_options)

    def _make_batch(self) -> ImageBatch | None:
        samples = self.reader.take(self.batch_size)
        if not samples:
            return None
        text = collate_prompts(samples, **self._collate_options)
        values = {f.name: getattr(text, f.name) for f in fields(PromptBatch)}
        latents = torch.stack([s.latent.float() for s in samples])
        return ImageBatch(**values, latents=latents, crops=[None] * len(samples))


def build_image_loader(
    source,
    batch_size: int,
    *,
    size: int | tuple[int, int],
    backend: str = "auto",
    device_id: int | None = None,
    **options,
) -> ImageBatchLoader:
    """The image loader factory: the only place that decides whether DALI is used.

    Args:
        source: image shards (a directory, manifest, glob or list, as for the prompt reader).
        batch_size: samples per batch (per data-parallel rank).
        size: target ``H`` (square) or ``(H, W)``.
        backend: ``"dali"`` (NVIDIA DALI, from the ``gpu`` extra; an ``ImportError`` saying how
            to install it when missing), ``"pil"`` (Pillow, always available) or ``"auto"``
            (DALI when it can be imported, else Pillow).
        device_id: CUDA device for DALI's GPU ("mixed") decoding and its output tensors; None
            runs DALI on the CPU only. The Pillow backend always returns CPU tensors.
        **options: ``crop`` ("center" / "random"), ``filter`` ("bilinear" / "bicubic" /
            "lanczos"), ``dtype`` (float32 / bfloat16 / float16), ``rank`` and ``world_size``
            (default: :func:`~mfmegatron.data.data_parallel_rank_and_size`), ``seed``,
            ``shuffle``, ``window_shards``, ``epochs``, ``load_embeddings``, ``prefetch``, the
            :func:`~mfmegatron.data.collate_prompts` options; DALI only: ``num_threads``,
            ``reader`` ("mfmegatron" or "dali"), ``initial_fill``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    if backend == "auto":
        from mfmegatron.data.images.dali import dali_available

        backend = "dali" if dali_available() else "pil"
    if backend == "dali":
        from mfmegatron.data.images.dali import DALIImageBatchLoader

        return DALIImageBatchLoader(source, batch_size, size=size, device_id=device_id, **options)
    for name in ("num_threads", "reader", "initial_fill"):
        if name in options:
            raise ValueError(f"{name!r} is a DALI option; the Pillow backend has no such setting")
    return PILImageBatchLoader(source, batch_size, size=size, **options)
