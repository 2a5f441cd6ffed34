"""Decoding, resizing and normalising images with Pillow (the fallback backend), the header peek
that plans DALI's work, and the normalisation both backends share.

**Resampling.** Both backends resample with the filter's support widened by the downscale
factor (antialiasing): Pillow always does, DALI with ``antialias=True``. They differ at the
borders: Pillow renormalises the weights of taps that fall outside the image, DALI repeats the
edge pixel. Here Pillow is given an edge-replicated margin and resamples the original box out of
it, so it repeats edges too. With ``filter="bilinear"`` (a triangle filter) the backends then
agree to 1 in 255 on every pixel (integer rounding); ``"bicubic"`` and ``"lanczos"`` use different
kernel constants in the two libraries and agree only on average (measured: mean |diff| below
0.3/255, isolated pixels up to ~25/255 at sharp edges, most when upscaling).

**Orientation.** EXIF orientation is applied (DALI's decoder does by default). Colour: palette,
greyscale, CMYK and alpha images become RGB; alpha is dropped, not composited. 16-bit
greyscale PNGs are not converted faithfully by the Pillow path (Pillow clips them to 8 bits).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch

from mfmegatron.data.images.geometry import CropPlan, plan_crop

FILTERS = ("bilinear", "bicubic", "lanczos")
# Kernel radius in output pixels (in source pixels when upscaling).
_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0, "lanczos": 3.0}
_ORIENTATION_TAG = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that transpose the image


class ImageDecodeError(ValueError):
    """The image member could not be decoded (the sample is skipped and counted)."""


def _pil():
    try:
        from PIL import Image, ImageOps
    except ImportError as error:  # pragma: no cover
        raise ImportError("the image shards and loaders need Pillow: pip install pillow") from error
    return Image, ImageOps


def check_filter(name: str) -> str:
    if name not in FILTERS:
        raise ValueError(f"filter must be one of {FILTERS}, not {name!r}")
    return name


def _orientation(image) -> int:
    """The EXIF orientation found while opening (never decodes pixels; 1 when absent)."""
    raw = image.info.get("exif")
    if not raw:
        return 1
    Image, _ = _pil()
    exif = Image.Exif()
    try:
        exif.load(raw)
        return int(exif.get(_ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001  (a broken EXIF block: the decoders ignore it too)
        return 1


@dataclass(frozen=True)
class ImageHeader:
    height: int  # after orientation
    width: int
    format: str  # Pillow's format name


def peek_image(data: bytes) -> ImageHeader:
    """Size (EXIF orientation applied) and format from the file header, without decoding."""
    Image, _ = _pil()
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            swapped = _orientation(image) in _SWAPS_AXES
            fmt = image.format or "?"
    except Exception as error:  # noqa: BLE001  (Pillow raises many kinds for bad files)
        raise ImageDecodeError(f"not a readable image ({error})") from error
    if swapped:
        width, height = height, width
    return ImageHeader(height, width, fmt)


def decode_rgb(data: bytes) -> np.ndarray:
    """The image as an ``[h, w, 3]`` uint8 array, EXIF orientation applied."""
    Image, ImageOps = _pil()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image = ImageOps.exif_transpose(image)
            return np.asarray(image.convert("RGB"))
    except Exception as error:  # noqa: BLE001
        raise ImageDecodeError(f"cannot decode ({error})") from error


_RESAMPLE = {"bilinear": "BILINEAR", "bicubic": "BICUBIC", "lanczos": "LANCZOS"}


def resize_crop(pixels: np.ndarray, plan: CropPlan, filter: str = "bilinear") -> np.ndarray:
    """``[h, w, 3]`` uint8 -> the plan's ``[H, W, 3]`` window of the resized image (uint8)."""
    Image, _ = _pil()
    height, width = pixels.shape[:2]
    if (height, width) != (plan.height, plan.width):
        raise ValueError(f"plan for {plan.height}x{plan.width}, image is {height}x{width}")
    # Taps reach support * max(downscale factor, 1) source pixels out: give them repeated edges
    # and resample the original box out of the padded image.
    factor = max(width / plan.resized_width, height / plan.resized_height, 1.0)
    margin = int(math.ceil(_SUPPORT[check_filter(filter)] * factor)) + 1
    padded = np.pad(pixels, ((margin, margin), (margin, margin), (0, 0)), mode="edge")
    resized = Image.fromarray(padded).resize(
        (plan.resized_width, plan.resized_height),
        getattr(Image.Resampling, _RESAMPLE[filter]),
        box=(margin, margin, margin + width, margin + height),
    )
    window = np.asarray(resized)[
        plan.top : plan.top + plan.crop_height, plan.left : plan.left + plan.crop_width
    ]
    return np.ascontiguousarray(window)


def pil_transform(
    data: bytes,
    target: tuple[int, int],
    *,
    crop: str = "center",
    filter: str = "bilinear",
    seed: int = 0,
    position: int = 0,
) -> tuple[np.ndarray, CropPlan]:
    """Encoded image -> (its ``[H, W, 3]`` uint8 window, the plan)."""
    pixels = decode_rgb(data)
    plan = plan_crop(pixels.shape[0], pixels.shape[1], target, crop, seed=seed, position=position)
    return resize_crop(pixels, plan, filter), plan


def to_unit_range(hwc: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[b, H, W, 3]`` uint8 (any device) -> ``[b, 3, H, W]`` in [-1, 1] (``x / 127.5 - 1``,
    computed in float32, then cast to ``dtype``). Both backends end with this."""
    if hwc.dtype != torch.uint8 or hwc.dim() != 4 or hwc.shape[-1] != 3:
        raise ValueError(f"expected [b, H, W, 3] uint8, got {tuple(hwc.shape)} {hwc.dtype}")
    out = hwc.permute(0, 3, 1, 2).to(torch.float32).div_(127.5).sub_(1.0)
    return out.to(dtype) if dtype != torch.float32 else out.contiguous()
