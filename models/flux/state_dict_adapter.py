"""Mapping between diffusers' FluxTransformer2DModel state dict and ours (full, unsharded), and
from the original BFL single-file layout to diffusers' (then on through ``to_megatron``).

``to_megatron`` / ``from_megatron`` convert whole tensors; sharding over tensor-parallel ranks and
selecting a pipeline stage's blocks happen in ``parallelize.py``. Differences in layout:

- Q, K and V (separate in diffusers) are one ``linear_qkv`` with per-head layout
  ``[head][q, k, v][head_dim]`` so that a contiguous TP split gives whole heads.
- The single block's ``proj_out`` over ``cat(attention, mlp)`` is two row-parallel layers,
  ``linear_attn_out`` (no bias) and ``linear_mlp_out`` (carries the bias).
- ``norm_out`` keeps diffusers' chunk order (scale, shift).

Both directions are pure re-layouts: export after import is bit-exact. The BFL layout
(``flux1-dev.safetensors``) differs from diffusers' in names, in fused tensors (QKV; the single
block's ``linear1`` = [q; k; v; mlp_in]) and in the final adaLN's chunk order (shift, scale); it is
expressed as where each diffusers tensor lives in a BFL file (``bfl_pieces``), so there is one
diffusers <-> megatron mapping. Also here: diffusers config.json <-> FluxConfig, and the key /
shape checks that name what does not fit.

A MeanFlow student's interval embedding (``interval_in.*``) has no diffusers counterpart: it is
exported as its own ``TimestepEmbedding`` file (``interval_from_megatron`` / ``interval_to_megatron``,
file format in ``interval_embedder.py``); ``to_megatron`` / ``from_megatron`` cover the rest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from models.flux import interval_embedder as interval_format
from models.flux.config import FluxConfig


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the config: names the key and the shapes."""


def _interleave_qkv(q, k, v, head_dim: int):
    """[n*d, ...] x3 -> [n, 3, d, ...] -> [3*n*d, ...]."""
    return torch.stack([t.unflatten(0, (-1, head_dim)) for t in (q, k, v)], dim=1).flatten(0, 2)


def _split_qkv(qkv, head_dim: int):
    parts = qkv.unflatten(0, (-1, 3, head_dim)).unbind(1)
    return tuple(p.flatten(0, 1).contiguous() for p in parts)


# Per-block renames (diffusers suffix -> ours); QKV and proj_out are handled separately.
_DOUBLE_RENAMES = {
    "norm1.linear": "img_mod.linear",
    "norm1_context.linear": "txt_mod.linear",
    "attn.norm_q": "img_attn.q_layernorm",
    "attn.norm_k": "img_attn.k_layernorm",
    "attn.norm_added_q": "txt_attn.q_layernorm",
    "attn.norm_added_k": "txt_attn.k_layernorm",
    "attn.to_out.0": "img_attn_proj",
    "attn.to_add_out": "txt_attn_proj",
    "ff.net.0.proj": "img_mlp.linear_fc1",
    "ff.net.2": "img_mlp.linear_fc2",
    "ff_context.net.0.proj": "txt_mlp.linear_fc1",
    "ff_context.net.2": "txt_mlp.linear_fc2",
}
_DOUBLE_QKV = {"img_attn.linear_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
               "txt_attn.linear_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_SINGLE_RENAMES = {
    "norm.linear": "mod.linear",
    "attn.norm_q": "attn.q_layernorm",
    "attn.norm_k": "attn.k_layernorm",
    "proj_mlp": "linear_mlp_in",
}
_SINGLE_QKV = {"attn.linear_qkv": ("attn.to_q", "attn.to_k", "attn.to_v")}
_TOP_RENAMES = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.mlp.linear_1",
    "time_text_embed.timestep_embedder.linear_2": "time_in.mlp.linear_2",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.mlp.linear_1",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.mlp.linear_2",
    "time_text_embed.text_embedder.linear_1": "vector_in.linear_1",
    "time_text_embed.text_embedder.linear_2": "vector_in.linear_2",
    "norm_out.linear": "final_mod.linear",
    "proj_out": "final_proj",
}


def _top_level_renames(config: FluxConfig) -> dict[str, str]:
    renames = dict(_TOP_RENAMES)
    if not config.guidance_embeds:
        renames = {k: v for k, v in renames.items() if "guidance" not in k}
    return renames


def diffusers_keys(config: FluxConfig) -> list[str]:
    """Every key a diffusers FluxTransformer2DModel with this config has."""
    keys = []
    for old in _top_level_renames(config):
        keys += [f"{old}.weight", f"{old}.bias"]
    for index in range(config.num_layers):
        prefix, _, renames, qkv = _block_layout(index, config)
        for old in renames:
            keys.append(prefix + old + ".weight")
            if "norm_" not in old:
                keys.append(prefix + old + ".bias")
        for sources in qkv.values():
            for source in sources:
                keys += [prefix + source + ".weight", prefix + source + ".bias"]
        if index >= config.num_double_layers:
            keys += [prefix + "proj_out.weight", prefix + "proj_out.bias"]
    return keys


def _block_layout(index: int, config: FluxConfig) -> tuple[str, str, dict, dict]:
    """For global block ``index``: diffusers' key prefix, ours, and the rename and QKV tables."""
    if index < config.num_double_layers:
        return f"transformer_blocks.{index}.", f"double_blocks.{index}.", _DOUBLE_RENAMES, _DOUBLE_QKV
    single = index - config.num_double_layers
    return (
        f"single_transformer_blocks.{single}.", f"single_blocks.{single}.", _SINGLE_RENAMES, _SINGLE_QKV
    )


def to_megatron(
    get: Callable[[str], torch.Tensor], config: FluxConfig, block_indices: range | None = None,
    top_level: bool = True,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (our key, tensor) from diffusers tensors fetched one at a time by ``get(key)``.

    Streaming (a getter, a generator) lets a 12B conversion hold a block at a time.
    ``block_indices`` restricts the blocks (global indices, doubles first); the top-level weights
    (embedders, final layer) come first unless ``top_level`` is False.
    """
    h = config.hidden_size
    head_dim = config.kv_channels
    for old, new in _top_level_renames(config).items() if top_level else ():
        for suffix in ("weight", "bias"):
            yield f"{new}.{suffix}", get(f"{old}.{suffix}")
    blocks = block_indices if block_indices is not None else range(config.num_layers)
    for index in blocks:
        old_prefix, new_prefix, renames, qkv = _block_layout(index, config)
        for old, new in renames.items():
            yield f"{new_prefix}{new}.weight", get(f"{old_prefix}{old}.weight")
            if "norm_" not in old:
                yield f"{new_prefix}{new}.bias", get(f"{old_prefix}{old}.bias")
        for new, sources in qkv.items():
            for suffix in ("weight", "bias"):
                parts = [get(f"{old_prefix}{s}.{suffix}") for s in sources]
                yield f"{new_prefix}{new}.{suffix}", _interleave_qkv(*parts, head_dim)
        if index >= config.num_double_layers:
            proj_out = get(f"{old_prefix}proj_out.weight")
            yield f"{new_prefix}linear_attn_out.weight", proj_out[:, :h].contiguous()
            yield f"{new_prefix}linear_mlp_out.weight", proj_out[:, h:].contiguous()
            yield f"{new_prefix}linear_mlp_out.bias", get(f"{old_prefix}proj_out.bias")


def from_megatron(
    get: Callable[[str], torch.Tensor], config: FluxConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (diffusers key, tensor) from our full tensors fetched by ``get(our_key)``."""
    head_dim = config.kv_channels
    for old, new in _top_level_renames(config).items():
        for suffix in ("weight", "bias"):
            yield f"{old}.{suffix}", get(f"{new}.{suffix}")
    for index in range(config.num_layers):
        old_prefix, new_prefix, renames, qkv = _block_layout(index, config)
        for old, new in renames.items():
            yield f"{old_prefix}{old}.weight", get(f"{new_prefix}{new}.weight")
            if "norm_" not in old:
                yield f"{old_prefix}{old}.bias", get(f"{new_prefix}{new}.bias")
        for new, sources in qkv.items():
            for suffix in ("weight", "bias"):
                for source, part in zip(sources, _split_qkv(get(f"{new_prefix}{new}.{suffix}"), head_dim)):
                    yield f"{old_prefix}{source}.{suffix}", part
        if index >= config.num_double_layers:
            weight = torch.cat(
                [get(f"{new_prefix}linear_attn_out.weight"), get(f"{new_prefix}linear_mlp_out.weight")],
                dim=1,
            )
            yield f"{old_prefix}proj_out.weight", weight
            yield f"{old_prefix}proj_out.bias", get(f"{new_prefix}linear_mlp_out.bias")


# The MeanFlow student's interval embedding: exported as its own diffusers TimestepEmbedding
# (``interval_embedder.safetensors``, keys ``linear_1.weight`` ...; see interval_embedder.py).
INTERVAL_PREFIX = "interval_in."
_INTERVAL_RENAMES = {"linear_1": "interval_in.mlp.linear_1", "linear_2": "interval_in.mlp.linear_2"}


def interval_keys() -> list[str]:
    """Our keys of the student's interval embedding."""
    return [f"{new}.{suffix}" for new in _INTERVAL_RENAMES.values() for suffix in ("weight", "bias")]


def is_student_keys(keys) -> bool:
    """Whether a set of our (checkpoint) keys is a MeanFlow student's (has the interval embedding)."""
    return any(key.startswith(INTERVAL_PREFIX) for key in keys)


def interval_from_megatron(get: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (interval-embedder file key, tensor) from our ``interval_in.*`` tensors."""
    for old, new in _INTERVAL_RENAMES.items():
        for suffix in ("weight", "bias"):
            yield f"{old}.{suffix}", get(f"{new}.{suffix}")


def interval_to_megatron(get: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (our key, tensor) from the interval-embedder file's tensors."""
    for old, new in _INTERVAL_RENAMES.items():
        for suffix in ("weight", "bias"):
            yield f"{new}.{suffix}", get(f"{old}.{suffix}")


def megatron_block_key_to_global(key: str, block_range: tuple[int, int], config: FluxConfig) -> str:
    """A pipeline stage's local key (``double_blocks.0``) -> the full model's (``double_blocks.k``)."""
    start, _ = block_range
    match = re.match(r"(double_blocks|single_blocks)\.(\d+)\.(.*)", key)
    if not match:
        return key
    kind, local, rest = match.group(1), int(match.group(2)), match.group(3)
    if kind == "double_blocks":
        return f"double_blocks.{start + local}.{rest}"
    first_single = max(start, config.num_double_layers) - config.num_double_layers
    return f"single_blocks.{first_single + local}.{rest}"


# --------------------------------------------------------------------------- key-set checks


def describe_keys(keys, limit: int = 5) -> str:
    """``'a', 'b', 'c' and 4 more`` (sorted): a readable summary of a long key list."""
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_key_sets(found, expected, what: str, hint: str = "") -> None:
    """Raises CheckpointMismatchError listing the missing and unexpected keys (first few + count)."""
    found, expected = set(found), set(expected)
    raise_on_key_mismatch(expected - found, found - expected, what, hint)


def raise_on_key_mismatch(missing, unexpected, what: str, hint: str = "") -> None:
    if not missing and not unexpected:
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing: {describe_keys(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {describe_keys(unexpected)}")
    raise CheckpointMismatchError(f"{what} does not match the model: " + "; ".join(parts) + hint)


def check_shapes(found: dict, expected: dict, what: str, hint: str = "") -> None:
    """Raises CheckpointMismatchError naming the first key whose shape differs, and both shapes."""
    wrong = [k for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    if not wrong:
        return
    first = sorted(wrong)[0]
    more = f" ({len(wrong) - 1} more keys differ: {describe_keys(set(wrong) - {first})})" if len(wrong) > 1 else ""
    raise CheckpointMismatchError(
        f"{what}: {first!r} has shape {tuple(found[first])} but the model expects "
        f"{tuple(expected[first])}{more}{hint}"
    )


def diffusers_shapes(megatron_shapes: dict, config: FluxConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of every diffusers tensor, derived from our full shapes through ``from_megatron``."""

    def meta(key):
        return torch.empty(megatron_shapes[key], device="meta")

    return {key: tuple(t.shape) for key, t in from_megatron(meta, config)}


# --------------------------------------------------------------------------- diffusers config


# FluxTransformer2DModel's constructor arguments and their defaults (diffusers 0.30 - 0.42).
DIFFUSERS_CONFIG_DEFAULTS = {
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": None,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": False,
    "axes_dims_rope": [16, 56, 56],
}
DIFFUSERS_CLASS_NAME = "FluxTransformer2DModel"
FLUX_TIME_EMBEDDING_SCALE = 1000.0


# The FluxConfig fields a diffusers config.json fixes (the weights' shapes); overrides of them
# must agree with a checkpoint. The rest (time_embedding_scale, the attention tangent pass, ...)
# a recipe may set over any checkpoint.
CHECKPOINT_ARCHITECTURE_FIELDS = (
    "num_double_layers", "num_single_layers", "num_attention_heads", "kv_channels", "hidden_size",
    "ffn_hidden_size", "in_channels", "out_channels", "patch_size", "joint_attention_dim",
    "pooled_projection_dim", "axes_dims_rope", "guidance_embeds",
)


def flux_config_from_diffusers(diffusers_config: dict, **overrides) -> FluxConfig:
    """Our FluxConfig for a diffusers ``FluxTransformer2DModel`` config.json (a dict).

    ``overrides`` are FluxConfig fields for everything that is not architecture (dtype, parallel
    sizes, initialisation). diffusers' MLP ratio is fixed at 4 and its RoPE theta at 10000.
    """
    from models.flux.config import flux_dev_config, flux_schnell_config

    class_name = diffusers_config.get("_class_name", DIFFUSERS_CLASS_NAME)
    if class_name != DIFFUSERS_CLASS_NAME:
        raise CheckpointMismatchError(
            f"config.json describes a {class_name!r}, not a {DIFFUSERS_CLASS_NAME!r}"
        )
    known = set(DIFFUSERS_CONFIG_DEFAULTS) | {interval_format.TIME_EMBEDDING_SCALE_FIELD}
    unknown = {k for k in diffusers_config if not k.startswith("_")} - known
    if unknown:
        raise CheckpointMismatchError(
            f"config.json has fields this converter does not know: {describe_keys(unknown)} "
            f"(known: {', '.join(DIFFUSERS_CONFIG_DEFAULTS)})"
        )
    c = {**DIFFUSERS_CONFIG_DEFAULTS, **{k: v for k, v in diffusers_config.items() if not k.startswith("_")}}
    hidden = c["num_attention_heads"] * c["attention_head_dim"]
    architecture = dict(
        num_double_layers=c["num_layers"],
        num_single_layers=c["num_single_layers"],
        num_attention_heads=c["num_attention_heads"],
        kv_channels=c["attention_head_dim"],
        hidden_size=hidden,
        ffn_hidden_size=4 * hidden,
        in_channels=c["in_channels"],
        out_channels=c["out_channels"],
        patch_size=c["patch_size"],
        joint_attention_dim=c["joint_attention_dim"],
        pooled_projection_dim=c["pooled_projection_dim"],
        axes_dims_rope=tuple(c["axes_dims_rope"]),
        time_embedding_scale=float(c.get(interval_format.TIME_EMBEDDING_SCALE_FIELD, FLUX_TIME_EMBEDDING_SCALE)),
    )
    architecture.update(overrides)
    factory = flux_dev_config if c["guidance_embeds"] else flux_schnell_config
    return factory(**architecture)


def diffusers_config_from_flux(config: FluxConfig) -> dict:
    """The diffusers config.json (a dict) of a FluxTransformer2DModel with ``config``'s architecture."""
    if config.ffn_hidden_size != 4 * config.hidden_size:
        raise CheckpointMismatchError(
            f"diffusers' FluxTransformer2DModel has an MLP of 4 x hidden; this config has "
            f"ffn_hidden_size={config.ffn_hidden_size} for hidden_size={config.hidden_size}"
        )
    scale = {} if config.time_embedding_scale == FLUX_TIME_EMBEDDING_SCALE else {
        interval_format.TIME_EMBEDDING_SCALE_FIELD: config.time_embedding_scale}
    return {
        "_class_name": DIFFUSERS_CLASS_NAME,
        **scale,
        "patch_size": config.patch_size,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "num_layers": config.num_double_layers,
        "num_single_layers": config.num_single_layers,
        "attention_head_dim": config.kv_channels,
        "num_attention_heads": config.num_attention_heads,
        "joint_attention_dim": config.joint_attention_dim,
        "pooled_projection_dim": config.pooled_projection_dim,
        "guidance_embeds": config.guidance_embeds,
        "axes_dims_rope": list(config.axes_dims_rope),
    }


# --------------------------------------------------------------------------- original BFL layout
#
# The single-file checkpoints Black Forest Labs published (flux1-dev.safetensors, ...) use the
# names of their reference implementation. Each diffusers tensor is a BFL tensor, a block of rows
# of one (fused QKV, and the single block's linear1 = [q; k; v; mlp_in]), or the final adaLN with
# its halves swapped (BFL: shift, scale; diffusers and we: scale, shift). Importing goes
# BFL -> diffusers names here, then through ``to_megatron`` like any diffusers checkpoint.

BFL_PREFIX = "model.diffusion_model."

_BFL_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",  # halves swapped
}
_BFL_DOUBLE = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
# Fused BFL tensors: diffusers parts in row order.
_BFL_DOUBLE_FUSED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_BFL_SINGLE = {
    "norm.linear": "modulation.lin",
    "attn.norm_q": "norm.query_norm",
    "attn.norm_k": "norm.key_norm",
    "proj_out": "linear2",
}
_BFL_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}


@dataclass(frozen=True)
class BflPiece:
    """Where a diffusers tensor lives in a BFL checkpoint."""

    key: str  # BFL key, without the optional "model.diffusion_model." prefix
    rows: tuple[int, int] | None = None  # rows [start, stop) of a fused tensor; None: all of it
    swap_halves: bool = False  # final_layer.adaLN_modulation.1: (shift, scale) <-> (scale, shift)


def _bfl_suffix(diffusers_name: str, suffix: str) -> str:
    # BFL's QK RMSNorms call their weight "scale".
    return "scale" if suffix == "weight" and "norm_" in diffusers_name else suffix


def bfl_pieces(config: FluxConfig) -> dict[str, BflPiece]:
    """diffusers key -> BflPiece, for every diffusers key of ``config``."""
    h, ffn = config.hidden_size, config.ffn_hidden_size
    pieces: dict[str, BflPiece] = {}
    for old, bfl in _BFL_TOP.items():
        if "guidance" in old and not config.guidance_embeds:
            continue
        for suffix in ("weight", "bias"):
            pieces[f"{old}.{suffix}"] = BflPiece(f"{bfl}.{suffix}", swap_halves=old == "norm_out.linear")

    def add_block(old_prefix, bfl_prefix, renames, fused, part_rows):
        for old, bfl in renames.items():
            suffixes = ("weight",) if "norm_" in old else ("weight", "bias")
            for suffix in suffixes:
                pieces[f"{old_prefix}{old}.{suffix}"] = BflPiece(f"{bfl_prefix}{bfl}.{_bfl_suffix(old, suffix)}")
        for bfl, parts in fused.items():
            start = 0
            for part, rows in zip(parts, part_rows):
                for suffix in ("weight", "bias"):
                    pieces[f"{old_prefix}{part}.{suffix}"] = BflPiece(f"{bfl_prefix}{bfl}.{suffix}", (start, start + rows))
                start += rows

    for i in range(config.num_double_layers):
        add_block(f"transformer_blocks.{i}.", f"double_blocks.{i}.", _BFL_DOUBLE, _BFL_DOUBLE_FUSED, (h, h, h))
    for i in range(config.num_single_layers):
        add_block(
            f"single_transformer_blocks.{i}.", f"single_blocks.{i}.", _BFL_SINGLE, _BFL_SINGLE_FUSED, (h, h, h, ffn)
        )
    return pieces


def bfl_shapes(config: FluxConfig, diffusers_shape: dict) -> dict[str, tuple[int, ...]]:
    """Every BFL key of ``config`` and its shape, from the diffusers shapes (see ``diffusers_shapes``)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for key, piece in bfl_pieces(config).items():
        shape = tuple(diffusers_shape[key])
        if piece.rows is not None:
            rows = max(piece.rows[1], shapes.get(piece.key, (0,))[0])
            shape = (rows,) + shape[1:]
        shapes[piece.key] = shape
    return shapes


def diffusers_getter_from_bfl(
    read: Callable[[str, tuple[int, int] | None], torch.Tensor], config: FluxConfig
) -> Callable[[str], torch.Tensor]:
    """``get(diffusers_key)`` over a BFL checkpoint; ``read(bfl_key, rows)`` fetches a tensor or
    the rows ``[start, stop)`` of one (``safe_open``'s ``get_slice`` reads just those)."""
    pieces = bfl_pieces(config)

    def get(key: str) -> torch.Tensor:
        piece = pieces[key]
        tensor = read(piece.key, piece.rows)
        if piece.swap_halves:
            shift, scale = tensor.chunk(2, dim=0)
            tensor = torch.cat([scale, shift], dim=0)
        return tensor

    return get


def infer_diffusers_config_from_bfl(shapes: dict[str, tuple[int, ...]]) -> dict:
    """A diffusers config.json (dict) read off BFL tensor shapes (prefix already stripped).

    RoPE's axes are not visible in the weights: FLUX.1's (16, 56, 56) is assumed, which needs a
    head dim of 128; other models need an explicit config.
    """

    def shape(key):
        if key not in shapes:
            raise CheckpointMismatchError(
                f"cannot infer the FLUX config: the checkpoint has no {key!r} (is this a FLUX.1 "
                "transformer in the original BFL layout?)"
            )
        return shapes[key]

    def count(kind):
        indices = {int(k.split(".")[1]) for k in shapes if k.startswith(kind + ".")}
        return max(indices) + 1 if indices else 0

    hidden, in_channels = shape("img_in.weight")
    head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale")[0] if count("double_blocks") else shape(
        "single_blocks.0.norm.query_norm.scale"
    )[0]
    if head_dim != 128:
        raise CheckpointMismatchError(
            f"cannot infer RoPE axes for head dim {head_dim} (FLUX.1 has 128): pass a config"
        )
    return {
        "_class_name": DIFFUSERS_CLASS_NAME,
        "patch_size": 1,
        "in_channels": in_channels,
        "out_channels": shape("final_layer.linear.weight")[0],
        "num_layers": count("double_blocks"),
        "num_single_layers": count("single_blocks"),
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": shape("txt_in.weight")[1],
        "pooled_projection_dim": shape("vector_in.in_layer.weight")[1],
        "guidance_embeds": "guidance_in.in_layer.weight" in shapes,
        "axes_dims_rope": [16, 56, 56],
    }
