"""Which layer implementations a FLUX model is built from (megatron's ModuleSpec idea).

The model asks the spec for its tensor-parallel linears; the spec decides the implementation:

- ``local``: megatron-core's local ``ColumnParallelLinear`` / ``RowParallelLinear`` with our
  forward-mode path (``mfmegatron.jvp.linear``): CPU, and GPUs without Transformer Engine;
- ``transformer_engine``: megatron-core's ``TEColumnParallelLinear`` / ``TERowParallelLinear`` with
  the same forward-mode path (``mfmegatron.jvp.te_linear``): TE's GEMMs, FP8 when the config's
  ``fp8`` is set, tangents in bf16 outside the primal's FP8 autocast.

Both have the same parameters (names, shapes, TP attributes), so checkpoints, conversion and the
planner do not depend on the spec. The attention stays the project's (cuDNN primal with its
log-sum-exp, Triton tangent) under either spec. TE's fused layer-norm linears do not apply: in
FLUX an adaLN modulation sits between every LayerNorm and the linear after it.
"""

from __future__ import annotations

from dataclasses import dataclass

from mfmegatron.jvp.fp8 import transformer_engine_import_error, use_transformer_engine_here
from mfmegatron.jvp.linear import ColumnParallelLinear, RowParallelLinear


@dataclass(frozen=True)
class FluxLayerSpec:
    column_parallel_linear: type
    row_parallel_linear: type
    name: str


LOCAL_SPEC = FluxLayerSpec(
    column_parallel_linear=ColumnParallelLinear,
    row_parallel_linear=RowParallelLinear,
    name="local",
)


def get_flux_layer_spec(use_transformer_engine: bool | None = None) -> FluxLayerSpec:
    """The spec to build FLUX with. ``None``: the best available (TE when it imports and CUDA is
    available, else local); ``True`` without TE is an error naming why TE does not import."""
    if not use_transformer_engine_here(use_transformer_engine):
        return LOCAL_SPEC
    error = transformer_engine_import_error()
    if error is not None:
        raise ImportError(f"use_transformer_engine=True but Transformer Engine does not import ({error})")
    from mfmegatron.jvp.te_linear import TEColumnParallelLinear, TERowParallelLinear

    return FluxLayerSpec(
        column_parallel_linear=TEColumnParallelLinear,
        row_parallel_linear=TERowParallelLinear,
        name="transformer_engine",
    )
