"""The shapes world: small captioned images of coloured shapes, drawn procedurally.

A prompt names one or two groups of shapes and, for two single shapes, where one is relative to
the other:

    "a red circle"                       one group, count 1
    "three blue squares"                 one group, count 2 or 3
    "a red circle and a green triangle"  two groups of one, no relation
    "a red circle above a blue square"   two groups of one, a relation (above, below, left of,
                                         right of)

Images are ``size`` x ``size`` RGB (default 32), saturated colours on black, crisp (no
anti-aliasing), shapes axis-aligned inside a bounding box: a disk (ellipse) filling the box, the
box itself (square) or an upright isosceles triangle (apex at the top middle, base the bottom
edge). The scorer (``models/shapes/scorer.py``) finds the shapes again with the same drawing code,
so "the image shows the prompt" has one definition here.

Everything is deterministic given a ``numpy.random.Generator``: ``render(prompt, rng)`` draws a
placement satisfying the prompt (rejection sampling over positions and sizes).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("above", "below", "left of", "right of")
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
BACKGROUND = (0, 0, 0)

# Relation test on centroids (pixels): the named axis must dominate and differ by this much. The
# renderer and the scorer use the same rule.
RELATION_MARGIN = 3.0


@dataclass(frozen=True)
class Group:
    count: int
    colour: str
    shape: str

    def words(self) -> str:
        noun = self.shape if self.count == 1 else self.shape + "s"
        return f"{COUNT_WORDS[self.count]} {self.colour} {noun}"


@dataclass(frozen=True)
class Prompt:
    """One or two groups; ``relation`` (only with two groups of one) says where the first group's
    shape is relative to the second's."""

    groups: tuple[Group, ...]
    relation: str | None = None

    def __post_init__(self):
        if not 1 <= len(self.groups) <= 2:
            raise ValueError(f"a prompt has one or two groups, got {len(self.groups)}")
        for group in self.groups:
            if group.colour not in COLOURS or group.shape not in SHAPES or group.count not in COUNT_WORDS:
                raise ValueError(f"unknown group {group}")
        if len(self.groups) == 2 and any(g.count != 1 for g in self.groups):
            raise ValueError("two-group prompts name one shape each")
        if self.relation is not None and (len(self.groups) != 2 or self.relation not in RELATIONS):
            raise ValueError(f"relation {self.relation!r} needs two groups and one of {RELATIONS}")

    @property
    def caption(self) -> str:
        if len(self.groups) == 1:
            return self.groups[0].words()
        joiner = self.relation or "and"
        return f"{self.groups[0].words()} {joiner} {self.groups[1].words()}"

    @property
    def num_shapes(self) -> int:
        return sum(g.count for g in self.groups)


_COUNT_BY_WORD = {word: count for count, word in COUNT_WORDS.items()}
_GROUP = r"(a|two|three) (\w+) (circle|square|triangle)s?"
_CAPTION = re.compile(rf"^{_GROUP}(?: (and|above|below|left of|right of) {_GROUP})?$")


def parse_caption(caption: str) -> Prompt:
    """The prompt a caption written by ``Prompt.caption`` describes; ValueError otherwise."""
    match = _CAPTION.match(caption.strip().lower())
    if match is None:
        raise ValueError(f"not a shapes-world caption: {caption!r}")
    count, colour, shape, joiner, count2, colour2, shape2 = match.groups()
    groups = [Group(_COUNT_BY_WORD[count], colour, shape)]
    if joiner is not None:
        groups.append(Group(_COUNT_BY_WORD[count2], colour2, shape2))
    return Prompt(tuple(groups), None if joiner in (None, "and") else joiner)


def all_prompts() -> list[Prompt]:
    """Every prompt the world can state, in a fixed order (1,584 of them)."""
    kinds = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    prompts = [Prompt((Group(n, c, s),)) for n in COUNT_WORDS for c, s in kinds]
    for first in kinds:
        for second in kinds:
            if first == second:
                continue
            pair = (Group(1, *first), Group(1, *second))
            prompts.append(Prompt(pair))
            prompts += [Prompt(pair, relation) for relation in RELATIONS]
    return prompts


def is_held_out(prompt: Prompt, fraction: float = 0.1) -> bool:
    """A fixed split by a hash of the caption: held-out prompts are never distillation prompts."""
    return zlib.crc32(prompt.caption.encode()) % 1000 < fraction * 1000


def sample_prompt(rng: np.random.Generator) -> Prompt:
    """Single groups, 'and' pairs and relation pairs in equal thirds."""
    kind = rng.integers(3)
    colours, shapes = list(COLOURS), list(SHAPES)

    def group(count=1) -> Group:
        return Group(count, colours[rng.integers(len(colours))], shapes[rng.integers(len(shapes))])

    if kind == 0:
        return Prompt((group(int(rng.integers(1, 4))),))
    first = group()
    second = group()
    while second == first:
        second = group()
    relation = None if kind == 1 else RELATIONS[rng.integers(len(RELATIONS))]
    return Prompt((first, second), relation)


# --------------------------------------------------------------------------- drawing


def shape_mask(shape: str, height: int, width: int) -> np.ndarray:
    """Boolean [height, width] mask of ``shape`` filling a box of that size (pixel centres)."""
    y = (np.arange(height) + 0.5)[:, None]
    x = (np.arange(width) + 0.5)[None, :]
    if shape == "square":
        return np.ones((height, width), dtype=bool)
    if shape == "circle":
        return ((x - width / 2) / (width / 2)) ** 2 + ((y - height / 2) / (height / 2)) ** 2 <= 1.0
    if shape == "triangle":
        return np.abs(x - width / 2) <= (width / 2) * (y / height)
    raise ValueError(f"unknown shape {shape!r}")


@dataclass(frozen=True)
class Placed:
    """A drawn shape: colour, kind and its box [y0, y0 + height) x [x0, x0 + width)."""

    colour: str
    shape: str
    y0: int
    x0: int
    height: int
    width: int

    def centroid(self) -> tuple[float, float]:
        mask = shape_mask(self.shape, self.height, self.width)
        ys, xs = np.nonzero(mask)
        return self.y0 + ys.mean() + 0.5, self.x0 + xs.mean() + 0.5


def relation_holds(relation: str, first: tuple[float, float], second: tuple[float, float]) -> bool:
    """Whether the centroid ``first`` (y, x) is ``relation`` the centroid ``second``."""
    dy, dx = first[0] - second[0], first[1] - second[1]
    if relation in ("above", "below"):
        along, across = (-dy if relation == "above" else dy), abs(dx)
    else:
        along, across = (-dx if relation == "left of" else dx), abs(dy)
    return along >= RELATION_MARGIN and along > across


def _boxes_apart(a: Placed, b: Placed, gap: int) -> bool:
    return (a.y0 + a.height + gap <= b.y0 or b.y0 + b.height + gap <= a.y0
            or a.x0 + a.width + gap <= b.x0 or b.x0 + b.width + gap <= a.x0)


def place(prompt: Prompt, rng: np.random.Generator, size: int = 32, min_side: int = 7,
          max_side: int = 11, gap: int = 2, attempts: int = 1000) -> list[Placed]:
    """Boxes for the prompt's shapes: inside the image, ``gap`` pixels apart, relation satisfied."""
    wanted = [(g.colour, g.shape) for g in prompt.groups for _ in range(g.count)]
    for _ in range(attempts):
        placed = []
        for colour, shape in wanted:
            side = int(rng.integers(min_side, max_side + 1))
            y0, x0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            candidate = Placed(colour, shape, y0, x0, side, side)
            if any(not _boxes_apart(candidate, other, gap) for other in placed):
                break
            placed.append(candidate)
        else:
            if prompt.relation is None or relation_holds(prompt.relation, placed[0].centroid(), placed[1].centroid()):
                return placed
    raise RuntimeError(f"could not place {prompt.caption!r} in {size}x{size} after {attempts} attempts")


def draw(placed: list[Placed], size: int = 32) -> np.ndarray:
    """uint8 [size, size, 3] image of the placed shapes on the background."""
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for item in placed:
        mask = shape_mask(item.shape, item.height, item.width)
        window = image[item.y0:item.y0 + item.height, item.x0:item.x0 + item.width]
        window[mask] = COLOURS[item.colour]
    return image


def render(prompt: Prompt, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """An image of the prompt: uint8 [size, size, 3]."""
    return draw(place(prompt, rng, size), size)


__all__ = [
    "COLOURS", "SHAPES", "RELATIONS", "Group", "Prompt", "Placed", "parse_caption", "all_prompts",
    "is_held_out", "sample_prompt", "shape_mask", "relation_holds", "place", "draw", "render",
]
