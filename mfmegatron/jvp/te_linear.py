"""megatron-core's Transformer Engine linears with the forward-mode path (import needs TE).

``TEColumnParallelLinear`` / ``TERowParallelLinear`` are megatron's (``megatron.core.extensions.
transformer_engine``: TE's ``Linear`` with megatron's TP attributes, initialisation and
``sharded_state_dict``) with ``ColumnParallelJVP`` / ``RowParallelJVP`` from
``mfmegatron/jvp/linear.py``, so they run exactly as the local layers do except for the primal
GEMM:

- the primal GEMM is TE's (cuBLASLt; FP8 inside the layer's own FP8 autocast when ``config.fp8``
  is set and the GEMM's shape allows it), entered through ``fp8.primal_gemm_region``;
- the tangent GEMM is ``fp8.tangent_gemm``: the same weight (dequantized when it is an FP8
  parameter) in bf16, outside the autocast, so it never touches TE's amax history or scales;
- TE's own tensor-parallel communication is switched off after construction (``parallel_mode``
  None, ``tp_size`` 1, no sequence parallel: megatron's ``explicit_expert_comm`` does the same for
  experts). Every collective is the project's, carrying primal and tangent together, as for the
  local layers; a replicated input's gradient is summed over TP by megatron's copy-to-TP region.

Design choices, unverified until a Hopper run (``tools/te_checks.py``):

- no weight caching across micro-batches (``is_first_microbatch=None``): a trained weight is
  quantized at every call, since the same layer runs several times per step (teacher, student,
  tangent directions) and megatron's per-step reset of the cache is not in this trainer's loop;
- a GEMM whose token count is not a multiple of 16 (the adaLN modulations: one row per sample)
  runs in bf16 — TE's FP8 GEMMs need both dimensions divisible by 16;
- the fused layer-norm linears (``TELayerNormColumnParallelLinear``) are not used: no FLUX linear
  is preceded by a plain norm (the adaLN modulation sits between every LayerNorm and its linear,
  and the QK RMSNorms follow the QKV projection).
"""

from __future__ import annotations

import transformer_engine.pytorch as te_pytorch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.extensions.transformer_engine import TELinear
from megatron.core.extensions.transformer_engine import TEColumnParallelLinear as _MegatronTEColumn
from megatron.core.extensions.transformer_engine import TERowParallelLinear as _MegatronTERow

from mfmegatron.jvp.linear import ColumnParallelJVP, RowParallelJVP

FP8_GEMM_ALIGNMENT = 16


def _fp8_recipe(config):
    if not config.fp8:
        return None
    from megatron.core.fp8_utils import get_fp8_recipe

    return get_fp8_recipe(config)


def _amax_reduction_group(config):
    if not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_amax_reduction_group(
        with_context_parallel=True, tp_only_amax_red=config.tp_only_amax_red
    )


class _TEJVPMixin:
    """What the column and row TE layers share: TE's comms off, the autocast of the primal."""

    def _take_over_communication(self, config):
        self.tp_world_size = parallel_state.get_tensor_model_parallel_world_size()
        self.jvp_sequence_parallel = bool(config.sequence_parallel and self.tp_world_size > 1)
        self.explicit_expert_comm = False
        # TE reads these at every forward: with them, TE's GEMM is this rank's local GEMM only.
        self.parallel_mode = None
        self.tp_size = 1
        self.sequence_parallel = False
        self.fp8_recipe = _fp8_recipe(config)
        self.amax_reduction_group = _amax_reduction_group(config) if self.fp8_recipe is not None else None

    def _primal_autocast(self, x):
        if self.fp8_recipe is None:
            return None
        rows = x.numel() // x.shape[-1]
        if rows % FP8_GEMM_ALIGNMENT or self.in_features % FP8_GEMM_ALIGNMENT or self.out_features % FP8_GEMM_ALIGNMENT:
            return None
        if hasattr(te_pytorch, "autocast"):
            return te_pytorch.autocast(enabled=True, recipe=self.fp8_recipe, amax_reduction_group=self.amax_reduction_group)
        return te_pytorch.fp8_autocast(enabled=True, fp8_recipe=self.fp8_recipe, fp8_group=self.amax_reduction_group)

    def _te_gemm(self, x):
        # TE's Linear.forward itself (megatron's TELinear.forward would cache the FP8 weight
        # across micro-batches); a returned bias (row-parallel) is added after the reduction.
        out = super(TELinear, self).forward(x, is_first_microbatch=None)
        return out[0] if isinstance(out, tuple) else out

    def forward(self, x):
        """megatron's convention (output, bias) through the forward-mode path."""
        y, _ = self.forward_jvp(x)
        return y, None


class TEColumnParallelLinear(_TEJVPMixin, ColumnParallelJVP, _MegatronTEColumn):
    # TE's own sequence-parallel Linear (column mode) keeps the rank's chunk for backward and
    # gathers it again for the weight gradient, as megatron's does (TE's source; not run here),
    # but its communication is switched off here, so TE's GEMM sees (and saves) the gathered
    # input. Whether TE's saved tensor is that gathered tensor (which collectives.
    # saving_sequence_chunk could swap for the chunk) or its own copy (FP8: the quantized input)
    # is not checked without a GPU, so the swap stays off: under SP these layers save the
    # gathered input whole, as before, and the FLUX memory count (models/flux/training.py,
    # activation_bytes) gives SP no activation saving with them.
    saves_sequence_chunk = False

    def __init__(self, input_size, output_size, *, config, init_method, bias=True, gather_output=False,
                 skip_bias_add=False, is_expert=False, **kwargs):
        if is_expert or skip_bias_add:
            raise NotImplementedError("the TE column-parallel linear with forward_jvp supports neither experts nor skip_bias_add")
        # megatron's TE layer refuses gather_output; the gather is ours (collectives.gather_last_dim).
        super().__init__(input_size, output_size, config=config, init_method=init_method, gather_output=False,
                         bias=bias, skip_bias_add=False, is_expert=False, **kwargs)
        self.gather_output = gather_output
        self._take_over_communication(config)

    def _primal_gemm(self, x):
        if self.tp_world_size > 1 and not self.jvp_sequence_parallel:
            # The input is replicated over TP: its gradient is the sum of every rank's partial one.
            x = tensor_parallel.copy_to_tensor_model_parallel_region(x)
        return self._te_gemm(x)


class TERowParallelLinear(_TEJVPMixin, RowParallelJVP, _MegatronTERow):
    def __init__(self, input_size, output_size, *, config, init_method, bias=True, input_is_parallel=True,
                 skip_bias_add=False, is_expert=False, **kwargs):
        if is_expert or not input_is_parallel:
            raise NotImplementedError("the TE row-parallel linear with forward_jvp needs input_is_parallel and no experts")
        # TE returns the bias instead of adding it (skip_bias_add): partial_jvp's output is the
        # bias-free partial sum, and reduce_jvp adds the bias once after the reduction.
        super().__init__(input_size, output_size, config=config, init_method=init_method, bias=bias,
                         input_is_parallel=True, skip_bias_add=True, is_expert=False, **kwargs)
        self.adds_bias = bias and not skip_bias_add
        self._take_over_communication(config)

    @property
    def jvp_bias(self):
        return self.bias if self.adds_bias else None

    def _primal_gemm(self, x):
        return self._te_gemm(x)
