"""Exponential moving average of the student's weights, in float32, optionally sharded over the
data-parallel group.

Every data-parallel replica holds the same (TP/PP-sharded) student, so a replicated EMA stores
the same float32 numbers DP times: 4 bytes per local parameter on every rank (12 GB per GPU for
FLUX.1-dev at TP=4). Sharded, each data-parallel rank keeps the EMA of a 1/DP slice of every local
parameter, as the distributed optimizer does with its float32 main parameters and Adam moments.

The slice is a block of rows (the first axis of the local tensor): data-parallel rank ``d`` owns
rows ``[d * n / DP, (d + 1) * n / DP)``. A parameter whose row count DP does not divide (a few
small vectors, if any) stays whole on every rank. Rows, rather than a slice of the flattened
tensor, keep each rank's part a regular block of the global tensor, so the checkpoint stores it as
an ordinary megatron ``ShardedTensor`` (one more fragmentation of the first axis): every rank
writes only its own rows, nothing is gathered at save, and the stored tensor is the whole EMA
under the same ``ema.*`` key as a replicated EMA's, loadable at any TP / PP / DP layout and with
either kind of EMA.

Routed MoE experts under expert parallelism (megatron marks their parameters ``allreduce=False``)
are replicated only over the *expert* data-parallel group (world / (ETP·EP·PP)): the ranks of the
dense data-parallel group hold different experts. Their rows are sharded over that group, as
megatron's distributed optimizer shards their state.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory


def resolve_sharding(setting: str, use_distributed_optimizer: bool) -> str:
    """``optim.ema_sharding`` with ``auto`` resolved: sharded like the optimizer's state."""
    if setting == "auto":
        return "data_parallel" if use_distributed_optimizer else "replicated"
    return setting


def _factory_entries(module: torch.nn.Module) -> set[str]:
    return {name for name, entry in module.sharded_state_dict().items() if isinstance(entry, ShardedTensorFactory)}


def row_block(rows: int, shards: int, index: int) -> slice | None:
    """The rows data-parallel rank ``index`` of ``shards`` owns, or None when the rows do not
    split evenly (the tensor then stays whole on every rank)."""
    if shards == 1 or rows % shards:
        return None
    size = rows // shards
    return slice(index * size, (index + 1) * size)


class ParameterEMA:
    """``shadow[name]``: the float32 EMA of this rank's part of parameter ``name`` (its row block
    when sharded, else the whole local tensor).

    ``group``: the data-parallel process group to shard over; None keeps a replicated EMA.
    ``expert_group``: the expert data-parallel group, which expert parameters shard over when
    ``group`` is set (None: the same as ``group``, right without expert parallelism).
    """

    def __init__(self, module: torch.nn.Module, decay: float, group=None, expert_group=None):
        self.module = module
        self.decay = decay
        self.rows: dict[str, slice | None] = {}
        self.groups: dict[str, object] = {}  # name -> the group its rows are sharded over
        self.shadow: dict[str, torch.Tensor] = {}
        # Parameters the checkpoint stores through a factory (megatron's SwiGLU fc1, saved as its
        # gate and up halves) are built from the whole tensor: they stay whole on every rank.
        factories = set() if group is None else _factory_entries(module)
        for name, param in module.named_parameters():
            is_expert = not getattr(param, "allreduce", True)
            param_group = expert_group if is_expert and group is not None and expert_group is not None else group
            shards = 1 if param_group is None else dist.get_world_size(param_group)
            index = 0 if param_group is None else dist.get_rank(param_group)
            rows = row_block(param.shape[0], shards, index) if param.dim() and name not in factories else None
            self.rows[name] = rows
            self.groups[name] = param_group if rows is not None else None
            self.shadow[name] = self._local_part(name, param).float().clone()

    @property
    def sharded(self) -> bool:
        return any(rows is not None for rows in self.rows.values())

    def _local_part(self, name: str, param: torch.Tensor) -> torch.Tensor:
        rows = self.rows[name]
        return param.detach() if rows is None else param.detach()[rows]

    @torch.no_grad()
    def update(self) -> None:
        for name, param in self.module.named_parameters():
            self.shadow[name].lerp_(self._local_part(name, param).float(), 1.0 - self.decay)

    @torch.no_grad()
    def full(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """The whole local EMA of one parameter (gathered over the data-parallel group when
        sharded; a collective: every data-parallel rank calls it for the same parameter)."""
        shadow = self.shadow[name]
        if self.rows[name] is None:
            return shadow
        group = self.groups[name]
        whole = torch.empty(param.shape, dtype=shadow.dtype, device=shadow.device)
        dist.all_gather(list(whole.chunk(dist.get_world_size(group))), shadow, group=group)
        return whole

    @contextlib.contextmanager
    def applied(self):
        """The module with the whole EMA weights in place (restored afterwards).

        One parameter at a time: the EMA is gathered into a transient of one parameter's size,
        and the training weights wait in host memory (a copy on the device would be a second
        model's worth of memory, which is what sharding the EMA saves)."""
        saved = {}
        with torch.no_grad():
            for name, param in self.module.named_parameters():
                saved[name] = param.detach().to("cpu", copy=True)
                param.copy_(self.full(name, param))
        try:
            yield self.module
        finally:
            with torch.no_grad():
                for name, param in self.module.named_parameters():
                    param.copy_(saved[name])

    def sharded_state_dict(self, module_sharded_state_dict: dict, key_prefix: str) -> dict:
        """The module's sharded layout with the EMA tensors as data and ``key_prefix`` keys.

        ``module_sharded_state_dict`` maps parameter names to megatron ShardedTensors (the
        module's own ``sharded_state_dict()``); non-parameter entries are left out. A sharded
        parameter's entry is narrowed to this rank's rows: its first local axis is fragmented
        DP times more, and no data-parallel rank is a replica of another for it.
        """
        sharded = {}
        for name, entry in module_sharded_state_dict.items():
            if name not in self.shadow or not hasattr(entry, "key"):
                continue
            if isinstance(entry, ShardedTensorFactory):
                sharded[name] = dataclasses.replace(entry, key=key_prefix + entry.key, data=self.shadow[name])
                continue
            fields = dict(key=key_prefix + entry.key, data=self.shadow[name], dtype=torch.float32)
            rows = self.rows[name]
            if rows is not None:
                if entry.flattened_range is not None:
                    raise ValueError(f"{entry.key}: a flattened ShardedTensor cannot be sharded by rows")
                axis = entry.prepend_axis_num  # the global axis of the local tensor's first one
                offsets, fragments = list(entry.global_offset), list(entry.axis_fragmentations)
                offsets[axis] += rows.start
                fragments[axis] *= dist.get_world_size(self.groups[name])
                replica_id = entry.replica_id
                # megatron's replica ids end with the data-parallel rank; the rows are unique.
                replica_id = (*replica_id[:-1], 0) if isinstance(replica_id, tuple) else 0
                fields.update(
                    local_shape=tuple(self.shadow[name].shape),
                    global_offset=tuple(offsets),
                    axis_fragmentations=tuple(fragments),
                    replica_id=replica_id,
                )
            sharded[name] = dataclasses.replace(entry, **fields)
        return sharded

    def load_state_dict(self, loaded: dict) -> None:
        for name, tensor in loaded.items():
            if name in self.shadow:
                self.shadow[name].copy_(tensor)
