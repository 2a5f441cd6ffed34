"""2-D toy flow teacher and MeanFlow student (plain torch; implements the mfmegatron.meanflow
interface).

Teacher: `v_T(z, t) = Trunk(z, c)` with `c = emb_t(t)`.
Student: the teacher's weights plus a second time embedding of the interval `h = t - r`,
`c = emb_t(t) + emb_h(t - r)` (as the official MeanFlow DiT). The last layer of `emb_h` is
zero-initialised, so at initialisation `emb_h ≡ 0` and `u_θ(z, r, t) = v_T(z, t)` for every r.

The time embedding is FLUX-like: sinusoidal features of `time_scale · t` (1000 by default).
The toy models are unconditional: `cond` is accepted for the interface and ignored.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class ToyFlowConfig:
    data_dim: int = 2
    width: int = 128
    depth: int = 3
    """Number of residual MLP blocks."""
    time_frequency_dim: int = 64
    time_scale: float = 1000.0
    """Times are multiplied by this before the sinusoidal features (FLUX uses 1000)."""


def sinusoidal_embedding(time: Tensor, dim: int, scale: float, max_period: float = 10000.0) -> Tensor:
    """`[B] -> [B, dim]` cos/sin features of `scale · time` at geometrically spaced frequencies."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, dtype=time.dtype, device=time.device) / half)
    angles = scale * time[:, None] * frequencies[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class TimeEmbedding(nn.Module):
    """Sinusoidal features followed by a 2-layer MLP, `[B] -> [B, width]`."""

    def __init__(self, config: ToyFlowConfig):
        super().__init__()
        self.frequency_dim = config.time_frequency_dim
        self.scale = config.time_scale
        self.mlp = nn.Sequential(
            nn.Linear(config.time_frequency_dim, config.width), nn.SiLU(), nn.Linear(config.width, config.width)
        )

    def zero_init_output(self) -> None:
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, time: Tensor) -> Tensor:
        return self.mlp(sinusoidal_embedding(time, self.frequency_dim, self.scale))


class ResidualBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.SiLU(), nn.Linear(2 * width, width))

    def forward(self, hidden: Tensor, conditioning: Tensor) -> Tensor:
        # The time conditioning enters every block (cheap stand-in for adaLN modulation).
        return hidden + self.mlp(self.norm(hidden) + conditioning)


class VelocityTrunk(nn.Module):
    """`(z [B, D], c [B, width]) -> [B, D]` residual MLP shared by teacher and student."""

    def __init__(self, config: ToyFlowConfig):
        super().__init__()
        self.input_proj = nn.Linear(config.data_dim, config.width)
        self.blocks = nn.ModuleList([ResidualBlock(config.width) for _ in range(config.depth)])
        self.output_norm = nn.LayerNorm(config.width)
        self.output_proj = nn.Linear(config.width, config.data_dim)

    def forward(self, z: Tensor, conditioning: Tensor) -> Tensor:
        hidden = self.input_proj(z)
        for block in self.blocks:
            hidden = block(hidden, conditioning)
        return self.output_proj(nn.functional.silu(self.output_norm(hidden)))


class ToyFlowTeacher(nn.Module):
    """Flow-matching velocity model `v(z, t)`; implements `FlowTeacher`."""

    def __init__(self, config: ToyFlowConfig | None = None):
        super().__init__()
        self.config = config or ToyFlowConfig()
        self.time_embed = TimeEmbedding(self.config)
        self.trunk = VelocityTrunk(self.config)

    def velocity(self, z: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return self.trunk(z, self.time_embed(t))

    def forward(self, z: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return self.velocity(z, t, cond)


class ToyMeanFlowStudent(nn.Module):
    """MeanFlow student `u(z, r, t)`; implements `MeanFlowStudent`. Build with `from_teacher`."""

    def __init__(self, config: ToyFlowConfig | None = None):
        super().__init__()
        self.config = config or ToyFlowConfig()
        self.time_embed = TimeEmbedding(self.config)
        self.interval_embed = TimeEmbedding(self.config)
        self.interval_embed.zero_init_output()
        self.trunk = VelocityTrunk(self.config)

    @classmethod
    def from_teacher(cls, teacher: ToyFlowTeacher) -> "ToyMeanFlowStudent":
        """Copy the teacher's weights; the new interval embedding starts at exactly zero."""
        student = cls(copy.deepcopy(teacher.config))
        student.time_embed.load_state_dict(teacher.time_embed.state_dict())
        student.trunk.load_state_dict(teacher.trunk.state_dict())
        return student.to(next(teacher.parameters()).dtype)

    def mean_velocity(self, z: Tensor, r: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        conditioning = self.time_embed(t) + self.interval_embed(t - r)
        return self.trunk(z, conditioning)

    def mean_velocity_jvp(
        self, z: Tensor, r: Tensor, t: Tensor, cond: Any, tangents: tuple[Tensor, Tensor, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """`(u, du)` with forward-mode AD (`torch.func.jvp`); `u` keeps its graph to the
        parameters, `du` is detached."""
        tangent_z, tangent_r, tangent_t = tangents

        def mean_velocity_of_inputs(z_in: Tensor, r_in: Tensor, t_in: Tensor) -> Tensor:
            return self.mean_velocity(z_in, r_in, t_in, cond)

        u, du = torch.func.jvp(mean_velocity_of_inputs, (z, r, t), (tangent_z, tangent_r, tangent_t))
        return u, du.detach()

    def forward(self, z: Tensor, r: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return self.mean_velocity(z, r, t, cond)
