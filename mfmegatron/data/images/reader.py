"""Image shards: the prompt-shard format plus one encoded image per sample, read in the prompt
reader's exactly resumable per-rank order.

A sample is ``KEY.txt`` (the prompt, required), ``KEY.jpg`` / ``KEY.jpeg`` / ``KEY.png`` /
``KEY.webp`` (the encoded image, required; the first of these present is used) and optionally
``KEY.json`` (metadata), the prompt format's precomputed text embeddings and ``KEY.latent.npy``
(the image's VAE latents ``[c, h, w]``, precomputed by ``build_image_shards`` with a latent
encoder; read instead of the image with ``latents=True``). Image shards are
prompt shards: :class:`~mfmegatron.data.PromptShardReader` reads their prompts, and
:class:`ImageShardReader` visits the same samples in the same order with the same state (its
``state_dict`` is a ``PromptShardReader`` state).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable

import torch

from mfmegatron.data import format as fmt
from mfmegatron.data.images.transforms import ImageDecodeError
from mfmegatron.data.reader import PromptSample, PromptShardReader

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
LATENT = "latent.npy"


@dataclass
class ImageSample(PromptSample):
    """A :class:`PromptSample` with its encoded image and what the reader's ``prepare`` made of
    it (decoded pixels for the Pillow backend, a crop plan for DALI) — or, read with
    ``latents=True``, its precomputed VAE latents instead."""

    image: bytes = b""
    image_ext: str = ""
    prepared: Any = None
    latent: torch.Tensor | None = None


class ImageShardReader(PromptShardReader):
    """:class:`PromptShardReader` that also reads each sample's image.

    ``prepare(sample)`` (optional) runs on every sample as it is read and its result is stored in
    ``sample.prepared``; an :class:`ImageDecodeError` (or ``ValueError``) from it, like a sample
    without an image member, skips the sample with one warning and counts it in
    ``counters["bad_samples"]`` — the stream goes on with the next position, as for any damaged
    sample. ``latents=True`` reads each sample's ``KEY.latent.npy`` instead of its image (no
    ``prepare``; a sample without one is skipped and counted likewise). Every other argument is
    :class:`PromptShardReader`'s.
    """

    def __init__(self, source, *, prepare: Callable[[ImageSample], Any] | None = None,
                 latents: bool = False, **kwargs):  # fmt: skip
        super().__init__(source, **kwargs)
        self.prepare = prepare
        self.latents = latents

    def _read(self, shard: int, index: int, epoch: int, position: int) -> ImageSample | None:
        sample = super()._read(shard, index, epoch, position)
        if sample is None:
            return None
        info = self.manifest.shards[shard]
        open_shard = self._open[shard]  # opened by the read above
        key, members = open_shard.index.samples[index]
        wanted = (LATENT,) if self.latents else IMAGE_EXTS
        ext = next((e for e in wanted if e in members), None)
        if ext is None:
            missing = f"no .{LATENT} member (shards built without a VAE)" if self.latents else (
                f"no image member ({', '.join(IMAGE_EXTS)})")  # fmt: skip
            self._bad_sample(info.path, key, missing)
            return None
        try:
            data = open_shard.read(*members[ext])
        except OSError as error:
            # As the prompt reader does: a shard that fails under us is not trusted further.
            self._bad_shards.add(info.name)
            open_shard.index.samples = open_shard.index.samples[:index]
            self._warn_once(
                info.path, f"shard {info.path}: read failed at sample {key!r} ({error}); the "
                "rest of this shard is skipped",
            )  # fmt: skip
            return None
        values = {f.name: getattr(sample, f.name) for f in fields(PromptSample)}
        if self.latents:
            try:
                latent = fmt.storage_to_tensor(fmt.load_npy(data))
                if latent.dim() != 3:
                    raise ValueError(f"shape {tuple(latent.shape)}, expected [c, h, w]")
            except ValueError as error:
                self._bad_sample(info.path, key, f".{LATENT}: {error}")
                return None
            return ImageSample(**values, latent=latent)
        image = ImageSample(**values, image=data, image_ext=ext)
        if self.prepare is not None:
            try:
                image.prepared = self.prepare(image)
            except (ImageDecodeError, ValueError) as error:
                self._bad_sample(info.path, key, f".{ext}: {error}")
                return None
        return image
