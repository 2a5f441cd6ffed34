"""Tensor-parallel collectives that carry a primal and its tangent in one communication.

The forward-mode (JVP) path computes a tangent next to every primal activation. Where a primal
needs a collective (all-reduce after a row-parallel GEMM, the sequence-parallel all-gather and
reduce-scatter, gathering a column-parallel output) the tangent needs the same one; both go in a
single call so latency is paid once. The primal side is differentiable exactly like megatron's
mappings (all-reduce ↔ identity, all-gather ↔ reduce-scatter, gather ↔ split); the tangent side has
no autograd graph (it is a stop-gradient target).

Every function takes ``tangent=None`` to mean "primal only" and then uses megatron-core's own
mapping, so there is one code path per collective.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel


def _tp_group(group):
    return group if group is not None else parallel_state.get_tensor_model_parallel_group()


def _world(group) -> int:
    return dist.get_world_size(group)


def _all_reduce(packed: torch.Tensor, group) -> torch.Tensor:
    packed = packed.contiguous()
    dist.all_reduce(packed, group=group)
    return packed


def _all_gather_first_dim(packed: torch.Tensor, group) -> torch.Tensor:
    """[2, s, ...] on each rank -> [2, world * s, ...] (rank-major along s)."""
    world = _world(group)
    packed = packed.contiguous()
    pair, rest = packed.shape[0], tuple(packed.shape[1:])
    output = torch.empty((world * pair,) + rest, dtype=packed.dtype, device=packed.device)
    dist.all_gather_into_tensor(output, packed, group=group)
    return output.view((world, pair) + rest).transpose(0, 1).flatten(1, 2)


def _reduce_scatter_first_dim(packed: torch.Tensor, group) -> torch.Tensor:
    """[2, world * s, ...] on each rank -> this rank's reduced [2, s, ...]."""
    world = _world(group)
    pair, length, rest = packed.shape[0], packed.shape[1], tuple(packed.shape[2:])
    if length % world:
        raise ValueError(f"sequence length {length} is not divisible by tensor_parallel_size {world}")
    # Rank-major chunks: [world, 2, s/world, ...] flattened to [world * 2, s/world, ...].
    chunks = packed.unflatten(1, (world, length // world)).transpose(0, 1).reshape(
        (world * pair, length // world) + rest
    )
    output = torch.empty((pair, length // world) + rest, dtype=packed.dtype, device=packed.device)
    dist.reduce_scatter_tensor(output, chunks, group=group)
    return output


class _AllReducePrimalAndTangent(torch.autograd.Function):
    """Forward: all-reduce (y, ty) together. Backward of y: identity (as megatron's reduce)."""

    @staticmethod
    def forward(ctx, primal, tangent, group):
        reduced = _all_reduce(torch.stack([primal, tangent.to(primal.dtype)]), group)
        ctx.mark_non_differentiable(reduced[1])
        return reduced[0], reduced[1]

    @staticmethod
    def backward(ctx, grad_primal, grad_tangent):
        return grad_primal, None, None


class _GatherSequencePrimalAndTangent(torch.autograd.Function):
    """Sequence-parallel all-gather along dim 0.

    Backward reduce-scatters the primal's gradient when the consumer is tensor-parallel (each rank
    holds a partial gradient), or keeps this rank's chunk when the consumer is replicated.
    """

    @staticmethod
    def forward(ctx, primal, tangent, group, tensor_parallel_output_grad):
        ctx.group = group
        ctx.tensor_parallel_output_grad = tensor_parallel_output_grad
        gathered = _all_gather_first_dim(torch.stack([primal, tangent.to(primal.dtype)]), group)
        ctx.mark_non_differentiable(gathered[1])
        return gathered[0], gathered[1]

    @staticmethod
    def backward(ctx, grad_primal, grad_tangent):
        if ctx.tensor_parallel_output_grad:
            grad = _reduce_scatter_first_dim(grad_primal.unsqueeze(0), ctx.group)[0]
        else:
            world, rank = _world(ctx.group), dist.get_rank(ctx.group)
            grad = grad_primal.chunk(world, dim=0)[rank].contiguous()
        return grad, None, None, None


class _ReduceScatterSequencePrimalAndTangent(torch.autograd.Function):
    """Sequence-parallel reduce-scatter along dim 0; backward all-gathers the primal's gradient."""

    @staticmethod
    def forward(ctx, primal, tangent, group):
        ctx.group = group
        scattered = _reduce_scatter_first_dim(torch.stack([primal, tangent.to(primal.dtype)]), group)
        ctx.mark_non_differentiable(scattered[1])
        return scattered[0], scattered[1]

    @staticmethod
    def backward(ctx, grad_primal, grad_tangent):
        grad = _all_gather_first_dim(grad_primal.unsqueeze(0), ctx.group)[0]
        return grad, None, None


class _GatherLastDimPrimalAndTangent(torch.autograd.Function):
    """Concatenate column-parallel outputs along the last dim; backward keeps this rank's split."""

    @staticmethod
    def forward(ctx, primal, tangent, group):
        ctx.group = group
        # Move the last dim first so the gather is along dim 0, then back.
        packed = torch.stack([primal, tangent.to(primal.dtype)]).movedim(-1, 1)
        gathered = _all_gather_first_dim(packed, group).movedim(1, -1)
        ctx.mark_non_differentiable(gathered[1])
        return gathered[0].contiguous(), gathered[1].contiguous()

    @staticmethod
    def backward(ctx, grad_primal, grad_tangent):
        world, rank = _world(ctx.group), dist.get_rank(ctx.group)
        return grad_primal.chunk(world, dim=-1)[rank].contiguous(), None, None


def all_reduce(primal, tangent=None, group=None):
    """Sum over the tensor-parallel group (after a row-parallel GEMM)."""
    group = _tp_group(group)
    if tangent is None:
        return tensor_parallel.reduce_from_tensor_model_parallel_region(primal, group=group), None
    if _world(group) == 1:
        return primal, tangent
    return _AllReducePrimalAndTangent.apply(primal, tangent, group)


def gather_sequence(primal, tangent=None, group=None, tensor_parallel_output_grad: bool = True):
    """Sequence-parallel shards [s/tp, b, h] -> the full sequence [s, b, h].

    ``tensor_parallel_output_grad``: the consumer is tensor-parallel (a column GEMM), so gradients
    are summed over ranks in backward; False when every rank computes the same thing from the
    gathered tensor (e.g. a replicated output layer) and each keeps its own chunk's gradient.
    """
    group = _tp_group(group)
    if tangent is None:
        return (
            tensor_parallel.gather_from_sequence_parallel_region(
                primal, tensor_parallel_output_grad=tensor_parallel_output_grad, group=group
            ),
            None,
        )
    if _world(group) == 1:
        return primal, tangent
    return _GatherSequencePrimalAndTangent.apply(primal, tangent, group, tensor_parallel_output_grad)


def reduce_scatter_sequence(primal, tangent=None, group=None):
    """Partial sums [s, b, h] -> this rank's reduced shard [s/tp, b, h] (after a row GEMM)."""
    group = _tp_group(group)
    if tangent is None:
        return tensor_parallel.reduce_scatter_to_sequence_parallel_region(primal, group=group), None
    if _world(group) == 1:
        return primal, tangent
    return _ReduceScatterSequencePrimalAndTangent.apply(primal, tangent, group)


def gather_last_dim(primal, tangent=None, group=None):
    """Column-parallel output shards [..., n/tp] -> [..., n] on every rank."""
    group = _tp_group(group)
    if tangent is None:
        return tensor_parallel.gather_from_tensor_model_parallel_region(primal, group=group), None
    if _world(group) == 1:
        return primal, tangent
    return _GatherLastDimPrimalAndTangent.apply(primal, tangent, group)


def scatter_sequence(tensor, group=None):
    """Keep this rank's chunk of the full sequence (entering a sequence-parallel region)."""
    return tensor_parallel.scatter_to_sequence_parallel_region(tensor, group=_tp_group(group))


# --------------------------------------------------------------------------- saving the chunk
#
# Under sequence parallel a column-parallel GEMM reads the whole (gathered) sequence, and autograd
# would save that gathered input for the weight's gradient (and a LoRA factor's): s x b x h on
# every rank, though the rank's own input is s/TP rows. Megatron's SP linear saves its chunk and
# all-gathers it again in backward; ``saving_sequence_chunk`` does the same for any GEMM run inside
# it, through autograd's saved-tensor hooks, so that the forward keeps its single gather of primal
# and tangent stacked (and several layers can share one gather: FLUX's single block). Each
# backward node that saved the gathered tensor re-gathers it once (primal only): one all-gather of
# s x b x h per such layer, as megatron's. ``counters`` records both, for tests.

chunk_counters = {"chunks_saved": 0, "regathers": 0}
"""How often ``saving_sequence_chunk`` saved a chunk in place of a gathered tensor, and how often
backward gathered one again: tests reset and read it to show the mechanism ran."""


class _SavedChunk:
    """What autograd keeps in place of a gathered tensor: this rank's chunk and how to rebuild it."""

    __slots__ = ("chunk", "version", "group", "shape")

    def __init__(self, chunk, group, shape):
        self.chunk, self.version, self.group, self.shape = chunk, chunk._version, group, shape

    def regather(self) -> torch.Tensor:
        if self.chunk._version != self.version:
            raise RuntimeError("a sequence chunk saved for backward (collectives.saving_sequence_chunk) was "
                               "modified in place before backward used it")
        chunk_counters["regathers"] += 1
        return _all_gather_first_dim(self.chunk.unsqueeze(0), self.group)[0].view(self.shape)


def _is_whole(tensor, whole) -> bool:
    """``tensor`` is the gathered tensor described by ``whole`` (data pointer, elements, dtype,
    device) or a contiguous reshape of all of it (what a matmul saves of a 3-D input: its 2-D
    view)."""
    return (
        type(tensor) is torch.Tensor  # not a parameter, nor a tensor subclass (TE's FP8 tensors)
        and (tensor.data_ptr(), tensor.numel(), tensor.dtype, tensor.device) == whole
        and tensor.is_contiguous()
    )


@contextlib.contextmanager
def saving_sequence_chunk(gathered, chunk, group=None):
    """Inside: autograd saves ``chunk`` (this rank's [s/tp, ...] rows) wherever it would save
    ``gathered`` (the sequence all-gathered from the chunks, rank-major), and backward all-gathers
    the chunk again when it needs the tensor. Other saved tensors are untouched."""
    group = _tp_group(group)
    if (chunk is None or _world(group) == 1 or not torch.is_grad_enabled() or not gathered.is_contiguous()
            or gathered.shape[0] != chunk.shape[0] * _world(group)):
        yield
        return
    # autograd keeps the hooks with every tensor saved here: they must hold neither the gathered
    # tensor (only its address, valid while the caller holds it) nor, after the block, the chunk.
    state = {"whole": (gathered.data_ptr(), gathered.numel(), gathered.dtype, gathered.device),
             "chunk": chunk.detach()}

    def pack(tensor):
        if state and _is_whole(tensor, state["whole"]):
            chunk_counters["chunks_saved"] += 1
            return _SavedChunk(state["chunk"], group, tensor.shape)
        return tensor

    def unpack(saved):
        return saved.regather() if isinstance(saved, _SavedChunk) else saved

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
    finally:
        state.clear()


def reset_chunk_counters() -> None:
    for key in chunk_counters:
        chunk_counters[key] = 0


# --------------------------------------------------------------------------- MoE token exchange
#
# An MoE layer moves a variable number of tokens per rank: the expert-parallel all-to-all and the
# expert-tensor-parallel all-gather / reduce-scatter with per-rank split sizes along dim 0. Here a
# primal [n, ...] and its tangent travel as one tensor [n, 2, ...] (interleaved per row, so the
# split sizes along dim 0 stay those of the primal) through megatron's own communication
# functions. The halves come back as separate contiguous tensors: the primal is saved for backward
# by the expert GEMMs, and a view into the packed buffer would keep the tangent alive with it.
# Backward moves only the primal's gradient, with megatron's primal-only function.


def _pack_rows(primal, tangent):
    return torch.stack([primal, tangent.to(primal.dtype)], dim=1)


def _unpack_rows(packed):
    return packed[:, 0].contiguous(), packed[:, 1].contiguous()


class _AllToAllPrimalAndTangent(torch.autograd.Function):
    @staticmethod
    def forward(ctx, primal, tangent, group, output_splits, input_splits):
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        packed = tensor_parallel.all_to_all(group, _pack_rows(primal, tangent), output_splits, input_splits)
        primal_out, tangent_out = _unpack_rows(packed)
        ctx.mark_non_differentiable(tangent_out)
        return primal_out, tangent_out

    @staticmethod
    def backward(ctx, grad_primal, grad_tangent):
        grad = tensor_parallel.all_to_all(ctx.group, grad_primal, ctx.input_splits, ctx.output_splits)
        return grad, None, None, None, None


class _GatherTokensPrimalAndTangent(torch.autograd.Function):
    @staticmethod
    def forward(ctx, primal, tangent, group, split_sizes):
        from megatron.core.tensor_parallel.mappings import _gather_along_first_dim

        ctx.group, ctx.split_sizes = group, split_sizes
        gathered = _gather_along_first_dim(_pack_rows(primal, tangent), group, split_sizes)
        primal_out, tangent_out = _unpack_rows(gathered)
        ctx.mark_non_differentiable(tangent_out)
        return primal_out, tangent_out

    @staticmethod
    def backward(ctx, grad_primal, grad_tangent):
        from megatron.core.tensor_parallel.mappings import _reduce_scatter_along_first_dim

        return _reduce_scatter_along_first_dim(grad_primal.contiguous(), ctx.group, ctx.split_sizes), None, None, None


class _ReduceScatterTokensPrimalAndTangent(torch.autograd.Function):
    @staticmethod
    def forward(ctx, primal, tangent, group, split_sizes):
        from megatron.core.tensor_parallel.mappings import _reduce_scatter_along_first_dim

        ctx.group, ctx.split_sizes = group, split_sizes
        scattered = _reduce_scatter_along_first_dim(_pack_rows(primal, tangent), group, split_sizes)
        primal_out, tangent_out = _unpack_rows(scattered)
        ctx.mark_non_differentiable(tangent_out)
        return primal_out, tangent_out

    @staticmethod
    def backward(ctx, grad_primal, grad_tangent):
        from megatron.core.tensor_parallel.mappings import _gather_along_first_dim

        return _gather_along_first_dim(grad_primal.contiguous(), ctx.group, ctx.split_sizes), None, None, None


def all_to_all_tokens(primal, tangent, group, output_splits=None, input_splits=None):
    """megatron's ``all_to_all`` (rows ``input_splits[r]`` to rank r, ``output_splits[r]`` from
    it) for a primal and its tangent in one exchange."""
    if tangent is None:
        return tensor_parallel.all_to_all(group, primal, output_splits, input_splits), None
    if _world(group) == 1:
        return primal, tangent
    return _AllToAllPrimalAndTangent.apply(primal, tangent, group, output_splits, input_splits)


def gather_tokens(primal, tangent, group, split_sizes=None):
    """All-gather along dim 0 with per-rank row counts ``split_sizes`` (megatron's
    ``gather_from_sequence_parallel_region``; backward reduce-scatters the primal's gradient)."""
    if tangent is None:
        return (
            tensor_parallel.gather_from_sequence_parallel_region(primal, group=group, output_split_sizes=split_sizes),
            None,
        )
    if _world(group) == 1:
        return primal, tangent
    return _GatherTokensPrimalAndTangent.apply(primal, tangent, group, split_sizes)


def reduce_scatter_tokens(primal, tangent, group, split_sizes=None):
    """Sum over ranks and keep this rank's ``split_sizes[rank]`` rows (megatron's
    ``reduce_scatter_to_sequence_parallel_region``; backward all-gathers the primal's gradient)."""
    if tangent is None:
        return (
            tensor_parallel.reduce_scatter_to_sequence_parallel_region(primal, group=group, input_split_sizes=split_sizes),
            None,
        )
    if _world(group) == 1:
        return primal, tangent
    return _ReduceScatterTokensPrimalAndTangent.apply(primal, tangent, group, split_sizes)


# --------------------------------------------------------------------------- replicated tokens
#
# Under tensor parallel without sequence parallel every TP rank holds the whole (replicated)
# sequence, and its gradient is the whole gradient on every rank (megatron's convention for
# replicated activations). A region that should see each token once per TP group (the routed
# experts: their expert-TP all-gather assumes each rank brings different tokens) takes this rank's
# rows with ``split_replicated_tokens`` and gives the whole sequence back with
# ``gather_replicated_tokens``. Backward is the mirror image: the kept rows' gradients are
# all-gathered into the whole gradient, and the gathered output's gradient (whole, on every rank)
# keeps this rank's rows. Row counts may differ between ranks (any sequence length works).
# megatron's scatter / gather mappings need equal rows and have no tangent, hence these.


def replicated_token_splits(rows: int, group) -> list[int]:
    """Rows per rank when ``rows`` replicated rows are shared out over ``group`` (the first
    ``rows % world`` ranks one more)."""
    base, extra = divmod(rows, _world(group))
    return [base + (1 if rank < extra else 0) for rank in range(_world(group))]


def _own_rows(tensor, group, split_sizes):
    start = sum(split_sizes[: dist.get_rank(group)])
    return tensor[start : start + split_sizes[dist.get_rank(group)]]


def _gather_rows(tensor, group, split_sizes):
    from megatron.core.tensor_parallel.mappings import _gather_along_first_dim

    return _gather_along_first_dim(tensor.contiguous(), group, split_sizes)


class _SplitReplicatedTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, primal, tangent, group, split_sizes):
        ctx.group, ctx.split_sizes = group, split_sizes
        out = _own_rows(primal, group, split_sizes).contiguous()
        if tangent is None:
            return out, None
        tangent_out = _own_rows(tangent, group, split_sizes).contiguous()
        ctx.mark_non_differentiable(tangent_out)
        return out, tangent_out

    @staticmethod
    def backward(ctx, grad_primal, grad_tangent):
        return _gather_rows(grad_primal, ctx.group, ctx.split_sizes), None, None, None


class _GatherReplicatedTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, primal, tangent, group, split_sizes):
        ctx.group, ctx.split_sizes = group, split_sizes
        if tangent is None:
            return _gather_rows(primal, group, split_sizes), None
        primal_out, tangent_out = _unpack_rows(_gather_rows(_pack_rows(primal, tangent), group, split_sizes))
        ctx.mark_non_differentiable(tangent_out)
        return primal_out, tangent_out

    @staticmethod
    def backward(ctx, grad_primal, grad_tangent):
        return _own_rows(grad_primal, ctx.group, ctx.split_sizes).contiguous(), None, None, None


def split_replicated_tokens(primal, tangent, group, split_sizes):
    """Replicated rows [n, ...] -> this rank's ``split_sizes[rank]`` rows (and the tangent's);
    backward all-gathers the rows' gradients into the whole (replicated) gradient."""
    if _world(group) == 1:
        return primal, tangent
    return _SplitReplicatedTokens.apply(primal, tangent, group, split_sizes)


def gather_replicated_tokens(primal, tangent, group, split_sizes):
    """This rank's rows -> all ranks' rows [n, ...] (primal and tangent in one all-gather), to be
    used replicated; backward keeps this rank's rows of the (whole, replicated) gradient."""
    if _world(group) == 1:
        return primal, tangent
    return _GatherReplicatedTokens.apply(primal, tangent, group, split_sizes)
