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

Image head (top-level attributes of the official ``HunyuanImage3ForCausalMM``, the same names in
our model): ``patch_embed.*``, ``final_layer.*``, ``timestep_emb.*``, ``time_embed.*``,
``time_embed_2.*`` and, for the few-step student, ``guidance_emb.*`` (``cfg_distilled``) and
``timestep_r_emb.*`` (``use_meanflow``), converted as identity renames when the model has them (``image_head=True``);
``image_head_shapes`` lists them. The released checkpoint also holds modules we do not train: the
VAE ``vae.*``, the vision tower ``vision_model.*`` and its ``vision_aligner.*``
(``UNCONVERTED_PREFIXES``): never converted, returned untouched as ``rest``.

``config_from_hf`` / ``hf_config_from_config``: the released ``config.json`` fields <-> our config.
"""

from __future__ import annotations

import re

import torch

from models.flux.state_dict_adapter import CheckpointMismatchError, check_key_sets, check_shapes, describe_keys  # noqa: F401
from models.hunyuan_image3.config import HunyuanImage3Config

__all__ = [
    "CheckpointMismatchError",
    "IMAGE_HEAD_PREFIXES",
    "UNCONVERTED_PREFIXES",
    "config_from_hf",
    "STUDENT_CONDITIONING_FIELD",
    "student_hf_fields",
    "hf_config_from_config",
    "image_head_shapes",
    "key_pairs",
    "released_shapes",
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
# The image head's modules: before the trunk (patch embedding and its timestep embedders) and
# after it (final layer and its embedder), as the model runs them.
_IMAGE_HEAD_BEFORE_TRUNK = ("patch_embed.", "time_embed.", "timestep_emb.", "guidance_emb.", "timestep_r_emb.")
_IMAGE_HEAD_AFTER_TRUNK = ("final_layer.", "time_embed_2.")
IMAGE_HEAD_PREFIXES = _IMAGE_HEAD_BEFORE_TRUNK + _IMAGE_HEAD_AFTER_TRUNK
# In the released checkpoint, not trained here: the VAE, the SigLIP2 vision tower and its aligner.
UNCONVERTED_PREFIXES = ("vae.", "vision_model.", "vision_aligner.")


def _res_block_shapes(prefix: str, channels_in: int, channels_out: int, emb: int) -> dict:
    """The official ResBlock (no up/down sampling, channels_in != channels_out): GroupNorm -> SiLU
    -> 3x3 conv, SiLU -> Linear to AdaGN (scale, shift), GroupNorm -> SiLU -> dropout -> 3x3 conv,
    1x1 conv skip. GroupNorm has 32 groups: the count changes no shape."""
    return {
        f"{prefix}in_layers.0.weight": (channels_in,),
        f"{prefix}in_layers.0.bias": (channels_in,),
        f"{prefix}in_layers.2.weight": (channels_out, channels_in, 3, 3),
        f"{prefix}in_layers.2.bias": (channels_out,),
        f"{prefix}emb_layers.1.weight": (2 * channels_out, emb),
        f"{prefix}emb_layers.1.bias": (2 * channels_out,),
        f"{prefix}out_layers.0.weight": (channels_out,),
        f"{prefix}out_layers.0.bias": (channels_out,),
        f"{prefix}out_layers.3.weight": (channels_out, channels_out, 3, 3),
        f"{prefix}out_layers.3.bias": (channels_out,),
        f"{prefix}skip_connection.weight": (channels_out, channels_in, 1, 1),
        f"{prefix}skip_connection.bias": (channels_out,),
    }


def _timestep_embedder_shapes(prefix: str, frequencies: int, hidden: int) -> dict:
    """The official TimestepEmbedder: Linear(frequencies -> hidden), GELU, Linear(hidden -> hidden)."""
    return {
        f"{prefix}mlp.0.weight": (hidden, frequencies),
        f"{prefix}mlp.0.bias": (hidden,),
        f"{prefix}mlp.2.weight": (hidden, hidden),
        f"{prefix}mlp.2.bias": (hidden,),
    }


def image_head_shapes(config: HunyuanImage3Config) -> dict[str, tuple[int, ...]]:
    """Official name -> shape of every image-head tensor (patch size 1, the released "unet"
    projection), in model order: ``patch_embed`` (UNetDown: 3x3 conv latent -> hidden P, then a
    ResBlock P -> H), the three timestep embedders, ``final_layer`` (UNetUp: a ResBlock H -> P,
    then GroupNorm, SiLU, 3x3 conv P -> latent)."""
    if config.patch_size != 1:
        raise CheckpointMismatchError(f"only patch_size 1 (the released model) is supported, not {config.patch_size}")
    latent, width, hidden = config.latent_channels, config.patch_embed_hidden_dim, config.hidden_size
    frequencies = config.timestep_embedding_dim
    shapes = {"patch_embed.model.0.weight": (width, latent, 3, 3), "patch_embed.model.0.bias": (width,)}
    shapes.update(_res_block_shapes("patch_embed.model.1.", width, hidden, hidden))
    shapes.update(_timestep_embedder_shapes("time_embed.", frequencies, hidden))
    shapes.update(_timestep_embedder_shapes("timestep_emb.", frequencies, hidden))
    # The few-step student's (Instruct-Distil): the same embedder form, first stage.
    if config.cfg_distilled:
        shapes.update(_timestep_embedder_shapes("guidance_emb.", frequencies, hidden))
    if config.use_meanflow:
        shapes.update(_timestep_embedder_shapes("timestep_r_emb.", frequencies, hidden))
    shapes.update(_res_block_shapes("final_layer.model.0.", hidden, width, hidden))
    shapes.update({
        "final_layer.model.1.0.weight": (width,),
        "final_layer.model.1.0.bias": (width,),
        "final_layer.model.1.2.weight": (latent, width, 3, 3),
        "final_layer.model.1.2.bias": (latent,),
    })
    shapes.update(_timestep_embedder_shapes("time_embed_2.", frequencies, hidden))
    return shapes


def swap_glu_halves(weight: torch.Tensor) -> torch.Tensor:
    """[a; b] -> [b; a] along the output rows ([up; gate] <-> [gate; up])."""
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def key_pairs(config: HunyuanImage3Config, image_head: bool = False) -> list[tuple[str, str, bool]]:
    """(released key, our key, swap GLU halves) for every converted tensor, in model order: the
    trunk, and with ``image_head`` the image head (same names on both sides)."""
    head = list(image_head_shapes(config)) if image_head else []
    before = [(k, k, False) for k in head if k.startswith(_IMAGE_HEAD_BEFORE_TRUNK)]
    after = [(k, k, False) for k in head if k.startswith(_IMAGE_HEAD_AFTER_TRUNK)]
    return before + _trunk_key_pairs(config) + after


def _trunk_key_pairs(config: HunyuanImage3Config) -> list[tuple[str, str, bool]]:
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


def released_shapes(config: HunyuanImage3Config, image_head: bool = False) -> dict[str, tuple[int, ...]]:
    """Released key -> shape of every converted tensor (``key_pairs`` order), from the config alone
    (no model, no process group: every rank of any layout gets the same answer)."""
    hidden, head_dim, heads = config.hidden_size, config.kv_channels, config.num_attention_heads
    width, shared = config.moe_ffn_hidden_size, config.moe_shared_expert_intermediate_size
    top = {
        "model.wte.weight": (config.vocab_size, hidden),
        "model.ln_f.weight": (hidden,),
        "lm_head.weight": (config.vocab_size, hidden),
    }
    per_layer = {
        "input_layernorm.weight": (hidden,),
        "self_attn.qkv_proj.weight": ((heads + 2 * config.num_query_groups) * head_dim, hidden),
        "self_attn.query_layernorm.weight": (head_dim,),
        "self_attn.key_layernorm.weight": (head_dim,),
        "self_attn.o_proj.weight": (hidden, heads * head_dim),
        "post_attention_layernorm.weight": (hidden,),
        "mlp.gate.wg.weight": (config.num_moe_experts, hidden),
        "mlp.shared_mlp.gate_and_up_proj.weight": (2 * shared, hidden),
        "mlp.shared_mlp.down_proj.weight": (hidden, shared),
    }
    per_expert = {"gate_and_up_proj.weight": (2 * width, hidden), "down_proj.weight": (hidden, width)}
    head = image_head_shapes(config) if image_head else {}
    shapes = {}
    for released, _, _ in key_pairs(config, image_head):
        expert = _RELEASED_EXPERT.match(released)
        layer = _RELEASED_LAYER.match(released)
        if expert:
            shapes[released] = per_expert[released[expert.end():]]
        elif layer:
            shapes[released] = per_layer[released[layer.end():]]
        else:
            shapes[released] = top.get(released) or head[released]
    return shapes


_RELEASED_LAYER = re.compile(r"^model\.layers\.\d+\.")
_RELEASED_EXPERT = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.\d+\.")


def hf_trunk_keys(config: HunyuanImage3Config) -> list[str]:
    return [hf for hf, _, _ in _trunk_key_pairs(config)]


def megatron_keys(config: HunyuanImage3Config, image_head: bool = False) -> list[str]:
    return [ours for _, ours, _ in key_pairs(config, image_head)]


def is_converted_key(key: str, image_head: bool = False) -> bool:
    """Whether a released key is one the conversion maps (trunk, and the image head if asked)."""
    return key.startswith(_TRUNK_PREFIXES) or (image_head and key.startswith(IMAGE_HEAD_PREFIXES))


def is_known_unconverted_key(key: str, image_head: bool = False) -> bool:
    """A released key this conversion skips by name: VAE, vision tower, aligner, and the image
    head when the model has none."""
    return key.startswith(UNCONVERTED_PREFIXES) or (not image_head and key.startswith(IMAGE_HEAD_PREFIXES))


def to_megatron(hf_state: dict, config: HunyuanImage3Config, image_head: bool = False) -> tuple[dict, dict]:
    """Released tensors -> ours. Returns (ours, rest): ``rest`` holds the keys not converted (the
    VAE, vision tower, aligner, and the image head unless ``image_head``), untouched. A missing or
    unknown converted key raises ``CheckpointMismatchError``."""
    converted = {k: v for k, v in hf_state.items() if is_converted_key(k, image_head)}
    rest = {k: v for k, v in hf_state.items() if k not in converted}
    pairs = key_pairs(config, image_head)
    check_key_sets(converted, [hf for hf, _, _ in pairs], "the HunyuanImage 3.0 checkpoint")
    ours = {}
    for hf, name, swap in pairs:
        tensor = converted[hf]
        ours[name] = swap_glu_halves(tensor) if swap else tensor
    return ours, rest


def from_megatron(state: dict, config: HunyuanImage3Config, image_head: bool = False) -> dict:
    """Ours (full tensors, global expert indices) -> the released keys and layouts."""
    pairs = key_pairs(config, image_head)
    check_key_sets(state, [ours for _, ours, _ in pairs], "the megatron state dict")
    out = {}
    for hf, name, swap in pairs:
        tensor = state[name]
        out[hf] = swap_glu_halves(tensor) if swap else tensor
    return out


# --------------------------------------------------------------------------- config.json


def _one_value(hf_config: dict, field: str, default=None):
    """A field that may be per layer (a list) in the released config: it must be one value here."""
    value = hf_config.get(field, default)
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise CheckpointMismatchError(f"config.json {field}={value}: per-layer values that differ are not supported")
        value = value[0]
    return value


def config_from_hf(hf_config: dict, **overrides) -> HunyuanImage3Config:
    """Our config from the released ``config.json`` fields; ``overrides`` set the rest (dtype,
    parallel sizes). The architecture fields not listed here keep the released model's values."""
    from models.hunyuan_image3.config import hunyuan_image3_config

    heads = hf_config["num_attention_heads"]
    expert_width = _one_value(hf_config, "moe_intermediate_size") or hf_config["intermediate_size"]
    vae = hf_config.get("vae") or {}
    settings = dict(
        num_layers=hf_config["num_hidden_layers"],
        hidden_size=hf_config["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=hf_config.get("num_key_value_heads") or heads,
        kv_channels=hf_config.get("attention_head_dim") or hf_config["hidden_size"] // heads,
        ffn_hidden_size=hf_config.get("intermediate_size", expert_width),
        vocab_size=hf_config["vocab_size"],
        num_moe_experts=_one_value(hf_config, "num_experts"),
        moe_router_topk=_one_value(hf_config, "moe_topk"),
        moe_ffn_hidden_size=expert_width,
        moe_shared_expert_intermediate_size=expert_width * _one_value(hf_config, "num_shared_expert", 1),
        layernorm_epsilon=hf_config.get("rms_norm_eps", 1e-5),
        rope_theta=hf_config.get("rope_theta", 10000.0),
        latent_channels=vae.get("latent_channels", 32),
        patch_embed_hidden_dim=hf_config.get("patch_embed_hidden_dim", 1024),
        patch_size=hf_config.get("patch_size", 1),
        cfg_distilled=bool(hf_config.get("cfg_distilled", False)),
        use_meanflow=bool(hf_config.get("use_meanflow", False)),
        student_conditioning=hf_config.get(STUDENT_CONDITIONING_FIELD, "tokens"),
        sequence_template=hf_config.get(SEQUENCE_TEMPLATE_FIELD, "pretrain"),
        system_prompt=hf_config.get(SYSTEM_PROMPT_FIELD),
    )
    settings.update(overrides)
    return hunyuan_image3_config(**settings)


def hf_config_from_config(config: HunyuanImage3Config) -> dict:
    """A ``config.json`` (the released field names) for ``config``: what export writes when the
    checkpoint does not carry the released one (e.g. a model made from a preset)."""
    return {
        "architectures": ["HunyuanImage3ForCausalMM"],
        "model_type": "hunyuan_image_3_moe",
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_query_groups,
        "attention_head_dim": config.kv_channels,
        "intermediate_size": config.ffn_hidden_size,
        "moe_intermediate_size": config.moe_ffn_hidden_size,
        "num_experts": config.num_moe_experts,
        "moe_topk": config.moe_router_topk,
        "num_shared_expert": config.moe_shared_expert_intermediate_size // config.moe_ffn_hidden_size,
        "vocab_size": config.vocab_size,
        "rms_norm_eps": config.layernorm_epsilon,
        "rope_theta": config.rope_theta,
        "hidden_act": "silu",
        "use_qk_norm": True,
        "norm_topk_prob": True,
        "moe_drop_tokens": False,
        "tie_word_embeddings": False,
        "img_proj_type": "unet",
        "patch_size": config.patch_size,
        "patch_embed_hidden_dim": config.patch_embed_hidden_dim,
        "vae": {"latent_channels": config.latent_channels, "scaling_factor": config.vae_scaling_factor},
        **student_hf_fields(config),
    }


# The project's own config.json fields: where a student's guidance / interval embeddings enter
# (the official code knows only the "tokens" layout; "embedding" students load only here), and the
# text template it was distilled with (the official code reads its template from
# generation_config.json, which the export does not write).
STUDENT_CONDITIONING_FIELD = "mfmegatron_student_conditioning"
SEQUENCE_TEMPLATE_FIELD = "mfmegatron_sequence_template"
SYSTEM_PROMPT_FIELD = "mfmegatron_system_prompt"


def student_hf_fields(config: HunyuanImage3Config) -> dict:
    """The student's config.json fields (official ``cfg_distilled`` / ``use_meanflow``, and ours
    for the variant and its text); none for a teacher, so its config.json stays the released one."""
    if not config.is_student:
        return {}
    fields = {"cfg_distilled": config.cfg_distilled, "use_meanflow": config.use_meanflow,
              STUDENT_CONDITIONING_FIELD: config.student_conditioning,
              SEQUENCE_TEMPLATE_FIELD: config.sequence_template}
    if config.system_prompt:
        fields[SYSTEM_PROMPT_FIELD] = config.system_prompt
    return fields
