"""Process groups on top of megatron-core's parallel_state, CPU platform support, rank spawning."""

from mfmegatron.parallel.spawn import RankFailure, run_on_ranks
from mfmegatron.parallel.state import (
    ParallelConfig,
    ParallelConfigError,
    ParallelInfo,
    destroy_parallel,
    initialize_parallel,
    parallel_context,
    seed_everything,
    validate_parallel_sizes,
)

__all__ = [
    "ParallelConfig",
    "ParallelConfigError",
    "ParallelInfo",
    "RankFailure",
    "destroy_parallel",
    "initialize_parallel",
    "parallel_context",
    "run_on_ranks",
    "seed_everything",
    "validate_parallel_sizes",
]
