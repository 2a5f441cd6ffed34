"""Image shards and image batches for ``z_source="data"`` (real images' latents as z_0).

* Format: prompt shards plus ``KEY.jpg`` / ``.jpeg`` / ``.png`` / ``.webp`` per sample
  (:mod:`~mfmegatron.data.images.reader`); built by :func:`build_image_shards`
  (``python -m tools.build_image_shards``).
* :func:`build_image_loader` is the one factory: ``backend="dali"`` (NVIDIA DALI, the ``gpu``
  extra; CPU-only with ``device_id=None``, "mixed" GPU decoding with a device id), ``"pil"``
  (Pillow, always available) or ``"auto"``. Batches are :class:`ImageBatch`: a
  :class:`~mfmegatron.data.PromptBatch` plus ``images`` ``[b, 3, H, W]`` in [-1, 1]. The
  trainer encodes them to FLUX latents with the VAE.
* Precomputed latents: shards built with a latent encoder (``build_image_shards --vae``) also
  hold ``KEY.latent.npy``; :class:`LatentBatchLoader` reads those instead of decoding images
  (``ImageBatch.latents``), in the same order and with the same state.
* Geometry: aspect-preserving resize to cover ``(H, W)``, then a center or seeded random crop,
  planned once in :mod:`~mfmegatron.data.images.geometry` for every backend.
* Resumption: exact with the Pillow backend and with DALI's default reader (both use the prompt
  reader's computed order and state); DALI's own webdataset reader (``reader="dali"``) resumes
  only from DALI's checkpoint at the same layout (:mod:`~mfmegatron.data.images.dali`).

DALI is imported only when a DALI loader is built; nothing here needs it.
"""

from mfmegatron.data.images.builder import (
    ImageBuildStats,
    ImageBuildSummary,
    LatentEncoding,
    build_image_shards,
)
from mfmegatron.data.images.geometry import CropPlan, plan_crop
from mfmegatron.data.images.loader import (
    BACKENDS,
    ImageBatch,
    ImageBatchLoader,
    LatentBatchLoader,
    PILImageBatchLoader,
    build_image_loader,
    collate_images,
)
from mfmegatron.data.images.reader import IMAGE_EXTS, LATENT, ImageSample, ImageShardReader
from mfmegatron.data.images.transforms import FILTERS, ImageDecodeError, to_unit_range


def dali_available() -> bool:
    """Whether NVIDIA DALI can be imported (checked without importing it)."""
    from mfmegatron.data.images.dali import dali_available as available

    return available()


__all__ = [
    "BACKENDS",
    "FILTERS",
    "IMAGE_EXTS",
    "CropPlan",
    "ImageBatch",
    "ImageBatchLoader",
    "ImageBuildStats",
    "ImageBuildSummary",
    "ImageDecodeError",
    "ImageSample",
    "ImageShardReader",
    "LATENT",
    "LatentEncoding",
    "LatentBatchLoader",
    "PILImageBatchLoader",
    "build_image_loader",
    "build_image_shards",
    "collate_images",
    "dali_available",
    "plan_crop",
    "to_unit_range",
]
