"""megatron-core's tensor-parallel linears with a forward-mode path.

``ColumnParallelLinear`` and ``RowParallelLinear`` are megatron's own layers (same parameters,
initialisation, TP attributes, ``sharded_state_dict``, gradient-accumulation fusion); they add
``forward_jvp(x, tx) -> (y, ty)``, in which

- the primal GEMM runs through megatron's ``_forward_impl`` (autograd, frozen-weight path, wgrad
  fusion), with the TP collectives taken out of it;
- the tangent GEMM uses the same local weight shard under ``no_grad``;
- every collective the pair needs is one call carrying both (``mfmegatron.parallel.collectives``);
- with sequence parallel, backward keeps the rank's chunk of a column-parallel GEMM's input and
  gathers it again (primal only), as megatron's SP linear does (``ColumnParallelJVP``).

The forward-mode logic lives in ``ColumnParallelJVP`` / ``RowParallelJVP``, written once for every
implementation of the GEMM: the local layers here and the Transformer Engine layers
(``mfmegatron/jvp/te_linear.py``) differ only in ``_primal_gemm``. The primal GEMM runs inside
``fp8.primal_gemm_region`` (where a TE layer enters its FP8 autocast), the tangent GEMM through
``fp8.tangent_gemm`` (bf16, outside any FP8 region: see ``mfmegatron/jvp/fp8.py``).

``forward_jvp(x, None)`` is the plain forward and matches megatron's ``forward`` exactly; models
call ``forward_jvp`` everywhere so the math exists once.

MoE experts (``is_expert``) under expert or tensor parallel have megatron's
``explicit_expert_comm``: the layer does no TP communication (the token dispatcher gathers and
reduce-scatters the tokens, ``mfmegatron/jvp/moe.py``), and so neither does ``forward_jvp``.

A ``LoRA`` (``mfmegatron/jvp/lora.py``, attached with ``add_lora``) adds a trainable low-rank
update ``scale · B A`` to a frozen layer as a side path: the weight is never merged, so nothing
weight-sized is created or saved for backward. Its factors follow the layer's TP split.
"""

from __future__ import annotations

import contextlib

from megatron.core import tensor_parallel

from mfmegatron.jvp import fp8
from mfmegatron.parallel import collectives


class ColumnParallelJVP:
    """Y = X Wᵀ + b with W's rows (output features) split over TP ranks.

    With sequence parallel the input arrives as this rank's sequence chunk and is all-gathered
    (primal and tangent together, one call) before the GEMM. What autograd saves of the gathered
    input (the GEMM's for the weight gradient, a LoRA's for its factor A) is the chunk: backward
    all-gathers it again (``collectives.saving_sequence_chunk``), as megatron's own SP linear
    does, so a column-parallel GEMM keeps s/TP rows per rank for backward, not s. Layers whose
    ``saves_sequence_chunk`` is False (the Transformer Engine ones) save what their GEMM saves.

    Needs ``_primal_gemm(x)`` (the local GEMM with the bias, its input gradient summed over TP
    when the input is replicated), ``weight``, ``jvp_sequence_parallel``, ``explicit_expert_comm``,
    ``gather_output``, ``tp_group`` and ``saves_sequence_chunk``.
    """

    saves_sequence_chunk = True

    def forward_jvp(self, x, tx=None, input_is_gathered: bool = False, sequence_chunk=None):
        """``input_is_gathered``: with SP, the caller already gathered the sequence (one gather
        shared by several column-parallel layers reading the same input); ``sequence_chunk``:
        then the rank's chunk it gathered ``x`` from, saved for backward in place of ``x``
        (without it the gathered ``x`` is saved whole)."""
        chunk = sequence_chunk if input_is_gathered else None
        if self.jvp_sequence_parallel and not input_is_gathered and not self.explicit_expert_comm:
            chunk = x
            x, tx = collectives.gather_sequence(x, tx, group=self.tp_group)
        saving = (
            collectives.saving_sequence_chunk(x, chunk, group=self.tp_group)
            if chunk is not None and self.jvp_sequence_parallel and self.saves_sequence_chunk
            else contextlib.nullcontext()
        )
        with saving:
            with fp8.primal_gemm_region(self._primal_autocast(x)):
                y = self._primal_gemm(x)
            ty = fp8.tangent_gemm(tx, self.weight)
            lora = _lora_of(self)
            if lora is not None:
                y, ty = lora.add_to_column_output(y, ty, x, tx, self.jvp_sequence_parallel)
        if self.gather_output:
            y, ty = collectives.gather_last_dim(y, ty, group=self.tp_group)
        return y, ty

    def _primal_autocast(self, x):
        """The FP8 autocast the primal GEMM of ``x`` runs in (None: bf16; TE layers: their recipe's)."""
        return None

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """megatron's (weight and bias split on dim 0), plus LoRA's B split like the weight."""
        return _sharded_with_lora(self, prefix, sharded_offsets, metadata, {"weight": 0, "bias": 0, "lora.b": 0})


class RowParallelJVP:
    """Y = X Wᵀ + b with W's columns (input features) split over TP ranks; input is parallel.

    ``partial_jvp`` is the local GEMM without the reduction or the bias, so that a block can add
    the partial outputs of several row-parallel layers and reduce them once (FLUX's single block).
    Needs ``_primal_gemm(x)`` (no bias, no reduction), ``weight``, ``jvp_bias`` (the bias to add
    after the reduction, or None), ``jvp_sequence_parallel``, ``explicit_expert_comm``,
    ``tp_group``.
    """

    def partial_jvp(self, x, tx=None):
        with fp8.primal_gemm_region(self._primal_autocast(x)):
            y = self._primal_gemm(x)
        ty = fp8.tangent_gemm(tx, self.weight)
        lora = _lora_of(self)
        if lora is not None:
            y, ty = lora.add_to_row_partial_output(y, ty, x, tx)
        return y, ty

    def reduce_jvp(self, y, ty=None):
        """Sum partial outputs over TP (reduce-scatter to sequence chunks with SP), add the bias.
        An expert's partial outputs stay partial (the token dispatcher reduces them)."""
        if self.explicit_expert_comm:
            reduce = None
        elif self.jvp_sequence_parallel:
            reduce = collectives.reduce_scatter_sequence
        else:
            reduce = collectives.all_reduce
        if reduce is not None:
            y, ty = reduce(y, ty, group=self.tp_group)
        if self.jvp_bias is not None:
            y = y + self.jvp_bias
        return y, ty

    def forward_jvp(self, x, tx=None):
        return self.reduce_jvp(*self.partial_jvp(x, tx))

    def _primal_autocast(self, x):
        return None

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """megatron's (weight split on dim 1, bias whole), plus LoRA's A split like the weight."""
        return _sharded_with_lora(self, prefix, sharded_offsets, metadata, {"weight": 1, "lora.a": 1})


class ColumnParallelLinear(ColumnParallelJVP, tensor_parallel.ColumnParallelLinear):
    """megatron's local ColumnParallelLinear with ``forward_jvp``."""

    @property
    def jvp_sequence_parallel(self) -> bool:
        return self.sequence_parallel

    def _primal_gemm(self, x):
        # Without SP the input is replicated and megatron's GEMM all-reduces its gradient
        # (allreduce_dgrad); with SP the gather's backward reduce-scatters it instead.
        return self._forward_impl(
            input=x,
            weight=self.weight,
            bias=None if self.skip_bias_add else self.bias,
            gradient_accumulation_fusion=self.gradient_accumulation_fusion,
            allreduce_dgrad=self.allreduce_dgrad and not self.explicit_expert_comm,
            sequence_parallel=False,
            grad_output_buffer=None,
            tp_group=self.tp_group,
        )


class RowParallelLinear(RowParallelJVP, tensor_parallel.RowParallelLinear):
    """megatron's local RowParallelLinear with ``forward_jvp`` / ``partial_jvp``."""

    @property
    def jvp_sequence_parallel(self) -> bool:
        return self.sequence_parallel

    @property
    def jvp_bias(self):
        return None if self.skip_bias_add else self.bias

    def _primal_gemm(self, x):
        return self._forward_impl(
            input=x,
            weight=self.weight,
            bias=None,
            gradient_accumulation_fusion=self.gradient_accumulation_fusion,
            allreduce_dgrad=False,
            sequence_parallel=False,
            tp_group=None,
            grad_output_buffer=None,
        )


def _sharded_with_lora(layer, prefix, sharded_offsets, metadata, axis_map):
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    # megatron's TE layers keep their TP group as _tp_group (TE's own tp_group is None when the
    # layer was built before torch.distributed); the local layers as tp_group.
    tp_group = getattr(layer, "_tp_group", None) or layer.tp_group
    return make_sharded_tensors_for_checkpoint(
        layer.state_dict(prefix="", keep_vars=True), prefix, axis_map, sharded_offsets,
        tp_group=tp_group, dp_cp_group=metadata["dp_cp_group"],
    )


def _lora_of(layer):
    """The layer's ``LoRA`` (``mfmegatron/jvp/lora.py``), or None."""
    return layer._modules.get("lora")
