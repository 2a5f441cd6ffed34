"""How the HunyuanImage 3.0 trunk is laid out over ranks: expert and tensor parallel.

Full (unsharded) weights use ``state_dict_adapter``'s names, with the global expert index.
An expert-parallel rank of size ``ep`` holds experts ``[r * E/ep, (r + 1) * E/ep)`` as
``local_experts.0 ..`` (megatron's ``SequentialMLP`` order). Tensor-parallel weights are split
along megatron's ``partition_dim`` (routed experts over the expert-tensor-parallel group, the rest
over TP): ``linear_qkv`` rows are whole KV groups, the embedding and ``lm_head`` vocab rows. A
SwiGLU ``linear_fc1`` (``[gate; up]`` in full) is split per half: rank ``r`` holds
``[gate_r; up_r]``, as megatron's GLU chunks its local output in two.
Pipeline stages are a later slice and raise here. Tensor parallel needs sequence parallel
(megatron's MoELayer refuses TP without SP in training).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable

import torch
from megatron.core import parallel_state

from models.hunyuan_image3.config import HunyuanImage3Config
from models.hunyuan_image3.model import HunyuanImage3Model
from models.hunyuan_image3.state_dict_adapter import CheckpointMismatchError, check_key_sets

_LOCAL_EXPERT = re.compile(r"^(layers\.\d+\.mlp\.experts\.local_experts\.)(\d+)(\..*)$")


def _check_supported_layout(config: HunyuanImage3Config) -> None:
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if pp != 1 or config.pipeline_model_parallel_size != 1:
        raise NotImplementedError(f"HunyuanImage 3.0 runs without pipeline stages so far; got PP={pp}")
    for what, initialised, configured in (
        ("expert", parallel_state.get_expert_model_parallel_world_size(), config.expert_model_parallel_size),
        ("tensor", parallel_state.get_tensor_model_parallel_world_size(), config.tensor_model_parallel_size),
    ):
        if initialised != configured:
            raise ValueError(
                f"the config's {what} parallel size is {configured} but the initialised {what}-"
                f"parallel group has {initialised} ranks"
            )


def build_hunyuan_model(config: HunyuanImage3Config) -> HunyuanImage3Model:
    """This rank's trunk (all layers: no pipeline stages yet)."""
    _check_supported_layout(config)
    return HunyuanImage3Model(config)


def meta_full_model(config: HunyuanImage3Config) -> HunyuanImage3Model:
    """The whole trunk (every expert) on the meta device: shapes and parameter counts only.

    Needs megatron's parallel state (a world of one is enough)."""
    shape_config = dataclasses.replace(
        config, use_cpu_initialization=True, perform_initialization=False, expert_model_parallel_size=1,
    )
    with torch.device("meta"):
        return HunyuanImage3Model(shape_config)


def _expert_offset(model: HunyuanImage3Model) -> int:
    local = model.config.num_moe_experts // parallel_state.get_expert_model_parallel_world_size()
    return parallel_state.get_expert_model_parallel_rank() * local


def local_to_global_key(key: str, offset: int) -> str:
    """``...local_experts.{i}...`` -> ``...local_experts.{offset + i}...``; other keys unchanged."""
    match = _LOCAL_EXPERT.match(key)
    if match is None:
        return key
    return f"{match.group(1)}{offset + int(match.group(2))}{match.group(3)}"


def _is_routed_expert(key: str) -> bool:
    return ".mlp.experts." in key


def _is_glu_fc1(key: str) -> bool:
    return ".mlp." in key and key.endswith("linear_fc1.weight")


def _tp_world_and_rank(key: str) -> tuple[int, int]:
    if _is_routed_expert(key):
        return (parallel_state.get_expert_tensor_parallel_world_size(),
                parallel_state.get_expert_tensor_parallel_rank())
    return parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()


def shard_full_tensor(key: str, full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's part of the full tensor ``key`` for ``param`` (megatron's TP attributes)."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    world, rank = _tp_world_and_rank(key)
    if _is_glu_fc1(key):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(world, dim=0)[rank], up.chunk(world, dim=0)[rank]], dim=0)
    return full.chunk(world, dim=param.partition_dim)[rank]


def unshard_tensor(key: str, parts: list[torch.Tensor], param: torch.Tensor) -> torch.Tensor:
    """The full tensor from the TP ranks' parts (in rank order): ``shard_full_tensor`` undone."""
    if not getattr(param, "tensor_model_parallel", False):
        return parts[0]
    if _is_glu_fc1(key):
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])], dim=0)
    return torch.cat(parts, dim=param.partition_dim)


def load_full_weights(model: HunyuanImage3Model, full: dict) -> None:
    """Copies full tensors (``state_dict_adapter`` names) into this rank's parameters."""
    _check_supported_layout(model.config)
    offset = _expert_offset(model)
    params = {local_to_global_key(name, offset): p for name, p in model.named_parameters()}
    expected = set(params)
    experts = {k for k in full if _LOCAL_EXPERT.match(k)}
    # Other ranks' experts are in the full dict too; only missing or unknown keys are errors.
    check_key_sets(set(full) - (experts - expected), expected, "the full HunyuanImage 3.0 weights")
    with torch.no_grad():
        for key, param in params.items():
            tensor = shard_full_tensor(key, full[key], param)
            if tuple(tensor.shape) != tuple(param.shape):
                raise CheckpointMismatchError(
                    f"{key}: checkpoint tensor {tuple(full[key].shape)} gives this rank "
                    f"{tuple(tensor.shape)}, the model expects {tuple(param.shape)}"
                )
            param.copy_(tensor.to(param.dtype))


def local_weights(model: HunyuanImage3Model) -> Iterable[tuple[str, torch.Tensor]]:
    """This rank's parameters under their full names (experts by global index)."""
    offset = _expert_offset(model)
    for name, param in model.named_parameters():
        yield local_to_global_key(name, offset), param.detach()
