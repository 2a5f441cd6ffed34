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
from models.flux.state_dict_adapter import (
    CheckpointMismatchError,
    check_key_sets,
    check_shapes,
    megatron_block_key_to_global,
    raise_on_key_mismatch,
)


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


def stage_pieces(config: FluxConfig) -> list[tuple[tuple[int, int], bool, bool]]:
    """(block range, first, last) of this rank's stage in pieces of one block: the first piece of
    the first stage also holds the embedders, the last piece of the last stage the final layer."""
    stage = parallel_state.get_pipeline_model_parallel_rank()
    stages = parallel_state.get_pipeline_model_parallel_world_size()
    start, end = pipeline_block_range(config, stage)
    return [((i, i + 1), stage == 0 and i == start, stage == stages - 1 and i == end - 1) for i in range(start, end)]


def piece_model(config: FluxConfig, piece, device=None) -> FluxModel:
    """This rank's part (its TP shards) of one ``stage_pieces`` entry."""
    block_range, first, last = piece
    with torch.device(device or "cpu"):
        return FluxModel(config, pre_process=first, post_process=last, block_range=block_range)


def teacher_with_fp8_weights(teacher: FluxModel, device) -> FluxModel:
    """The frozen teacher rebuilt with its Transformer Engine linears' weights as FP8 tensors
    (``config.fp8_param``: TE's quantized parameters, scaled by the config's FP8 recipe) and its
    weights copied in: each weight is quantized once, here. The other parameters (embedders,
    norms, the replicated projections) stay in the teacher's dtype. The full-precision teacher
    is dropped by the caller, so the peak holds both for the moment of the copy."""
    import dataclasses

    config = dataclasses.replace(teacher.config, fp8_param=True, perform_initialization=False)
    with torch.no_grad():
        quantized = FluxModel(config, pre_process=teacher.pre_process, post_process=teacher.post_process,
                              block_range=teacher.block_range).to(device)
        sources = dict(teacher.named_parameters())
        for name, param in quantized.named_parameters():
            param.copy_(sources[name])
    return quantized.requires_grad_(False)


def _tp_shard(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    world = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    return full.chunk(world, dim=dim)[rank]


def _copy_full_into(param: torch.Tensor, key: str, full: torch.Tensor, config: FluxConfig) -> None:
    expected = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        expected[param.partition_dim] *= parallel_state.get_tensor_model_parallel_world_size()
    if tuple(full.shape) != tuple(expected):
        raise CheckpointMismatchError(
            f"{key}: checkpoint tensor has shape {tuple(full.shape)}, but the model (config "
            f"{_describe(config)}) expects {tuple(expected)}"
        )
    param.copy_(_tp_shard(full, param).to(param.dtype))


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
            _copy_full_into(param, key, full, config)


def load_streamed_weights(
    model: FluxModel,
    tensors: Iterable[tuple[str, torch.Tensor]],
    on_tensor: Callable[[str, torch.Tensor], None] | None = None,
) -> None:
    """Copies (global key, full tensor) pairs, consumed one at a time, into this rank's shards.

    ``tensors`` is typically ``to_megatron(get, config, block_indices)`` over a lazily read
    checkpoint, so only one tensor (one fused QKV) is in memory besides the model. Every parameter
    of this stage must be given exactly once; keys that are not this stage's are an error.
    """
    config = model.config
    params = {
        megatron_block_key_to_global(name, model.block_range, config): param
        for name, param in model.named_parameters()
    }
    seen: set[str] = set()
    with torch.no_grad():
        for key, full in tensors:
            param = params.get(key)
            if param is None or key in seen:
                problem = "twice" if key in seen else "but this model stage has no such parameter"
                raise CheckpointMismatchError(f"{key!r} was given {problem} (config {_describe(config)})")
            _copy_full_into(param, key, full, config)
            seen.add(key)
            if on_tensor is not None:
                on_tensor(key, full)
    check_key_sets(seen, params, "the converted tensors")


def full_parameter_shapes(model: FluxModel) -> dict[str, tuple[int, ...]]:
    """(global key -> full, TP-unsharded shape) of this stage's parameters; works on meta."""
    world = parallel_state.get_tensor_model_parallel_world_size()
    shapes = {}
    for name, param in model.named_parameters():
        shape = list(param.shape)
        if getattr(param, "tensor_model_parallel", False):
            shape[param.partition_dim] *= world
        shapes[megatron_block_key_to_global(name, model.block_range, model.config)] = tuple(shape)
    return shapes


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


# --------------------------------------------------------------------------- dist checkpoints
#
# A FLUX checkpoint is a megatron dist_checkpointing directory (torch_dist format) plus one JSON
# file naming the architecture. Its tensor keys do not depend on the layout it was saved from
# (see FluxModel.sharded_state_dict), so it loads at any TP / PP / DP size.

CHECKPOINT_INFO_FILE = "mfmegatron_flux.json"
CHECKPOINT_FORMAT = "mfmegatron-flux-dist-checkpoint"


def meta_full_model(config: FluxConfig) -> FluxModel:
    """The whole model (every block, first and last stage parts) on the meta device: shapes only."""
    import dataclasses

    from models.flux.layer_specs import LOCAL_SPEC

    # The local spec whatever the config asks: TE's layers have the same parameters but need CUDA.
    shape_config = dataclasses.replace(config, use_cpu_initialization=True, perform_initialization=False,
                                       fp8_param=False)
    with torch.device("meta"):
        return FluxModel(shape_config, LOCAL_SPEC, block_range=(0, config.num_layers))


def _sharded_tensors(sharded_state_dict: dict) -> dict:
    """checkpoint key -> ShardedTensor (ShardedObjects, i.e. the linears' empty _extra_state, left out)."""
    from megatron.core.dist_checkpointing import ShardedTensor

    return {v.key: v for v in sharded_state_dict.values() if isinstance(v, ShardedTensor)}


def checkpoint_tensor_shapes(config: FluxConfig) -> dict[str, tuple[int, ...]]:
    """checkpoint key -> global shape of every tensor a checkpoint of ``config`` holds."""
    return {k: tuple(v.global_shape) for k, v in _sharded_tensors(meta_full_model(config).sharded_state_dict()).items()}


def save_dist_checkpoint(model: FluxModel, directory, diffusers_config: dict, pieces=None, **info) -> int | None:
    """Saves this stage's shards into ``directory``; every rank of the job calls it.

    ``diffusers_config`` (the architecture, as diffusers' config.json) and ``info`` go into
    ``mfmegatron_flux.json`` next to megatron's files. ``pieces`` (``conversion.CheckpointPiece``,
    e.g. from ``stage_pieces``): ``model`` may be on the meta device (it gives the plan) and the
    data come from the pieces, one in memory at a time; returns how many piece loads that took.
    """
    from pathlib import Path

    from megatron.core import dist_checkpointing

    from mfmegatron.conversion import save_dist_checkpoint_in_pieces

    directory = Path(directory)
    rank = dist.get_rank()
    # Every rank checks (before any collective), so a bad directory is an error everywhere, not a hang.
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise FileExistsError(f"checkpoint directory {directory} exists and is not empty")
    dist.barrier()
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    piece_loads = None
    if pieces is None:
        dist_checkpointing.save(model.sharded_state_dict(), str(directory))
    else:
        piece_loads = save_dist_checkpoint_in_pieces(model.sharded_state_dict(), directory, pieces)
    if rank == 0:
        (directory / CHECKPOINT_INFO_FILE).write_text(checkpoint_info_json(model.config, diffusers_config, **info))
    dist.barrier()
    return piece_loads


def checkpoint_info_json(config: FluxConfig, diffusers_config: dict, **info) -> str:
    """The text of ``mfmegatron_flux.json``: the architecture (as diffusers' config.json), the
    parameters' dtype and ``info``. A training checkpoint adds ``weight_prefixes``: the key
    prefixes its FLUX weights are stored under (the EMA's first), which export strips."""
    import json

    record = {
        "format": CHECKPOINT_FORMAT,
        "version": 1,
        "dtype": str(config.params_dtype).removeprefix("torch."),
        "diffusers_config": diffusers_config,
        **info,
    }
    return json.dumps(record, indent=2) + "\n"


def read_checkpoint_info(directory) -> dict:
    """The ``mfmegatron_flux.json`` record of a checkpoint directory (architecture and dtype)."""
    import json
    from pathlib import Path

    path = Path(directory) / CHECKPOINT_INFO_FILE
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} is not an mfmegatron FLUX checkpoint (no {CHECKPOINT_INFO_FILE})"
        )
    record = json.loads(path.read_text())
    if record.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointMismatchError(f"{path}: format {record.get('format')!r} is not {CHECKPOINT_FORMAT!r}")
    return record


def flux_config_from_checkpoint(directory, **overrides) -> FluxConfig:
    """The FluxConfig of a checkpoint's architecture; ``overrides`` set the rest (parallel sizes,
    dtype: by default the stored one)."""
    from models.flux.state_dict_adapter import flux_config_from_diffusers

    record = read_checkpoint_info(directory)
    dtype = getattr(torch, record["dtype"])
    settings = dict(params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16)
    settings.update(overrides)
    if settings.get("pipeline_model_parallel_size", 1) > 1:
        settings.setdefault("pipeline_dtype", settings["params_dtype"])
    return flux_config_from_diffusers(record["diffusers_config"], **settings)


def weights_prefix(directory) -> str:
    """The key prefix of a checkpoint's FLUX weights: "" for a converted checkpoint, the first of
    ``weight_prefixes`` (the EMA's when it has one) for a training checkpoint."""
    return (read_checkpoint_info(directory).get("weight_prefixes") or [""])[0]


def check_dist_checkpoint(model: FluxModel, directory) -> dict:
    """Compares a checkpoint's tensor keys and global shapes with this stage's; returns its metadata.

    Missing keys (this stage needs them) and keys no stage of this config has are errors that list
    the keys; a shape difference names the key and both shapes. A training checkpoint is compared
    on its ``weights_prefix`` weights (its other networks and optimizer state are not ours).
    """
    from megatron.core import dist_checkpointing

    prefix = weights_prefix(directory)
    metadata = dist_checkpointing.load_tensors_metadata(str(directory))
    found = {k.removeprefix(prefix): tuple(v.global_shape) for k, v in metadata.items() if k.startswith(prefix)}
    ours = _sharded_tensors(model.sharded_state_dict())
    hint = f" (checkpoint {directory}; model config {_describe(model.config)})"
    missing = set(ours) - set(found)
    unexpected = set(found) - set(checkpoint_tensor_shapes(model.config))
    raise_on_key_mismatch(missing, unexpected, f"checkpoint {directory}", hint)
    check_shapes(found, {k: tuple(v.global_shape) for k, v in ours.items()}, f"checkpoint {directory}", hint)
    return metadata


def load_dist_checkpoint(model: FluxModel, directory) -> None:
    """Loads a checkpoint saved at any layout into this stage's shards (every rank calls it): a
    converted one, or a training checkpoint's EMA (else its trained network), e.g. a teacher
    trained with ``train.objective=flow_matching``."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding

    check_dist_checkpoint(model, directory)
    prefix = weights_prefix(directory)
    sharded = model.sharded_state_dict()
    if prefix:
        # A training checkpoint's EMA holds the parameters only (no layers' extra state).
        parameters = dict(model.named_parameters())
        sharded = {name: entry for name, entry in sharded.items() if name in parameters}
        replace_prefix_for_sharding(sharded, "", prefix)
    loaded = dist_checkpointing.load(sharded, str(directory))
    # A training checkpoint's common state (step, optimizer settings) comes back too.
    loaded = {name: value for name, value in loaded.items() if name in sharded}
    missing, unexpected = model.load_state_dict(loaded, strict=False)
    left_out = [name for name in missing if not (prefix and name.endswith("_extra_state"))]
    if left_out or unexpected:
        raise CheckpointMismatchError(f"checkpoint {directory}: missing {left_out[:3]}, unexpected {unexpected[:3]}")
