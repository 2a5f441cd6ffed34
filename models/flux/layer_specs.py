"""Which layer implementations a FLUX model is built from (megatron's ModuleSpec idea).

The model asks the spec for its tensor-parallel linears; the spec decides the implementation.
Today there is one: megatron-core's local ``ColumnParallelLinear`` / ``RowParallelLinear`` with
our forward-mode path (``mfmegatron.jvp.linear``). Transformer Engine variants (FP8 GEMMs through
megatron's TE layers, tangents kept in bf16 outside the primal's fp8_autocast) plug in here; they
are not written yet because no machine this project runs on has Transformer Engine to test them.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def get_flux_layer_spec(use_transformer_engine: bool | None = None) -> FluxLayerSpec:
    """The spec to build FLUX with. ``None``: the best available (currently always local)."""
    if use_transformer_engine:
        raise NotImplementedError(
            "Transformer Engine FLUX layers are not implemented yet; build with the local spec "
            "(use_transformer_engine=False or None)"
        )
    return LOCAL_SPEC
