"""Closed-form flow for Gaussian data, used as an independent reference in the MeanFlow tests.

Data x ~ N(μ, s² I), z_τ = (1 - τ) x + τ ε. The marginal is N(m_τ, σ_τ² I) with m_τ = (1 - τ) μ,
σ_τ² = (1 - τ)² s² + τ². The probability-flow ODE is the affine map z_τ = m_τ + σ_τ ξ, so

    v(z, τ)      = -μ + (τ - (1 - τ) s²) / σ_τ² · (z - m_τ)
    z_r          = m_r + σ_r / σ_t · (z_t - m_t)
    u*(z, r, t)  = (z_t - z_r) / (t - r)
                 = -μ + (z - m_t) · ((t + r) - s² (2 - t - r)) / (σ_t (σ_t + σ_r))

(the last form has no 0/0 and gives v at r = t). Derived by hand for these tests.
"""

from __future__ import annotations

import torch
from torch import Tensor


class GaussianFlow:
    def __init__(self, mean: Tensor, std: float):
        self.mean = mean
        self.std = std

    def _col(self, time: Tensor, like: Tensor) -> Tensor:
        return time.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)

    def sigma(self, time: Tensor) -> Tensor:
        return torch.sqrt((1 - time) ** 2 * self.std**2 + time**2)

    # FlowTeacher
    def velocity(self, z: Tensor, t: Tensor, cond=None) -> Tensor:
        tt = self._col(t, z)
        sigma2 = self._col(self.sigma(t) ** 2, z)
        return -self.mean + (tt - (1 - tt) * self.std**2) / sigma2 * (z - (1 - tt) * self.mean)

    def flow_map(self, z_t: Tensor, r: Tensor, t: Tensor) -> Tensor:
        ratio = self._col(self.sigma(r) / self.sigma(t), z_t)
        return (1 - self._col(r, z_t)) * self.mean + ratio * (z_t - (1 - self._col(t, z_t)) * self.mean)

    # MeanFlowStudent (the exact average velocity)
    def mean_velocity(self, z: Tensor, r: Tensor, t: Tensor, cond=None) -> Tensor:
        sigma_t, sigma_r = self.sigma(t), self.sigma(r)
        factor = ((t + r) - self.std**2 * (2 - t - r)) / (sigma_t * (sigma_t + sigma_r))
        return -self.mean + (z - (1 - self._col(t, z)) * self.mean) * self._col(factor, z)

    def mean_velocity_jvp(self, z, r, t, cond, tangents):
        u, du = torch.func.jvp(lambda a, b, c: self.mean_velocity(a, b, c, cond), (z, r, t), tuple(tangents))
        return u, du.detach()
