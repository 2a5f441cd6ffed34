"""``initialize_parallel`` in the calling process (a world of one, as tools and tests use it)."""

import os

import torch
import torch.distributed as dist

from mfmegatron.parallel import parallel_context


def test_a_world_of_one_takes_no_port_and_leaves_the_environment_alone(monkeypatch):
    # Subprocesses inherit os.environ: a MASTER_PORT set here once made a later tool run in a
    # subprocess try the same port.
    for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    with parallel_context(tensor_parallel_size=1) as info:
        assert info.world_size == 1 and info.data_parallel_size == 1
        assert "MASTER_PORT" not in os.environ and "MASTER_ADDR" not in os.environ
        value = torch.ones(2)
        dist.all_reduce(value)
        assert value.tolist() == [1.0, 1.0]
    assert not dist.is_initialized()
