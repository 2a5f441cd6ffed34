"""HunyuanImage 3.0's per-rank numbers for the memory count (``mfmegatron/training/memory.py``).

``rank_parameter_counts(architecture, config)``: parameters one rank holds of the teacher, the
MeanFlow student and the LoRA fake network, read off the whole model built on the meta device (no
memory) and split as the layout splits them:

- routed experts (``layers.*.mlp.experts.*``) over expert parallel (EP) and, when tensor-parallel,
  over expert tensor parallel (ETP);
- the other tensor-parallel weights (attention, shared expert, ``wte``, ``lm_head``) over TP; the
  router, the norms and the image path are whole on every TP rank;
- the layers over pipeline stages (``parallelize.pipeline_layer_range``), ``wte`` and the image
  input path (``timestep_emb``, ``time_embed``, ``patch_embed``) on the first stage, ``ln_f``,
  ``lm_head`` and the image head (``time_embed_2``, ``final_layer``) on the last. The count is the
  worst stage's (the most teacher and student parameters; the first stage at an even split).

The routed experts' part is returned again under ``*_expert`` keys: their gradients are reduced,
and the distributed optimizer and the sharded EMA split their state, over expert-data-parallel
ranks (world / (ETP·EP·PP)), the rest over data-parallel ranks (world / (TP·PP)).

``activation_bytes`` and ``no_grad_activation_bytes_per_sample``: estimates of one rank's
activation peak, with the MoE all-to-all buffers (primal and tangent rows in one exchange,
``mfmegatron/jvp/moe.py``). Arithmetic on tensor sizes, not measured.
"""

from __future__ import annotations

import dataclasses

from models.hunyuan_image3.config import HunyuanImage3Config
from models.hunyuan_image3.tokenizer import pixels_per_cell
# <bos> <boi> <img_size> <img_ratio> <timestep> ... <eoi> around the prompt and the image.
TEMPLATE_TOKENS = 6
# The student's <guidance> and <timestep_r> tokens, filled by its two extra embedders.
STUDENT_EXTRA_TOKENS = 2
STUDENT_EXTRA_EMBEDDERS = 2

FIRST_STAGE_MODULES = ("word_embeddings", "timestep_emb", "guidance_emb", "timestep_r_emb", "time_embed", "patch_embed")
LAST_STAGE_MODULES = ("final_layernorm", "output_layer", "time_embed_2", "final_layer")


@dataclasses.dataclass(frozen=True)
class Layout:
    tp: int
    ep: int
    etp: int
    pp: int
    sequence_parallel: bool


def layout_of(config) -> Layout:
    parallel = config.parallel
    tp = parallel.tensor_parallel_size
    return Layout(
        tp=tp, ep=parallel.expert_parallel_size, etp=parallel.expert_tensor_parallel_size or tp,
        pp=parallel.pipeline_parallel_size, sequence_parallel=parallel.sequence_parallel,
    )


def preset_architecture(config) -> HunyuanImage3Config:
    """The teacher's architecture from the recipe's preset and ``model.overrides``, with the
    image path (for planning before the teacher checkpoint exists)."""
    from models.hunyuan_image3.config import HUNYUAN_IMAGE3_CONFIGS

    if config.model.preset not in HUNYUAN_IMAGE3_CONFIGS:
        raise ValueError(f"unknown HunyuanImage 3.0 preset {config.model.preset!r}; known: {', '.join(HUNYUAN_IMAGE3_CONFIGS)}")
    return HUNYUAN_IMAGE3_CONFIGS[config.model.preset](**{**config.model.overrides, "image_path": True})


def _is_routed_expert(name: str) -> bool:
    return ".mlp.experts." in name


def stage_layer_ranges(architecture: HunyuanImage3Config, pp: int) -> list[tuple[int, int]]:
    """Layers [start, end) of each of ``pp`` stages (``parallelize.pipeline_layer_range``: the
    architecture's ``pipeline_layers`` or an even split)."""
    from types import SimpleNamespace

    from models.hunyuan_image3.parallelize import pipeline_layer_range

    # Only the three fields pipeline_layer_range reads (a config at another PP would need its
    # pipeline dtype and the rest of megatron's checks).
    staged = SimpleNamespace(
        pipeline_layers=architecture.pipeline_layers, num_layers=architecture.num_layers, pipeline_model_parallel_size=pp
    )
    return [pipeline_layer_range(staged, stage) for stage in range(pp)]


def _stage_of(name: str, ranges: list[tuple[int, int]]) -> int:
    top = name.split(".")[0]
    if top == "layers":
        layer = int(name.split(".")[1])
        return next(stage for stage, (_, end) in enumerate(ranges) if layer < end)
    if top in FIRST_STAGE_MODULES:
        return 0
    if top in LAST_STAGE_MODULES:
        return len(ranges) - 1
    raise ValueError(f"no pipeline stage known for parameter {name}")


def _meta_model(architecture: HunyuanImage3Config):
    """The whole model (every layer and expert) on the meta device at TP = ETP = 1. Rebuilds
    megatron's process groups as a world of one's sizes when they are at another layout: a
    planning call, not one for a training process."""
    from megatron.core import parallel_state

    from mfmegatron.parallel import initialize_parallel
    from models.hunyuan_image3.parallelize import meta_full_model

    if not (
        parallel_state.model_parallel_is_initialized()
        and parallel_state.get_tensor_model_parallel_world_size() == 1
        and parallel_state.get_pipeline_model_parallel_world_size() == 1
        and parallel_state.get_expert_model_parallel_world_size() == 1
        and parallel_state.get_expert_tensor_parallel_world_size() == 1
    ):
        initialize_parallel()
    whole = dataclasses.replace(
        architecture, tensor_model_parallel_size=1, expert_tensor_parallel_size=1, sequence_parallel=False,
        image_path=True,
    )
    return meta_full_model(whole)


def _split(name: str, count: float, tensor_parallel: bool, layout: Layout) -> float:
    """This rank's share of ``count`` elements of parameter ``name`` (one stage's)."""
    if _is_routed_expert(name):
        return count / layout.ep / (layout.etp if tensor_parallel else 1)
    return count / (layout.tp if tensor_parallel else 1)


def stage_parameter_counts(architecture: HunyuanImage3Config, config) -> list[dict[str, float]]:
    """For each pipeline stage, the parameters one of its ranks holds: ``teacher``, ``student``,
    ``lora`` (the LoRA fake network's factors at ``alignment.lora_rank``) and the routed experts'
    part of each (``teacher_expert``, ``student_expert``, ``lora_expert``).

    LoRA factors as ``jvp/lora.py`` attaches them to the linears the fake network adapts
    (``meanflow.lora_covers``: the attention projections): ``A [r, in]`` and ``B [out, r]`` of the
    local weight's shape. ``lora_expert`` stays for a rule that adapts routed experts (zero now)."""
    from mfmegatron.jvp.linear import ColumnParallelLinear, RowParallelLinear
    from models.hunyuan_image3.meanflow import lora_covers

    layout = layout_of(config)
    ranges = stage_layer_ranges(architecture, layout.pp)
    model = _meta_model(architecture)
    stages = [dict.fromkeys(("teacher", "teacher_expert", "lora", "lora_expert"), 0.0) for _ in ranges]
    for name, param in model.named_parameters():
        counts = stages[_stage_of(name, ranges)]
        share = _split(name, param.numel(), getattr(param, "tensor_model_parallel", False), layout)
        counts["teacher"] += share
        if _is_routed_expert(name):
            counts["teacher_expert"] += share
    rank = config.alignment.lora_rank
    for name, layer in model.named_modules():
        if not isinstance(layer, (ColumnParallelLinear, RowParallelLinear)) or not lora_covers(name):
            continue
        counts = stages[_stage_of(name, ranges)]
        expert = _is_routed_expert(name + ".")
        split = layout.etp if expert else layout.tp
        out_features, in_features = layer.weight.shape
        if isinstance(layer, ColumnParallelLinear):
            factors = rank * (in_features + out_features / split)
        else:
            factors = rank * (in_features / split + out_features)
        if expert:
            factors /= layout.ep
            counts["lora_expert"] += factors
        counts["lora"] += factors
    # The student: the teacher plus its <guidance> and <timestep_r> embedders on the first stage,
    # each the size of timestep_emb.
    extra_embedders = STUDENT_EXTRA_EMBEDDERS * sum(p.numel() for p in model.timestep_emb.parameters())
    for stage, counts in enumerate(stages):
        counts["student"] = counts["teacher"] + (extra_embedders if stage == 0 else 0)
        counts["student_expert"] = counts["teacher_expert"]
    return stages


def rank_parameter_counts(architecture: HunyuanImage3Config, config) -> dict[str, float]:
    """``stage_parameter_counts`` of the worst pipeline stage: the one holding the most teacher
    and student parameters (the first at an even split: ``wte``, the image input path and the
    student's two extra embedders outweigh ``lm_head`` and the image head)."""
    return max(stage_parameter_counts(architecture, config), key=lambda counts: counts["teacher"] + counts["student"])


# --------------------------------------------------------------------------- activations


def sequence_length(config, image_tokens: int) -> int:
    """The length of every sequence the trainer runs (teacher, unconditional, student, fake
    network: one length, so pipeline stages exchange one shape): the template, the prompt
    budget ``model.text_tokens``, the student's two extra tokens (``model.student_conditioning=
    tokens``; padding in the other networks' sequences) and the image, rounded up to a multiple of
    TP (so that sequence parallelism splits it; the trainer rounds without SP too)."""
    student = STUDENT_EXTRA_TOKENS if config.model.student_conditioning == "tokens" else 0
    length = TEMPLATE_TOKENS + config.model.text_tokens + student + image_tokens
    tp = config.parallel.tensor_parallel_size
    return -(-length // tp) * tp


def sequence_tokens(architecture: HunyuanImage3Config, config) -> tuple[int, int]:
    """(image tokens, sequence length): the latent grid of ``model.image_size`` and
    ``sequence_length``."""
    per_token = pixels_per_cell(config) * architecture.patch_size
    side, remainder = divmod(config.model.image_size, per_token)
    if remainder:
        raise ValueError(f"model.image_size must be a multiple of {per_token}, got {config.model.image_size}")
    image = side * side
    return image, sequence_length(config, image)


def _element_bytes(config) -> int:
    return 2 if config.model.dtype == "bf16" else 4


def layer_saved_bytes(architecture: HunyuanImage3Config, config, tokens: float) -> float:
    """What one decoder layer saves for backward on one rank for ``tokens`` tokens (sequence x
    batch), primal only. Sequence-parallel chunks are tokens/TP; a column-parallel linear saves
    its input's chunk under sequence parallel (it gathers it again in backward:
    ``jvp/linear.py``), the whole sequence without. e: the element size.

    attention: norm input (and its float32 copy: the norms compute in float32), QKV input, QKV
    output, RoPE'd q and k (two float32 tensors each) and their normed copies, k and v
    repeated to the query heads, the attention output;
    MoE: norm input (and float32 copy) and output, float32 router logits and probabilities, the shared expert's
    input, fc1 output and SwiGLU output; the routed experts' rows (each token k times,
    times ETP after the expert-TP gather): fc1 input, fc1 output, SwiGLU output and its
    probability-scaled copy, float32 probabilities. Balanced routing assumed (every EP rank gets
    tokens·k/TP rows). Without sequence parallel the norms, attention, router and shared expert
    see the whole sequence, but each TP rank still dispatches only its share of the tokens to the
    routed experts (``jvp/moe.moe_forward_jvp``)."""
    a = architecture
    e = _element_bytes(config)
    layout = layout_of(config)
    tp = layout.tp
    local = tokens / (tp if layout.sequence_parallel else 1)
    h, d = a.hidden_size, a.kv_channels
    q_width, kv_width = a.num_attention_heads * d, a.num_query_groups * d
    attention = (
        local * h * (e + 4) + local * h * e
        + tokens / tp * (q_width + 2 * kv_width) * e
        + tokens / tp * (q_width + kv_width) * (2 * 4 + e)
        + tokens / tp * 2 * q_width * e
        + tokens / tp * q_width * e
    )
    shared = a.moe_shared_expert_intermediate_size or 0
    rows = tokens / tp * a.moe_router_topk * layout.etp
    expert_width = a.moe_ffn_hidden_size / layout.etp
    moe = (
        local * h * (2 * e + 4) + 2 * local * a.num_moe_experts * 4
        + (local * h * e + tokens / tp * 3 * shared * e if shared else 0)
        + rows * (h * e + 4 * expert_width * e + 4)
    )
    return attention + moe


def dispatch_buffer_bytes(architecture: HunyuanImage3Config, config, tokens: float, with_tangent: bool) -> float:
    """The MoE exchange buffers of one layer on one rank for ``tokens`` tokens: the permuted rows
    (each token k times) sent and received by the expert-parallel all-to-all — with a tangent,
    primal and tangent rows packed into one buffer each way next to the unpacked originals
    (``collectives.all_to_all_tokens``) — the expert-TP all-gather's output and the float32
    reduce-scatter input of the combine, and the float32 probabilities (exchanged separately).
    Balanced routing assumed."""
    a = architecture
    e = _element_bytes(config)
    layout = layout_of(config)
    local = tokens / layout.tp  # each TP rank dispatches 1/TP of the tokens, with or without SP
    copies = 2 if with_tangent else 1
    sent = local * a.moe_router_topk
    gathered = sent * layout.etp
    # Without a tangent: the send and the receive buffer. With one: the primal's and the
    # tangent's rows, their packed send buffer and the packed receive buffer (2 + 2 + 2 rows).
    total = sent * a.hidden_size * e * (6 if with_tangent else 2)
    if layout.etp > 1:
        total += copies * gathered * a.hidden_size * (e + 4)
    total += copies * 2 * (sent + gathered) * 4
    return total


def _image_path_bytes(architecture: HunyuanImage3Config, config, image_tokens: float) -> float:
    """patch_embed's saved tensors on the first stage (final_layer's on the last are the same
    size): convolution, GroupNorm and SiLU outputs of ``patch_embed_hidden_dim`` and hidden width
    over the latent grid, about (4 c + 6 h) per image token."""
    a = architecture
    return (4 * a.patch_embed_hidden_dim + 6 * a.hidden_size) * image_tokens * _element_bytes(config)


def activation_bytes(architecture: HunyuanImage3Config, config) -> tuple[float, str]:
    """Peak activation bytes of one rank in a training pass of one micro-batch, and the formula.

    With recompute (``model.recompute``) every layer keeps only its input (tokens/TP x h under
    sequence parallel) and backward recomputes one layer at a time (``layer_saved_bytes``);
    without, every layer keeps everything. The MeanFlow tangent pass saves nothing for backward
    but holds one layer's primal and tangent temporaries in its forward (one layer more) and the
    exchange buffers of primal and tangent (``dispatch_buffer_bytes``); the two peaks do not
    coincide, so adding them errs high. 1F1B keeps min(PP, micro-batches) micro-batches in flight
    on the first stage, which also holds the image path's activations. Layers: the largest stage's."""
    layout = layout_of(config)
    image, s = sequence_tokens(architecture, config)
    b = config.data.micro_batch_size
    tokens = s * b
    e = _element_bytes(config)
    layers = max(end - start for start, end in stage_layer_ranges(architecture, layout.pp))
    in_flight = min(layout.pp, config.parallel.num_microbatches)
    one_layer = layer_saved_bytes(architecture, config, tokens)
    dispatch = dispatch_buffer_bytes(architecture, config, tokens, with_tangent=True)
    image_path = _image_path_bytes(architecture, config, image * b)
    if config.model.recompute:
        inputs = tokens * architecture.hidden_size * e / (layout.tp if layout.sequence_parallel else 1)
        total = in_flight * layers * inputs + 2 * one_layer + dispatch + image_path
        formula = f"{in_flight} x {layers} layer inputs + 1 layer recomputed + 1 of tangents"
    else:
        total = in_flight * layers * one_layer + one_layer + dispatch + image_path
        formula = f"{in_flight} x {layers} layers + 1 of tangents"
    formula += f" + dispatch {dispatch / 1e9:.2f} GB + image path; {s} tokens, micro-batch {b}"
    return total, formula


def no_grad_activation_bytes_per_sample(architecture: HunyuanImage3Config, config, with_tangent: bool) -> float:
    """A no-grad forward's peak per sample on one rank (sizes ``parallel.no_grad_memory_gb``'s
    micro-batches): the residual stream (tokens/TP x h under sequence parallel) and one layer's
    temporaries — taken as ``layer_saved_bytes`` — plus the layer's exchange buffers; with a
    tangent the residual and the temporaries twice and the buffers packed."""
    layout = layout_of(config)
    _, s = sequence_tokens(architecture, config)
    residual = s * architecture.hidden_size * _element_bytes(config) / (layout.tp if layout.sequence_parallel else 1)
    copies = 2 if with_tangent else 1
    return (
        copies * (residual + layer_saved_bytes(architecture, config, s))
        + dispatch_buffer_bytes(architecture, config, s, with_tangent)
    )


__all__ = [
    "rank_parameter_counts",
    "stage_parameter_counts",
    "activation_bytes",
    "no_grad_activation_bytes_per_sample",
    "dispatch_buffer_bytes",
    "layer_saved_bytes",
    "sequence_length",
    "sequence_tokens",
    "layout_of",
    "preset_architecture",
]
