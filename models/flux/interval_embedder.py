"""The exported MeanFlow student's interval embedding: file names, JSON description, reading and
writing (torch + safetensors only; neither megatron-core nor diffusers is needed here).

A student export is a diffusers ``FluxTransformer2DModel`` folder (the teacher architecture:
``config.json`` and ``diffusion_pytorch_model*.safetensors``) plus two files::

    interval_embedder.safetensors   linear_1.weight [D, 256], linear_1.bias [D],
                                    linear_2.weight [D, D],   linear_2.bias [D]
    interval_embedder.json          what it is and how it is applied (see ``describe``)

The tensors are a diffusers ``TimestepEmbedding(in_channels=256, time_embed_dim=D)`` (linear,
SiLU, linear), the same structure as FLUX's ``time_text_embed.timestep_embedder``. It embeds the
interval ``h = t - r`` (t, r sigmas in [0, 1], t >= r) as ``Timesteps(256, flip_sin_to_cos=True,
downscale_freq_shift=0)`` of ``1000 * h``, and its output is added to the conditioning vector
``temb = time_text_embed(timestep, [guidance,] pooled_projections)`` before the transformer blocks.
``FluxTransformer2DModel.from_pretrained`` ignores the two extra files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

WEIGHTS_NAME = "interval_embedder.safetensors"
CONFIG_NAME = "interval_embedder.json"
FORMAT = "mfmegatron-meanflow-interval-embedder"
KEYS = ("linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias")


# The project's own transformer config.json field for a time-embedding scale other than FLUX's
# 1000 (``FluxConfig.time_embedding_scale``). diffusers' FluxTransformer2DModel hard-codes 1000 and
# ignores the field: such a folder is for this project's importer, not for diffusers pipelines (the
# export warns, MeanFlowFluxPipeline refuses). Here, beside the other exported-folder format, so
# that the pipeline needs no megatron import.
TIME_EMBEDDING_SCALE_FIELD = "mfmegatron_time_embedding_scale"


class IntervalEmbedderFormatError(ValueError):
    """The interval embedder files are missing, malformed or do not fit the transformer."""


def describe(embedding_dim: int, num_channels: int = 256, input_scale: float = 1000.0) -> dict:
    """The JSON record written next to the weights: the architecture and how it is applied
    (``input_scale``: the model's ``time_embedding_scale``, FLUX's 1000)."""
    s = f"{input_scale:g}"
    return {
        "format": FORMAT,
        "version": 1,
        "description": (
            "MeanFlow student interval embedding (mfmegatron, arXiv 2605.17834): the distilled FLUX "
            "predicts the average velocity u(z_t, r, t); this module embeds h = t - r and is added to "
            "the FLUX conditioning vector temb. One sampling jump is z_r = z_t - (t - r) * u."
        ),
        "module": "diffusers.models.embeddings.TimestepEmbedding",
        "embedding_dim": embedding_dim,
        "num_channels": num_channels,
        "act_fn": "silu",
        "sinusoid": {"flip_sin_to_cos": True, "downscale_freq_shift": 0, "max_period": 10000},
        "input": f"{s} * (t - r), with t >= r sigmas in [0, 1] (t = 1 is noise)",
        "input_scale": float(input_scale),
        "applied": (
            f"temb = transformer.time_text_embed({s} * t, [{s} * guidance,] pooled_projections) "
            f"+ linear_2(silu(linear_1(sinusoid({s} * (t - r)))))"
        ),
        "weights": WEIGHTS_NAME,
        "keys": list(KEYS),
    }


def expected_shapes(embedding_dim: int, num_channels: int = 256) -> dict[str, tuple[int, ...]]:
    d = embedding_dim
    return {
        "linear_1.weight": (d, num_channels),
        "linear_1.bias": (d,),
        "linear_2.weight": (d, d),
        "linear_2.bias": (d,),
    }


def has_interval_embedder(folder) -> bool:
    """Whether ``folder`` (a transformer folder) holds a student's interval embedder."""
    return (Path(folder) / CONFIG_NAME).is_file()


def save(folder, tensors: dict[str, torch.Tensor], num_channels: int = 256, input_scale: float = 1000.0) -> None:
    """Writes ``interval_embedder.safetensors`` and ``interval_embedder.json`` into ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if set(tensors) != set(KEYS):
        raise IntervalEmbedderFormatError(f"interval embedder tensors must be {KEYS}, got {sorted(tensors)}")
    embedding_dim = tensors["linear_1.weight"].shape[0]
    _check_shapes({k: tuple(v.shape) for k, v in tensors.items()}, embedding_dim, num_channels, "tensors")
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: tensors[k].detach().to("cpu").contiguous().clone() for k in KEYS},
        str(folder / WEIGHTS_NAME),
        metadata={"format": "pt"},
    )
    record = describe(embedding_dim, num_channels, input_scale)
    (folder / CONFIG_NAME).write_text(json.dumps(record, indent=2) + "\n")


def read_config(folder) -> dict:
    """The checked JSON record of ``folder``'s interval embedder."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise IntervalEmbedderFormatError(
            f"{folder}: no {CONFIG_NAME}; this is not an exported MeanFlow student (a plain FLUX "
            "transformer has no interval embedding)"
        )
    record = json.loads(path.read_text())
    if record.get("format") != FORMAT:
        raise IntervalEmbedderFormatError(f"{path}: format {record.get('format')!r} is not {FORMAT!r}")
    return record


def load(folder) -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON record, tensors) of ``folder``'s interval embedder, keys and shapes checked."""
    from safetensors.torch import load_file

    record = read_config(folder)
    weights = Path(folder) / record.get("weights", WEIGHTS_NAME)
    if not weights.is_file():
        raise IntervalEmbedderFormatError(f"{folder}: {CONFIG_NAME} names {weights.name}, which does not exist")
    tensors = load_file(str(weights))
    if set(tensors) != set(KEYS):
        raise IntervalEmbedderFormatError(f"{weights}: keys {sorted(tensors)} are not {list(KEYS)}")
    _check_shapes({k: tuple(v.shape) for k, v in tensors.items()}, record["embedding_dim"],
                  record.get("num_channels", 256), str(weights))
    return record, tensors


def _check_shapes(found: dict, embedding_dim: int, num_channels: int, what: str) -> None:
    for key, shape in expected_shapes(embedding_dim, num_channels).items():
        if found[key] != shape:
            raise IntervalEmbedderFormatError(
                f"{what}: {key!r} has shape {found[key]}, expected {shape} (embedding_dim={embedding_dim})"
            )
