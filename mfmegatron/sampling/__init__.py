"""Samplers: the few-step MeanFlow student sampler and the teacher ODE sampler."""

from mfmegatron.sampling.few_step import check_time_grid, sample_student, uniform_time_grid
from mfmegatron.sampling.ode import OdeSolution, integrate_ode, sample_teacher

__all__ = [
    "OdeSolution",
    "integrate_ode",
    "sample_teacher",
    "sample_student",
    "uniform_time_grid",
    "check_time_grid",
]
