"""How the HunyuanImage 3.0 trunk is laid out over ranks: expert, tensor and pipeline parallel.

Full (unsharded) weights use ``state_dict_adapter``'s names, with the global expert index.
An expert-parallel rank of size ``ep`` holds experts ``[r * E/ep, (r + 1) * E/ep)`` as
``local_experts.0 ..`` (megatron's ``SequentialMLP`` order). Tensor-parallel weights are split
along megatron's ``partition_dim`` (routed experts over the expert-tensor-parallel group, the rest
over TP): ``linear_qkv`` rows are whole KV groups, the embedding and ``lm_head`` vocab rows. A
SwiGLU ``linear_fc1`` (``[gate; up]`` in full) is split per half: rank ``r`` holds
``[gate_r; up_r]``, as megatron's GLU chunks its local output in two.
Pipeline stages hold contiguous layer ranges (``pipeline_layer_range``: an even split, or the
config's explicit ``pipeline_layers``); full names use global layer indices. Tensor parallel
runs with or without sequence parallel (without it, each TP rank dispatches its share of the
replicated tokens to the routed experts: ``mfmegatron.jvp.moe``).

``check_layout`` says, in one line and before any process group or model exists, why a layout
cannot hold the model (every rank computes the same answer from the same config, so no rank is
left waiting in a collective).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable

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


class LayoutError(ValueError):
    """A parallel layout that cannot hold the model; the message is one line."""


def check_layout(
    config: HunyuanImage3Config,
    *,
    tp: int | None = None,
    ep: int | None = None,
    pp: int | None = None,
    etp: int | None = None,
    sequence_parallel: bool | None = None,
    pipeline_layers=None,
    seq_length: int | None = None,
) -> None:
    """Raises LayoutError (one line) if the model cannot be split this way. Sizes default to the
    config's; ``etp`` (expert tensor parallel) defaults to ``tp`` (megatron's default);
    ``seq_length``: checked only when known.

    The rules: TP splits whole KV groups (TP divides the groups, hence TP <= groups), the heads,
    the vocabulary rows and the shared expert; under sequence parallel the sequence splits into
    TP chunks; EP divides the experts; expert TP splits each expert's gate and up
    halves; PP divides the layers unless ``pipeline_layers`` names each stage's count."""
    tp = config.tensor_model_parallel_size if tp is None else tp
    ep = config.expert_model_parallel_size if ep is None else ep
    pp = config.pipeline_model_parallel_size if pp is None else pp
    if etp is None:
        # The config's own expert TP when checking the config's TP; megatron's default (= TP) when
        # asked about another TP.
        same_tp = tp == config.tensor_model_parallel_size
        etp = (config.expert_tensor_parallel_size if same_tp else None) or tp
    sequence_parallel = config.sequence_parallel if sequence_parallel is None else sequence_parallel
    if pipeline_layers is None:
        pipeline_layers = config.pipeline_layers
    layout = f"tp={tp} ep={ep} pp={pp} etp={etp}"
    groups, heads, experts = config.num_query_groups, config.num_attention_heads, config.num_moe_experts
    layers, vocab = config.num_layers, config.vocab_size
    problems = []
    for name, size in (("tensor", tp), ("expert", ep), ("pipeline", pp), ("expert tensor", etp)):
        if not isinstance(size, int) or size < 1:
            problems.append(f"the {name} parallel size must be a positive integer, not {size!r}")
    if not problems:
        if groups % tp:
            problems.append(f"tensor parallel {tp} does not divide the {groups} KV groups (a rank holds whole "
                            f"groups: use a divisor of {groups})")
        elif heads % tp:
            problems.append(f"tensor parallel {tp} does not divide the {heads} attention heads")
        if vocab % tp:
            problems.append(f"tensor parallel {tp} does not divide the vocabulary of {vocab} rows")
        if config.moe_shared_expert_intermediate_size and config.moe_shared_expert_intermediate_size % tp:
            problems.append(f"tensor parallel {tp} does not divide the shared expert's width "
                            f"{config.moe_shared_expert_intermediate_size}")
        if tp > 1 and sequence_parallel and seq_length is not None and seq_length % tp:
            problems.append(f"sequence parallel splits the sequence in {tp}: length {seq_length} is not a multiple")
        if experts % ep:
            problems.append(f"expert parallel {ep} does not divide the {experts} experts")
        if config.moe_ffn_hidden_size % etp:
            problems.append(f"expert tensor parallel {etp} does not divide the expert width {config.moe_ffn_hidden_size}")
        if pipeline_layers is not None:
            stages = list(pipeline_layers)
            if len(stages) != pp or sum(stages) != layers or min(stages, default=0) < 1:
                problems.append(f"pipeline_layers {stages} must give each of the {pp} stages at least one layer "
                                f"and sum to the {layers} layers")
        elif layers % pp:
            problems.append(f"pipeline parallel {pp} does not divide the {layers} layers (give an explicit "
                            f"stage list, e.g. pipeline_layers={_uneven_example(layers, pp)})")
    if problems:
        raise LayoutError(f"HunyuanImage 3.0 cannot be split {layout}: " + "; ".join(problems))


def _uneven_example(layers: int, stages: int) -> list[int]:
    base, extra = divmod(layers, stages)
    return [base + (1 if stage < extra else 0) for stage in range(stages)]


def pipeline_layer_range(config: HunyuanImage3Config, stage: int) -> tuple[int, int]:
    """Layers [start, end) of pipeline stage ``stage``: ``config.pipeline_layers`` if given, else
    an even split (the last stage also runs ``ln_f`` and ``lm_head``)."""
    if config.pipeline_layers is not None:
        counts = list(config.pipeline_layers)
    else:
        counts = _uneven_example(config.num_layers, config.pipeline_model_parallel_size)
    start = sum(counts[:stage])
    return start, start + counts[stage]


def build_hunyuan_model(config: HunyuanImage3Config) -> HunyuanImage3Model:
    """This rank's model, or its pipeline stage of it. The layout is checked first (one line)."""
    check_layout(config)
    _check_supported_layout(config)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    stages = parallel_state.get_pipeline_model_parallel_world_size()
    return HunyuanImage3Model(
        config, pre_process=stage == 0, post_process=stage == stages - 1,
        layer_range=pipeline_layer_range(config, stage),
    )


def mark_routed_experts(model: HunyuanImage3Model) -> HunyuanImage3Model:
    """Gives the routed experts megatron's expert treatment at every layout (``allreduce=False``:
    their own gradient buckets and optimizer, reduced over the expert-data-parallel group), which
    megatron gives them only under expert parallelism. The trainer's optimizer is then chained
    (dense, experts) at every layout, so its checkpoint resumes at another EP size. At EP=1 the
    expert-data-parallel group is the data-parallel group: the same reduction."""
    for name, param in model.named_parameters():
        if ".mlp.experts." in name:
            param.allreduce = False
    return model


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


def full_shape(key: str, param: torch.Tensor) -> tuple[int, ...]:
    """The full (TP-unsharded) shape of this rank's ``param`` named ``key``."""
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= _tp_world_and_rank(key)[0]
    return tuple(shape)


def load_weights(
    model: HunyuanImage3Model,
    get_full: Callable[[str], torch.Tensor],
    on_tensor: Callable[[str, torch.Tensor], None] | None = None,
) -> None:
    """Fills this rank's parameters in place from full tensors fetched one at a time by
    ``get_full(full name)`` (``state_dict_adapter`` names): only this rank's experts and this
    stage's layers are asked for, so memory holds one full tensor besides the model. A shape
    that does not fit raises CheckpointMismatchError naming the key and both shapes."""
    _check_supported_layout(model.config)
    offset = _expert_offset(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            key = local_to_global_key(name, offset, model.layer_range[0])
            full = get_full(key)
            if tuple(full.shape) != full_shape(key, param):
                raise CheckpointMismatchError(
                    f"{key}: the checkpoint tensor has shape {tuple(full.shape)}, the model expects "
                    f"{full_shape(key, param)}"
                )
            param.copy_(shard_full_tensor(key, full, param).to(param.dtype))
            if on_tensor is not None:
                on_tensor(key, full)


def load_full_weights(model: HunyuanImage3Model, full: dict) -> None:
    """Copies full tensors (``state_dict_adapter`` names) into this rank's parameters."""
    offset = _expert_offset(model)
    expected = {local_to_global_key(name, offset, model.layer_range[0]) for name, _ in model.named_parameters()}
    # Other ranks' experts and other stages' parts are in the full dict too; only keys missing
    # here or belonging to no rank are errors.
    everywhere = set(_full_names(model.config))
    check_key_sets(set(full) & (expected | (set(full) - everywhere)), expected, "the full HunyuanImage 3.0 weights")
    load_weights(model, full.__getitem__)


def local_weights(model: HunyuanImage3Model) -> Iterable[tuple[str, torch.Tensor]]:
    """This rank's parameters under their full names (layers and experts by global index)."""
    offset = _expert_offset(model)
    for name, param in model.named_parameters():
        yield local_to_global_key(name, offset, model.layer_range[0]), param.detach()


def _full_names(config: HunyuanImage3Config) -> list[str]:
    from models.hunyuan_image3.state_dict_adapter import megatron_keys

    return megatron_keys(config, image_head=config.image_path)


# --------------------------------------------------------------------------- dist checkpoints
#
# A HunyuanImage 3.0 checkpoint is a megatron dist_checkpointing directory (torch_dist format)
# plus one JSON file: the released config.json's fields (the architecture) and the dtype. Its
# tensor keys are global (every expert on an expert axis, layers by global index), so it loads at
# any TP / EP / PP size and exports the same whatever layout wrote it.

CHECKPOINT_INFO_FILE = "mfmegatron_hunyuan_image3.json"
CHECKPOINT_FORMAT = "mfmegatron-hunyuan-image3-dist-checkpoint"


def save_dist_checkpoint(model: HunyuanImage3Model, directory, hf_config: dict, pieces=None, **info) -> int | None:
    """Saves this rank's part into the existing ``directory``; every rank of the job calls it.
    ``hf_config`` and ``info`` go into ``CHECKPOINT_INFO_FILE`` (written last, by rank 0).
    ``pieces`` (``conversion.CheckpointPiece``, e.g. from ``stage_pieces``): ``model`` may be on the
    meta device (it gives the plan) and the data come from the pieces, one in memory at a time;
    returns how many piece loads that took (None without pieces)."""
    import json
    from pathlib import Path

    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from mfmegatron.conversion import save_dist_checkpoint_in_pieces

    piece_loads = None
    if pieces is None:
        dist_checkpointing.save(model.sharded_state_dict(), str(directory))
    else:
        piece_loads = save_dist_checkpoint_in_pieces(model.sharded_state_dict(), directory, pieces)
    if dist.get_rank() == 0:
        record = {
            "format": CHECKPOINT_FORMAT,
            "version": 1,
            "dtype": str(model.config.params_dtype).removeprefix("torch."),
            "hf_config": hf_config,
            **info,
        }
        (Path(directory) / CHECKPOINT_INFO_FILE).write_text(json.dumps(record, indent=2) + "\n")
    dist.barrier()
    return piece_loads


def read_checkpoint_info(directory) -> dict:
    """The ``CHECKPOINT_INFO_FILE`` record of a checkpoint directory (architecture and dtype)."""
    import json
    from pathlib import Path

    path = Path(directory) / CHECKPOINT_INFO_FILE
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a complete mfmegatron HunyuanImage 3.0 checkpoint (no {CHECKPOINT_INFO_FILE})")
    record = json.loads(path.read_text())
    if record.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointMismatchError(f"{path}: format {record.get('format')!r} is not {CHECKPOINT_FORMAT!r}")
    return record


def checkpoint_tensor_shapes(config: HunyuanImage3Config) -> dict[str, tuple[int, ...]]:
    """checkpoint key -> global shape of every tensor a checkpoint of ``config`` holds."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    shapes = {}
    for value in meta_full_model(config).sharded_state_dict().values():
        if isinstance(value, ShardedTensorFactory):  # a SwiGLU fc1: gate and up under one key
            value = value.build()
        for item in nested_values(value) if isinstance(value, (dict, list)) else [value]:
            if isinstance(item, ShardedTensor):
                shapes[item.key] = tuple(item.global_shape)
    return shapes


def export_pieces(config: HunyuanImage3Config) -> list[tuple[tuple[int, int], bool, bool]]:
    """(layer range, first stage, last stage) of the one-layer models export loads in turn: the
    first also holds what precedes the layers, the last what follows them."""
    last = config.num_layers - 1
    return [((i, i + 1), i == 0, i == last) for i in range(config.num_layers)]


def stage_pieces(config: HunyuanImage3Config) -> list[tuple[tuple[int, int], bool, bool]]:
    """``export_pieces`` for this rank's pipeline stage: one layer each, the first also holding
    what precedes the layers on the first stage, the last what follows them on the last."""
    stage = parallel_state.get_pipeline_model_parallel_rank()
    stages = parallel_state.get_pipeline_model_parallel_world_size()
    start, end = pipeline_layer_range(config, stage)
    return [((i, i + 1), stage == 0 and i == start, stage == stages - 1 and i == end - 1) for i in range(start, end)]


def piece_model(config: HunyuanImage3Config, piece, device=None) -> HunyuanImage3Model:
    """This rank's part (its TP shards, its experts) of one ``stage_pieces`` entry, at the
    config's layout; parameters as the config allocates them."""
    layer_range, first, last = piece
    with torch.device(device or "cpu"):
        return HunyuanImage3Model(config, pre_process=first, post_process=last, layer_range=layer_range)


def one_layer_model(config: HunyuanImage3Config, piece, device=None) -> HunyuanImage3Model:
    """A world-of-one model of one ``export_pieces`` entry (its layer and, on the first / last
    piece, the parts before / after the layers), parameters allocated but not initialised."""
    layer_range, first, last = piece
    piece_config = dataclasses.replace(
        config, use_cpu_initialization=True, perform_initialization=False, tensor_model_parallel_size=1,
        expert_model_parallel_size=1, expert_tensor_parallel_size=1, pipeline_model_parallel_size=1,
        sequence_parallel=False, pipeline_layers=None,
    )
    with torch.device(device or "cpu"):
        return HunyuanImage3Model(piece_config, pre_process=first, post_process=last, layer_range=layer_range)
