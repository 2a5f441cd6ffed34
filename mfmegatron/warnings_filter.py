"""Silence warnings that megatron-core and torch print on import on machines without
Transformer Engine, apex or CUDA: they are expected there and bury the output users need.
Called by the command-line entry points only (library users keep their own filters)."""

from __future__ import annotations

import logging
import warnings

EXPECTED_WARNINGS = (
    r".*Transformer Engine and Apex are not installed.*",
    r".*Apex is not installed.*",
    r".*absl.logging is not installed.*",
    r".*The following imports from `dynamic_context.py` will be removed.*",
    r".*is deprecated. Please use `torch.distributed.*",
    r".*async save is deprecated.*",
    r".*torch.distributed is disabled, unavailable or uninitialized.*",
    r".*The argument order of load has been changed.*",
    r".*MimoModelConfig is experimental.*",
    r".*full scope is deprecated.*",
)


def quiet_expected_warnings() -> None:
    import torch

    for pattern in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    if not torch.cuda.is_available():  # advice about CUDA streams; meaningless on CPU
        warnings.filterwarnings("ignore", message=r".*CUDA_DEVICE_MAX_CONNECTIONS.*")
    # torch logs "No CUDA runtime is found" when importing its C++ extension helpers on CPU;
    # megatron logs that its own (synchronous here) checkpoint writer is deprecated.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    logging.getLogger("megatron.core.dist_checkpointing.strategies.torch").setLevel(logging.ERROR)
