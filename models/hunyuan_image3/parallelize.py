"""How the HunyuanImage 3.0 trunk is laid out over ranks: expert, tensor and pipeline parallel.

Full (unsharded) weights use ``state_dict_adapter``'s names, with the global expert index.
An expert-parallel rank of size ``ep`` holds experts ``[r * E/ep, (r + 1) * E/ep)`` as
``local_experts.0 ..`` (megatron's ``SequentialMLP`` order). Tensor-parallel weights are split
along megatron's ``partition_dim`` (routed experts over the expert-tensor-parallel group, the rest
over TP): ``linear_qkv`` rows are whole KV groups, the embedding and ``lm_head`` vocab rows. A
SwiGLU ``linear_fc1`` (``[gate; up]`` in full) is split per half: rank ``r`` holds
``[gate_r; up_r]``, as megatron's GLU chunks its local output in two.
Pipeline stages hold contiguous layer ranges (``pipeline_layer_range``); full names use global
layer indices. Tensor parallel needs sequence parallel (megatron's MoELayer refuses TP without SP
in training).
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
_LAYER = re.compile(r"^layers\.(\d+)\.")


def _check_supported_layout(config: HunyuanImage3Config) -> None:
    if parallel_state.get_virtual_pipeline_model_parallel_world_size() not in (None, 1):
        raise NotImplementedError("HunyuanImage 3.0 has no interleaved (virtual) pipeline stages yet")
    for what, initialised, configured in (
        ("pipeline", parallel_state.get_pipeline_model_parallel_world_size(), config.pipeline_model_parallel_size),
        ("expert", parallel_state.get_expert_model_parallel_world_size(), config.expert_model_parallel_size),
        ("tensor", parallel_state.get_tensor_model_parallel_world_size(), config.tensor_model_parallel_size),
    ):
        if initialised != configured:
            raise ValueError(
                f"the config's {what} parallel size is {configured} but the initialised {what}-"
                f"parallel group has {initialised} ranks"
            )


def pipeline_layer_range(config: HunyuanImage3Config, stage: int) -> tuple[int, int]:
    """Layers [start, end) of pipeline stage ``stage``: an even split, earlier stages taking the
    remainder (the last stage also runs ``ln_f`` and ``lm_head``)."""
    stages = config.pipeline_model_parallel_size
    base, extra = divmod(config.num_layers, stages)
    start = stage * base + min(stage, extra)
    return start, start + base + (1 if stage < extra else 0)


def build_hunyuan_model(config: HunyuanImage3Config) -> HunyuanImage3Model:
    """This rank's trunk, or its pipeline stage of it."""
    _check_supported_layout(config)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    stages = parallel_state.get_pipeline_model_parallel_world_size()
    return HunyuanImage3Model(
        config, pre_process=stage == 0, post_process=stage == stages - 1,
        layer_range=pipeline_layer_range(config, stage),
    )


def meta_full_model(config: HunyuanImage3Config) -> HunyuanImage3Model:
    """The whole trunk (every expert) on the meta device: shapes and parameter counts only.

    Needs megatron's parallel state (a world of one is enough)."""
    shape_config = dataclasses.replace(
        config, use_cpu_initialization=True, perform_initialization=False, expert_model_parallel_size=1,
        pipeline_model_parallel_size=1,
    )
    with torch.device("meta"):
        return HunyuanImage3Model(shape_config)


def _expert_offset(model: HunyuanImage3Model) -> int:
    local = model.config.num_moe_experts // parallel_state.get_expert_model_parallel_world_size()
    return parallel_state.get_expert_model_parallel_rank() * local


def local_to_global_key(key: str, expert_offset: int, layer_offset: int = 0) -> str:
    """A stage's parameter name -> its full name: ``layers.{j}`` -> ``layers.{layer_offset + j}``,
    ``local_experts.{i}`` -> ``local_experts.{expert_offset + i}``; other keys unchanged."""
    layer = _LAYER.match(key)
    if layer is not None:
        key = f"layers.{layer_offset + int(layer.group(1))}." + key[layer.end():]
    match = _LOCAL_EXPERT.match(key)
    if match is None:
        return key
    return f"{match.group(1)}{expert_offset + int(match.group(2))}{match.group(3)}"


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
    params = {local_to_global_key(name, offset, model.layer_range[0]): p for name, p in model.named_parameters()}
    expected = set(params)
    # Other ranks' experts and other stages' parts are in the full dict too; only keys missing
    # here or belonging to no rank are errors.
    everywhere = set(_full_names(model.config))
    check_key_sets(set(full) & (expected | (set(full) - everywhere)), expected, "the full HunyuanImage 3.0 weights")
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
    """This rank's parameters under their full names (layers and experts by global index)."""
    offset = _expert_offset(model)
    for name, param in model.named_parameters():
        yield local_to_global_key(name, offset, model.layer_range[0]), param.detach()


def _full_names(config: HunyuanImage3Config) -> list[str]:
    from models.hunyuan_image3.model import image_path_keys
    from models.hunyuan_image3.state_dict_adapter import megatron_keys

    return megatron_keys(config) + (image_path_keys(config) if config.image_path else [])
