"""How the HunyuanImage 3.0 trunk is laid out over ranks (this slice: expert parallel only).

Full (unsharded) weights use ``state_dict_adapter``'s names, with the global expert index.
An expert-parallel rank of size ``ep`` holds experts ``[r * E/ep, (r + 1) * E/ep)`` as
``local_experts.0 ..`` (megatron's ``SequentialMLP`` order); everything else is replicated.
Tensor parallel > 1 and pipeline stages are later slices and raise here.
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
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if tp != 1 or pp != 1 or config.tensor_model_parallel_size != 1 or config.pipeline_model_parallel_size != 1:
        raise NotImplementedError(
            "HunyuanImage 3.0 runs with tensor and pipeline parallel size 1 so far (expert "
            f"parallel only); got TP={tp}, PP={pp}"
        )
    ep = parallel_state.get_expert_model_parallel_world_size()
    if ep != config.expert_model_parallel_size:
        raise ValueError(
            f"config.expert_model_parallel_size={config.expert_model_parallel_size} but the "
            f"initialised expert-parallel group has {ep} ranks"
        )


def build_hunyuan_model(config: HunyuanImage3Config) -> HunyuanImage3Model:
    """This rank's trunk (whole model: no tensor or pipeline parallelism yet)."""
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
            tensor = full[key]
            if tuple(tensor.shape) != tuple(param.shape):
                raise CheckpointMismatchError(
                    f"{key}: checkpoint tensor has shape {tuple(tensor.shape)}, the model expects "
                    f"{tuple(param.shape)}"
                )
            param.copy_(tensor.to(param.dtype))


def local_weights(model: HunyuanImage3Model) -> Iterable[tuple[str, torch.Tensor]]:
    """This rank's parameters under their full names (experts by global index)."""
    offset = _expert_offset(model)
    for name, param in model.named_parameters():
        yield local_to_global_key(name, offset), param.detach()
