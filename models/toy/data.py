"""2-D target distributions for the toy demo, each with its own mode-coverage metric.

- `RingOfGaussians`: 8 isotropic Gaussians on a circle (the classic mode-collapse probe).
- `Checkerboard`: uniform on the 8 dark cells of a 4 x 4 board on [-2, 2]^2; non-convex support
  with sharp edges, hard for 1-step generators.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class RingOfGaussians:
    name = "ring"

    def __init__(self, num_modes: int = 8, radius: float = 2.0, std: float = 0.1):
        self.num_modes = num_modes
        self.radius = radius
        self.std = std
        angles = torch.arange(num_modes, dtype=torch.float64) * (2 * math.pi / num_modes)
        self.modes = torch.stack([radius * torch.cos(angles), radius * torch.sin(angles)], dim=1)

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
        index = torch.randint(0, self.num_modes, (num_samples,), generator=generator)
        noise = torch.randn(num_samples, 2, generator=generator, dtype=torch.float64)
        return (self.modes[index] + self.std * noise).float()

    def mode_stats(self, samples: Tensor, min_share: float = 0.2) -> dict[str, float]:
        """`high_quality_fraction`: samples within 3 std of their nearest mode.
        `modes_covered`: modes that receive at least `min_share` of their expected share
        (`N / num_modes`) of high-quality samples."""
        samples = samples.double()
        distance = torch.cdist(samples, self.modes)
        nearest_distance, nearest = distance.min(dim=1)
        high_quality = nearest_distance < 3 * self.std
        counts = torch.bincount(nearest[high_quality], minlength=self.num_modes)
        expected = samples.shape[0] / self.num_modes
        return {
            "high_quality_fraction": float(high_quality.double().mean()),
            "modes_covered": int((counts >= min_share * expected).sum()),
            "num_modes": self.num_modes,
        }


class Checkerboard:
    name = "checkerboard"

    def __init__(self, cells_per_side: int = 4, half_width: float = 2.0):
        self.cells_per_side = cells_per_side
        self.half_width = half_width
        self.cell_size = 2 * half_width / cells_per_side
        rows, cols = torch.meshgrid(torch.arange(cells_per_side), torch.arange(cells_per_side), indexing="ij")
        dark = (rows + cols) % 2 == 0
        self.dark_cells = torch.stack([rows[dark], cols[dark]], dim=1)  # [num_modes, 2] (row, col)
        self.num_modes = self.dark_cells.shape[0]

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
        index = torch.randint(0, self.num_modes, (num_samples,), generator=generator)
        offset = torch.rand(num_samples, 2, generator=generator, dtype=torch.float64)
        cell = self.dark_cells[index].double()
        # x follows the column, y the row.
        x = -self.half_width + (cell[:, 1] + offset[:, 0]) * self.cell_size
        y = -self.half_width + (cell[:, 0] + offset[:, 1]) * self.cell_size
        return torch.stack([x, y], dim=1).float()

    def cell_index(self, samples: Tensor) -> tuple[Tensor, Tensor]:
        """Per sample: (dark-cell id or -1, inside-the-board flag)."""
        position = (samples.double() + self.half_width) / self.cell_size
        col = torch.floor(position[:, 0]).long()
        row = torch.floor(position[:, 1]).long()
        inside = (col >= 0) & (col < self.cells_per_side) & (row >= 0) & (row < self.cells_per_side)
        lookup = torch.full((self.cells_per_side, self.cells_per_side), -1, dtype=torch.long)
        lookup[self.dark_cells[:, 0], self.dark_cells[:, 1]] = torch.arange(self.num_modes)
        cell = torch.full_like(col, -1)
        cell[inside] = lookup[row[inside], col[inside]]
        return cell, inside

    def mode_stats(self, samples: Tensor, min_share: float = 0.2) -> dict[str, float]:
        """`high_quality_fraction`: samples inside a dark cell. `modes_covered`: dark cells that
        receive at least `min_share` of their expected share of samples."""
        cell, _ = self.cell_index(samples)
        in_support = cell >= 0
        counts = torch.bincount(cell[in_support], minlength=self.num_modes)
        expected = samples.shape[0] / self.num_modes
        return {
            "high_quality_fraction": float(in_support.double().mean()),
            "modes_covered": int((counts >= min_share * expected).sum()),
            "num_modes": self.num_modes,
        }


TOY_TARGETS = {"ring": RingOfGaussians, "checkerboard": Checkerboard}
