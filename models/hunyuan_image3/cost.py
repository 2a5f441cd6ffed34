"""What one HunyuanImage 3.0 network costs, from its shapes alone: FLOPs per sample and the bytes
of every collective a pass sends (``mfmegatron/planner.py`` asks the family for these; the family
delegates here with the teacher's ``HunyuanImage3Config`` and the recipe).

The sequence (``sequence.py``): ``<bos>``, ``model.text_tokens`` prompt tokens, ``<boi>``, size,
ratio, ``<timestep>`` and the "tokens" student's ``<guidance>`` / ``<timestep_r>`` (the prefix),
the ``(image_size / 16)²`` image tokens (``(image_size / 4)²`` in pixel space), ``<eoi>`` (the suffix), right-padded under sequence
parallel to a multiple of TP (``build_image_sequences(..., length=...)``). A teacher evaluation is
classifier-free guided: a [cond; uncond] batch, two sequences per sample.

FLOPs are those of the matrix products, 2 per multiply-add: what ``torch.utils.flop_counter``
counts (a convolution as its im2col product; padding included). Elementwise work (norms, RoPE,
SwiGLU, softmax, routing's top-k, GroupNorm) is left out.

- forward: every linear layer and convolution on its rows: the tokens (attention, router, shared
  expert), each token top-k times (the routed experts: every token goes to exactly k experts, so
  this is deterministic), the image tokens (patch_embed / final_layer convolutions), one row per
  sequence (the timestep embedders, the ResBlocks' modulations); attention 4·d per (query, key)
  pair and head, over what our three calls per sequence compute (``model.mixed_attention_jvp``):
  prefix × prefix (causal), image × (prefix + image) (unmasked), suffix × all (causal, aligned to
  the last key). torch counts a causal call as its whole rectangle;
- tangent (the extra work of a forward with a JVP): each layer with a non-zero input tangent
  once more (all but ``guidance_emb``: w has no tangent; the router's logits too,
  ``jvp/moe.route_jvp``); attention's tangent 10·d per pair for the prefix and image calls (the
  log-sum-exp pass or the Triton kernel, ``jvp/attention.py``) and 12·d for the suffix (its mask
  is aligned to the last key, which no fused kernel serves: the online-softmax pass). The prefix
  call's tangent pass skips key tiles wholly above the diagonal; counted here as the whole
  rectangle, exact while the prefix fits one key tile (1024 on CUDA, 256 on CPU);
- backward: for a network whose weights all train, each layer's weight gradient and input
  gradient (a forward's worth each), except the input gradients of layers whose input is data
  (the latents, the time sinusoids); attention's backward 10·d per pair (torch's count for fused
  attention). A LoRA fake network (``jvp/lora.py``, factors on the linears ``meanflow.lora_covers``
  names: the attention projections) computes input gradients only where the input depends on
  a factor (not the first layer's QKV, nor the image input path or the embedders; the router
  computes its frozen weight's gradient all the same, megatron's gating function) and, per
  tensor-parallel linear, rank·(in + out) multiply-adds forward and rank·(2·out + in) backward
  (plus rank·in for the input's gradient).

Communication is in the second half of the file (``pass_traffic``, ``gradient_traffic``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from models.flux.cost import NetworkFlops, gradient_buffer_elements
from models.hunyuan_image3.config import HunyuanImage3Config
from models.hunyuan_image3.meanflow import lora_covers
from models.hunyuan_image3.memory import TEMPLATE_TOKENS, layout_of, sequence_length
from models.hunyuan_image3.tokenizer import pixels_per_cell

# Attention FLOPs per (query, key) pair, head and unit of head width: the forward's QKᵀ and PV;
# the tangent's log-sum-exp pass and online-softmax pass; the fused backward.
ATTENTION_FORWARD, ATTENTION_TANGENT, ATTENTION_TANGENT_ONLINE, ATTENTION_BACKWARD = 4, 10, 12, 10
ROUTING_COUNT_BYTES = 8  # megatron's per-expert token counts are int64
PROBABILITY_BYTES = 4  # the router runs in float32 (config ``moe_router_dtype="fp32"``)


@dataclass(frozen=True)
class SequenceLayout:
    """Tokens of one sequence: before the image, the image, after it (``<eoi>`` and padding)."""

    prefix: int
    image: int
    suffix: int

    @property
    def tokens(self) -> int:
        return self.prefix + self.image + self.suffix


@dataclass(frozen=True)
class Linear:
    name: str
    rows: str
    """Rows per sequence it maps: "tokens", "routed" (each token top-k times), "image" or
    "sample" (one)."""
    in_features: int
    """For a convolution: input channels × kernel area."""
    out_features: int
    tensor_parallel: bool
    """A megatron Column/RowParallelLinear (LoRA attaches to these)."""
    tangent: bool
    """Maps a non-zero input tangent in a forward with a JVP."""
    data_input: bool
    """Its input is data (no gradient ever flows into it)."""
    lora_input: bool
    """In a LoRA fake network its input depends on a LoRA factor (needs an input gradient)."""
    in_layers: bool = False
    """In the decoder layers (what activation recompute repeats)."""
    frozen_weight_gradient: bool = False
    """Computes its weight's gradient even when the weight is frozen: megatron's
    ``RouterGatingLinearFunction`` (the router) always returns both gradients."""


def network_architecture(architecture: HunyuanImage3Config, network: str) -> HunyuanImage3Config:
    """``network``'s architecture from the teacher's: the student is HunyuanImage-3.0-Instruct-
    Distil's (``cfg_distilled`` and ``use_meanflow``, the teacher's ``student_conditioning``)
    unless ``architecture`` already is a student; the fake and flow networks are the teacher."""
    if network == "student" and not architecture.is_student:
        return dataclasses.replace(architecture, cfg_distilled=True, use_meanflow=True)
    return architecture


def student_token_count(architecture: HunyuanImage3Config) -> int:
    """The "tokens" student's extra tokens: one per embedder it has (``<guidance>``, ``<timestep_r>``)."""
    if architecture.student_conditioning != "tokens":
        return 0
    return int(architecture.cfg_distilled) + int(architecture.use_meanflow)


def sequence_layout(architecture: HunyuanImage3Config, config, network: str) -> SequenceLayout:
    """One sequence of ``network`` at the recipe's image size, prompt length and layout."""
    network_config = network_architecture(architecture, network)
    per_token = pixels_per_cell(config) * architecture.patch_size
    side, remainder = divmod(config.model.image_size, per_token)
    if remainder:
        raise ValueError(f"model.image_size must be a multiple of {per_token}, got {config.model.image_size}")
    # Every network's sequences have the trainer's one length (memory.sequence_length): the
    # student's token slots are padding after <eoi> in the teacher's and the fake network's, and
    # the whole is rounded up to a multiple of TP.
    own = student_token_count(network_config) if config.model.student_conditioning == "tokens" else 0
    prefix = config.model.text_tokens + TEMPLATE_TOKENS - 1 + own
    suffix = sequence_length(config, side * side) - prefix - side * side  # <eoi> and padding
    return SequenceLayout(prefix=prefix, image=side * side, suffix=suffix)


def evaluation_rows(network: str, cfg: bool | None = None) -> int:
    """Sequences per sample of one evaluation: the teacher's are classifier-free guided ([cond;
    uncond], two), the others' one. ``cfg`` overrides the rule."""
    if cfg is None:
        cfg = network == "teacher"
    return 2 if cfg else 1


def linear_layers(architecture: HunyuanImage3Config) -> list[Linear]:
    """Every linear layer and convolution of the whole image network (all pipeline stages), in
    forward order. ``lm_head`` is not on the image path."""
    a = architecture
    h, c, channels = a.hidden_size, a.patch_embed_hidden_dim, a.latent_channels
    layers = []

    def embedder(name, tangent=True):
        layers.extend([Linear(f"{name}.mlp.0", "sample", a.timestep_embedding_dim, h, False, tangent, True, False),
                       Linear(f"{name}.mlp.2", "sample", h, h, False, tangent, False, False)])

    def resblock(name, cin, cout, lora_input):
        layers.extend([Linear(f"{name}.in_layers.2", "image", 9 * cin, cout, False, True, False, lora_input),
                       Linear(f"{name}.emb_layers.1", "sample", h, 2 * cout, False, True, False, False),
                       Linear(f"{name}.out_layers.3", "image", 9 * cout, cout, False, True, False, lora_input)])
        if cin != cout:
            layers.append(Linear(f"{name}.skip_connection", "image", cin, cout, False, True, False, lora_input))

    embedder("time_embed")
    layers.append(Linear("patch_embed.model.0", "image", 9 * channels, c, False, True, True, False))
    resblock("patch_embed.model.1", c, h, lora_input=False)
    embedder("timestep_emb")
    if a.cfg_distilled:
        embedder("guidance_emb", tangent=False)
    if a.use_meanflow:
        embedder("timestep_r_emb")
    d = a.kv_channels
    qkv = (a.num_attention_heads + 2 * a.num_query_groups) * d
    shared = a.moe_shared_expert_intermediate_size or 0
    for index in range(a.num_layers):
        prefix = f"layers.{index}"
        layers += [
            Linear(f"{prefix}.self_attention.linear_qkv", "tokens", h, qkv, True, True, False, index > 0, True),
            Linear(f"{prefix}.self_attention.linear_proj", "tokens", a.num_attention_heads * d, h, True, True, False,
                   True, True),
        ]
        if shared:
            layers += [Linear(f"{prefix}.mlp.shared_experts.linear_fc1", "tokens", h, 2 * shared, True, True, False,
                              True, True),
                       Linear(f"{prefix}.mlp.shared_experts.linear_fc2", "tokens", shared, h, True, True, False,
                              True, True)]
        layers += [
            Linear(f"{prefix}.mlp.router", "tokens", h, a.num_moe_experts, False, True, False, True, True, True),
            Linear(f"{prefix}.mlp.experts.linear_fc1", "routed", h, 2 * a.moe_ffn_hidden_size, True, True, False,
                   True, True),
            Linear(f"{prefix}.mlp.experts.linear_fc2", "routed", a.moe_ffn_hidden_size, h, True, True, False,
                   True, True),
        ]
    embedder("time_embed_2")
    resblock("final_layer.model.0", h, c, lora_input=True)
    layers.append(Linear("final_layer.model.1.2", "image", 9 * c, channels, False, True, False, True))
    return layers


def attention_pairs(sequence: SequenceLayout) -> tuple[int, int]:
    """(query-key pairs of the prefix and image calls, of the suffix call) of one sequence."""
    fused = sequence.prefix * sequence.prefix + sequence.image * (sequence.prefix + sequence.image)
    return fused, sequence.suffix * sequence.tokens


def network_flops(architecture: HunyuanImage3Config, config, network: str, cfg: bool | None = None) -> NetworkFlops:
    """FLOPs per sample of ``network`` ("teacher", "student", "fake" or "flow") through the whole
    network: forward, the extra of a forward with a JVP, backward as the network trains
    (``planner.network_training``: frozen, full or LoRA at ``alignment.lora_rank``) and what
    activation recompute repeats (the layers' primal forward). ``architecture``: the teacher's;
    a teacher evaluation counts its [cond; uncond] pair (``evaluation_rows``)."""
    from mfmegatron.planner import network_training

    training = network_training(config, network)
    lora_rank = config.alignment.lora_rank
    network_config = network_architecture(architecture, network)
    sequence = sequence_layout(architecture, config, network)
    rows = {"tokens": sequence.tokens, "routed": sequence.tokens * network_config.moe_router_topk,
            "image": sequence.image, "sample": 1}
    forward = tangent = backward = recomputed = 0.0
    for layer in linear_layers(network_config):
        macs = rows[layer.rows] * layer.in_features * layer.out_features
        forward += 2 * macs
        recomputed += 2 * macs if layer.in_layers else 0.0
        tangent += 2 * macs if layer.tangent else 0.0
        if training == "full":
            backward += 2 * macs * (1 if layer.data_input else 2)
        elif training == "lora":
            backward += 2 * macs * (int(layer.lora_input) + int(layer.frozen_weight_gradient))
            if layer.tensor_parallel and lora_covers(layer.name):
                factors = rows[layer.rows] * lora_rank
                forward += 2 * factors * (layer.in_features + layer.out_features)
                recomputed += 2 * factors * (layer.in_features + layer.out_features)
                # grad B, grad of A's output, grad A, and the input's when it needs one.
                backward += 2 * factors * (2 * layer.out_features + layer.in_features)
                backward += 2 * factors * layer.in_features if layer.lora_input else 0.0
        elif training != "frozen":
            raise ValueError(f"training must be 'full', 'lora' or 'frozen', got {training!r}")
    fused, suffix = attention_pairs(sequence)
    width = network_config.num_layers * network_config.num_attention_heads * network_config.kv_channels
    forward += ATTENTION_FORWARD * (fused + suffix) * width
    recomputed += ATTENTION_FORWARD * (fused + suffix) * width
    tangent += (ATTENTION_TANGENT * fused + ATTENTION_TANGENT_ONLINE * suffix) * width
    if training != "frozen":
        backward += ATTENTION_BACKWARD * (fused + suffix) * width
    flops = NetworkFlops(forward=forward, tangent=tangent, backward=backward, recomputed=recomputed)
    return flops.times(evaluation_rows(network, cfg))


# --------------------------------------------------------------------------- communication
#
# Bytes are the payload of one call as the caller holds it whole (``mfmegatron/planner.py``): an
# all-reduce's tensor, an all-gather's gathered output, a reduce-scatter's input, a send's or a
# receive's tensor, an all-to-all's input. With a tangent the primal and its tangent travel in one
# call (twice the bytes, the same calls); backward moves only the primal's gradient. Groups: "tp",
# "pp", "dp" (the dense parameters' data-parallel ranks),
# "edp" (the routed experts' data-parallel ranks, world / (ETP·EP·PP)), "ep" (megatron's
# tensor-and-expert-parallel group the MoE dispatcher exchanges over, ETP·EP ranks) and "etp"
# (expert tensor parallel).
#
# The all-to-all: what a rank sends in the dispatch (each of its tokens top-k times) and receives
# in the combine's backward is fixed; what it sends in the combine (the rows its experts got) and in
# the dispatch's backward depends on the routing. Those are given as their expectation under
# balanced routing (every rank's experts get as many rows as it sends): the sum over ranks is exact,
# one rank's share is not.


def _stage_layer_count(architecture: HunyuanImage3Config, config, stage: int) -> int:
    from models.hunyuan_image3.memory import stage_layer_ranges

    start, end = stage_layer_ranges(architecture, layout_of(config).pp)[stage]
    return end - start


def _activation_bytes(config) -> int:
    from models.hunyuan_image3.memory import _element_bytes

    return _element_bytes(config)


def tensor_parallel_traffic(architecture: HunyuanImage3Config, config, network: str, rows: int, stage: int,
                            phase: str, training: str = "full"):
    """TP collectives of one micro-batch of ``rows`` samples (sequences) through pipeline
    ``stage``: ``phase`` "forward", "forward_jvp", "backward" (of a network trained as
    ``training``: "full" or "lora") or "recompute" (the layers' primal forward again, which
    activation recompute runs in backward). The first stage all-reduces the vocabulary-parallel
    embedding (whole sequence, primal only: the ids have no tangent).

    Sequence parallel: every TP linear on the layers' tokens gathers its input or reduce-scatters
    its output (attention QKV and output projection, the shared expert's two), and backward
    gathers again the input of each column-parallel one that saved it (only the rank's chunk is
    kept: ``collectives.saving_sequence_chunk``); the embedding's
    backward gathers the gradient of the sequence split when the image path trains; the last
    stage gathers the sequence for the replicated image head (backward keeps each rank's chunk).

    Without it every rank holds the whole sequence: the row-parallel linears (attention output,
    shared expert fc2) all-reduce their output, the column-parallel ones (QKV, shared fc1)
    all-reduce their input's gradient in backward (megatron's ``allreduce_dgrad``), and the MoE
    hands each rank its share of the rows for the routed experts and all-gathers their combined
    output (``collectives.split_replicated_tokens`` / ``gather_replicated_tokens``; backward
    all-gathers the shares' gradients: the tokens' and the float32 probabilities'). Image head and
    embedding backward: nothing. Returns a ``CollectiveVolume``."""
    from mfmegatron.planner import CollectiveVolume

    volume = CollectiveVolume()
    layout = layout_of(config)
    if layout.tp == 1:
        return volume
    if phase not in ("forward", "forward_jvp", "backward", "recompute"):
        raise ValueError(f"phase must be 'forward', 'forward_jvp', 'backward' or 'recompute', got {phase!r}")
    backward = phase == "backward"
    if backward and training not in ("full", "lora"):
        raise ValueError(f"a backward needs training 'full' or 'lora', got {training!r}")
    a = network_architecture(architecture, network)
    e = _activation_bytes(config)
    tokens = rows * sequence_layout(architecture, config, network).tokens
    sequence_bytes = tokens * a.hidden_size * e
    copies = 2 if phase == "forward_jvp" else 1
    first, last = stage == 0, stage == layout.pp - 1
    layers = _stage_layer_count(a, config, stage)
    # Recompute re-runs the layers only: not the embedding, nor the image head's gather.
    embedding, head = first and phase != "recompute", last and phase != "recompute"
    lora_rank = config.alignment.lora_rank
    # Column-parallel and row-parallel linears of the stage's layers: attention's QKV and output
    # projection, the shared expert's fc1 and fc2.
    pairs = layers * (2 if a.moe_shared_expert_intermediate_size else 1)
    # A LoRA network's first QKV has no input gradient (its input, the frozen embeddings' norm,
    # needs none), so neither its sequence gather nor its dgrad all-reduce has a backward.
    columns_with_input_gradient = pairs - (1 if training == "lora" and first else 0)
    if not backward:
        if embedding:
            volume.add("tp", "all_reduce", sequence_bytes)
        if layout.sequence_parallel:
            volume.add("tp", "all_gather", pairs * copies * sequence_bytes, pairs)
            volume.add("tp", "reduce_scatter", pairs * copies * sequence_bytes, pairs)
            if head:
                volume.add("tp", "all_gather", copies * sequence_bytes)
        else:
            volume.add("tp", "all_reduce", pairs * copies * sequence_bytes, pairs)
            volume.add("tp", "all_gather", layers * copies * sequence_bytes, layers)  # the MoE's combined output
        return volume
    if layout.sequence_parallel:
        # Each gather's gradient is reduce-scattered, each reduce-scatter's gathered. A
        # column-parallel linear saved only the rank's chunk of its gathered input and gathers it
        # again: every one when the network trains fully (the GEMM's weight gradient needs it),
        # the QKV (LoRA's factor A needs it) when it trains LoRA.
        regathered = pairs if training == "full" else layers
        volume.add("tp", "reduce_scatter", columns_with_input_gradient * sequence_bytes, columns_with_input_gradient)
        volume.add("tp", "all_gather", (pairs + regathered) * sequence_bytes, pairs + regathered)
        if first and training == "full":
            volume.add("tp", "all_gather", sequence_bytes)
    else:
        volume.add("tp", "all_reduce", columns_with_input_gradient * sequence_bytes, columns_with_input_gradient)
        # The MoE's shares: the tokens' gradients, then the probabilities' [tokens, experts].
        volume.add("tp", "all_gather", layers * sequence_bytes, layers)
        volume.add("tp", "all_gather", layers * tokens * a.num_moe_experts * PROBABILITY_BYTES, layers)
    if training == "lora":
        # The factor kept whole on every TP rank has its gradient summed over TP (jvp/lora.py),
        # on the attention's pair in every layer (meanflow.lora_covers): the row-parallel output
        # projection's B [h, r]; the column-parallel QKV's A [r, h] with SP, without it the
        # gradient of A's output h = x Aᵀ [tokens, r].
        qkv = lora_rank * a.hidden_size if layout.sequence_parallel else tokens * lora_rank
        volume.add("tp", "all_reduce", layers * (qkv + a.hidden_size * lora_rank) * e, 2 * layers)
    return volume


def expert_traffic(architecture: HunyuanImage3Config, config, network: str, rows: int, stage: int, phase: str):
    """The MoE dispatcher's exchanges of one micro-batch of ``rows`` sequences through pipeline
    ``stage`` (``jvp/moe.moe_forward_jvp``), per layer: the per-expert token counts (int64,
    gathered over the ETP·EP ranks), the tokens' all-to-all (primal and tangent rows packed in one
    call), the float32 probabilities' all-to-all (a second call) and the combine's all-to-all;
    with expert TP its all-gathers and the float32 reduce-scatter of the combine. Backward
    reverses each token and probability exchange for the primal's gradient. Balanced routing for
    the routing-dependent halves (see above)."""
    from mfmegatron.planner import CollectiveVolume

    volume = CollectiveVolume()
    layout = layout_of(config)
    if layout.ep * layout.etp == 1:
        return volume
    a = network_architecture(architecture, network)
    e = _activation_bytes(config)
    backward = phase == "backward"
    copies = 2 if phase == "forward_jvp" else 1
    layers = _stage_layer_count(a, config, stage)
    # With or without sequence parallel each TP rank dispatches its 1/TP of the tokens
    # (without it, its share of the replicated sequence: jvp/moe.moe_forward_jvp).
    local_tokens = rows * sequence_layout(architecture, config, network).tokens // layout.tp
    routed = local_tokens * a.moe_router_topk  # rows this rank sends (and, balanced, receives)
    token_bytes, probability_bytes = routed * a.hidden_size * e, routed * PROBABILITY_BYTES
    # One layer's; every layer of the stage does the same.
    if layout.ep > 1:
        tangent_copies = 1 if backward else copies
        volume.add("ep", "all_to_all", tangent_copies * token_bytes)  # dispatch (backward: combine's)
        volume.add("ep", "all_to_all", tangent_copies * token_bytes)  # combine (backward: dispatch's)
        volume.add("ep", "all_to_all", tangent_copies * probability_bytes)
    if not backward:
        volume.add("ep", "all_gather", layout.ep * layout.etp * a.num_moe_experts * ROUTING_COUNT_BYTES)
    if layout.etp > 1:  # measured at TP=2 ± SP, expert TP=2 (tests/test_hunyuan_image3_cost.py)
        gathered = layout.etp * routed
        if backward:
            volume.add("etp", "reduce_scatter", gathered * a.hidden_size * e)
            volume.add("etp", "reduce_scatter", gathered * PROBABILITY_BYTES)
            volume.add("etp", "all_gather", gathered * a.hidden_size * PROBABILITY_BYTES)
        else:
            volume.add("etp", "all_gather", copies * gathered * a.hidden_size * e)
            volume.add("etp", "all_gather", copies * gathered * PROBABILITY_BYTES)
            volume.add("etp", "reduce_scatter", copies * gathered * a.hidden_size * PROBABILITY_BYTES)
    return volume.scaled(layers)


def pipeline_traffic(architecture: HunyuanImage3Config, config, network: str, rows: int, stage: int,
                     with_tangent: bool, with_backward: bool):
    """Point-to-point traffic of pipeline ``stage`` for one micro-batch: the stage activation
    (this rank's sequence chunk, the tangent's rows after the primal's) forward, its gradient (the
    same shape: the tangent half carries zeros) backward."""
    from mfmegatron.planner import CollectiveVolume

    volume = CollectiveVolume()
    layout = layout_of(config)
    if layout.pp == 1:
        return volume
    tokens = sequence_layout(architecture, config, network).tokens // (layout.tp if layout.sequence_parallel else 1)
    nbytes = (2 if with_tangent else 1) * rows * tokens * architecture.hidden_size * _activation_bytes(config)
    volume.add_stage_exchange(nbytes, stage, layout.pp, with_backward)
    return volume


def pass_traffic(architecture: HunyuanImage3Config, config, network: str, phase: str, rows: int, stage: int,
                 with_backward: bool):
    """Collectives of one micro-batch of ``rows`` samples through ``network``'s pipeline
    ``stage``: TP, the MoE's exchanges (``phase`` "forward" or "forward_jvp"; and the backward's
    when ``with_backward``, with the layers' forward ones again under activation recompute) and
    the pipeline sends. A teacher evaluation is a [cond; uncond]
    batch: twice the rows (``evaluation_rows``)."""
    from mfmegatron.planner import network_training

    sequences = rows * evaluation_rows(network)
    volume = (tensor_parallel_traffic(architecture, config, network, sequences, stage, phase)
              + expert_traffic(architecture, config, network, sequences, stage, phase))
    if with_backward:
        training = network_training(config, network)
        volume = (volume + tensor_parallel_traffic(architecture, config, network, sequences, stage, "backward",
                                                   training)
                  + expert_traffic(architecture, config, network, sequences, stage, "backward"))
        if config.model.recompute:
            # Every layer re-runs its primal forward in backward (the family recomputes them all,
            # jvp/recompute.py), and with it the layers' TP collectives and MoE exchanges.
            volume = (volume + tensor_parallel_traffic(architecture, config, network, sequences, stage, "recompute")
                      + expert_traffic(architecture, config, network, sequences, stage, "forward"))
    return volume + pipeline_traffic(architecture, config, network, sequences, stage, phase == "forward_jvp",
                                     with_backward)


def gradient_traffic(architecture: HunyuanImage3Config, config, network: str, stage: int, data_parallel_size: int):
    """Collectives of one optimizer step of ``network`` on pipeline ``stage``'s ranks: the TP sum
    of replicated weights' partial gradients (megatron's ``finalize_model_grads``: the
    sequence-parallel norms and router, the q/k norms), and the data-parallel reduction of megatron
    DDP's buffers (with the distributed optimizer: reduce-scatter, then the updated parameters'
    all-gather): the dense parameters' over the ``data_parallel_size`` ranks, the routed experts'
    over the expert-data-parallel ranks in buffers of their own (the trainer marks them
    ``allreduce=False`` at every layout: ``parallelize.mark_routed_experts``). DDP keeps one buffer per
    parameter dtype (the float32 router apart from bf16 weights), each one call. With expert
    buffers megatron chains a dense and an expert distributed optimizer, and each one's step
    all-gathers every buffer (``start_param_sync_for_bucket_group_subset``): the parameters'
    all-gather runs twice (measured).

    A LoRA network's factors: on the linears ``meanflow.lora_covers`` names (the attention
    projections; none on routed experts)."""
    from mfmegatron.jvp.linear import ColumnParallelLinear, RowParallelLinear
    from mfmegatron.planner import CollectiveVolume, network_training
    from models.hunyuan_image3.memory import _is_routed_expert, _meta_model, _split, _stage_of, stage_layer_ranges

    volume = CollectiveVolume()
    layout = layout_of(config)
    training = network_training(config, network)
    a = network_architecture(architecture, network)
    model = _meta_model(a)
    ranges = stage_layer_ranges(a, layout.pp)
    buffers = {}  # (expert, param dtype bytes) -> numels in named_parameters order

    def grad_bytes(weight_bytes):
        return 4 if config.optim.grad_reduce_in_fp32 else weight_bytes

    if training == "lora":
        rank = config.alignment.lora_rank
        weight_bytes = _activation_bytes(config)
        for name, layer in model.named_modules():
            if not isinstance(layer, (ColumnParallelLinear, RowParallelLinear)) or _stage_of(name, ranges) != stage:
                continue
            if not lora_covers(name):
                continue
            expert = _is_routed_expert(name + ".")
            split = layout.etp if expert else layout.tp
            out_features, in_features = layer.weight.shape
            if isinstance(layer, ColumnParallelLinear):
                factors = [rank * in_features, out_features // split * rank]
            else:
                factors = [rank * in_features // split, out_features * rank]
            buffers.setdefault((expert, weight_bytes), []).extend(factors)
    else:
        summed = 0
        for name, param in model.named_parameters():
            if _stage_of(name, ranges) != stage:
                continue
            numel = int(_split(name, param.numel(), getattr(param, "tensor_model_parallel", False), layout))
            # Routed experts in buffers of their own at every layout (parallelize.mark_routed_experts).
            buffers.setdefault((_is_routed_expert(name), param.element_size()), []).append(numel)
            replicated_partial = name.endswith(("layernorm.weight", "mlp.router.weight"))
            if replicated_partial and (layout.sequence_parallel or "q_layernorm" in name or "k_layernorm" in name):
                summed += numel * grad_bytes(param.element_size())
        if layout.tp > 1 and summed:
            volume.add("tp", "all_reduce", summed)
    expert_data_parallel_size = data_parallel_size * layout.tp // (layout.ep * layout.etp)
    # megatron chains a dense and an expert optimizer when any trained parameter is an expert's.
    optimizers = 2 if any(expert for expert, _ in buffers) else 1
    for (expert, weight_bytes), numels in buffers.items():
        group, ranks = ("edp", expert_data_parallel_size) if expert else ("dp", data_parallel_size)
        if ranks == 1:
            continue
        distributed = config.parallel.use_distributed_optimizer
        elements = gradient_buffer_elements(numels, ranks, distributed)
        if distributed:
            volume.add(group, "reduce_scatter", elements * grad_bytes(weight_bytes))
            volume.add(group, "all_gather", optimizers * elements * weight_bytes, optimizers)
        else:
            volume.add(group, "all_reduce", elements * grad_bytes(weight_bytes))
    return volume


def layout_problem(architecture: HunyuanImage3Config, config) -> str | None:
    """Why HunyuanImage 3.0 cannot train, or cannot be planned, at the recipe's layout, or None
    (``parallelize.check_layout``: TP splits whole KV groups, heads, vocabulary and shared expert
    (sequence parallel optional); EP divides the experts, expert TP their width, PP the layers)."""
    from models.hunyuan_image3.parallelize import LayoutError, check_layout

    layout = layout_of(config)
    try:
        check_layout(architecture, tp=layout.tp, ep=layout.ep, pp=layout.pp, etp=layout.etp,
                     sequence_parallel=layout.sequence_parallel)
    except LayoutError as error:
        return str(error)
    return None
