"""Scoring shapes-world images against their prompts, in the spirit of GenEval.

GenEval detects objects with a trained detector and checks colour, count and position against the
prompt. Here the world is simple enough to detect analytically:

1. every pixel at least half as bright as full scale is labelled with the nearest palette colour
   after scaling it to full brightness; darker pixels are background (the world draws on black);
2. the 4-connected components of each colour label, with at least ``min_area`` pixels, are the
   objects;
3. an object's kind is the shape whose mask, drawn into the object's bounding box with the
   world's own drawing code, overlaps the object best (intersection over union);
4. centroids decide relations with the world's own rule (``relation_holds``).

Per prompt, each attribute passes when it holds for every group it applies to:

- ``colour``: an object of the group's colour exists;
- ``shape``: an object of the group's colour and kind exists;
- ``count``: exactly ``count`` objects of the group's colour and kind exist;
- ``position`` (relation prompts only): some object matching the first group stands in the
  relation to some object matching the second;
- ``overall``: all of the above that apply.

``score_images`` returns the fraction of prompts passing each (``score_captions`` for caption
strings: the trainer's ``train.eval_scorer=shapes``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from models.shapes.world import COLOURS, SHAPES, Prompt, parse_caption, relation_holds, shape_mask

ATTRIBUTES = ("colour", "shape", "count", "position", "overall")
# Top-third / bottom-third mean row width below which a component is a triangle: a drawn triangle
# gives about 0.2-0.3, a circle or square about 1.
TRIANGLE_WIDTH_RATIO = 0.6


@dataclass(frozen=True)
class Detected:
    colour: str
    shape: str
    area: int
    centroid: tuple[float, float]  # (y, x) in pixels
    shape_iou: float


def to_uint8_image(image) -> np.ndarray:
    """[H, W, 3] uint8 from uint8 arrays, or float arrays / tensors in [0, 1] (either channel
    order: [3, H, W] is transposed)."""
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().numpy()
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] == 3 and image.shape[-1] != 3:
        image = image.transpose(1, 2, 0)
    if image.dtype != np.uint8:
        image = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    return image


def colour_labels(image: np.ndarray) -> np.ndarray:
    """int [H, W]: 0 for background, i for the i-th palette colour (``COLOURS`` order, from 1).

    A pixel is foreground when its brightest channel is at least half of full scale (the edge of a
    blurred shape sits at half intensity); its colour is the palette colour nearest to it after
    scaling it to full brightness, so darker or blurred pixels keep their hue.
    """
    pixels = image.astype(np.float32)
    brightness = pixels.max(-1, keepdims=True)
    normalised = pixels * 255.0 / np.maximum(brightness, 1.0)
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    nearest = np.argmin(((normalised[..., None, :] - palette) ** 2).sum(-1), axis=-1) + 1
    return np.where(brightness[..., 0] >= 127.5, nearest, 0)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, each as an int [n, 2] array of (y, x)."""
    seen = np.zeros_like(mask)
    height, width = mask.shape
    components = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        queue, pixels = deque([start]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        components.append(np.array(pixels))
    return components


def classify_shape(pixels: np.ndarray) -> tuple[str, float]:
    """The component's kind and how well it fits it (IoU with the kind's mask in its bounding box).

    A component whose top third is much narrower than its bottom third is a triangle: blur eats a
    triangle's apex, leaving a trapezoid that fits the *square* template best, while the width
    profile still tells. Otherwise it is whichever of circle and square fits its box better.
    """
    y0, x0 = pixels.min(0)
    height, width = pixels.max(0) - (y0, x0) + 1
    component = np.zeros((height, width), dtype=bool)
    component[pixels[:, 0] - y0, pixels[:, 1] - x0] = True

    def iou(shape: str) -> float:
        template = shape_mask(shape, height, width)
        return float((component & template).sum() / (component | template).sum())

    third = max(height // 3, 1)
    row_widths = component.sum(1)
    if row_widths[:third].mean() < TRIANGLE_WIDTH_RATIO * row_widths[-third:].mean():
        return "triangle", iou("triangle")
    return max(((shape, iou(shape)) for shape in ("circle", "square")), key=lambda item: item[1])


def detect(image, min_area: int = 12) -> list[Detected]:
    """The objects in one image (see the module docstring)."""
    image = to_uint8_image(image)
    labels = colour_labels(image)
    names = [None, *COLOURS]
    found = []
    for index in range(1, len(names)):
        for pixels in _components(labels == index):
            if len(pixels) < min_area:
                continue
            shape, iou = classify_shape(pixels)
            centroid = (float(pixels[:, 0].mean()) + 0.5, float(pixels[:, 1].mean()) + 0.5)
            found.append(Detected(names[index], shape, len(pixels), centroid, iou))
    return found


def check(prompt: Prompt, objects: Sequence[Detected]) -> dict[str, bool | None]:
    """Each attribute for one image (``position`` is None for prompts without a relation)."""
    def matching(group, by_shape=True):
        return [o for o in objects if o.colour == group.colour and (not by_shape or o.shape == group.shape)]

    result = {
        "colour": all(matching(g, by_shape=False) for g in prompt.groups),
        "shape": all(matching(g) for g in prompt.groups),
        "count": all(len(matching(g)) == g.count for g in prompt.groups),
        "position": None,
    }
    if prompt.relation is not None:
        first, second = (matching(g) for g in prompt.groups)
        result["position"] = any(
            relation_holds(prompt.relation, a.centroid, b.centroid) for a in first for b in second
        )
    result["overall"] = all(v for v in result.values() if v is not None)
    return result


def score_images(prompts: Sequence[Prompt], images) -> dict[str, float]:
    """Fraction of prompts passing each attribute (``position`` over relation prompts only), and
    ``num_prompts`` / ``num_relation_prompts``."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
    totals = {name: 0 for name in ATTRIBUTES}
    counted = {name: 0 for name in ATTRIBUTES}
    for prompt, image in zip(prompts, images):
        for name, passed in check(prompt, detect(image)).items():
            if passed is not None:
                totals[name] += int(passed)
                counted[name] += 1
    scores = {name: totals[name] / counted[name] if counted[name] else float("nan") for name in ATTRIBUTES}
    scores["num_prompts"] = len(prompts)
    scores["num_relation_prompts"] = counted["position"]
    return scores


def score_captions(captions: Sequence[str], images) -> dict[str, float]:
    """``score_images`` for captions (the trainer's evaluation scorer, ``train.eval_scorer=shapes``)."""
    return score_images([parse_caption(c) for c in captions], list(images))


__all__ = ["ATTRIBUTES", "Detected", "detect", "check", "classify_shape", "colour_labels",
           "score_images", "score_captions", "to_uint8_image"]
