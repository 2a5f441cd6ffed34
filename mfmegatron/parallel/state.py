"""Bringing up and tearing down torch.distributed plus megatron-core's model-parallel groups.

One call, :func:`initialize_parallel`, does everything a training or test process needs:
validates the parallel sizes against the world size (before any collective, so a bad size is the
same clear error on every rank instead of a hang), starts torch.distributed (nccl with CUDA, gloo
without), applies the CPU platform support when there is no CUDA, builds megatron's
``parallel_state`` groups and seeds the model-parallel RNG streams.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist


class ParallelConfigError(ValueError):
    """The requested parallel sizes do not fit the world size (or each other)."""


@dataclass
class ParallelConfig:
    """Parallel layout of a job. ``data_parallel_size`` is derived: world / (tp * pp * cp)."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    virtual_pipeline_parallel_size: int | None = None
    context_parallel_size: int = 1
    expert_parallel_size: int = 1
    # None: experts are split like the dense layers (megatron's default, = tensor_parallel_size).
    expert_tensor_parallel_size: int | None = None
    seed: int = 1234
    # None picks nccl when CUDA is available, gloo otherwise.
    backend: str | None = None
    timeout_minutes: int = 30


@dataclass(frozen=True)
class ParallelInfo:
    """Where this process sits in the layout, for logging and for code that needs ranks."""

    world_size: int
    rank: int
    local_rank: int
    backend: str
    device: torch.device
    tensor_parallel_size: int
    pipeline_parallel_size: int
    context_parallel_size: int
    expert_parallel_size: int
    expert_tensor_parallel_size: int
    data_parallel_size: int
    tensor_parallel_rank: int
    pipeline_parallel_rank: int
    data_parallel_rank: int
    expert_parallel_rank: int
    cpu_redirects: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        return (
            f"world={self.world_size} backend={self.backend} device={self.device} "
            f"tp={self.tensor_parallel_size} pp={self.pipeline_parallel_size} "
            f"cp={self.context_parallel_size} ep={self.expert_parallel_size} "
            f"etp={self.expert_tensor_parallel_size} dp={self.data_parallel_size}"
        )


def validate_parallel_sizes(config: ParallelConfig, world_size: int) -> int:
    """Checks the layout against ``world_size``; returns the data-parallel size.

    The rules are megatron-core's (``initialize_model_parallel``), restated here so the error is
    raised before any process group exists and says which sizes to change.
    """
    sizes = {
        "tensor_parallel_size": config.tensor_parallel_size,
        "pipeline_parallel_size": config.pipeline_parallel_size,
        "context_parallel_size": config.context_parallel_size,
        "expert_parallel_size": config.expert_parallel_size,
    }
    if config.expert_tensor_parallel_size is not None:
        sizes["expert_tensor_parallel_size"] = config.expert_tensor_parallel_size
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise ParallelConfigError(f"{name} must be a positive integer, got {value!r}")

    tp, pp, cp = config.tensor_parallel_size, config.pipeline_parallel_size, config.context_parallel_size
    model_parallel = tp * pp * cp
    if world_size % model_parallel != 0:
        raise ParallelConfigError(
            f"world size {world_size} is not divisible by tensor_parallel_size ({tp}) x "
            f"pipeline_parallel_size ({pp}) x context_parallel_size ({cp}) = {model_parallel}; "
            f"launch a multiple of {model_parallel} processes or choose sizes whose product "
            f"divides {world_size}"
        )
    etp = config.expert_tensor_parallel_size or tp
    ep = config.expert_parallel_size
    expert_parallel = etp * ep * pp
    if world_size % expert_parallel != 0:
        raise ParallelConfigError(
            f"world size {world_size} is not divisible by expert_tensor_parallel_size ({etp}) x "
            f"expert_parallel_size ({ep}) x pipeline_parallel_size ({pp}) = {expert_parallel}"
        )
    vpp = config.virtual_pipeline_parallel_size
    if vpp is not None and pp == 1:
        raise ParallelConfigError(
            "virtual_pipeline_parallel_size needs pipeline_parallel_size > 1 (interleaved 1F1B)"
        )
    return world_size // model_parallel


def _world_from_environment() -> tuple[int, int, int]:
    """(world_size, rank, local_rank) as set by torchrun / our spawner; a single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    return world_size, rank, local_rank


def initialize_parallel(config: ParallelConfig | None = None, **sizes: int) -> ParallelInfo:
    """Start torch.distributed and megatron's parallel groups for this process.

    Reads ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` from the
    environment (torchrun sets them); a process started without them is a world of one.
    Keyword arguments override fields of ``config`` (``initialize_parallel(tensor_parallel_size=2)``).
    """
    from megatron.core import parallel_state

    from mfmegatron.parallel.cpu_platform import apply_cpu_platform_support

    config = config or ParallelConfig()
    for name, value in sizes.items():
        if not hasattr(config, name):
            raise ParallelConfigError(f"unknown parallel setting {name!r}")
        setattr(config, name, value)

    world_size, rank, local_rank = _world_from_environment()
    data_parallel_size = validate_parallel_sizes(config, world_size)

    has_cuda = torch.cuda.is_available()
    backend = config.backend or ("nccl" if has_cuda else "gloo")
    if backend == "nccl" and not has_cuda:
        raise ParallelConfigError("backend 'nccl' needs CUDA; use 'gloo' on CPU-only machines")
    redirects = apply_cpu_platform_support()
    if has_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")

    if not dist.is_initialized():
        rendezvous = {}
        if world_size == 1 and not {"MASTER_ADDR", "MASTER_PORT"} <= os.environ.keys():
            # A world of one needs no rendezvous: an in-process store takes no port and leaves
            # os.environ alone (subprocesses inherit it, and a fixed port can still be held).
            rendezvous["store"] = dist.HashStore()
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(
            backend=backend,
            world_size=world_size,
            rank=rank,
            timeout=datetime.timedelta(minutes=config.timeout_minutes),
            device_id=device if backend == "nccl" else None,
            **rendezvous,
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=config.tensor_parallel_size,
        pipeline_model_parallel_size=config.pipeline_parallel_size,
        virtual_pipeline_model_parallel_size=config.virtual_pipeline_parallel_size,
        context_parallel_size=config.context_parallel_size,
        expert_model_parallel_size=config.expert_parallel_size,
        expert_tensor_parallel_size=config.expert_tensor_parallel_size,
        distributed_timeout_minutes=config.timeout_minutes,
    )
    seed_everything(config.seed)
    return ParallelInfo(
        world_size=world_size,
        rank=rank,
        local_rank=local_rank,
        backend=backend,
        device=device,
        tensor_parallel_size=config.tensor_parallel_size,
        pipeline_parallel_size=config.pipeline_parallel_size,
        context_parallel_size=config.context_parallel_size,
        expert_parallel_size=config.expert_parallel_size,
        expert_tensor_parallel_size=config.expert_tensor_parallel_size or config.tensor_parallel_size,
        data_parallel_size=data_parallel_size,
        tensor_parallel_rank=parallel_state.get_tensor_model_parallel_rank(),
        pipeline_parallel_rank=parallel_state.get_pipeline_model_parallel_rank(),
        data_parallel_rank=parallel_state.get_data_parallel_rank(),
        expert_parallel_rank=parallel_state.get_expert_model_parallel_rank(),
        cpu_redirects=tuple(f"{r.module}.{r.attribute}" for r in redirects),
    )


def seed_everything(seed: int) -> None:
    """Seeds Python, numpy and torch, and megatron's per-TP/EP-rank RNG streams.

    Data-parallel replicas share ``seed``; tensor/expert-parallel ranks get megatron's offsets so
    that dropout inside a TP region differs across TP ranks (see
    ``megatron.core.tensor_parallel.model_parallel_cuda_manual_seed``).
    """
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def destroy_parallel() -> None:
    """Tears down megatron's groups and the default process group; safe to call twice."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def parallel_context(config: ParallelConfig | None = None, **sizes: int) -> Iterator[ParallelInfo]:
    """``with parallel_context(tensor_parallel_size=2) as info:`` — initialise, then always tear down."""
    info = initialize_parallel(config, **sizes)
    try:
        yield info
    finally:
        destroy_parallel()
