"""Where each image is resized and cropped, computed once in Python for every backend.

An image of ``h x w`` pixels (after its EXIF orientation is applied) is resized, keeping its
aspect ratio, to the smallest size that covers the target ``H x W`` (DALI's ``"not_smaller"``
mode), then an ``H x W`` window is cut out of it:

* resized size: ``s = max(H / h, W / w)``; ``rh = round(h * s)``, ``rw = round(w * s)`` with
  halves rounded up, in exact integer arithmetic (the side that sets ``s`` is exactly ``H`` or
  ``W``);
* ``crop="center"``: the window's offset is half the excess, a half pixel rounded up
  (``(rw - W + 1) // 2``) — the offset DALI's own crop takes at ``crop_pos=0.5``;
* ``crop="random"``: offsets uniform in ``[0, rw - W]`` x ``[0, rh - H]``, drawn from a hash of
  (seed, the sample's global position): the same sample gets the same window in every backend, on
  every data-parallel layout and after a resume, without any generator state to checkpoint.

Both backends then resample to exactly ``(rw, rh)`` and slice the window, so they differ only in
the resampling arithmetic (see :mod:`mfmegatron.data.images.transforms`).
"""

from __future__ import annotations

from dataclasses import dataclass

from mfmegatron.data.order import mix64, stream_key

CROPS = ("center", "random")
_TAG_CROP = 3  # order.py uses tags 1 (shards) and 2 (windows)


@dataclass(frozen=True)
class CropPlan:
    """Source size (oriented), resized size and the crop window (top-left corner and size),
    in pixels."""

    height: int
    width: int
    resized_height: int
    resized_width: int
    top: int
    left: int
    crop_height: int
    crop_width: int


def normalize_size(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``512`` or ``(height, width)`` -> ``(height, width)``, both >= 1."""
    if isinstance(size, int):
        size = (size, size)
    height, width = (int(v) for v in size)
    if height < 1 or width < 1:
        raise ValueError(f"target size must be positive, got {size!r}")
    return height, width


def _round_ratio(numerator: int, denominator: int) -> int:
    """``round(numerator / denominator)`` with halves rounded up, exactly."""
    return (2 * numerator + denominator) // (2 * denominator)


def resized_size(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """The aspect-preserving size that covers ``target`` (``"not_smaller"``)."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    target_h, target_w = target
    if target_h * width >= target_w * height:  # the height sets the scale
        return target_h, max(target_w, _round_ratio(width * target_h, height))
    return max(target_h, _round_ratio(height * target_w, width)), target_w


def plan_crop(
    height: int,
    width: int,
    target: tuple[int, int],
    crop: str = "center",
    *,
    seed: int = 0,
    position: int = 0,
) -> CropPlan:
    """The resize and crop of one ``height x width`` image (see the module docstring)."""
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, not {crop!r}")
    resized_h, resized_w = resized_size(height, width, target)
    excess_h, excess_w = resized_h - target[0], resized_w - target[1]
    if crop == "center":
        top, left = (excess_h + 1) // 2, (excess_w + 1) // 2
    else:
        draw = int(mix64(stream_key(seed, position, _TAG_CROP))[0])
        left = (draw & 0xFFFFFFFF) % (excess_w + 1)
        top = (draw >> 32) % (excess_h + 1)
    return CropPlan(height, width, resized_h, resized_w, top, left, target[0], target[1])
