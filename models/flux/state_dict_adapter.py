"""Mapping between diffusers' FluxTransformer2DModel state dict and ours (full, unsharded).

``to_megatron`` / ``from_megatron`` convert whole tensors; sharding over tensor-parallel ranks and
selecting a pipeline stage's blocks happen in ``parallelize.py``. Differences in layout:

- Q, K and V (separate in diffusers) are one ``linear_qkv`` with per-head layout
  ``[head][q, k, v][head_dim]`` so that a contiguous TP split gives whole heads.
- The single block's ``proj_out`` over ``cat(attention, mlp)`` is two row-parallel layers,
  ``linear_attn_out`` (no bias) and ``linear_mlp_out`` (carries the bias).
- ``norm_out`` keeps diffusers' chunk order (scale, shift).

Both directions are pure re-layouts: export after import is bit-exact.
"""

from __future__ import annotations

import re
from typing import Callable, Iterator

import torch

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
    for i in range(config.num_double_layers):
        p = f"transformer_blocks.{i}."
        for old in _DOUBLE_RENAMES:
            keys.append(p + old + ".weight")
            if "norm_" not in old:
                keys.append(p + old + ".bias")
        for sources in _DOUBLE_QKV.values():
            for s in sources:
                keys += [p + s + ".weight", p + s + ".bias"]
    for i in range(config.num_single_layers):
        p = f"single_transformer_blocks.{i}."
        for old in _SINGLE_RENAMES:
            keys.append(p + old + ".weight")
            if "norm_" not in old:
                keys.append(p + old + ".bias")
        for sources in _SINGLE_QKV.values():
            for s in sources:
                keys += [p + s + ".weight", p + s + ".bias"]
        keys += [p + "proj_out.weight", p + "proj_out.bias"]
    return keys


def to_megatron(
    get: Callable[[str], torch.Tensor], config: FluxConfig, block_indices: range | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (our key, tensor) from diffusers tensors fetched one at a time by ``get(key)``.

    Streaming (a getter, a generator) lets a 12B conversion hold a block at a time.
    ``block_indices`` restricts the blocks (global indices, doubles first); top-level weights are
    always included.
    """
    h = config.hidden_size
    head_dim = config.kv_channels
    for old, new in _top_level_renames(config).items():
        for suffix in ("weight", "bias"):
            yield f"{new}.{suffix}", get(f"{old}.{suffix}")
    blocks = block_indices if block_indices is not None else range(config.num_layers)
    for index in blocks:
        if index < config.num_double_layers:
            old_prefix, new_prefix = f"transformer_blocks.{index}.", f"double_blocks.{index}."
            renames, qkv = _DOUBLE_RENAMES, _DOUBLE_QKV
        else:
            single = index - config.num_double_layers
            old_prefix, new_prefix = f"single_transformer_blocks.{single}.", f"single_blocks.{single}."
            renames, qkv = _SINGLE_RENAMES, _SINGLE_QKV
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
        if index < config.num_double_layers:
            old_prefix, new_prefix = f"transformer_blocks.{index}.", f"double_blocks.{index}."
            renames, qkv = _DOUBLE_RENAMES, _DOUBLE_QKV
        else:
            single = index - config.num_double_layers
            old_prefix, new_prefix = f"single_transformer_blocks.{single}.", f"single_blocks.{single}."
            renames, qkv = _SINGLE_RENAMES, _SINGLE_QKV
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
