"""Mapping between the released HunyuanImage 3.0 state dict (the trunk's keys) and ours.

Full, unsharded tensors on both sides; expert ``e`` is ``mlp.experts.local_experts.{e}`` with its
global index (what a model built at expert-parallel size 1 holds). Selecting a rank's experts and
TP shards happens in ``parallelize.py``.

| released (``model.layers.{i}.`` prefix)        | ours (``layers.{i}.`` prefix)                   |
|------------------------------------------------|-------------------------------------------------|
| ``input_layernorm``                            | ``input_layernorm``                             |
| ``self_attn.qkv_proj``                         | ``self_attention.linear_qkv`` (same row order)  |
| ``self_attn.query_layernorm`` / ``key_...``    | ``self_attention.q_layernorm`` / ``k_layernorm``|
| ``self_attn.o_proj``                           | ``self_attention.linear_proj``                  |
| ``post_attention_layernorm``                   | ``pre_mlp_layernorm``                           |
| ``mlp.gate.wg``                                | ``mlp.router``                                  |
| ``mlp.experts.{e}.gate_and_up_proj``           | ``mlp.experts.local_experts.{e}.linear_fc1``    |
| ``mlp.experts.{e}.down_proj``                  | ``mlp.experts.local_experts.{e}.linear_fc2``    |
| ``mlp.shared_mlp.gate_and_up_proj``            | ``mlp.shared_experts.linear_fc1``               |
| ``mlp.shared_mlp.down_proj``                   | ``mlp.shared_experts.linear_fc2``               |

Top level: ``model.wte`` -> ``word_embeddings``, ``model.ln_f`` -> ``final_layernorm``,
``lm_head`` -> ``output_layer`` (all ``.weight``).

The fused ``gate_and_up_proj`` rows are ``[up; gate]`` (``down(x1 * silu(x2))``); megatron's GLU
activates the first half, so ``linear_fc1`` is ``[gate; up]``: the halves are swapped both ways.
``qkv_proj`` is already in megatron's per-KV-group order ``[group][q x n, k, v][head_dim]``.
Both directions are pure re-layouts (export after import is bit-exact).

Keys outside the trunk (the image path: patch embedding, final layer, timestep embedders, VAE,
vision tower) are not converted in this slice: ``to_megatron`` returns them untouched as ``rest``.
"""

from __future__ import annotations

import torch

from models.flux.state_dict_adapter import CheckpointMismatchError, check_key_sets
from models.hunyuan_image3.config import HunyuanImage3Config

__all__ = [
    "CheckpointMismatchError",
    "hf_trunk_keys",
    "megatron_keys",
    "to_megatron",
    "from_megatron",
    "swap_glu_halves",
]

# Per-layer renames (released suffix -> ours) for tensors copied as they are.
_LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attn.qkv_proj.weight": "self_attention.linear_qkv.weight",
    "self_attn.query_layernorm.weight": "self_attention.q_layernorm.weight",
    "self_attn.key_layernorm.weight": "self_attention.k_layernorm.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "mlp.gate.wg.weight": "mlp.router.weight",
    "mlp.shared_mlp.down_proj.weight": "mlp.shared_experts.linear_fc2.weight",
}
# Fused SwiGLU inputs: [up; gate] released, [gate; up] ours.
_LAYER_GLU = {"mlp.shared_mlp.gate_and_up_proj.weight": "mlp.shared_experts.linear_fc1.weight"}
_EXPERT_RENAMES = {"down_proj.weight": "linear_fc2.weight"}
_EXPERT_GLU = {"gate_and_up_proj.weight": "linear_fc1.weight"}

_TRUNK_PREFIXES = ("model.wte.", "model.ln_f.", "model.layers.", "lm_head.")


def swap_glu_halves(weight: torch.Tensor) -> torch.Tensor:
    """[a; b] -> [b; a] along the output rows ([up; gate] <-> [gate; up])."""
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _key_pairs(config: HunyuanImage3Config) -> list[tuple[str, str, bool]]:
    """(released key, our key, swap GLU halves) for every trunk tensor, in model order."""
    pairs = [("model.wte.weight", "word_embeddings.weight", False)]
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        pairs += [(hf + a, ours + b, False) for a, b in _LAYER_RENAMES.items()]
        pairs += [(hf + a, ours + b, True) for a, b in _LAYER_GLU.items()]
        for e in range(config.num_moe_experts):
            hf_e, ours_e = f"{hf}mlp.experts.{e}.", f"{ours}mlp.experts.local_experts.{e}."
            pairs += [(hf_e + a, ours_e + b, False) for a, b in _EXPERT_RENAMES.items()]
            pairs += [(hf_e + a, ours_e + b, True) for a, b in _EXPERT_GLU.items()]
    pairs += [("model.ln_f.weight", "final_layernorm.weight", False), ("lm_head.weight", "output_layer.weight", False)]
    return pairs


def hf_trunk_keys(config: HunyuanImage3Config) -> list[str]:
    return [hf for hf, _, _ in _key_pairs(config)]


def megatron_keys(config: HunyuanImage3Config) -> list[str]:
    return [ours for _, ours, _ in _key_pairs(config)]


def _is_trunk_key(key: str) -> bool:
    return key.startswith(_TRUNK_PREFIXES)


def to_megatron(hf_state: dict, config: HunyuanImage3Config) -> tuple[dict, dict]:
    """Released trunk tensors -> ours. Returns (ours, rest): ``rest`` holds the keys outside the
    trunk, untouched. A missing or unknown trunk key raises ``CheckpointMismatchError``."""
    trunk = {k: v for k, v in hf_state.items() if _is_trunk_key(k)}
    rest = {k: v for k, v in hf_state.items() if k not in trunk}
    pairs = _key_pairs(config)
    check_key_sets(trunk, [hf for hf, _, _ in pairs], "the HunyuanImage 3.0 checkpoint's trunk")
    ours = {}
    for hf, name, swap in pairs:
        tensor = trunk[hf]
        ours[name] = swap_glu_halves(tensor) if swap else tensor
    return ours, rest


def from_megatron(state: dict, config: HunyuanImage3Config) -> dict:
    """Ours (full tensors, global expert indices) -> the released trunk's keys and layouts."""
    pairs = _key_pairs(config)
    check_key_sets(state, [ours for _, ours, _ in pairs], "the megatron state dict")
    out = {}
    for hf, name, swap in pairs:
        tensor = state[name]
        out[hf] = swap_glu_halves(tensor) if swap else tensor
    return out
