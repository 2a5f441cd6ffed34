"""The rank spawner: results in rank order, failures with tracebacks, no hang when a rank dies."""

import os
import time

import pytest

from mfmegatron.parallel import RankFailure, run_on_ranks


def _rank_and_sum(offset):
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    value = torch.tensor([float(dist.get_rank() + offset)])
    dist.all_reduce(value)
    return dist.get_rank(), value


def _rank_one_raises_while_rank_zero_waits():
    import torch.distributed as dist

    dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        raise ValueError("boom on rank one")
    dist.barrier()  # never completes: rank 1 is gone


def _rank_one_dies_while_rank_zero_waits():
    import torch.distributed as dist

    dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        os._exit(3)
    dist.barrier()


def test_results_come_back_in_rank_order():
    results = run_on_ranks(_rank_and_sum, 2, 10)
    assert [rank for rank, _ in results] == [0, 1]
    assert all(value.item() == 21.0 for _, value in results)


def test_a_rank_exception_is_reraised_with_its_traceback():
    start = time.monotonic()
    with pytest.raises(RankFailure) as failure:
        run_on_ranks(_rank_one_raises_while_rank_zero_waits, 2, timeout=60)
    assert failure.value.rank == 1
    assert "boom on rank one" in str(failure.value) and "Traceback" in str(failure.value)
    assert time.monotonic() - start < 30  # rank 0 was killed, not waited for


def test_a_dead_rank_does_not_hang_the_others():
    start = time.monotonic()
    with pytest.raises(RankFailure, match="rank 1 of 2 died with exit code 3"):
        run_on_ranks(_rank_one_dies_while_rank_zero_waits, 2, timeout=60)
    assert time.monotonic() - start < 30
