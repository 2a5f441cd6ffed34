"""How a FLUX model is laid out over ranks: pipeline stages, TP shards of full weights.

The model (``model.py``) is written once; this file decides which blocks a pipeline stage builds
and moves full (unsharded) weights into / out of a rank's shards using megatron's
tensor-parallel attributes on each parameter (``tensor_model_parallel``, ``partition_dim``).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from models.flux.config import FluxConfig
from models.flux.layer_specs import FluxLayerSpec
from models.flux.model import FluxModel
from models.flux.state_dict_adapter import CheckpointMismatchError, megatron_block_key_to_global


def pipeline_stage_blocks(config: FluxConfig) -> tuple[int, ...]:
    """Blocks per stage: ``config.pipeline_stage_blocks`` or an even split by count."""
    stages = config.pipeline_model_parallel_size
    if config.pipeline_stage_blocks is not None:
        return tuple(config.pipeline_stage_blocks)
    base, extra = divmod(config.num_layers, stages)
    # Earlier stages take the remainder: the last stage also runs the final layer and the loss.
    return tuple(base + (1 if stage < extra else 0) for stage in range(stages))


def pipeline_block_range(config: FluxConfig, stage: int) -> tuple[int, int]:
    blocks = pipeline_stage_blocks(config)
    start = sum(blocks[:stage])
    return start, start + blocks[stage]


def build_flux_model(config: FluxConfig, spec: FluxLayerSpec | None = None) -> FluxModel:
    """This rank's FLUX stage (the whole model without pipeline parallelism)."""
    stage = parallel_state.get_pipeline_model_parallel_rank()
    stages = parallel_state.get_pipeline_model_parallel_world_size()
    if stages != config.pipeline_model_parallel_size:
        raise ValueError(
            f"config.pipeline_model_parallel_size={config.pipeline_model_parallel_size} but "
            f"the initialised pipeline has {stages} stages"
        )
    return FluxModel(
        config,
        spec,
        pre_process=stage == 0,
        post_process=stage == stages - 1,
        block_range=pipeline_block_range(config, stage),
    )


def _tp_shard(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    world = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    return full.chunk(world, dim=dim)[rank]


def load_full_weights(model: FluxModel, get_full: Callable[[str], torch.Tensor]) -> None:
    """Copies full tensors (our naming, global block indices) into this rank's shards.

    Raises CheckpointMismatchError naming the key and both shapes on a mismatch.
    """
    config = model.config
    with torch.no_grad():
        for name, param in model.named_parameters():
            key = megatron_block_key_to_global(name, model.block_range, config)
            try:
                full = get_full(key)
            except KeyError as error:
                raise CheckpointMismatchError(f"checkpoint has no tensor for {key!r}") from error
            shard = _tp_shard(full, param)
            if shard.shape != param.shape:
                raise CheckpointMismatchError(
                    f"{key}: checkpoint tensor of shape {tuple(full.shape)} gives a shard of "
                    f"{tuple(shard.shape)}, but the model (config {_describe(config)}) expects "
                    f"{tuple(param.shape)} on this rank"
                )
            param.copy_(shard.to(param.dtype))


def full_weights(model: FluxModel) -> Iterable[tuple[str, torch.Tensor]]:
    """(global key, full tensor) for this stage's parameters, gathered over TP (all TP ranks)."""
    config = model.config
    group = parallel_state.get_tensor_model_parallel_group()
    world = parallel_state.get_tensor_model_parallel_world_size()
    for name, param in model.named_parameters():
        key = megatron_block_key_to_global(name, model.block_range, config)
        tensor = param.detach()
        if getattr(param, "tensor_model_parallel", False) and world > 1:
            parts = [torch.empty_like(tensor) for _ in range(world)]
            dist.all_gather(parts, tensor.contiguous(), group=group)
            tensor = torch.cat(parts, dim=param.partition_dim)
        yield key, tensor


def _describe(config: FluxConfig) -> str:
    return (
        f"hidden={config.hidden_size}, heads={config.num_attention_heads}, "
        f"double={config.num_double_layers}, single={config.num_single_layers}, "
        f"tp={config.tensor_model_parallel_size}"
    )


def pipeline_seq_length(config: FluxConfig, text_length: int, image_length: int, with_tangent: bool) -> int:
    """The ``seq_length`` to give megatron's pipeline schedules for FLUX's stage activation.

    A stage passes ``[temb; txt; img]`` rows (twice as many with the tangent). megatron divides
    ``seq_length`` by the TP size under sequence parallel, while our temb row is not split, so
    the value is scaled to come out right after that division.
    """
    sp = config.tensor_model_parallel_size if config.sequence_parallel else 1
    local_rows = 1 + (text_length + image_length) // sp
    return (2 if with_tangent else 1) * local_rows * sp
