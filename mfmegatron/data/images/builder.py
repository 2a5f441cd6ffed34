"""Building image shards from image files with captions.

Inputs:

* a **directory**: every image file under it (recursively, sorted by relative path) whose
  caption is in a file next to it with the same stem and ``.txt``
  (``cats/001.jpg`` + ``cats/001.txt``); images without a caption are dropped and counted;
* a **list file** (``.jsonl`` / ``.csv`` / ``.tsv``): one row per image, the image path in
  ``image_field`` (relative to the list file's directory, or absolute) and the prompt in
  ``field`` (JSONL) / ``column`` (CSV); the other columns / keys become the ``.json`` metadata.

JPEG, PNG and WebP files are stored byte for byte (``.jpg`` / ``.png`` / ``.webp``); any other
format Pillow opens (BMP, TIFF, GIF, ...) is converted to PNG. Every image is opened and verified
first: files Pillow cannot read are dropped and counted. Keys, shard names, the manifest and the
byte-identical output for the same input are the prompt builder's.

With a :class:`LatentEncoding`, each sample also gets ``KEY.latent.npy``: the VAE latents of the
image resized to cover a square and centre-cropped (the image loader's geometry and filter), so
training reads latents instead of decoding and encoding images every epoch. The manifest's
``latent`` field records the size, shape, dtype and what the caller says about the encoder.
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from mfmegatron.data import format as fmt
from mfmegatron.data.builder import (
    InputStats,
    PromptRecord,
    _lookup,
    _sample_members,
    check_source,
    detect_format,
    read_prompts,
)
from mfmegatron.data.images.reader import LATENT
from mfmegatron.data.images.transforms import pil_transform, to_unit_range

# File suffix -> member extension for formats stored as they are.
_KEEP = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
_CONVERT = {".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".jp2", ".tga"}
IMAGE_SUFFIXES = tuple(sorted(set(_KEEP) | _CONVERT))


@dataclass
class ImageBuildStats:
    records: int = 0  # images (directory) or rows (list file) seen
    no_caption: int = 0  # directory images without a .txt / rows without a prompt
    missing_image: int = 0  # rows whose image field is absent or names no file
    bad_image: int = 0  # files Pillow cannot open
    converted: int = 0  # stored as PNG after conversion


@dataclass
class LatentEncoding:
    """Precompute each image's latents into the shards (``KEY.latent.npy``)."""

    encode: Callable[[torch.Tensor], torch.Tensor]
    """Images ``[1, 3, size, size]`` in [-1, 1] -> latents ``[1, c, h, w]`` (e.g. a VAE's
    deterministic posterior mean, scaled as the model expects)."""
    size: int
    """Pixels per side of the centre crop that is encoded (the trainer's ``model.image_size``)."""
    dtype: str = "float16"
    """Storage dtype: float16, bfloat16 or float32."""
    info: dict[str, Any] = field(default_factory=dict)
    """Recorded in the manifest's ``latent`` field (which VAE, which latent)."""

    def __call__(self, image: bytes) -> bytes:
        """One encoded image file -> its ``.latent.npy`` member."""
        pixels, _ = pil_transform(image, (self.size, self.size), crop="center")
        with torch.no_grad():
            latents = self.encode(to_unit_range(torch.from_numpy(np.stack([pixels]))))
        if latents.dim() != 4 or latents.shape[0] != 1:
            raise ValueError(f"the latent encoder returned shape {tuple(latents.shape)}, expected [1, c, h, w]")
        return fmt.npy_bytes(fmt.tensor_to_storage(latents[0], self.dtype))


@dataclass
class ImageBuildSummary:
    manifest: fmt.Manifest
    manifest_path: Path
    stats: ImageBuildStats
    samples: int = 0
    seconds: float = 0.0
    formats: dict[str, int] = field(default_factory=dict)


def encode_for_shard(path: str | os.PathLike) -> tuple[str, bytes]:
    """``(member extension, bytes)`` of one image file; raises ``ValueError`` if unreadable."""
    from PIL import Image

    path = Path(path)
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        ext = _KEEP.get(path.suffix.lower())
        if ext is not None:
            return ext, data
        with Image.open(io.BytesIO(data)) as image:
            out = io.BytesIO()
            image.save(out, "PNG")
        return "png", out.getvalue()
    except Exception as error:  # noqa: BLE001  (Pillow raises many kinds for bad files)
        raise ValueError(f"{path}: not a readable image ({error})") from error


def _directory_records(root: Path, stats: ImageBuildStats) -> Iterator[tuple[Path, PromptRecord]]:
    images = sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    for image in images:
        stats.records += 1
        caption = image.with_suffix(".txt")
        prompt = caption.read_text(encoding="utf-8").strip() if caption.is_file() else ""
        if not prompt:
            stats.no_caption += 1
            continue
        yield image, PromptRecord(prompt, {"file": image.relative_to(root).as_posix()})


def _list_records(
    path: Path, input_format: str | None, image_field: str, column: str, field: str,
    stats: ImageBuildStats,
) -> Iterator[tuple[Path, PromptRecord]]:  # fmt: skip
    prompt_stats = InputStats()
    for record in read_prompts(path, input_format, column=column, field=field, stats=prompt_stats):
        stats.records += 1
        meta = dict(record.meta or {})
        name = _lookup(meta, image_field)
        meta.pop(image_field.split(".")[0], None)
        if not isinstance(name, str) or not (path.parent / name).is_file():
            stats.missing_image += 1
            continue
        yield path.parent / name, PromptRecord(record.prompt, meta or None)
    # Rows dropped by read_prompts itself (no or empty prompt, invalid lines).
    stats.records += prompt_stats.empty + prompt_stats.missing + prompt_stats.invalid
    stats.no_caption += prompt_stats.empty + prompt_stats.missing + prompt_stats.invalid


def build_image_shards(
    sources: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    samples_per_shard: int = 1000,
    input_format: str | None = None,
    image_field: str = "image",
    column: str = "prompt",
    field: str = "prompt",
    keep_meta: bool = True,
    limit: int | None = None,
    prefix: str = "shard",
    overwrite: bool = False,
    progress: Callable[[int, int, float], None] | None = None,
    latents: LatentEncoding | None = None,
) -> ImageBuildSummary:
    """Writes ``out_dir/{prefix}-000000.tar, ...`` and ``out_dir/manifest.json`` (with
    ``latents``: also each image's ``KEY.latent.npy``, see :class:`LatentEncoding`).

    ``progress(records_seen, samples_written, elapsed_s)`` is called after every sample.
    """
    start = time.monotonic()
    sources = [Path(s) for s in sources]
    for source in sources:
        if not source.exists():
            raise FileNotFoundError(f"no such input: {source}")
        if source.is_file():
            if (input_format or detect_format(source)) == "txt":
                raise ValueError(f"{source}: a .txt list has no image column; use .jsonl or .csv")
            check_source(source, input_format, column=column)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out_dir} is not empty (pass overwrite=True / --overwrite)")
        for old in list(out_dir.glob(f"{prefix}-*.tar")) + [out_dir / fmt.MANIFEST_NAME]:
            old.unlink(missing_ok=True)

    stats = ImageBuildStats()
    formats: dict[str, int] = {}
    latent_shape: list[int] | None = None
    written = 0

    def records() -> Iterator[tuple[Path, PromptRecord]]:
        for source in sources:
            if source.is_dir():
                yield from _directory_records(source, stats)
            else:
                yield from _list_records(source, input_format, image_field, column, field, stats)

    with fmt.ShardWriter(out_dir, samples_per_shard, prefix) as writer:
        for image_path, record in records():
            if limit is not None and written >= limit:
                break
            try:
                ext, data = encode_for_shard(image_path)
            except ValueError:
                stats.bad_image += 1
                continue
            if ext == "png" and image_path.suffix.lower() != ".png":
                stats.converted += 1
            members = _sample_members(record if keep_meta else PromptRecord(record.prompt))
            members[ext] = data
            if latents is not None:
                members[LATENT] = latents(data)
                latent_shape = list(fmt.load_npy(members[LATENT]).shape)
            writer.write(f"{written:010d}", members)
            formats[ext] = formats.get(ext, 0) + 1
            written += 1
            if progress is not None:
                progress(stats.records, written, time.monotonic() - start)

    builder_info: dict[str, Any] = {
        "sources": [s.name for s in sources],
        "input_records": stats.records,
        "dropped": {"no_caption": stats.no_caption, "missing_image": stats.missing_image,
                    "bad_image": stats.bad_image},  # fmt: skip
        "converted_to_png": stats.converted,
    }
    fields: dict[str, Any] = {fmt.TXT: {}, "image": {"formats": formats}}
    if latents is not None:
        fields["latent"] = {"size": latents.size, "crop": "center", "shape": latent_shape,
                            "dtype": fmt.normalize_embed_dtype(latents.dtype), **latents.info}  # fmt: skip
    manifest = fmt.Manifest(
        shards=writer.shards,
        fields=fields,
        extra={"encoder": None, "builder": builder_info},
    )
    manifest_path = out_dir / fmt.MANIFEST_NAME
    manifest.write(manifest_path)
    return ImageBuildSummary(manifest, manifest_path, stats, written, time.monotonic() - start,
                             formats)  # fmt: skip
