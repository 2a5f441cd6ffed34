"""FLUX.1 (MMDiT) on megatron-core, with a forward-mode (JVP) path through every module.

Reads top to bottom as the architecture:

    timestep / guidance / pooled-text (/ MeanFlow interval) embeddings  -> temb
    img_in(latents), txt_in(T5 states)                                  -> img, txt streams
    double-stream blocks: per-stream adaLN-Zero, joint attention, per-stream MLP
    single-stream blocks on cat(txt, img): fused attention + MLP in parallel
    final adaLN + projection on the image tokens                       -> velocity

Every module has ``forward_jvp(inputs, tangents) -> (outputs, output_tangents)``: the primal with
autograd, the tangent without a graph. ``tangents=None`` is the plain forward, so the math exists
once. Tensors inside blocks are sequence-first ``[s, b, h]`` (megatron's convention).

Parallelism: attention heads and MLP columns are split over tensor-parallel ranks (megatron
Column/RowParallelLinear); adaLN modulation projections are column-parallel with a gathered output;
with sequence parallel the activations between blocks are sequence chunks ``[txt_r; img_r]`` of
each rank; pipeline stages hold a contiguous range of blocks (double, then single) and pass
``[temb; txt; img]`` (and the tangent of it) as one tensor. See ``parallelize.py``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from mfmegatron.jvp import functional as jf
from mfmegatron.jvp.attention import attention, attention_jvp
from mfmegatron.jvp.fp8 import quantized_weights
from mfmegatron.jvp.recompute import checkpoint_primal
from mfmegatron.parallel import collectives
from models.flux.config import FluxConfig
from models.flux.layer_specs import FluxLayerSpec, get_flux_layer_spec


@dataclass
class FluxInputs:
    """One batch, batch-first as diffusers' FluxTransformer2DModel takes it.

    ``timestep``, ``guidance`` and ``timestep_r`` are in [0, 1] (sigmas); the model scales by
    ``config.time_embedding_scale`` (FLUX's 1000).
    """

    latents: torch.Tensor  # [b, s_img, in_channels] packed latents
    encoder_hidden_states: torch.Tensor  # [b, s_txt, joint_attention_dim]
    pooled_projections: torch.Tensor  # [b, pooled_projection_dim]
    timestep: torch.Tensor  # [b]
    img_ids: torch.Tensor  # [s_img, 3]
    txt_ids: torch.Tensor  # [s_txt, 3]
    guidance: torch.Tensor | None = None  # [b], guidance-distilled models only
    timestep_r: torch.Tensor | None = None  # [b], the MeanFlow student's r (h = t - r)


@dataclass
class FluxTangents:
    """Tangent directions of the inputs that vary: the latents and the times (t, r)."""

    latents: torch.Tensor  # [b, s_img, in_channels]
    timestep: torch.Tensor  # [b]
    timestep_r: torch.Tensor | None = None  # [b]


# --------------------------------------------------------------------------- embeddings


def sinusoidal_embedding(t, tt, dim: int, dtype: torch.dtype, max_period: float = 10000.0):
    """[cos(t f), sin(t f)] with f = max_period^(-i/half) (diffusers' flip_sin_to_cos layout).

    Computed in float32 whatever t's dtype, exactly as diffusers' ``get_timestep_embedding`` (the
    teacher was trained with these numerics), and returned in ``dtype`` (the MLP's, as diffusers
    casts the projection to the model's dtype).
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    angles = t.float()[:, None] * freqs[None]
    y = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1).to(dtype)
    if tt is None:
        return y, None
    with torch.no_grad():
        rate = tt.float()[:, None] * freqs[None]
        ty = torch.cat([-torch.sin(angles) * rate, torch.cos(angles) * rate], dim=-1).to(dtype)
    return y, ty


class MLPEmbedder(MegatronModule):
    """linear_1 -> SiLU -> linear_2 (replicated: these are small and see no sequence dim)."""

    def __init__(self, config: FluxConfig, in_features: int, zero_init_output: bool = False):
        super().__init__(config)
        dtype = config.params_dtype
        self.linear_1 = torch.nn.Linear(in_features, config.hidden_size, dtype=dtype)
        self.linear_2 = torch.nn.Linear(config.hidden_size, config.hidden_size, dtype=dtype)
        if zero_init_output:
            torch.nn.init.zeros_(self.linear_2.weight)
            torch.nn.init.zeros_(self.linear_2.bias)

    def forward_jvp(self, x, tx=None):
        h, th = jf.linear(x, tx, self.linear_1.weight, self.linear_1.bias)
        h, th = jf.silu(h, th)
        return jf.linear(h, th, self.linear_2.weight, self.linear_2.bias)


class TimestepEmbedder(MegatronModule):
    """t in [0, 1] -> sinusoid of s·t -> MLP (diffusers' Timesteps + TimestepEmbedding), s the
    config's ``time_embedding_scale`` (FLUX's 1000)."""

    def __init__(self, config: FluxConfig, zero_init_output: bool = False):
        super().__init__(config)
        self.frequency_dim = config.timestep_embedding_dim
        self.mlp = MLPEmbedder(config, self.frequency_dim, zero_init_output)

    def forward_jvp(self, t, tt=None):
        # s·t in float32 at least: in bf16, 1000 t moves in steps of 4 near t = 1.
        scale = self.config.time_embedding_scale
        scaled = t.to(torch.promote_types(t.dtype, torch.float32)) * scale
        emb, temb = sinusoidal_embedding(
            scaled, None if tt is None else tt * scale, self.frequency_dim, self.config.params_dtype
        )
        return self.mlp.forward_jvp(emb, temb)


class ReplicatedLinear(torch.nn.Linear):
    """A linear whose weight is the same on every rank (input/output projections)."""

    def forward_jvp(self, x, tx=None):
        return jf.linear(x, tx, self.weight, self.bias)


# --------------------------------------------------------------------------- rotary embedding


def rope_tables(ids: torch.Tensor, axes_dims, theta: float, dtype: torch.dtype):
    """cos, sin of shape [s, head_dim] for 3-axis position ids [s, 3] (FLUX's RoPE).

    Each axis contributes axes_dims[i] channels; each frequency covers a consecutive pair.
    """
    compute_dtype = torch.promote_types(dtype, torch.float32)
    cos_parts, sin_parts = [], []
    positions = ids.to(torch.float64)
    for axis, dim in enumerate(axes_dims):
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim))
        angles = torch.outer(positions[:, axis], freqs)
        cos_parts.append(angles.cos().repeat_interleave(2, dim=1))
        sin_parts.append(angles.sin().repeat_interleave(2, dim=1))
    # diffusers rounds the tables to float32; do the same so bf16/fp32 runs match bit for bit.
    cos = torch.cat(cos_parts, dim=-1).float().to(compute_dtype)
    sin = torch.cat(sin_parts, dim=-1).float().to(compute_dtype)
    return cos, sin


def apply_rope(x, cos, sin):
    """x [s, b, heads, d]; rotates consecutive channel pairs. Linear in x, so the tangent uses it too."""
    compute_dtype = cos.dtype
    pairs = x.to(compute_dtype).unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    cos, sin = cos[:, None, None, :], sin[:, None, None, :]
    return (x.to(compute_dtype) * cos + rotated * sin).to(x.dtype)


def apply_rope_jvp(x, tx, cos, sin):
    y = apply_rope(x, cos, sin)
    if tx is None:
        return y, None
    with torch.no_grad():
        return y, _rope_tangent(tx, cos, sin)


_rope_tangent = jf.fused_on_cuda(apply_rope)


# --------------------------------------------------------------------------- building blocks


class AdaLNModulation(MegatronModule):
    """SiLU(temb) -> column-parallel linear to `chunks` x hidden, gathered on every rank.

    The projection is the largest part of FLUX's parameters (6 x h x h per stream and block), so
    it is split over TP; its input (temb) is replicated and has no sequence dim, so it is never
    sequence-parallel.
    """

    def __init__(
        self, config: FluxConfig, spec: FluxLayerSpec, chunks: int, applied_to_sequence_chunks: bool = True
    ):
        super().__init__(config)
        self.chunks = chunks
        # With sequence parallel, the shift/scale/gate act on each rank's own tokens, so their
        # gradients are partial sums over tokens; they must be summed over TP in backward.
        self.sum_grads_over_tp = config.sequence_parallel and applied_to_sequence_chunks
        self.linear = spec.column_parallel_linear(
            config.hidden_size,
            chunks * config.hidden_size,
            config=dataclasses.replace(config, sequence_parallel=False),
            init_method=config.init_method,
            bias=True,
            gather_output=True,
        )

    def forward_jvp(self, temb, ttemb=None):
        """temb [b, h] -> `chunks` tensors [1, b, h] (broadcast over the sequence dim)."""
        x, tx = jf.silu(temb, ttemb)
        y, ty = self.linear.forward_jvp(x.unsqueeze(0), None if tx is None else tx.unsqueeze(0))
        if self.sum_grads_over_tp:
            y = tensor_parallel.copy_to_tensor_model_parallel_region(y)  # identity; all-reduce grad
        parts = y.chunk(self.chunks, dim=-1)
        tparts = ty.chunk(self.chunks, dim=-1) if ty is not None else (None,) * self.chunks
        return parts, tparts


class QKVProjection(MegatronModule):
    """Column-parallel fused QKV with per-head layout [head][q, k, v][head_dim], then QK RMSNorm.

    Each TP rank holds whole heads. Returns q, k, v as [s, b, local_heads, head_dim].
    """

    def __init__(self, config: FluxConfig, spec: FluxLayerSpec):
        super().__init__(config)
        self.head_dim = config.kv_channels
        self.linear_qkv = spec.column_parallel_linear(
            config.hidden_size, 3 * config.hidden_size, config=config,
            init_method=config.init_method, bias=True, gather_output=False,
        )
        dtype = config.params_dtype
        # Named as megatron's so finalize_model_grads sums their replicated grads over TP.
        self.q_layernorm = torch.nn.RMSNorm(self.head_dim, eps=config.layernorm_epsilon, dtype=dtype)
        self.k_layernorm = torch.nn.RMSNorm(self.head_dim, eps=config.layernorm_epsilon, dtype=dtype)

    def forward_jvp(self, x, tx=None, input_is_gathered: bool = False, sequence_chunk=None):
        qkv, tqkv = self.linear_qkv.forward_jvp(x, tx, input_is_gathered=input_is_gathered,
                                                sequence_chunk=sequence_chunk)
        q, k, v = qkv.unflatten(-1, (-1, 3, self.head_dim)).unbind(-2)
        tq = tk = tv = None
        if tqkv is not None:
            tq, tk, tv = tqkv.unflatten(-1, (-1, 3, self.head_dim)).unbind(-2)
        eps = self.config.layernorm_epsilon
        q, tq = jf.rms_norm(q, tq, self.q_layernorm.weight, eps)
        k, tk = jf.rms_norm(k, tk, self.k_layernorm.weight, eps)
        return (q, k, v), (tq, tk, tv)


def joint_attention(qkv, tqkv, rope, tangent_pass="auto"):
    """RoPE, then full bidirectional attention. q, k, v [s, b, heads, d] -> [s, b, heads * d]."""
    (q, k, v), (tq, tk, tv) = qkv, tqkv
    cos, sin = rope
    q, tq = apply_rope_jvp(q, tq, cos, sin)
    k, tk = apply_rope_jvp(k, tk, cos, sin)

    def to_bhsd(t):
        return None if t is None else t.permute(1, 2, 0, 3)

    def to_sbh(t):
        return None if t is None else t.permute(2, 0, 1, 3).flatten(2)

    if tq is None:
        out, tout = attention(to_bhsd(q), to_bhsd(k), to_bhsd(v)), None
    else:
        out, tout = attention_jvp(
            to_bhsd(q), to_bhsd(k), to_bhsd(v), to_bhsd(tq), to_bhsd(tk), to_bhsd(tv),
            tangent_pass=tangent_pass,
        )
    return to_sbh(out), to_sbh(tout)


class MLP(MegatronModule):
    """Column-parallel fc1 -> GELU(tanh) -> row-parallel fc2."""

    def __init__(self, config: FluxConfig, spec: FluxLayerSpec):
        super().__init__(config)
        self.linear_fc1 = spec.column_parallel_linear(
            config.hidden_size, config.ffn_hidden_size, config=config,
            init_method=config.init_method, bias=True, gather_output=False,
        )
        self.linear_fc2 = _row_parallel(config, spec, config.ffn_hidden_size, bias=True)

    def forward_jvp(self, x, tx=None):
        h, th = self.linear_fc1.forward_jvp(x, tx)
        h, th = jf.gelu_tanh(h, th, overwrite_tangent=True)
        return self.linear_fc2.forward_jvp(h, th)


def _row_parallel(config: FluxConfig, spec: FluxLayerSpec, in_features: int, bias: bool):
    return spec.row_parallel_linear(
        in_features, config.hidden_size, config=config,
        init_method=config.output_layer_init_method, bias=bias, input_is_parallel=True,
        skip_bias_add=False,
    )


# --------------------------------------------------------------------------- blocks


class DoubleStreamBlock(MegatronModule):
    """MMDiT block: image and text streams with their own weights, attending jointly."""

    def __init__(self, config: FluxConfig, spec: FluxLayerSpec):
        super().__init__(config)
        self.img_mod = AdaLNModulation(config, spec, chunks=6)
        self.txt_mod = AdaLNModulation(config, spec, chunks=6)
        self.img_attn = QKVProjection(config, spec)
        self.txt_attn = QKVProjection(config, spec)
        self.img_attn_proj = _row_parallel(config, spec, config.hidden_size, bias=True)
        self.txt_attn_proj = _row_parallel(config, spec, config.hidden_size, bias=True)
        self.img_mlp = MLP(config, spec)
        self.txt_mlp = MLP(config, spec)

    def forward_jvp(self, primals, tangents, rope):
        """primals = (temb, txt, img); txt/img are this rank's [s, b, h] (chunks with SP)."""
        temb, txt, img = primals
        ttemb, ttxt, timg = tangents if tangents is not None else (None, None, None)
        eps = self.config.layernorm_epsilon

        img_mod, timg_mod = self.img_mod.forward_jvp(temb, ttemb)
        txt_mod, ttxt_mod = self.txt_mod.forward_jvp(temb, ttemb)
        # Each: shift1, scale1, gate1 (attention branch), shift2, scale2, gate2 (MLP branch).

        img_x, timg_x = jf.layer_norm(img, timg, eps)
        img_x, timg_x = jf.modulate(img_x, timg_x, img_mod[0], timg_mod[0], img_mod[1], timg_mod[1])
        txt_x, ttxt_x = jf.layer_norm(txt, ttxt, eps)
        txt_x, ttxt_x = jf.modulate(txt_x, ttxt_x, txt_mod[0], ttxt_mod[0], txt_mod[1], ttxt_mod[1])
        (txt_out, img_out), (ttxt_out, timg_out) = self._joint_attention(
            (txt_x, img_x), None if tangents is None else (ttxt_x, timg_x), rope)
        del img_x, timg_x, txt_x, ttxt_x

        a, ta = self.img_attn_proj.forward_jvp(img_out, timg_out)
        img, timg = jf.gated_residual(img, timg, img_mod[2], timg_mod[2], a, ta)
        a, ta = self.txt_attn_proj.forward_jvp(txt_out, ttxt_out)
        txt, ttxt = jf.gated_residual(txt, ttxt, txt_mod[2], ttxt_mod[2], a, ta)

        x, tx = jf.layer_norm(img, timg, eps)
        x, tx = jf.modulate(x, tx, img_mod[3], timg_mod[3], img_mod[4], timg_mod[4])
        m, tm = self.img_mlp.forward_jvp(x, tx)
        img, timg = jf.gated_residual(img, timg, img_mod[5], timg_mod[5], m, tm)
        x, tx = jf.layer_norm(txt, ttxt, eps)
        x, tx = jf.modulate(x, tx, txt_mod[3], ttxt_mod[3], txt_mod[4], ttxt_mod[4])
        m, tm = self.txt_mlp.forward_jvp(x, tx)
        txt, ttxt = jf.gated_residual(txt, ttxt, txt_mod[5], ttxt_mod[5], m, tm)
        return (temb, txt, img), (None if tangents is None else (ttemb, ttxt, timg))

    def _joint_attention(self, inputs, tangents, rope):
        """Attention over [text; image] (full sequence: the QKV layers gather it under SP).
        Returns (txt_out, img_out) and their tangents. Its q, k, v and their tangents are freed on
        return, before the MLP makes its 4x-wide hidden activation."""
        (txt_x, img_x), (ttxt_x, timg_x) = inputs, tangents or (None, None)
        txt_qkv, ttxt_qkv = self.txt_attn.forward_jvp(txt_x, ttxt_x)
        img_qkv, timg_qkv = self.img_attn.forward_jvp(img_x, timg_x)
        text_length = txt_qkv[0].shape[0]
        qkv = tuple(torch.cat(pair, dim=0) for pair in zip(txt_qkv, img_qkv))
        tqkv = (None, None, None)
        if tangents is not None:
            tqkv = tuple(torch.cat(pair, dim=0) for pair in zip(ttxt_qkv, timg_qkv))
        out, tout = joint_attention(qkv, tqkv, rope.double_stream, self.config.attention_tangent_pass)
        outs = (out[:text_length], out[text_length:])
        return outs, ((None, None) if tout is None else (tout[:text_length], tout[text_length:]))


class SingleStreamBlock(MegatronModule):
    """Parallel attention + MLP on the joint sequence, one reduction for both branches."""

    def __init__(self, config: FluxConfig, spec: FluxLayerSpec):
        super().__init__(config)
        self.mod = AdaLNModulation(config, spec, chunks=3)  # shift, scale, gate
        self.attn = QKVProjection(config, spec)
        self.linear_mlp_in = spec.column_parallel_linear(
            config.hidden_size, config.ffn_hidden_size, config=config,
            init_method=config.init_method, bias=True, gather_output=False,
        )
        # diffusers' proj_out over cat(attn, mlp) is kept as its two column blocks so each TP
        # rank's shard of both is contiguous; the partial outputs are summed, then reduced once.
        self.linear_attn_out = _row_parallel(config, spec, config.hidden_size, bias=False)
        self.linear_mlp_out = _row_parallel(config, spec, config.ffn_hidden_size, bias=True)

    def forward_jvp(self, primals, tangents, rope):
        """primals = (temb, joint); joint is this rank's [txt; img] rows."""
        temb, joint = primals
        ttemb, tjoint = tangents if tangents is not None else (None, None)
        (shift, scale, gate), (tshift, tscale, tgate) = self.mod.forward_jvp(temb, ttemb)
        x, tx = jf.layer_norm(joint, tjoint, self.config.layernorm_epsilon)
        x, tx = jf.modulate(x, tx, shift, tshift, scale, tscale)
        chunk = None
        if self.config.sequence_parallel:
            # One gather feeds both column-parallel layers. The gathered order is rank-major
            # ([txt_0; img_0; txt_1; img_1; ...]); rope.single_stream is permuted to match. Each
            # layer saves the chunk for backward and gathers it again there (one all-gather per
            # layer, as megatron's SP linears: collectives.saving_sequence_chunk).
            chunk = x
            x, tx = collectives.gather_sequence(x, tx)
        # The attention branch first, through its output GEMM, so that its q, k, v and their
        # tangents are freed before the MLP's 4x-wide hidden is made (a MeanFlow step's peak).
        y, ty = self.linear_attn_out.partial_jvp(*self._attention(x, tx, rope, chunk))
        m, tm = self.linear_mlp_in.forward_jvp(x, tx, input_is_gathered=True, sequence_chunk=chunk)
        del x, tx, chunk
        m, tm = jf.gelu_tanh(m, tm, overwrite_tangent=True)
        y, ty = jf.add(y, ty, *self.linear_mlp_out.partial_jvp(m, tm))
        y, ty = self.linear_mlp_out.reduce_jvp(y, ty)  # adds the only bias
        joint, tjoint = jf.gated_residual(joint, tjoint, gate, tgate, y, ty)
        return (temb, joint), (None if tangents is None else (ttemb, tjoint))

    def _attention(self, x, tx, rope, chunk=None):
        qkv, tqkv = self.attn.forward_jvp(x, tx, input_is_gathered=True, sequence_chunk=chunk)
        return joint_attention(qkv, tqkv, rope.single_stream, self.config.attention_tangent_pass)


# --------------------------------------------------------------------------- the model


@dataclass
class RopeTables:
    """cos/sin [s, head_dim] in the token order each kind of block attends in."""

    double_stream: tuple[torch.Tensor, torch.Tensor]  # [all text; all image]
    single_stream: tuple[torch.Tensor, torch.Tensor]  # rank-major [txt_r; img_r] under SP


class FluxModel(MegatronModule):
    """FLUX.1 transformer (one pipeline stage of it when pipeline parallel).

    ``forward_jvp(inputs, tangents)`` returns the velocity [b, s_img, c] and its tangent on the last
    stage, and the packed stage activation (see ``pack_stage_activation``) on earlier stages.
    """

    def __init__(
        self,
        config: FluxConfig,
        spec: FluxLayerSpec | None = None,
        pre_process: bool = True,
        post_process: bool = True,
        block_range: tuple[int, int] | None = None,
    ):
        super().__init__(config)
        spec = spec or get_flux_layer_spec(config.use_transformer_engine)
        self.spec_name = spec.name
        self.pre_process, self.post_process = pre_process, post_process
        start, end = block_range if block_range is not None else (0, config.num_layers)
        self.block_range = (start, end)
        self.input_tensor = None
        # Read by megatron's schedules and finalize_model_grads (FLUX ties no embeddings).
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = False
        dtype = config.params_dtype
        h = config.hidden_size

        if pre_process:
            self.time_in = TimestepEmbedder(config)
            self.guidance_in = TimestepEmbedder(config) if config.guidance_embeds else None
            self.vector_in = MLPEmbedder(config, config.pooled_projection_dim)
            # The MeanFlow student's interval embedding of h = t - r: zero at initialisation so
            # the student starts as the teacher.
            self.interval_in = (
                TimestepEmbedder(config, zero_init_output=True) if config.mean_flow_student else None
            )
            self.img_in = ReplicatedLinear(config.in_channels * config.patch_size**2, h, dtype=dtype)
            self.txt_in = ReplicatedLinear(config.joint_attention_dim, h, dtype=dtype)

        # With config.fp8_param (the frozen teacher in FP8) the TE linears' weights are built as
        # FP8 tensors; nothing else changes.
        with quantized_weights(config):
            self.double_blocks = torch.nn.ModuleList(
                DoubleStreamBlock(config, spec) for _ in range(start, min(end, config.num_double_layers))
            )
            self.single_blocks = torch.nn.ModuleList(
                SingleStreamBlock(config, spec)
                for _ in range(max(start, config.num_double_layers), end)
            )
            # scale, shift (this order); applied after the image tokens are gathered.
            final_mod = AdaLNModulation(config, spec, chunks=2, applied_to_sequence_chunks=False) if post_process else None

        if post_process:
            self.final_mod = final_mod
            self.final_proj = ReplicatedLinear(
                h, config.patch_size**2 * config.out_channels, dtype=dtype
            )

    # -- pipeline plumbing ---------------------------------------------------------------------

    def set_input_tensor(self, input_tensor):
        """Called by megatron's schedules with the previous stage's output (a list of one)."""
        self.input_tensor = input_tensor[0] if isinstance(input_tensor, list) else input_tensor

    @staticmethod
    def pack_stage_activation(temb, rows, ttemb=None, trows=None):
        """[temb; rows] as one [1 + s, b, h] tensor, and the tangent's rows after the primal's."""
        packed = torch.cat([temb.unsqueeze(0), rows], dim=0)
        if ttemb is None:
            return packed
        return torch.cat([packed, torch.cat([ttemb.unsqueeze(0), trows], dim=0)], dim=0)

    @staticmethod
    def unpack_stage_activation(packed, with_tangent: bool):
        if not with_tangent:
            return (packed[0], packed[1:]), None
        primal, tangent = packed.chunk(2, dim=0)
        # The tangent half has no graph; backward sends zeros for it.
        tangent = tangent.detach()
        return (primal[0], primal[1:]), (tangent[0], tangent[1:])

    # -- forward ------------------------------------------------------------------------------

    def _embed(self, inputs: FluxInputs, tangents: FluxTangents | None):
        """temb [b, h] and the streams txt [s_txt, b, h], img [s_img, b, h] (full sequences)."""
        config = self.config
        temb, ttemb = self.time_in.forward_jvp(inputs.timestep, None if tangents is None else tangents.timestep)
        if self.guidance_in is not None:
            if inputs.guidance is None:
                raise ValueError("this FLUX config has a guidance embedding: pass inputs.guidance")
            guidance, _ = self.guidance_in.forward_jvp(inputs.guidance)
            temb = temb + guidance
        pooled, _ = self.vector_in.forward_jvp(inputs.pooled_projections.to(config.params_dtype))
        temb = temb + pooled
        if self.interval_in is not None:
            if inputs.timestep_r is None:
                raise ValueError("the MeanFlow student needs inputs.timestep_r (r <= t)")
            interval = inputs.timestep - inputs.timestep_r
            tinterval = None
            if tangents is not None:
                tinterval = tangents.timestep - (
                    tangents.timestep_r if tangents.timestep_r is not None else 0.0
                )
            h, th = self.interval_in.forward_jvp(interval, tinterval)
            temb, ttemb = jf.add(temb, ttemb, h, th)

        # The latents (and their tangent) may come in float32 (the MeanFlow objective keeps its
        # ODE state there); the network runs in its own dtype.
        dtype = config.params_dtype
        img, timg = self.img_in.forward_jvp(
            inputs.latents.transpose(0, 1).to(dtype),
            None if tangents is None else tangents.latents.transpose(0, 1).to(dtype),
        )
        txt, _ = self.txt_in.forward_jvp(inputs.encoder_hidden_states.transpose(0, 1).to(dtype))
        ttxt = None if tangents is None else torch.zeros_like(txt)
        return (temb, txt, img), (None if tangents is None else (ttemb, ttxt, timg))

    def _rope(self, inputs: FluxInputs, dtype) -> RopeTables:
        config = self.config
        ids = torch.cat([inputs.txt_ids, inputs.img_ids], dim=0)
        cos, sin = rope_tables(ids, config.axes_dims_rope, config.rope_theta, dtype)
        natural = (cos, sin)
        order = _single_stream_token_order(
            inputs.txt_ids.shape[0], inputs.img_ids.shape[0], _sequence_parallel_size(config), cos.device
        )
        single = natural if order is None else (cos[order], sin[order])
        return RopeTables(double_stream=natural, single_stream=single)

    def forward_jvp(self, inputs: FluxInputs, tangents: FluxTangents | None = None):
        config = self.config
        with_tangent = tangents is not None
        text_length = inputs.txt_ids.shape[0]
        sp_size = _sequence_parallel_size(config)
        for name, length in (("text", text_length), ("image", inputs.img_ids.shape[0])):
            if length % sp_size:
                raise ValueError(
                    f"{name} sequence length {length} is not divisible by tensor_parallel_size "
                    f"{sp_size} (needed with sequence_parallel)"
                )
        local_text = text_length // sp_size

        if self.pre_process:
            (temb, txt, img), t = self._embed(inputs, tangents)
            ttemb, ttxt, timg = t if with_tangent else (None, None, None)
            if config.sequence_parallel:
                txt, img = collectives.scatter_sequence(txt), collectives.scatter_sequence(img)
                if with_tangent:
                    ttxt, timg = collectives.scatter_sequence(ttxt), collectives.scatter_sequence(timg)
            rows = torch.cat([txt, img], dim=0)
            trows = torch.cat([ttxt, timg], dim=0) if with_tangent else None
        else:
            if self.input_tensor is None:
                raise RuntimeError("a non-first pipeline stage needs set_input_tensor() first")
            (temb, rows), t = self.unpack_stage_activation(self.input_tensor, with_tangent)
            ttemb, trows = t if with_tangent else (None, None)

        rope = self._rope(inputs, rows.dtype)
        for index, block in enumerate(self.double_blocks):
            recompute = self._recomputes(index)
            primals = (temb, rows[:local_text], rows[local_text:])
            tangents_in = (ttemb, trows[:local_text], trows[local_text:]) if with_tangent else None
            (temb, txt, img), t = _run_block(block, primals, tangents_in, rope, recompute)
            rows = torch.cat([txt, img], dim=0)
            trows = torch.cat([t[1], t[2]], dim=0) if with_tangent else None
            ttemb = t[0] if with_tangent else None
        for index, block in enumerate(self.single_blocks, start=len(self.double_blocks)):
            recompute = self._recomputes(index)
            (temb, rows), t = _run_block(block, (temb, rows), (ttemb, trows) if with_tangent else None, rope, recompute)
            ttemb, trows = t if with_tangent else (None, None)

        if not self.post_process:
            return self.pack_stage_activation(temb, rows, ttemb, trows)

        img, timg = rows[local_text:], (trows[local_text:] if with_tangent else None)
        if config.sequence_parallel:
            # The output layer is replicated: each rank keeps its own chunk's gradient.
            img, timg = collectives.gather_sequence(img, timg, tensor_parallel_output_grad=False)
        (scale, shift), (tscale, tshift) = self.final_mod.forward_jvp(temb, ttemb)
        x, tx = jf.layer_norm(img, timg, config.layernorm_epsilon)
        x, tx = jf.modulate(x, tx, shift, tshift, scale, tscale)
        out, tout = self.final_proj.forward_jvp(x, tx)
        out = out.transpose(0, 1)  # [b, s_img, c], diffusers' layout
        return out, (tout.transpose(0, 1) if tout is not None else None)

    def _recomputes(self, stage_block_index: int) -> bool:
        """Activation recompute (megatron's settings): ``recompute_granularity="full"`` with
        ``recompute_method="uniform"`` recomputes every block of the stage, ``"block"`` the first
        ``recompute_num_layers`` blocks. Only the primal is recomputed (see jvp/recompute.py)."""
        config = self.config
        if config.recompute_granularity != "full":
            return False
        if config.recompute_method == "block":
            return stage_block_index < config.recompute_num_layers
        return True

    def forward(self, inputs: FluxInputs):
        out, _ = self.forward_jvp(inputs, None)
        return out

    # -- distributed checkpointing ----------------------------------------------------------

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """This stage's parameters for megatron ``dist_checkpointing``, layout-independent.

        Dict keys are this stage's module names, so ``load_state_dict`` takes what
        ``dist_checkpointing.load`` returns. The checkpoint keys (``ShardedTensor.key``) are the
        same at every TP/PP layout: blocks are named by their global index (a second pipeline
        stage's local ``double_blocks.0`` is saved as, e.g., ``double_blocks.3``); TP-split
        weights are ShardedTensors along their partition dim (megatron's Column/RowParallelLinear);
        everything else (QK RMSNorms, replicated ``torch.nn.Linear``s) is replicated with replica
        id ``(0, tp_rank, dp_rank)`` so exactly one rank writes it.
        """
        from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
        from megatron.core.transformer.utils import (
            ensure_metadata_has_dp_cp_group,
            sharded_state_dict_default,
        )

        from models.flux.state_dict_adapter import megatron_block_key_to_global

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        tp_group = parallel_state.get_tensor_model_parallel_group()
        sharded = {}
        for name, module in self.named_children():
            if name in ("double_blocks", "single_blocks"):
                continue
            sharded.update(
                sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata, tp_group=tp_group)
            )
        for kind, blocks in (("double_blocks", self.double_blocks), ("single_blocks", self.single_blocks)):
            for local, block in enumerate(blocks):
                local_prefix = f"{prefix}{kind}.{local}."
                global_prefix = prefix + megatron_block_key_to_global(local_prefix[len(prefix):], self.block_range, self.config)
                block_sharded = block.sharded_state_dict(local_prefix, sharded_offsets, metadata)
                replace_prefix_for_sharding(block_sharded, local_prefix, global_prefix)
                sharded.update(block_sharded)
        return sharded


def _run_block(block, primals, tangents, rope, recompute: bool):
    if not recompute:
        return block.forward_jvp(primals, tangents, rope)

    def run(p, t):
        return block.forward_jvp(p, t, rope)

    return checkpoint_primal(run, primals, tangents)


def _sequence_parallel_size(config: FluxConfig) -> int:
    if not config.sequence_parallel:
        return 1
    return parallel_state.get_tensor_model_parallel_world_size()


def _single_stream_token_order(text_length: int, image_length: int, ranks: int, device):
    """Indices into [text; image] giving the rank-major order [txt_0; img_0; txt_1; img_1; ...]."""
    if ranks == 1:
        return None
    text = torch.arange(text_length, device=device).chunk(ranks)
    image = (torch.arange(image_length, device=device) + text_length).chunk(ranks)
    return torch.cat([torch.cat([t, i]) for t, i in zip(text, image)])
