"""Which layer implementations the HunyuanImage 3.0 trunk is built from.

One spec today: megatron-core's local ``ColumnParallelLinear`` / ``RowParallelLinear`` (our
subclasses with a forward-mode path, ``mfmegatron.jvp.linear``) for attention and inside the MoE,
and megatron's ``MoELayer`` as its local MoE spec builds it (``SequentialMLP`` experts and
``SharedExpertMLP``, both megatron ``MLP``s over those linears, top-k router, the token dispatcher
chosen by ``moe_token_dispatcher_type``); ``mfmegatron.jvp.moe`` runs it with tangents. Transformer Engine variants
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
    from functools import partial

    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
    from megatron.core.transformer.moe.shared_experts import SharedExpertMLP

    if use_transformer_engine:
        raise NotImplementedError(
            "Transformer Engine HunyuanImage 3.0 layers are not implemented yet; build with the "
            "local spec (use_transformer_engine=False or None)"
        )
    # megatron's local MoE spec (get_moe_module_spec(use_te=False)) with our linears.
    mlp = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    moe = partial(
        MoELayer,
        submodules=MoESubmodules(
            experts=partial(SequentialMLP, submodules=mlp),
            shared_experts=partial(SharedExpertMLP, submodules=mlp),
        ),
    )
    return HunyuanLayerSpec(
        column_parallel_linear=ColumnParallelLinear,
        row_parallel_linear=RowParallelLinear,
        moe_builder=moe,
        name="local",
    )
