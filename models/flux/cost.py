"""What one FLUX network costs, from its shapes alone: FLOPs per sample and the bytes of every
collective a pass sends (``mfmegatron/planner.py`` asks ``FluxFamily`` for these).

FLOPs are those of the matrix products, 2 per multiply-add: what ``torch.utils.flop_counter``
counts. Elementwise work (norms, modulation, RoPE, GELU, softmax's exponentials) is left out.

- forward: every linear layer on its rows (tokens, or one row per sample for the embedders and
  the adaLN modulations) and attention's two products, 4·s²·h per block (s tokens, h width);
- tangent (the extra work of a forward with a JVP): each linear layer that receives a non-zero
  input tangent once more (the text input, the guidance and the pooled-text embeddings carry
  none) and attention's tangent, 10·s²·h per block (the log-sum-exp pass and the Triton kernel,
  ``jvp/attention.py``: tS = [tQ|Q][K|tK]ᵀ 4, S again 2, (P∘tS)V 2, P·tV 2);
- backward: for a network whose weights all train, the weight gradient and the input gradient
  (each a forward's worth) of every linear layer, except the input gradients of layers whose
  input is data (latents, text states, the time sinusoids, the pooled text); attention's
  backward 10·s²·h (torch's count for fused attention: S recomputed, dP, dV, dQ, dK). A LoRA
  fake network (frozen weights, ``jvp/lora.py``) computes input gradients only where its input
  depends on a LoRA factor (the blocks and the final projection; not the embedders or the
  modulations, whose input is the frozen time embedding) and, per tensor-parallel linear,
  rank·(in + out) multiply-adds forward and twice that (plus the input's) backward.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.flux.config import FluxConfig

# Attention FLOPs per (token pair x width unit) and block: forward QKᵀ and PV; the tangent's
# log-sum-exp pass; the backward of fused attention.
ATTENTION_FORWARD, ATTENTION_TANGENT, ATTENTION_BACKWARD = 4, 10, 10


@dataclass(frozen=True)
class Linear:
    name: str
    rows: str
    """Rows per sample it maps: "image", "text" or "tokens" (both), or "sample" (one)."""
    in_features: int
    out_features: int
    tensor_parallel: bool
    """A megatron Column/RowParallelLinear (split over TP; LoRA attaches to these)."""
    tangent: bool
    """Maps a non-zero input tangent in a forward with a JVP."""
    data_input: bool
    """Its input is data (no gradient ever flows into it)."""
    block_input: bool = False
    """Its input is a block activation (depends on the blocks' LoRA factors in a LoRA fake)."""


@dataclass(frozen=True)
class NetworkFlops:
    """FLOPs of one network for one sample."""

    forward: float
    tangent: float
    """The extra FLOPs of a forward with a JVP (forward + tangent: the JVP forward)."""
    backward: float
    """0 for a frozen network."""
    recomputed: float = 0.0
    """What activation recompute repeats in a backward: the blocks' forward (primal only)."""

    def times(self, rows: int) -> "NetworkFlops":
        """The FLOPs of ``rows`` evaluations per sample (a CFG teacher: conditional + unconditional)."""
        return NetworkFlops(forward=rows * self.forward, tangent=rows * self.tangent,
                            backward=rows * self.backward, recomputed=rows * self.recomputed)


def linear_layers(flux: FluxConfig, student: bool) -> list[Linear]:
    """Every linear layer of the whole network (all pipeline stages), in forward order."""
    h, ffn, frequencies = flux.hidden_size, flux.ffn_hidden_size, flux.timestep_embedding_dim
    layers = [Linear("time_in.linear_1", "sample", frequencies, h, False, True, True),
              Linear("time_in.linear_2", "sample", h, h, False, True, False)]
    if flux.guidance_embeds:
        layers += [Linear("guidance_in.linear_1", "sample", frequencies, h, False, False, True),
                   Linear("guidance_in.linear_2", "sample", h, h, False, False, False)]
    layers += [Linear("vector_in.linear_1", "sample", flux.pooled_projection_dim, h, False, False, True),
               Linear("vector_in.linear_2", "sample", h, h, False, False, False)]
    if student:
        layers += [Linear("interval_in.linear_1", "sample", frequencies, h, False, True, True),
                   Linear("interval_in.linear_2", "sample", h, h, False, True, False)]
    layers += [Linear("img_in", "image", flux.in_channels * flux.patch_size**2, h, False, True, True),
               Linear("txt_in", "text", flux.joint_attention_dim, h, False, False, True)]
    for block in range(flux.num_double_layers):
        for stream, rows in (("img", "image"), ("txt", "text")):
            prefix = f"double_blocks.{block}.{stream}"
            layers += [Linear(f"{prefix}_mod", "sample", h, 6 * h, True, True, False),
                       Linear(f"{prefix}_attn.linear_qkv", rows, h, 3 * h, True, True, False, True),
                       Linear(f"{prefix}_attn_proj", rows, h, h, True, True, False, True),
                       Linear(f"{prefix}_mlp.linear_fc1", rows, h, ffn, True, True, False, True),
                       Linear(f"{prefix}_mlp.linear_fc2", rows, ffn, h, True, True, False, True)]
    for block in range(flux.num_single_layers):
        prefix = f"single_blocks.{block}"
        layers += [Linear(f"{prefix}.mod", "sample", h, 3 * h, True, True, False),
                   Linear(f"{prefix}.attn.linear_qkv", "tokens", h, 3 * h, True, True, False, True),
                   Linear(f"{prefix}.linear_mlp_in", "tokens", h, ffn, True, True, False, True),
                   Linear(f"{prefix}.linear_attn_out", "tokens", h, h, True, True, False, True),
                   Linear(f"{prefix}.linear_mlp_out", "tokens", ffn, h, True, True, False, True)]
    layers += [Linear("final_mod", "sample", h, 2 * h, True, True, False),
               Linear("final_proj", "image", h, flux.patch_size**2 * flux.out_channels, False, True, False, True)]
    return layers


def network_flops(flux: FluxConfig, image_tokens: int, text_tokens: int, student: bool,
                  training: str = "full", lora_rank: int = 0) -> NetworkFlops:
    """FLOPs of one sample through the whole network (see the module docstring).

    ``training``: "full" (every weight trains: the student, a full fake, a flow network),
    "lora" (frozen weights plus LoRA factors of rank ``lora_rank`` on the TP linears) or
    "frozen" (the teacher: no backward).
    """
    rows = {"image": image_tokens, "text": text_tokens, "tokens": image_tokens + text_tokens, "sample": 1}
    forward = tangent = backward = blocks = 0.0
    for layer in linear_layers(flux, student):
        macs = rows[layer.rows] * layer.in_features * layer.out_features
        forward += 2 * macs
        in_block = layer.name.startswith(("double_blocks.", "single_blocks."))
        blocks += 2 * macs if in_block else 0.0
        if layer.tangent:
            tangent += 2 * macs
        if training == "full":
            backward += 2 * macs * (1 if layer.data_input else 2)
        elif training == "lora":
            backward += 2 * macs if layer.block_input else 0.0
            if layer.tensor_parallel:
                factors = rows[layer.rows] * lora_rank
                forward += 2 * factors * (layer.in_features + layer.out_features)
                blocks += 2 * factors * (layer.in_features + layer.out_features) if in_block else 0.0
                # grad B, grad of A's output, grad A, and the input's when it needs one.
                backward += 2 * factors * (2 * layer.out_features + layer.in_features)
                backward += 2 * factors * layer.in_features if layer.block_input else 0.0
        elif training != "frozen":
            raise ValueError(f"training must be 'full', 'lora' or 'frozen', got {training!r}")
    tokens = image_tokens + text_tokens
    pairs = flux.num_layers * tokens * tokens * flux.hidden_size
    forward += ATTENTION_FORWARD * pairs
    blocks += ATTENTION_FORWARD * pairs
    tangent += ATTENTION_TANGENT * pairs
    if training != "frozen":
        backward += ATTENTION_BACKWARD * pairs
    return NetworkFlops(forward=forward, tangent=tangent, backward=backward, recomputed=blocks)


# --------------------------------------------------------------------------- communication
#
# Bytes are the payload of one call as the caller holds it whole: an all-reduce's tensor, an
# all-gather's gathered output, a reduce-scatter's input, a send's or a receive's tensor, a
# broadcast's tensor. With a tangent the primal and its tangent travel stacked in one call (twice
# the bytes, the same calls); backward moves only the primal's gradient.


def _stage_blocks(flux: FluxConfig, stage: int) -> tuple[int, int]:
    """(double, single) blocks of pipeline ``stage``."""
    from models.flux.parallelize import pipeline_block_range

    start, end = pipeline_block_range(flux, stage)
    doubles = max(0, min(end, flux.num_double_layers) - start)
    return doubles, (end - start) - doubles


def tensor_parallel_traffic(flux: FluxConfig, image_tokens: int, text_tokens: int, rows: int, stage: int,
                            phase: str, training: str = "full", lora_rank: int = 0):
    """TP collectives of one micro-batch of ``rows`` samples through pipeline ``stage`` of the
    network at ``flux``'s layout (its TP size and sequence parallelism): ``phase`` "forward",
    "forward_jvp" (a forward with a tangent) or "backward" (of a network trained as ``training``:
    "full" or "lora"). Returns a ``mfmegatron.planner.CollectiveVolume``."""
    from mfmegatron.planner import CollectiveVolume

    volume = CollectiveVolume()
    tp, sp = flux.tensor_model_parallel_size, flux.sequence_parallel
    if tp == 1:
        return volume
    if phase not in ("forward", "forward_jvp", "backward"):
        raise ValueError(f"phase must be 'forward', 'forward_jvp' or 'backward', got {phase!r}")
    backward = phase == "backward"
    if backward and training not in ("full", "lora"):
        raise ValueError(f"a backward needs training 'full' or 'lora', got {training!r}")
    lora = backward and training == "lora"
    copies = 2 if phase == "forward_jvp" else 1
    e = flux.params_dtype.itemsize
    h = flux.hidden_size
    row_bytes = rows * h * e  # one [rows, h] activation row per token
    # With activation recompute a block's backward first re-runs its primal forward (never the
    # tangent: jvp/recompute.py), and with it the forward's collectives.
    recompute = backward and flux.recompute_granularity == "full"
    block = {"recomputed": False}  # whether the block being counted is recomputed

    def recomputed(stage_block_index):
        """Megatron's settings, as ``FluxModel._recomputes`` reads them."""
        if not recompute:
            return False
        return flux.recompute_method != "block" or stage_block_index < flux.recompute_num_layers

    def forward_op(kind, tokens):
        if not backward:
            volume.add("tp", kind, copies * tokens * row_bytes)
        elif block["recomputed"]:
            volume.add("tp", kind, tokens * row_bytes)

    def backward_op(kind, tokens):
        if backward:
            volume.add("tp", kind, tokens * row_bytes)

    def column(tokens, in_features, gathered_by_caller=False):
        """A column-parallel linear on the block rows: SP gathers its input (backward
        reduce-scatters) and, having saved only the rank's chunk of it for backward (the GEMM's
        for its weight gradient, or a LoRA's for A), gathers it again in backward, once per layer
        even where two layers share the forward's gather; without SP its input gradient is
        all-reduced."""
        if sp:
            if not gathered_by_caller:
                forward_op("all_gather", tokens)
                backward_op("reduce_scatter", tokens)
            backward_op("all_gather", tokens)
        else:
            backward_op("all_reduce", tokens)
        if lora:  # the whole factor's gradient is summed over TP (jvp/lora.py)
            volume.add("tp", "all_reduce", (lora_rank * in_features if sp else rows * tokens * lora_rank) * e)

    def row(tokens):
        """A row-parallel reduction of the block rows: SP reduce-scatters (backward gathers),
        without SP it all-reduces (backward: nothing)."""
        if sp:
            forward_op("reduce_scatter", tokens)
            backward_op("all_gather", tokens)
        else:
            forward_op("all_reduce", tokens)

    def row_lora(out_features):
        if lora:
            volume.add("tp", "all_reduce", out_features * lora_rank * e)

    def modulation(chunks, on_sequence_chunks=True):
        """adaLN: a column-parallel linear on temb [1, rows, h] with a gathered output."""
        if not backward:
            volume.add("tp", "all_gather", copies * rows * chunks * h * e)
            return
        if block["recomputed"]:
            volume.add("tp", "all_gather", rows * chunks * h * e)
        if training == "full":  # its input, SiLU(temb), needs a gradient only when temb trains
            volume.add("tp", "all_reduce", rows * h * e)
        if sp and on_sequence_chunks:  # its outputs act on this rank's tokens: summed over TP
            volume.add("tp", "all_reduce", rows * chunks * h * e)
        if lora:
            volume.add("tp", "all_reduce", rows * lora_rank * e)

    first, last = stage == 0, stage == flux.pipeline_model_parallel_size - 1
    doubles, singles = _stage_blocks(flux, stage)
    tokens = image_tokens + text_tokens
    if first and sp and training == "full":
        # Entering the sequence-parallel region splits txt and img; backward gathers each.
        backward_op("all_gather", text_tokens)
        backward_op("all_gather", image_tokens)
    for index in range(doubles):
        block["recomputed"] = recomputed(index)
        for stream_tokens in (image_tokens, text_tokens):
            modulation(6)
            column(stream_tokens, h)  # QKV
            row(stream_tokens)  # attention output projection
            row_lora(h)
            column(stream_tokens, h)  # MLP
            row(stream_tokens)
            row_lora(h)
    for index in range(singles):
        block["recomputed"] = recomputed(doubles + index)
        modulation(3)
        if sp:  # one gather feeds both column-parallel layers
            forward_op("all_gather", tokens)
            backward_op("reduce_scatter", tokens)
        column(tokens, h, gathered_by_caller=True)  # QKV
        column(tokens, h, gathered_by_caller=True)  # MLP in
        row_lora(h)  # attention out and MLP out: partial sums, reduced once
        row_lora(h)
        row(tokens)
    block["recomputed"] = False
    if last:
        if sp:  # the replicated final layer reads all image tokens; each rank keeps its gradient
            forward_op("all_gather", image_tokens)
        modulation(2, on_sequence_chunks=False)
    return volume


def pipeline_traffic(flux: FluxConfig, image_tokens: int, text_tokens: int, rows: int, stage: int,
                     with_tangent: bool, with_backward: bool):
    """Point-to-point traffic of pipeline ``stage`` for one micro-batch: the stage activation
    ``[temb; rows]`` (its tangent rows after it) forward, its gradient (the same shape: the
    tangent half carries zeros) backward."""
    from mfmegatron.planner import CollectiveVolume

    volume = CollectiveVolume()
    stages = flux.pipeline_model_parallel_size
    if stages == 1:
        return volume
    sp = flux.tensor_model_parallel_size if flux.sequence_parallel else 1
    local_rows = (1 + (image_tokens + text_tokens) // sp) * (2 if with_tangent else 1)
    nbytes = local_rows * rows * flux.hidden_size * flux.pipeline_dtype.itemsize
    volume.add_stage_exchange(nbytes, stage, stages, with_backward)
    return volume


def on_stage(flux: FluxConfig, name: str, stage: int) -> bool:
    """Whether the whole model's parameter or module ``name`` lives on pipeline ``stage``."""
    from models.flux.parallelize import pipeline_block_range

    start, end = pipeline_block_range(flux, stage)
    for kind, offset in (("double_blocks.", 0), ("single_blocks.", flux.num_double_layers)):
        if name.startswith(kind):
            return start <= offset + int(name[len(kind):].split(".")[0]) < end
    if name.startswith(("final_mod", "final_proj")):
        return stage == flux.pipeline_model_parallel_size - 1
    return stage == 0


def gradient_buffer_elements(numels: list[int], data_parallel_size: int, distributed_optimizer: bool) -> int:
    """Elements of megatron DDP's gradient (and, with the distributed optimizer, parameter)
    buffer for parameters of ``numels`` in ``named_parameters`` order, as one bucket (our trainer
    does not overlap the gradient reduction, so megatron makes one bucket): the distributed
    optimizer aligns each parameter's start to 64 elements (the buffer is laid out in reverse
    order) and pads the end to a multiple of lcm(DP, 128)."""
    from megatron.core.optimizer.param_layout import pad_bucket_end, pad_param_start

    if not distributed_optimizer:
        return sum(numels)
    end = 0
    for numel in reversed(numels):
        end = pad_param_start(end) + numel
    return pad_bucket_end(end, data_parallel_size, False)
