"""Writing diffusers folders: the transformer's safetensors shards and, for a MeanFlow student, its
interval embedder (``interval_embedder.py``).

Two ways in:

- ``tools/convert_flux.py export`` reads a dist checkpoint (any layout) a block at a time and
  writes through ``write_shards``;
- ``export_to_diffusers(model, output)`` exports a model in memory (e.g. the trainer at the end of
  training): every rank calls it, tensor-parallel weights are gathered one tensor at a time and
  the first data-parallel replica's tensor-parallel rank 0 writes.

An exported student folder loads with ``FluxTransformer2DModel.from_pretrained`` (the teacher
architecture; the extra files are ignored) and with ``MeanFlowFluxPipeline.from_pretrained``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from mfmegatron import conversion
from mfmegatron.conversion import plan_shards
from models.flux import interval_embedder

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = DIFFUSERS_WEIGHTS + ".index.json"
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9


def shard_file_names(count: int) -> list[str]:
    return conversion.shard_file_names(count, DIFFUSERS_WEIGHTS)


def write_shards(
    output: Path,
    pairs: Iterable[tuple[str, torch.Tensor]],
    planned: list[tuple[str, int]],
    shards: list[list[str]],
    dtype: torch.dtype | None = None,
    on_tensor: Callable[[int], None] | None = None,
) -> None:
    """``mfmegatron.conversion.write_shards`` with diffusers' file names."""
    conversion.write_shards(output, pairs, planned, shards, DIFFUSERS_WEIGHTS, dtype, on_tensor)


def write_config(output: Path, diffusers_config: dict) -> None:
    (output / "config.json").write_text(json.dumps(diffusers_config, indent=2, sort_keys=True) + "\n")
    field = interval_embedder.TIME_EMBEDDING_SCALE_FIELD
    if field in diffusers_config:
        # One line, also under --quiet: the folder is valid for mfmegatron only.
        print(f"warning: {output} embeds time as sinusoid({diffusers_config[field]:g}·t), not FLUX's 1000·t; "
              f"diffusers' FluxTransformer2DModel ignores {field} and would compute 1000·t: load it with "
              "mfmegatron-convert-flux import, not a diffusers pipeline", file=sys.stderr, flush=True)


def write_interval_embedder(output: Path, get: Callable[[str], torch.Tensor], dtype: torch.dtype | None = None,
                            num_channels: int = 256, input_scale: float = 1000.0) -> None:
    """The student's ``interval_in.*`` tensors (fetched by our key) as ``interval_embedder.*``."""
    from models.flux.state_dict_adapter import interval_from_megatron

    tensors = {key: (t if dtype is None else t.to(dtype)) for key, t in interval_from_megatron(get)}
    interval_embedder.save(output, tensors, num_channels=num_channels, input_scale=input_scale)


def checkpoint_is_student(directory) -> bool:
    """Whether a FLUX dist checkpoint is a MeanFlow student's (it holds ``interval_in.*``); build
    its model with ``flux_config_from_checkpoint(directory, mean_flow_student=True, ...)``."""
    from megatron.core import dist_checkpointing

    from models.flux.state_dict_adapter import is_student_keys

    return is_student_keys(dist_checkpointing.load_tensors_metadata(str(directory)))


# --------------------------------------------------------------------------- in-memory export


def export_to_diffusers(
    model,
    output,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
) -> Path | None:
    """Exports a whole ``FluxModel`` (teacher or MeanFlow student) to a diffusers folder.

    Every rank of the job calls it (collectives over the tensor-parallel group); the writer is
    tensor-parallel rank 0 of data-parallel replica 0, which returns the folder (others return
    None). ``dtype``: of the written tensors (default: the parameters'). A student
    (``config.mean_flow_student``) also gets ``interval_embedder.safetensors`` / ``.json``.
    Pipeline parallelism is not supported here: save a dist checkpoint and run
    ``mfmegatron-convert-flux export`` on it (that path reads any layout).
    """
    from megatron.core import parallel_state

    from models.flux.parallelize import full_parameter_shapes
    from models.flux.state_dict_adapter import (
        diffusers_config_from_flux,
        from_megatron,
        megatron_block_key_to_global,
    )

    config = model.config
    if not (model.pre_process and model.post_process) or tuple(model.block_range) != (0, config.num_layers):
        raise ValueError(
            "export_to_diffusers needs the whole model on each rank (no pipeline parallelism); save a "
            "dist checkpoint and convert it with `mfmegatron-convert-flux export` instead"
        )
    output = Path(output)
    # Every rank checks (before any collective), so a bad output is an error everywhere, not a hang.
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"output {output} already exists and is not an empty directory")
    # ... and only then does the writer start: a rank that checked late would see its files.
    dist.barrier()
    diffusers_config = diffusers_config_from_flux(config)

    dp_rank = parallel_state.get_data_parallel_rank(with_context_parallel=True)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_world = parallel_state.get_tensor_model_parallel_world_size()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    writer = dp_rank == 0 and tp_rank == 0
    params = {
        megatron_block_key_to_global(name, model.block_range, config): param
        for name, param in model.named_parameters()
    }

    def get(key: str) -> torch.Tensor:
        param = params[key].detach()
        if getattr(params[key], "tensor_model_parallel", False) and tp_world > 1:
            parts = [torch.empty_like(param) for _ in range(tp_world)]
            dist.all_gather(parts, param.contiguous(), group=tp_group)
            return torch.cat(parts, dim=params[key].partition_dim)
        return param

    if dp_rank == 0:  # one replica's TP group gathers; the other replicas hold the same weights
        shapes = full_parameter_shapes(model)

        def meta(key):
            return torch.empty(shapes[key], dtype=dtype or params[key].dtype, device="meta")

        planned = [(key, t.numel() * t.element_size()) for key, t in from_megatron(meta, config)]
        shards = plan_shards(planned, max_shard_size)
        if writer:
            output.mkdir(parents=True, exist_ok=True)
            write_shards(output, from_megatron(get, config), planned, shards, dtype)
            write_config(output, diffusers_config)
            if config.mean_flow_student:
                write_interval_embedder(output, get, dtype, config.timestep_embedding_dim, config.time_embedding_scale)
        else:
            for _ in from_megatron(get, config):  # take part in the gathers
                pass
    dist.barrier()
    return output if writer else None
