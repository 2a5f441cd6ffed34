"""Which layer implementations the HunyuanImage 3.0 trunk is built from.

One spec today: megatron-core's local ``ColumnParallelLinear`` / ``RowParallelLinear`` (our
subclasses with a forward-mode path, ``mfmegatron.jvp.linear``) for attention, and megatron's
``MoELayer`` from its local MoE spec (``SequentialMLP`` experts, ``SharedExpertMLP``, top-k router,
the token dispatcher chosen by ``moe_token_dispatcher_type``). Transformer Engine variants
(grouped GEMM experts, FP8) plug in here; none is written yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from mfmegatron.jvp.linear import ColumnParallelLinear, RowParallelLinear


@dataclass(frozen=True)
class HunyuanLayerSpec:
    column_parallel_linear: type
    row_parallel_linear: type
    moe_builder: Callable
    name: str


def get_hunyuan_layer_spec(use_transformer_engine: bool | None = None, num_experts: int = 64) -> HunyuanLayerSpec:
    """The spec to build the trunk with. ``None``: the best available (currently always local)."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

    if use_transformer_engine:
        raise NotImplementedError(
            "Transformer Engine HunyuanImage 3.0 layers are not implemented yet; build with the "
            "local spec (use_transformer_engine=False or None)"
        )
    return HunyuanLayerSpec(
        column_parallel_linear=ColumnParallelLinear,
        row_parallel_linear=RowParallelLinear,
        moe_builder=get_moe_module_spec(use_te=False, num_experts=num_experts, moe_grouped_gemm=False),
        name="local",
    )
