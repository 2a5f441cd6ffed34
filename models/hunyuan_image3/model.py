"""HunyuanImage 3.0 on megatron-core: the language-model trunk and the text-to-image path.

Reads top to bottom as the architecture:

    wte(token ids)                                         -> hidden [s, b, h]
      image generation: <timestep> row <- timestep_emb(σ),
      <img> rows <- patch_embed(latents, time_embed(σ))     (sequence.py builds the sequence)
    32 decoder layers, pre-norm:
        x += o_proj(attention(input_layernorm(x)))          GQA, fused per-group QKV, 2-D RoPE
                                                            then q/k RMSNorm; causal, the image
                                                            block bidirectional
        x += shared_expert(h) + moe(h),  h = post_attention_layernorm(x)
    text:  ln_f, lm_head                                   -> logits
    image: <img> rows, *without* ln_f, final_layer(·, time_embed_2(σ)) -> velocity [b, C, h, w]

megatron-core pieces: the attention projections are megatron's Column/RowParallelLinear
(``mfmegatron.jvp.linear``), the MoE is megatron's ``MoELayer`` (router, token dispatcher,
``SequentialMLP`` experts, ``SharedExpertMLP``), the embedding megatron's
``VocabParallelEmbedding``. The attention itself is written here because HunyuanImage 3.0
normalises q and k *after* RoPE (megatron's ``SelfAttention`` normalises before).

Layouts: tensors are sequence-first ``[s, b, h]`` (megatron's convention). The fused QKV weight's
rows are ``[group][q_0 .. q_{n-1}, k, v][head_dim]`` with ``n = heads / groups``: megatron's own
``linear_qkv`` order, the same as the released ``qkv_proj`` (a TP split is whole KV groups). The
expert ``linear_fc1`` rows are ``[gate; up]`` (megatron's GLU activates the first half); the
released ``gate_and_up_proj`` is ``[up; gate]`` and is swapped by ``state_dict_adapter``.

Numerics as the official code: RMSNorm, RoPE tables and rotation, the router weight, logits and
softmax in float32; results cast back to the activation dtype.

Parallelism: tensor parallel with sequence parallel keeps activations between layers as sequence
chunks ``[s/tp, b, h]``; without it they are the whole sequence on every TP rank, and each rank
dispatches its share of the tokens to the routed experts (``jvp/moe.py``); experts are split
over expert parallel (and expert tensor parallel); pipeline stages hold a contiguous range of
layers and pass the [s, b, h] activation. The image-path modules are replicated over TP. See
``parallelize.py``.

Attention mask: causal for text; with ``image_spans`` (one ``(start, end)`` of ``<img>`` tokens
per sample) the image block is bidirectional, run as a causal call, an unmasked call and a short
causal tail per sample (``mixed_attention_jvp``), never an S×S mask.

Few-step student (``config.cfg_distilled`` / ``use_meanflow``, the Instruct-Distil names):
``guidance_emb(1000·w)`` and ``timestep_r_emb(1000·σ_r)`` on the first stage, as the
``<guidance>`` / ``<timestep_r>`` rows after ``<timestep>`` (``student_conditioning="tokens"``)
or added to ``<timestep>``'s row (``"embedding"``); their last linear is zero at init.

``forward_jvp(x, tx, ...) -> (y, ty)`` on every module (tangent without autograd graph;
``tx=None`` is the primal alone); ``HunyuanImage3Model.velocity_jvp`` is the whole image forward's
(tangents in the latents and σ). ``DecoderLayer.forward_jvp`` and
``HunyuanImage3Model.decoder_forward_jvp`` carry the tangent through the layers; the MoE's is
``mfmegatron.jvp.moe.moe_forward_jvp`` (the primal routes; the
tangents travel with their tokens through the same dispatch, primal and tangent in one
all-to-all). With ``recompute_granularity="full"`` each layer recomputes only its primal in
backward.
"""

from __future__ import annotations

import math

import torch
from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule

from mfmegatron.jvp import functional as jf
from mfmegatron.parallel import collectives
from mfmegatron.jvp.attention import attention, attention_jvp
from mfmegatron.jvp.moe import moe_forward_jvp
from mfmegatron.jvp.recompute import checkpoint_primal
from models.hunyuan_image3.config import HunyuanImage3Config
from models.hunyuan_image3.layer_specs import HunyuanLayerSpec, get_hunyuan_layer_spec
from models.hunyuan_image3.state_dict_adapter import IMAGE_HEAD_PREFIXES

# --------------------------------------------------------------------------- norms, rotary


class RMSNorm(torch.nn.Module):
    """``weight * (x / rms(x))`` with the normalisation in float32 (float64 inputs stay float64)
    and the scale applied after the cast back to x's dtype (``jvp.functional.rms_norm_float32``)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, sequence_parallel: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(dim, dtype=dtype))
        # Applied to sequence chunks under sequence parallel: megatron's finalize_model_grads
        # then sums the weight's gradient over TP.
        self.weight.sequence_parallel = sequence_parallel

    def forward_jvp(self, x, tx=None):
        return jf.rms_norm_float32(x, tx, self.weight, self.eps)

    def forward(self, x):
        return self.forward_jvp(x)[0]


def rope_tables(positions_y: torch.Tensor, positions_x: torch.Tensor, head_dim: int, theta: float):
    """cos, sin [..., head_dim] in float32 for per-token (y, x) positions [...] ([s] or [b, s]).

    Frequency m (m = 0 .. head_dim/2 - 1) is ``theta^(-2m/head_dim)``; its angle uses y for even m
    and x for odd m; the table is laid out ``[angles, angles]`` (pairs m, m + head_dim/2, applied
    with rotate_half). A text token at index n has y = x = n: plain 1-D RoPE.
    """
    device = positions_y.device
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    even = (torch.arange(head_dim // 2, device=device) % 2) == 0
    positions = torch.where(even, positions_y.float()[..., None], positions_x.float()[..., None])
    angles = positions * inv_freq
    table = torch.cat([angles, angles], dim=-1)
    return table.cos(), table.sin()


def text_rope_positions(length: int, device=None):
    """(y, x) positions of a text-only sequence: y = x = index."""
    index = torch.arange(length, device=device)
    return index, index


def apply_rope(x, cos, sin):
    """x [s, b, heads, d]; cos, sin [s, d] (one table for the batch) or [s, b, d] (per sample);
    rotate_half RoPE, returned in float32 (float64 stays float64): the official code keeps the
    rotated q and k in float32 through their RMSNorm and casts after it. Linear in x: the
    tangent is the same rotation (``apply_rope_jvp``)."""
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    half = wide.shape[-1] // 2
    rotated = torch.cat([-wide[..., half:], wide[..., :half]], dim=-1)
    if cos.dim() == 2:
        cos, sin = cos[:, None, None, :], sin[:, None, None, :]
    else:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return wide * cos + rotated * sin


def apply_rope_jvp(x, tx, cos, sin):
    y = apply_rope(x, cos, sin)
    if tx is None:
        return y, None
    with torch.no_grad():
        return y, apply_rope(tx, cos, sin)


# --------------------------------------------------------------------------- attention


def mixed_attention_jvp(q, k, v, tq=None, tk=None, tv=None, image_spans=None):
    """HunyuanImage 3.0's attention and its JVP, without an S×S mask.

    q [b, heads, s, d]; k, v [b, heads, s, d] (KV heads already repeated per query head);
    tangents alike or None. ``image_spans``: None (every sample causal) or one ``(start, end)``
    per sample, the ``<img>`` tokens ``[start, end)``. The official mask
    (``_prepare_attention_mask_for_generation``) is causal plus full attention within the image
    block: image queries see keys ``[0, end)``, the others are causal. Per run of samples with the
    same span that is three attention calls, each of which fused kernels serve:

    - queries ``[0, start)`` (the prefix up to ``<timestep>``): causal over keys ``[0, start)``;
    - queries ``[start, end)`` (the image): unmasked over keys ``[0, end)``;
    - queries ``[end, s)`` (``<eoi>`` and right padding, a few tokens): causal over all keys,
      aligned to the last key (``jvp.attention``'s ``causal``).

    Returns (o, to) [b, heads, s, d]; ``to`` is None without tangents (the primal alone).
    """
    def attend(queries, keys_end, causal, batch):
        """Queries ``queries`` (a slice of positions) of samples ``batch`` over keys [0, keys_end)."""
        def pick(query, key, value):
            keys = slice(0, keys_end)
            return query[batch, :, queries], key[batch, :, keys], value[batch, :, keys]

        if tq is None:
            return attention(*pick(q, k, v), causal=causal), None
        return attention_jvp(*pick(q, k, v), *pick(tq, tk, tv), causal=causal)

    s = q.shape[2]
    if image_spans is None:
        return attend(slice(None), s, True, slice(None))
    if len(image_spans) != q.shape[0]:
        raise ValueError(f"{len(image_spans)} image spans for a batch of {q.shape[0]}")
    samples_by_span = {}
    for sample, span in enumerate(image_spans):
        samples_by_span.setdefault((int(span[0]), int(span[1])), []).append(sample)
    outs, touts, order = [], [], []
    for (start, end), samples in samples_by_span.items():
        if not 0 < start < end <= s:
            raise ValueError(f"image span [{start}, {end}) does not fit a sequence of {s} after a prefix")
        batch = slice(None) if len(samples) == q.shape[0] else torch.tensor(samples, device=q.device)
        pieces = [attend(slice(0, start), start, True, batch), attend(slice(start, end), end, False, batch)]
        if end < s:
            pieces.append(attend(slice(end, s), s, True, batch))
        outs.append(torch.cat([o for o, _ in pieces], dim=2))
        touts.append(None if tq is None else torch.cat([t for _, t in pieces], dim=2))
        order += samples
    if len(outs) == 1:
        return outs[0], touts[0]
    inverse = torch.argsort(torch.tensor(order, device=q.device))
    o = torch.cat(outs)[inverse]
    return o, (None if tq is None else torch.cat(touts)[inverse])


class SelfAttention(MegatronModule):
    """GQA self-attention: fused per-group QKV -> RoPE -> q/k RMSNorm -> attention with the
    mixed causal / image mask (``mixed_attention_jvp``) -> output projection.

    Each tensor-parallel rank holds whole KV groups (and their query heads). Under sequence
    parallel the QKV projection gathers the sequence and the output projection reduce-scatters it.

    ``forward_jvp(x, tx, rope, image_spans) -> (y, ty)``: x, tx [s, b, h] (sequence chunks under
    SP), rope = (cos, sin) [s, d] or [s, b, d], image_spans as ``mixed_attention_jvp``; ``tx=None``
    is the primal alone (``ty`` None). The tangent carries no autograd graph.
    """

    def __init__(self, config: HunyuanImage3Config, spec: HunyuanLayerSpec):
        super().__init__(config)
        self.head_dim = config.kv_channels
        self.heads_per_group = config.query_heads_per_group
        qkv_width = (config.num_attention_heads + 2 * config.num_query_groups) * self.head_dim
        self.linear_qkv = spec.column_parallel_linear(
            config.hidden_size, qkv_width, config=config, init_method=config.init_method,
            bias=False, gather_output=False,
        )
        dtype = config.params_dtype
        # Named as megatron's so finalize_model_grads sums their replicated grads over TP.
        self.q_layernorm = RMSNorm(self.head_dim, config.layernorm_epsilon, dtype)
        self.k_layernorm = RMSNorm(self.head_dim, config.layernorm_epsilon, dtype)
        self.linear_proj = spec.row_parallel_linear(
            config.num_attention_heads * self.head_dim, config.hidden_size, config=config,
            init_method=config.output_layer_init_method, bias=False, input_is_parallel=True,
            skip_bias_add=False,
        )

    def _split_heads(self, qkv):
        """[s, b, local groups * (n + 2) * d] -> q [s, b, local heads, d] (heads group-major),
        k, v [s, b, local groups, d]."""
        if qkv is None:
            return None, None, None
        n = self.heads_per_group
        qkv = qkv.view(*qkv.shape[:2], -1, n + 2, self.head_dim)
        return qkv[:, :, :, :n].flatten(2, 3), qkv[:, :, :, n], qkv[:, :, :, n + 1]

    def forward_jvp(self, x, tx, rope, image_spans=None):
        qkv, tqkv = self.linear_qkv.forward_jvp(x, tx)
        (q, k, v), (tq, tk, tv) = self._split_heads(qkv), self._split_heads(tqkv)
        cos, sin = rope
        # RoPE and the q/k RMSNorm in float32 (the norm's scale too), then cast: the official order.
        q, tq = self.q_layernorm.forward_jvp(*apply_rope_jvp(q, tq, cos, sin))
        k, tk = self.k_layernorm.forward_jvp(*apply_rope_jvp(k, tk, cos, sin))
        q, k = q.to(v.dtype), k.to(v.dtype)
        if tq is not None:
            tq, tk = tq.to(v.dtype), tk.to(v.dtype)

        def to_bhsd(t, repeat=1):
            # Query head i reads KV group i // n (the fused layout's order): repeat each group n times.
            return None if t is None else t.permute(1, 2, 0, 3).repeat_interleave(repeat, dim=1)

        n = self.heads_per_group
        out, tout = mixed_attention_jvp(
            to_bhsd(q), to_bhsd(k, n), to_bhsd(v, n), to_bhsd(tq), to_bhsd(tk, n), to_bhsd(tv, n),
            image_spans,
        )

        def to_sbh(t):
            return None if t is None else t.permute(2, 0, 1, 3).flatten(2)  # [s, b, local heads * d]

        return self.linear_proj.forward_jvp(to_sbh(out), to_sbh(tout))

    def forward(self, x, rope, image_spans=None):
        """x [s, b, h]; rope = (cos, sin) [s, d] or [s, b, d]; image_spans: None (causal) or one
        ``(start, end)`` of ``<img>`` tokens per sample."""
        return self.forward_jvp(x, None, rope, image_spans)[0]


# --------------------------------------------------------------------------- decoder layer


class DecoderLayer(MegatronModule):
    """Pre-norm attention and MoE (routed experts + shared expert, both in megatron's MoELayer)."""

    def __init__(self, config: HunyuanImage3Config, spec: HunyuanLayerSpec, layer_number: int):
        super().__init__(config)
        dtype, sp = config.params_dtype, config.sequence_parallel
        self.input_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon, dtype, sp)
        self.self_attention = SelfAttention(config, spec)
        self.pre_mlp_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon, dtype, sp)
        self.mlp = spec.moe_builder(
            config=config, layer_number=layer_number,
            pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
        )
        # The released router weight is float32 and used in float32; megatron stores it in
        # params_dtype (bf16 would round the released weights and move routing decisions).
        # A float64 trunk (tests) keeps it in float64. Trainable bf16 networks keep megatron's
        # convention (``router_weight_fp32``).
        if config.router_weight_fp32:
            router = self.mlp.router
            router.weight.data = router.weight.data.to(torch.promote_types(dtype, torch.float32))

    def forward(self, x, rope, image_spans=None):
        return self.forward_jvp(x, None, rope, image_spans)[0]

    def forward_jvp(self, x, tx, rope, image_spans=None):
        """(x, tx) [s, b, h] -> (y, ty); ``tx=None``: the primal only (``ty`` None)."""
        h, th = self.input_layernorm.forward_jvp(x, tx)
        a, ta = self.self_attention.forward_jvp(h, th, rope, image_spans)
        x, tx = jf.add(x, tx, a, ta)
        h, th = self.pre_mlp_layernorm.forward_jvp(x, tx)
        m, tm = moe_forward_jvp(self.mlp, h, th)  # routed + shared expert
        return jf.add(x, tx, m, tm)


# --------------------------------------------------------------------------- image path
#
# Modules named as the released checkpoint's top-level parameters (``timestep_emb``, ``time_embed``,
# ``time_embed_2``, ``patch_embed``, ``final_layer``), so their conversion is the identity. Read in
# the official ``hunyuan_image_3/hunyuan.py``: ``timestep_embedding`` (the sinusoid),
# ``TimestepEmbedder``, ``ResBlock``, ``UNetDown``, ``UNetUp``, ``normalization`` (GroupNorm with 32
# groups, eps 1e-5) and ``HunyuanImage3ForCausalMM.__init__`` (sizes, ``out_norm=True``), ``forward``
# / ``instantiate_*`` / ``ragged_final_layer`` (what conditions what).
#
# Replicated over tensor parallel: they are ~0.4% of the model's parameters and see the whole
# latent grid; every TP rank computes them on the same inputs and receives the same gradients
# (see ``HunyuanImage3Model._embed`` / ``_image_head`` for how the sequence-parallel collectives
# keep that true). Nothing here is marked ``sequence_parallel``: no TP reduction of their grads.


def timestep_sinusoid(t, tt, dim: int, max_period: float = 10000.0):
    """[cos(t f), sin(t f)] with f_i = max_period^(−i / (dim/2)), in float32 (float64 stays
    float64), as the official ``timestep_embedding`` (cos first). t [b] -> [b, dim]."""
    wide = torch.promote_types(t.dtype, torch.float32)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=wide, device=t.device) / half)
    angles = t.to(wide)[:, None] * freqs[None]
    y = torch.cat([angles.cos(), angles.sin()], dim=-1)
    if tt is None:
        return y, None
    with torch.no_grad():
        rate = tt.to(wide)[:, None] * freqs[None]
        return y, torch.cat([-angles.sin() * rate, angles.cos() * rate], dim=-1)


def _linear(layer, x, tx):
    return jf.linear(x, tx, layer.weight, layer.bias)


def _conv(layer, x, tx):
    return jf.conv2d(x, tx, layer.weight, layer.bias, padding=layer.padding[0])


def _group_norm(layer, x, tx):
    return jf.group_norm(x, tx, layer.num_groups, layer.weight, layer.bias, layer.eps)


class TimestepEmbedder(torch.nn.Module):
    """σ [b] -> sinusoid of 1000·σ (``timestep_embedding_dim`` wide, float32) -> ``mlp.0`` Linear
    -> exact GELU -> ``mlp.2`` Linear -> [b, hidden]. The sinusoid is cast to the weights' dtype
    (official: ``.type(self.mlp[0].weight.dtype)``)."""

    def __init__(self, config: HunyuanImage3Config):
        super().__init__()
        dim, hidden, dtype = config.timestep_embedding_dim, config.hidden_size, config.params_dtype
        self.frequency_dim = dim
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(dim, hidden, dtype=dtype), torch.nn.GELU(), torch.nn.Linear(hidden, hidden, dtype=dtype)
        )

    def forward_jvp(self, sigma, tsigma=None):
        # The model's input is 1000·σ, kept at least float32 (bf16 moves in steps of 4 near 1000).
        wide = torch.promote_types(sigma.dtype, torch.float32)
        emb, temb = timestep_sinusoid(
            sigma.to(wide) * 1000, None if tsigma is None else tsigma.to(wide) * 1000, self.frequency_dim
        )
        dtype = self.mlp[0].weight.dtype
        emb, temb = emb.to(dtype), (None if temb is None else temb.to(dtype))
        h, th = jf.gelu(*_linear(self.mlp[0], emb, temb))
        return _linear(self.mlp[2], h, th)

    def forward(self, sigma):
        return self.forward_jvp(sigma)[0]


def _zero_last_linear(embedder: TimestepEmbedder) -> TimestepEmbedder:
    """The student's new embedders: the last linear's weight and bias zero, so the embedding is
    exactly zero at init (``meanflow.init_student_from_teacher`` keeps it)."""
    with torch.no_grad():
        embedder.mlp[2].weight.zero_()
        embedder.mlp[2].bias.zero_()
    return embedder


class ResBlock(torch.nn.Module):
    """The UNet residual block with adaptive GroupNorm, no up/down sampling:

        h = conv3x3(SiLU(GN(x)))                                   in_layers.{0, 2}
        scale, shift = chunk(Linear(SiLU(emb)), 2)                 emb_layers.1
        h = conv3x3(SiLU(GN(h) · (1 + scale) + shift))             out_layers.{0, 3} (AdaGN)
        out = skip_connection(x) + h                               1x1 conv (channels change)
    """

    def __init__(self, config: HunyuanImage3Config, in_channels: int, out_channels: int):
        super().__init__()
        groups, dtype = config.image_norm_groups, config.params_dtype
        eps = 1e-5  # torch's GroupNorm default, as the official ``normalization``
        self.in_layers = torch.nn.Sequential(
            torch.nn.GroupNorm(groups, in_channels, eps=eps, dtype=dtype),
            torch.nn.SiLU(),
            torch.nn.Conv2d(in_channels, out_channels, 3, padding=1, dtype=dtype),
        )
        self.emb_layers = torch.nn.Sequential(
            torch.nn.SiLU(), torch.nn.Linear(config.hidden_size, 2 * out_channels, dtype=dtype)
        )
        self.out_layers = torch.nn.Sequential(
            torch.nn.GroupNorm(groups, out_channels, eps=eps, dtype=dtype),
            torch.nn.SiLU(),
            torch.nn.Identity(),  # the official dropout (p = 0) sits here: the conv is index 3
            torch.nn.Conv2d(out_channels, out_channels, 3, padding=1, dtype=dtype),
        )
        if in_channels == out_channels:
            self.skip_connection = torch.nn.Identity()
        else:
            self.skip_connection = torch.nn.Conv2d(in_channels, out_channels, 1, dtype=dtype)

    def forward_jvp(self, x, tx, emb, temb):
        h, th = jf.silu(*_group_norm(self.in_layers[0], x, tx))
        h, th = _conv(self.in_layers[2], h, th)
        modulation, tmodulation = _linear(self.emb_layers[1], *jf.silu(emb, temb))
        scale, shift = _scale_shift(modulation)
        tscale, tshift = _scale_shift(tmodulation)
        h, th = jf.modulate(*_group_norm(self.out_layers[0], h, th), shift, tshift, scale, tscale)
        h, th = _conv(self.out_layers[3], *jf.silu(h, th))
        if isinstance(self.skip_connection, torch.nn.Identity):
            skip, tskip = x, tx
        else:
            skip, tskip = _conv(self.skip_connection, x, tx)
        return jf.add(skip, tskip, h, th)


class PatchEmbed(torch.nn.Module):
    """The official ``UNetDown`` at patch size 1: latents [b, C, h, w] -> ``model.0`` conv3x3 to
    ``patch_embed_hidden_dim`` -> ``model.1`` ResBlock to hidden (conditioned on ``time_embed``)
    -> tokens [b, h·w, hidden], row-major (``b c h w -> b (h w) c``)."""

    def __init__(self, config: HunyuanImage3Config):
        super().__init__()
        width = config.patch_embed_hidden_dim
        self.model = torch.nn.ModuleList([
            torch.nn.Conv2d(config.latent_channels, width, 3, padding=1, dtype=config.params_dtype),
            ResBlock(config, width, config.hidden_size),
        ])

    def forward_jvp(self, latents, tlatents, emb, temb):
        x, tx = self.model[1].forward_jvp(*_conv(self.model[0], latents, tlatents), emb, temb)
        return _grid_to_tokens(x), _grid_to_tokens(tx)


class FinalLayer(torch.nn.Module):
    """The official ``UNetUp`` at patch size 1 with ``out_norm``: image tokens [b, h·w, hidden] ->
    [b, hidden, h, w] -> ``model.0`` ResBlock to ``patch_embed_hidden_dim`` (conditioned on
    ``time_embed_2``) -> ``model.1``: GroupNorm, SiLU, conv3x3 to the latent channels."""

    def __init__(self, config: HunyuanImage3Config):
        super().__init__()
        width, dtype = config.patch_embed_hidden_dim, config.params_dtype
        self.model = torch.nn.ModuleList([
            ResBlock(config, config.hidden_size, width),
            torch.nn.Sequential(
                torch.nn.GroupNorm(config.image_norm_groups, width, eps=1e-5, dtype=dtype),
                torch.nn.SiLU(),
                torch.nn.Conv2d(width, config.latent_channels, 3, padding=1, dtype=dtype),
            ),
        ])

    def forward_jvp(self, tokens, ttokens, latent_hw, emb, temb):
        x, tx = _tokens_to_grid(tokens, latent_hw), _tokens_to_grid(ttokens, latent_hw)
        x, tx = self.model[0].forward_jvp(x, tx, emb, temb)
        out = self.model[1]
        x, tx = jf.silu(*_group_norm(out[0], x, tx))
        return _conv(out[2], x, tx)


def _scale_shift(modulation):
    """[b, 2c] -> scale, shift [b, c, 1, 1] (the official ``chunk(emb_out, 2, dim=1)``: scale first)."""
    if modulation is None:
        return None, None
    scale, shift = modulation[:, :, None, None].chunk(2, dim=1)
    return scale, shift


def _grid_to_tokens(x):
    return None if x is None else x.flatten(2).transpose(1, 2)


def _tokens_to_grid(x, latent_hw):
    return None if x is None else x.transpose(1, 2).unflatten(2, latent_hw)


# --------------------------------------------------------------------------- the model


# The image-path modules: their attribute names are the released checkpoint's top-level names,
# which the conversion lists (``state_dict_adapter.IMAGE_HEAD_PREFIXES``, with every tensor's
# shape from the config in ``image_head_shapes``).
IMAGE_PATH_MODULES = tuple(prefix.rstrip(".") for prefix in IMAGE_HEAD_PREFIXES)


def _put_image_tokens(x, image_tokens, timestep_token, sequence, extra_rows=()):
    """x [s, b, h] with sample i's ``<timestep>`` row replaced by timestep_token [b, h], its
    ``<img>`` rows by image_tokens [b, h·w, h] and, for each ``(positions, rows)`` of
    ``extra_rows`` (the student's ``<guidance>`` / ``<timestep_r>``: per-sample indices, rows
    [b, h]), that row (out of place; autograd flows to all of them). The replaced rows must be
    contiguous and end right before the image."""
    out = []
    for i, (start, end) in enumerate(sequence.image_spans):
        rows = {sequence.timestep_positions[i]: timestep_token[i:i + 1]}
        for positions, values in extra_rows:
            rows[positions[i]] = values[i:i + 1]
        first = start - len(rows)
        if sorted(rows) != list(range(first, start)):
            raise ValueError(
                f"<timestep> and the student's tokens must come right before the image: at {sorted(rows)}, "
                f"image at {start}"
            )
        out.append(torch.cat([x[:first, i], *(rows[p] for p in range(first, start)), image_tokens[i], x[end:, i]]))
    return torch.stack(out, dim=1)


class HunyuanImage3Model(MegatronModule):
    """The model — or one pipeline stage of it: ``layer_range`` (global indices) of the layers;
    on the first stage (``pre_process``) ``wte`` and the image input path (``timestep_emb``,
    ``time_embed``, ``patch_embed``); on the last (``post_process``) ``ln_f`` and ``lm_head`` (text)
    and the image head (``time_embed_2``, ``final_layer``). Only the [s, b, h] activation crosses
    stages: every stage gets the batch (token ids, spans, positions, σ), so the last stage's
    ``time_embed_2(σ)`` needs nothing from the first.

    ``velocity(sequence, latents, sigma)``: the diffusion forward (image generation), the
    predicted velocity [b, C, h, w] on the last stage. ``hidden_states(...)`` returns the last
    layer's output [s, b, h] (text); ``forward(...)`` returns this rank's vocab shard of the
    logits, batch-first [b, s, vocab / tp], on the last stage. Non-last stages return their output
    activation [s, b, h] (sequence chunks [s/tp, b, h] under sequence parallel).
    """

    def __init__(
        self,
        config: HunyuanImage3Config,
        spec: HunyuanLayerSpec | None = None,
        pre_process: bool = True,
        post_process: bool = True,
        layer_range: tuple[int, int] | None = None,
    ):
        super().__init__(config)
        spec = spec or get_hunyuan_layer_spec(num_experts=config.num_moe_experts)
        self.pre_process, self.post_process = pre_process, post_process
        start, end = layer_range if layer_range is not None else (0, config.num_layers)
        self.layer_range = (start, end)
        self.input_tensor = None
        # Read by megatron's schedules and finalize_model_grads (embeddings are not tied).
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = False
        dtype = config.params_dtype
        if pre_process:
            # All-reduced to the whole sequence on every TP rank (not reduce-scattered): the image
            # and <timestep> embeddings are put into it before the sequence-parallel split.
            self.word_embeddings = tensor_parallel.VocabParallelEmbedding(
                config.vocab_size, config.hidden_size, init_method=config.init_method, config=config,
                reduce_scatter_embeddings=False,
            )
        if pre_process and config.image_path:
            self.timestep_emb = TimestepEmbedder(config)  # replaces <timestep>'s embedding
            # The few-step student's (official names): guidance_emb(1000·w) and
            # timestep_r_emb(1000·σ_r), <guidance> / <timestep_r>'s rows ("tokens") or added to
            # <timestep>'s ("embedding"). Their last linear is zero: both are zero at init.
            if config.cfg_distilled:
                self.guidance_emb = _zero_last_linear(TimestepEmbedder(config))
            if config.use_meanflow:
                self.timestep_r_emb = _zero_last_linear(TimestepEmbedder(config))
            self.time_embed = TimestepEmbedder(config)  # conditions patch_embed
            self.patch_embed = PatchEmbed(config)
        self.layers = torch.nn.ModuleList(
            DecoderLayer(config, spec, layer_number=i + 1) for i in range(start, end)
        )
        if post_process:
            self.final_layernorm = RMSNorm(
                config.hidden_size, config.layernorm_epsilon, dtype, config.sequence_parallel
            )
            self.output_layer = spec.column_parallel_linear(
                config.hidden_size, config.vocab_size, config=config, init_method=config.init_method,
                bias=False, gather_output=False,
            )
        if post_process and config.image_path:
            self.time_embed_2 = TimestepEmbedder(config)  # conditions final_layer
            self.final_layer = FinalLayer(config)

    def set_input_tensor(self, input_tensor):
        """Called by megatron's schedules with the previous stage's output (a list of one)."""
        self.input_tensor = input_tensor[0] if isinstance(input_tensor, list) else input_tensor

    def hidden_states(self, input_ids, rope_positions=None, image_spans=None):
        """input_ids [b, s] -> this stage's last layer's output [s, b, h] (before ``ln_f``); this
        rank's sequence chunk [s/tp, b, h] under sequence parallel.

        ``rope_positions``: (y, x) positions [s] (default: text positions 0 .. s-1);
        ``image_spans``: None for causal, or one ``(start, end)`` of ``<img>`` tokens per sample.
        """
        x = self._split_sequence(self._text_embeddings(input_ids)) if self.pre_process else self._stage_input()
        if rope_positions is None:
            rope_positions = text_rope_positions(input_ids.shape[1], input_ids.device)
        rope = self._rope(*rope_positions)
        return self.decoder_forward_jvp(x, None, rope, image_spans)[0]

    def decoder_forward_jvp(self, x, tx, rope, image_spans=None):
        """This stage's decoder layers on (x, tx) [s, b, h] (sequence chunks under SP): the
        hidden-states JVP. ``rope``: ``rope_tables(...)``; ``tx=None``: the primal only.

        With ``recompute_granularity="full"`` (``recompute_method`` "uniform": every layer,
        "block": the first ``recompute_num_layers``) a layer keeps no activations and backward
        recomputes its primal only (``mfmegatron.jvp.recompute``)."""
        for index, layer in enumerate(self.layers):
            if not self._recomputes(index):
                x, tx = layer.forward_jvp(x, tx, rope, image_spans)
                continue

            def run(primals, tangents, layer=layer):
                y, ty = layer.forward_jvp(primals[0], tangents[0] if tangents else None, rope, image_spans)
                return (y,), ((ty,) if ty is not None else None)

            (x,), t = checkpoint_primal(run, (x,), (tx,) if tx is not None else None)
            tx = t[0] if t is not None else None
        return x, tx

    def _recomputes(self, stage_layer_index: int) -> bool:
        config = self.config
        if config.recompute_granularity != "full":
            return False
        if config.recompute_method == "block":
            return stage_layer_index < config.recompute_num_layers
        return True

    def velocity(self, sequence, latents, sigma, sigma_r=None, guidance=None):
        """The diffusion forward: ``sequence`` (``sequence.ImageSequence``: ids, image spans,
        positions), latents [b, C, h, w] (the noisy ``x_σ``), σ [b] in [0, 1] (the model sees
        1000·σ) -> the predicted velocity ``ε − x0`` [b, C, h, w] on the last stage (the
        ``mfmegatron.flow_matching`` convention); the stage activation on the others.

        First stage: ``wte(ids)`` with ``<timestep>`` replaced by ``timestep_emb(σ)`` and the
        ``<img>`` slots by ``patch_embed(latents, time_embed(σ))``. Last stage: the ``<img>``
        slots' hidden states of the last layer, *without* ``ln_f``, through
        ``final_layer(·, time_embed_2(σ))``.

        The few-step student (``config.use_meanflow`` / ``cfg_distilled``) also takes σ_r [b]
        (the interval's end, σ_r ≤ σ: the output is then the average velocity over [σ_r, σ]) and
        the guidance scale w [b]; each is required exactly when the model has its embedding.
        """
        return self.velocity_jvp(sequence, latents, sigma, sigma_r=sigma_r, guidance=guidance)[0]

    def velocity_jvp(self, sequence, latents, sigma, tlatents=None, tsigma=None, sigma_r=None, tsigma_r=None,
                     guidance=None):
        """``velocity`` and its JVP along (tlatents, tsigma, tsigma_r) (any may be None = zero; all
        None: the primal only, tangent None; the guidance scale has no tangent). Returns (v, tv)
        [b, C, h, w] on the last stage; on the others the stage activation, with the tangent's rows
        after the primal's ([2s, b, h], as FLUX's stages) when there are tangents. The tangent
        carries no autograd graph."""
        if not self.config.image_path:
            raise RuntimeError("this model was built without the image path (config.image_path=False)")
        if tuple(latents.shape[2:]) != tuple(sequence.latent_hw):
            raise ValueError(f"latents {tuple(latents.shape)} do not match the sequence's grid {sequence.latent_hw}")
        self._check_student_inputs(sequence, sigma_r, tsigma_r, guidance)
        with_tangent = tlatents is not None or tsigma is not None or tsigma_r is not None
        if with_tangent:
            tlatents = torch.zeros_like(latents) if tlatents is None else tlatents
            tsigma = torch.zeros_like(sigma) if tsigma is None else tsigma
            if sigma_r is not None and tsigma_r is None:
                tsigma_r = torch.zeros_like(sigma_r)
        if self.pre_process:
            x, tx = self._embed(sequence, latents, sigma, tlatents, tsigma, sigma_r, tsigma_r, guidance)
        else:
            x, tx = self._stage_input(), None
            if with_tangent:
                x, tx = x.chunk(2, dim=0)
                tx = tx.detach()  # no graph: backward sends zeros for it
        rope = self._rope(sequence.positions_y, sequence.positions_x)
        x, tx = self.decoder_forward_jvp(x, tx, rope, sequence.image_spans)
        if not self.post_process:
            return (torch.cat([x, tx], dim=0) if with_tangent else x), None
        return self._image_head(x, tx, sequence, sigma, tsigma)

    def _check_student_inputs(self, sequence, sigma_r, tsigma_r, guidance) -> None:
        """σ_r and w are given exactly when the model has their embeddings; a "tokens" student's
        sequence has the tokens of its embeddings, an "embedding" student's and a teacher's none.
        The same answer on every stage (every stage gets the batch)."""
        config = self.config
        for name, value, built, flag in (("sigma_r", sigma_r, config.use_meanflow, "use_meanflow"),
                                          ("guidance", guidance, config.cfg_distilled, "cfg_distilled")):
            if built and value is None:
                raise ValueError(f"this model is built with {flag}=True: velocity needs {name} [b]")
            if not built and value is not None:
                raise ValueError(f"{name} given, but this model is built without {flag} (it has no {name} embedding)")
        if tsigma_r is not None and sigma_r is None:
            raise ValueError("tsigma_r given without sigma_r")
        tokens = config.student_conditioning == "tokens" and config.is_student
        for name, positions, built in (("<guidance>", sequence.guidance_positions, config.cfg_distilled),
                                       ("<timestep_r>", sequence.timestep_r_positions, config.use_meanflow)):
            if tokens and built and positions is None:
                raise ValueError(f"this student takes {name} as a token (student_conditioning='tokens'): build the "
                                 "sequence with build_image_sequences(..., student_tokens=True)")
            if positions is not None and not (tokens and built):
                raise ValueError(f"the sequence has {name} tokens, but this model has no {name} token embedding "
                                 f"(cfg_distilled={config.cfg_distilled}, use_meanflow={config.use_meanflow}, "
                                 f"student_conditioning={config.student_conditioning!r})")

    # -- pieces of the forward ----------------------------------------------------------------

    def _stage_input(self):
        if self.input_tensor is None:
            raise RuntimeError("a non-first pipeline stage needs set_input_tensor() first")
        return self.input_tensor

    def _text_embeddings(self, input_ids):
        """[b, s] -> [s, b, h], the whole sequence, the same on every TP rank."""
        return self.word_embeddings(input_ids).transpose(0, 1).contiguous()

    def _split_sequence(self, x):
        """Under sequence parallel, this rank's chunk [s/tp, b, h] (backward: all-gather, so the
        replicated image-path modules get the whole sequence's gradient on every rank)."""
        if not self.config.sequence_parallel:
            return x
        tp = self.config.tensor_model_parallel_size
        if x.shape[0] % tp:
            raise ValueError(
                f"sequence length {x.shape[0]} is not divisible by tensor_parallel_size {tp} (needed with "
                "sequence_parallel): pad it (build_image_sequences(..., length=...))"
            )
        return collectives.scatter_sequence(x)

    def _rope(self, positions_y, positions_x):
        """cos, sin [s, d] for positions [s]; [s, b, d] for per-sample positions [b, s]."""
        cos, sin = rope_tables(positions_y, positions_x, self.config.kv_channels, self.config.rope_theta)
        if cos.dim() == 3:
            cos, sin = cos.transpose(0, 1), sin.transpose(0, 1)
        return cos, sin

    def _embed(self, sequence, latents, sigma, tlatents, tsigma, sigma_r=None, tsigma_r=None, guidance=None):
        """The first stage's input rows (and tangent): token embeddings with the ``<timestep>``
        (and the student's ``<guidance>`` / ``<timestep_r>``) and ``<img>`` rows replaced; this
        rank's sequence chunk under SP. The token embeddings' tangent is zero (the ids do not
        vary), and so is the guidance row's (w has no tangent)."""
        temb, ttemb = self.time_embed.forward_jvp(sigma, tsigma)
        tokens, ttokens = self.patch_embed.forward_jvp(latents, tlatents, temb, ttemb)
        step, tstep = self.timestep_emb.forward_jvp(sigma, tsigma)
        extra, textra = [], []  # (positions, rows) of the "tokens" student
        if self.config.is_student:
            conditions = []
            if self.config.cfg_distilled:
                g, _ = self.guidance_emb.forward_jvp(guidance)
                conditions.append((sequence.guidance_positions, g, None if tstep is None else torch.zeros_like(tstep)))
            if self.config.use_meanflow:
                r, tr = self.timestep_r_emb.forward_jvp(sigma_r, tsigma_r)
                conditions.append((sequence.timestep_r_positions, r, tr))
            if self.config.student_conditioning == "tokens":
                extra = [(positions, rows) for positions, rows, _ in conditions]
                textra = [(positions, trows) for positions, _, trows in conditions]
            else:  # "embedding": added to <timestep>'s row
                for _, rows, trows in conditions:
                    step, tstep = jf.add(step, tstep, rows, trows)
        text = self._text_embeddings(sequence.input_ids)
        x = self._split_sequence(_put_image_tokens(text, tokens, step, sequence, extra))
        if ttokens is None:
            return x, None
        with torch.no_grad():
            tx = self._split_sequence(_put_image_tokens(torch.zeros_like(text), ttokens, tstep, sequence, textra))
        return x, tx

    def _image_head(self, x, tx, sequence, sigma, tsigma):
        if self.config.sequence_parallel:
            # Every rank runs the replicated head on the whole image: in backward each keeps its
            # own chunk's gradient (a split, not a sum over ranks).
            x, tx = collectives.gather_sequence(x, tx, tensor_parallel_output_grad=False)

        def image_rows(rows):
            if rows is None:
                return None
            return torch.stack([rows[start:end, i] for i, (start, end) in enumerate(sequence.image_spans)])

        emb, temb = self.time_embed_2.forward_jvp(sigma, tsigma)
        return self.final_layer.forward_jvp(image_rows(x), image_rows(tx), sequence.latent_hw, emb, temb)

    def forward(self, input_ids, rope_positions=None, image_spans=None):
        """Logits [b, s, vocab / tp] (the output layer gathers the sequence under SP) on the last
        stage; the stage activation on the others."""
        x = self.hidden_states(input_ids, rope_positions, image_spans)
        if not self.post_process:
            return x
        logits, _ = self.output_layer.forward_jvp(self.final_layernorm(x))
        return logits.transpose(0, 1)

    # -- distributed checkpointing ----------------------------------------------------------

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """This rank's parameters for megatron ``dist_checkpointing``, layout-independent.

        megatron's default would treat the ``layers`` ModuleList as one plain module (its
        state_dict, replicated): every rank would save its *local* experts under local names, so a
        checkpoint saved at EP > 1 would hold only ``E/ep`` experts, and TP-split weights would be
        saved as if whole. So each layer gives its own sharded state dict: megatron's
        ``SequentialMLP`` places local expert ``i`` at global index ``ep_rank * E/ep + i`` of an
        expert axis, its ``MLP`` stores SwiGLU ``fc1`` gate and up halves TP-independently, the TP
        linears are split along their partition dim, and the norms are replicated.
        """
        from megatron.core import parallel_state
        from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
        from megatron.core.transformer.utils import (
            ensure_metadata_has_dp_cp_group,
            sharded_state_dict_default,
        )

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        tp_group = parallel_state.get_tensor_model_parallel_group()
        sharded = {}
        for name, module in self.named_children():
            if name == "layers":
                for index, layer in enumerate(module, start=self.layer_range[0]):
                    # Dict keys stay this stage's module names (for load_state_dict); checkpoint
                    # keys use the global layer index, the same at every pipeline layout.
                    local = f"{prefix}layers.{index - self.layer_range[0]}."
                    layer_sharded = layer.sharded_state_dict(local, sharded_offsets, metadata)
                    replace_prefix_for_sharding(layer_sharded, local, f"{prefix}layers.{index}.")
                    sharded.update(layer_sharded)
            else:
                sharded.update(
                    sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata, tp_group=tp_group)
                )
        return sharded


# --------------------------------------------------------------------------- sizes


def parameter_counts(model: HunyuanImage3Model) -> dict[str, int]:
    """Parameter counts read off the built modules (a meta-device build works).

    ``total``: the language model (``wte``, layers, ``ln_f``, ``lm_head``); ``image_path``: the
    image modules (``IMAGE_PATH_MODULES``), 340,402,208 at the released sizes.
    ``activated_per_token_layers``: parameters one token passes through in the decoder layers —
    everything in a layer except the routed experts, plus ``topk`` routed experts' worth.
    """
    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    layers = sum(count(layer) for layer in model.layers)
    activated = 0
    for layer in model.layers:
        experts = layer.mlp.experts
        routed = count(experts)
        one_expert = count(experts.local_experts[0])
        activated += count(layer) - routed + model.config.moe_router_topk * one_expert
    image_path = {name: count(getattr(model, name)) for name in IMAGE_PATH_MODULES if hasattr(model, name)}
    return {
        "total": count(model) - sum(image_path.values()),
        "image_path": sum(image_path.values()),
        **{f"image_path.{name}": n for name, n in image_path.items()},
        "layers": layers,
        "word_embeddings": count(model.word_embeddings),
        "output_layer": count(model.output_layer),
        "final_layernorm": count(model.final_layernorm),
        "activated_per_token_layers": activated,
    }


__all__ = [
    "HunyuanImage3Model",
    "DecoderLayer",
    "SelfAttention",
    "RMSNorm",
    "rope_tables",
    "text_rope_positions",
    "apply_rope",
    "parameter_counts",
    "IMAGE_PATH_MODULES",
    "mixed_attention_jvp",
    "apply_rope_jvp",
    "TimestepEmbedder",
    "ResBlock",
    "PatchEmbed",
    "FinalLayer",
    "timestep_sinusoid",
]
