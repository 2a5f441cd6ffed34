"""HunyuanImage 3.0's image path: the mixed causal / image attention (primal and JVP), sequence
assembly and 2-D positions, the image-path modules and their JVP rules, the whole image forward.

References nobody here wrote: SDPA with the official dense mask, ``torch.func.jvp`` in float64
(through SDPA's math backend), and dense single-process rewrites of the official code's order of
operations (``hunyuan.py``), with which the documented traps are pinned: each trap test shows the
other order gives a different result.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from mfmegatron.parallel import parallel_context

HEADS, GROUPS, HEAD_DIM, HIDDEN = 4, 2, 16, 64


def _tiny_config(**overrides):
    from models.hunyuan_image3.config import tiny_hunyuan_image3_config

    return tiny_hunyuan_image3_config(**{"image_path": True, **overrides})


def _randomise(module, seed, scale=0.3):
    """Weights large enough that attention, norms and routing all matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float64).to(param.dtype)
            param.copy_(1 + 0.2 * noise if param.ndim == 1 else scale * noise)


def official_dense_mask(length: int, image_spans) -> torch.Tensor:
    """The official ``_prepare_attention_mask_for_generation``: causal, plus True over the whole
    image block (rows and columns of the ``<img>`` slice). [b, 1, s, s]."""
    mask = torch.ones(length, length, dtype=torch.bool).tril().repeat(len(image_spans), 1, 1)
    for sample, (start, end) in enumerate(image_spans):
        mask[sample, start:end, start:end] = True
    return mask[:, None]


# --------------------------------------------------------------------------- mixed attention


def _qkv(batch, length, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, HEADS, length, HEAD_DIM, generator=g, dtype=torch.float64).to(dtype) for _ in range(6)]


# Three samples of length 14: two share a span (one attention call for both), one has a longer
# prompt and ends without padding; the first two have right padding after <eoi>.
SPANS = [(4, 10), (6, 13), (4, 10)]
LENGTH = 14


def test_mixed_attention_equals_sdpa_under_the_official_dense_mask():
    from models.hunyuan_image3.model import mixed_attention_jvp

    q, k, v, tq, tk, tv = _qkv(3, LENGTH, 0)
    mask = official_dense_mask(LENGTH, SPANS)
    with sdpa_kernel(SDPBackend.MATH):
        expected, expected_tangent = torch.func.jvp(
            lambda q_, k_, v_: F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask), (q, k, v), (tq, tk, tv)
        )
    out, _ = mixed_attention_jvp(q, k, v, image_spans=SPANS)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    out, tangent = mixed_attention_jvp(q, k, v, tq, tk, tv, image_spans=SPANS)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tangent, expected_tangent, rtol=1e-11, atol=1e-11)
    # Text only: causal.
    causal, causal_tangent = mixed_attention_jvp(q, k, v, tq, tk, tv)
    with sdpa_kernel(SDPBackend.MATH):
        expected, expected_tangent = torch.func.jvp(
            lambda q_, k_, v_: F.scaled_dot_product_attention(q_, k_, v_, is_causal=True), (q, k, v), (tq, tk, tv)
        )
    torch.testing.assert_close(causal, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(causal_tangent, expected_tangent, rtol=1e-11, atol=1e-11)


def test_image_queries_attend_to_later_image_tokens_and_the_prefix_does_not():
    """Change the key / value of the last image token: every image token's output changes (the
    block is bidirectional), no prefix token's does, and under the causal mask an earlier image
    token's does not either."""
    from models.hunyuan_image3.model import mixed_attention_jvp

    q, k, v = _qkv(3, LENGTH, 1)[:3]
    start, end = SPANS[1]
    k2, v2 = k.clone(), v.clone()
    k2[:, :, end - 1] += 1.0
    v2[:, :, end - 1] += 1.0
    before, _ = mixed_attention_jvp(q, k, v, image_spans=SPANS)
    after, _ = mixed_attention_jvp(q, k2, v2, image_spans=SPANS)
    changed = (after[1] - before[1]).abs().amax(dim=(0, 2)) > 1e-6  # per position of sample 1
    assert not changed[:start].any()
    assert changed[start:end].all()
    causal_before, _ = mixed_attention_jvp(q, k, v)
    causal_after, _ = mixed_attention_jvp(q, k2, v2)
    assert torch.equal(causal_before[1, :, : end - 1], causal_after[1, :, : end - 1])


# --------------------------------------------------------------------------- SelfAttention


def reference_attention(x, qkv_weight, q_norm, k_norm, o_weight, cos, sin, mask, eps=1e-5,
                        wrong: str | None = None):
    """A dense rewrite of the official SDPA attention's order of operations, batch-first.

    x [b, s, h]; cos, sin [b, s, d]; mask [b, 1, s, s] (True = attend). ``wrong`` does one step
    the other way (for the trap tests): "qkv_blocks" reads the fused weight as [all q; all k;
    all v] instead of per KV group, "norm_before_rope" swaps q/k norm and RoPE.
    """
    b, s, _ = x.shape
    n = HEADS // GROUPS
    qkv = x @ qkv_weight.T
    if wrong == "qkv_blocks":
        q, k, v = qkv.split([HEADS * HEAD_DIM, GROUPS * HEAD_DIM, GROUPS * HEAD_DIM], dim=-1)
        q = q.reshape(b, s, HEADS, HEAD_DIM)
        k, v = k.reshape(b, s, GROUPS, HEAD_DIM), v.reshape(b, s, GROUPS, HEAD_DIM)
    else:
        grouped = qkv.reshape(b, s, GROUPS, n + 2, HEAD_DIM)
        q = grouped[:, :, :, :n].reshape(b, s, HEADS, HEAD_DIM)
        k, v = grouped[:, :, :, n], grouped[:, :, :, n + 1]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def rope(t):
        half = HEAD_DIM // 2
        rotated = torch.cat([-t[..., half:], t[..., :half]], dim=-1)
        return t * cos[:, None] + rotated * sin[:, None]

    def rms(t, w):
        return w * t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps)

    if wrong == "norm_before_rope":
        q, k = rope(rms(q, q_norm)), rope(rms(k, k_norm))
    else:
        q, k = rms(rope(q), q_norm), rms(rope(k), k_norm)
    k, v = k.repeat_interleave(n, dim=1), v.repeat_interleave(n, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, s, -1) @ o_weight.T


def _attention_module(dtype=torch.float64):
    from models.hunyuan_image3.layer_specs import get_hunyuan_layer_spec
    from models.hunyuan_image3.model import SelfAttention

    config = _tiny_config(params_dtype=dtype)
    module = SelfAttention(config, get_hunyuan_layer_spec(num_experts=config.num_moe_experts))
    _randomise(module, 3)
    return module


def _reference_weights(module):
    return (module.linear_qkv.weight.detach(), module.q_layernorm.weight.detach(),
            module.k_layernorm.weight.detach(), module.linear_proj.weight.detach())


def _per_sample_rope(spans, latent_hw, length):
    """Tables [s, b, d] from our positions (checked against the official formula elsewhere)."""
    from models.hunyuan_image3.model import rope_tables

    tables = []
    for start, _ in spans:
        ys, xs = image_rope_positions_independent(length, start, *latent_hw)
        tables.append(rope_tables(ys, xs, HEAD_DIM, 10000.0))
    return torch.stack([c for c, _ in tables], 1), torch.stack([s for _, s in tables], 1)


def image_rope_positions_independent(length, start, h, w):
    """The official ``build_2d_rope`` positions, written from its formula: text y = x = index;
    the image from ``start`` on a grid starting at beta = start + (hw − h)/2, start + (hw − w)/2
    (float linspace, truncated to integers); text again after it."""
    y = torch.arange(length, dtype=torch.float32)
    x = torch.arange(length, dtype=torch.float32)
    beta_y, beta_x = start + (w * h - h) / 2, start + (w * h - w) / 2
    grid_y, grid_x = torch.meshgrid(beta_y + torch.arange(h).float(), beta_x + torch.arange(w).float(), indexing="ij")
    y[start:start + h * w], x[start:start + h * w] = grid_y.flatten(), grid_x.flatten()
    return y.long(), x.long()


@pytest.mark.parametrize("mixed", [False, True], ids=["causal", "mixed"])
def test_self_attention_forward_jvp_matches_torch_func_jvp_of_the_dense_official_order(mixed):
    """float64; the primal equals the dense rewrite of the official attention and the tangent
    equals ``torch.func.jvp`` of it; the tangent holds no graph."""
    spans = [(2, 8), (3, 9)] if mixed else None
    length = 11
    with parallel_context():
        module = _attention_module()
        g = torch.Generator().manual_seed(4)
        x = torch.randn(length, 2, HIDDEN, generator=g, dtype=torch.float64, requires_grad=True)
        tx = torch.randn(length, 2, HIDDEN, generator=g, dtype=torch.float64)
        cos, sin = _per_sample_rope(spans or [(0, 0), (0, 0)], (2, 3), length)
        y, ty = module.forward_jvp(x, tx, (cos, sin), spans)
        y_plain = module(x, (cos, sin), spans)
    mask = official_dense_mask(length, spans) if mixed else torch.ones(length, length, dtype=torch.bool).tril()
    weights = _reference_weights(module)

    def reference(x_bsh):
        return reference_attention(x_bsh, *weights, cos.transpose(0, 1).double(), sin.transpose(0, 1).double(), mask)

    with sdpa_kernel(SDPBackend.MATH):
        expected, expected_tangent = torch.func.jvp(reference, (x.detach().transpose(0, 1),), (tx.transpose(0, 1),))
    torch.testing.assert_close(y.transpose(0, 1), expected, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(ty.transpose(0, 1), expected_tangent, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y_plain, y, rtol=0, atol=0)
    assert y.requires_grad and not ty.requires_grad
    for wrong in ("qkv_blocks", "norm_before_rope"):  # the traps: the other order differs
        other = reference_attention(x.detach().transpose(0, 1), *weights, cos.transpose(0, 1).double(),
                                    sin.transpose(0, 1).double(), mask, wrong=wrong)
        assert (other - expected).abs().max() > 1e-3, wrong


@pytest.mark.parametrize("tangent_pass", ["logsumexp", "online"])
@pytest.mark.parametrize("q_len", [37, 5], ids=["square", "last_rows"])
def test_causal_attention_jvp_matches_torch_func_jvp(tangent_pass, q_len):
    """``jvp.attention``'s causal rule (aligned to the last key), with small tiles so that whole
    tiles are skipped above the diagonal and others masked across it; float64 and float32."""
    from mfmegatron.jvp.attention import attention_jvp, causal_mask, explain_tangent_pass

    g = torch.Generator().manual_seed(7)
    k_len = 37
    q, tq = (torch.randn(2, 3, q_len, 8, generator=g, dtype=torch.float64) for _ in range(2))
    k, v, tk, tv = (torch.randn(2, 3, k_len, 8, generator=g, dtype=torch.float64) for _ in range(4))
    mask = causal_mask(q_len, k_len)
    assert mask[0, k_len - q_len] and not mask[0, k_len - q_len + 1]
    with sdpa_kernel(SDPBackend.MATH):
        expected, expected_tangent = torch.func.jvp(
            lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=mask), (q, k, v), (tq, tk, tv)
        )
    if tangent_pass == "logsumexp" and q_len != k_len:
        # The fused kernels' causal mask is aligned to the first key: this case runs online.
        assert explain_tangent_pass(q, k, v, "auto", causal=True)[0] == "online"
        with pytest.raises(RuntimeError, match="aligned to the first key"):
            attention_jvp(q, k, v, tq, tk, tv, tangent_pass="logsumexp", causal=True)
        return
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-6)):
        args = [t.to(dtype) for t in (q, k, v, tq, tk, tv)]
        out, tangent = attention_jvp(*args, block_size=8, query_block_size=4, tangent_pass=tangent_pass, causal=True)
        torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
        torch.testing.assert_close(tangent.double(), expected_tangent, rtol=tol, atol=tol)


# --------------------------------------------------------------------------- sequences, positions

TOKENS = dict(bos=1, pad=0, boi=2, eoi=3, img=4, timestep=5, size=6, ratio=7)


def _tokens():
    from models.hunyuan_image3.sequence import ImageTokens

    return ImageTokens(**TOKENS)


def test_sequences_follow_the_official_template_positions_and_padding():
    from models.hunyuan_image3.sequence import build_image_sequences

    seq = build_image_sequences([[10, 11, 12], [13, 14, 15, 16, 17]], (2, 3), _tokens())
    assert seq.input_ids.tolist() == [
        [1, 10, 11, 12, 2, 6, 7, 5, 4, 4, 4, 4, 4, 4, 3, 0, 0],
        [1, 13, 14, 15, 16, 17, 2, 6, 7, 5, 4, 4, 4, 4, 4, 4, 3],
    ]
    assert seq.image_spans == [(8, 14), (10, 16)] and seq.timestep_positions == [7, 9]
    assert seq.lengths == [15, 17]
    for sample, (start, _) in enumerate(seq.image_spans):
        y, x = image_rope_positions_independent(17, start, 2, 3)
        assert torch.equal(seq.positions_y[sample], y) and torch.equal(seq.positions_x[sample], x)
    # (hw − h)/2 = 2, (hw − w)/2 = 1.5 -> truncated to 1: the image of sample 0 starts at (10, 9).
    assert seq.positions_y[0, 8:14].tolist() == [10, 10, 10, 11, 11, 11]
    assert seq.positions_x[0, 8:14].tolist() == [9, 10, 11, 9, 10, 11]
    assert seq.positions_y[0, 14:].tolist() == [14, 15, 16]  # <eoi> and pads continue at L + hw


def test_rope_tables_interleave_axes_by_frequency_parity_with_cos_sin_halves():
    """The official ``build_2d_rope``: θ reshaped [d/4, 2] times (y, x), i.e. even frequencies take
    y, odd take x; the table is [φ, φ]. Half-split axes (y on the first d/4) would differ."""
    from models.hunyuan_image3.model import rope_tables

    d = HEAD_DIM
    y, x = torch.tensor([3, 7]), torch.tensor([5, 2])
    cos, sin = rope_tables(y, x, d, 10000.0)
    theta = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
    official = (torch.stack([y, x], dim=1)[:, None, :] * theta.reshape(1, d // 4, 2)).reshape(2, d // 2).repeat(1, 2)
    torch.testing.assert_close(cos, official.cos(), rtol=0, atol=0)
    torch.testing.assert_close(sin, official.sin(), rtol=0, atol=0)
    halves = torch.cat([y[:, None] * theta[: d // 4], x[:, None] * theta[d // 4:]], dim=1).repeat(1, 2)
    assert (halves.cos() - cos).abs().max() > 0.1


# --------------------------------------------------------------------------- JVP rules


def _check_rule(rule, primal_fn, inputs, tangents, **kwargs):
    y, ty = rule(*[v for pair in zip(inputs, tangents) for v in pair], **kwargs)
    expected, expected_tangent = torch.func.jvp(primal_fn, tuple(inputs), tuple(tangents))
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ty, expected_tangent, rtol=1e-11, atol=1e-11)


def test_image_path_jvp_rules_match_torch_func_jvp():
    """float64: group norm (with affine), exact GELU, conv2d, RMSNorm in the official order."""
    from mfmegatron.jvp import functional as jf

    g = torch.Generator().manual_seed(11)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    x, tx = randn(2, 8, 3, 5), randn(2, 8, 3, 5)
    weight, bias = randn(8), randn(8)
    y, ty = jf.group_norm(x, tx, 4, weight, bias, 1e-5)
    expected, expected_tangent = torch.func.jvp(lambda a: F.group_norm(a, 4, weight, bias, 1e-5), (x,), (tx,))
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ty, expected_tangent, rtol=1e-11, atol=1e-11)

    y, ty = jf.gelu(x, tx)
    expected, expected_tangent = torch.func.jvp(F.gelu, (x,), (tx,))
    torch.testing.assert_close(ty, expected_tangent, rtol=1e-12, atol=1e-12)

    conv_w, conv_b = randn(6, 8, 3, 3), randn(6)
    y, ty = jf.conv2d(x, tx, conv_w, conv_b, padding=1)
    expected, expected_tangent = torch.func.jvp(lambda a: F.conv2d(a, conv_w, conv_b, padding=1), (x,), (tx,))
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ty, expected_tangent, rtol=1e-11, atol=1e-11)

    h, th, scale = randn(5, 16), randn(5, 16), randn(16)
    y, ty = jf.rms_norm_float32(h, th, scale, 1e-5)
    expected, expected_tangent = torch.func.jvp(
        lambda a: scale * (a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + 1e-5)), (h,), (th,)
    )
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ty, expected_tangent, rtol=1e-11, atol=1e-11)


def _reference_timestep_embedder(module, sigma):
    """The official TimestepEmbedder at σ: [cos, sin] sinusoid of 1000·σ, Linear, exact GELU, Linear."""
    dim = module.frequency_dim
    half = dim // 2
    freqs = torch.exp(-torch.log(torch.tensor(10000.0, dtype=sigma.dtype)) * torch.arange(half, dtype=sigma.dtype) / half)
    args = (1000 * sigma)[:, None] * freqs[None]
    emb = torch.cat([args.cos(), args.sin()], dim=-1)
    return module.mlp[2](F.gelu(module.mlp[0](emb)))


def _reference_resblock(block, x, emb, groups):
    """The official ResBlock.forward (no up/down): in_layers, AdaGN, out_layers, skip."""
    h = block.in_layers[2](F.silu(F.group_norm(x, groups, block.in_layers[0].weight, block.in_layers[0].bias, 1e-5)))
    scale, shift = block.emb_layers[1](F.silu(emb))[:, :, None, None].chunk(2, dim=1)
    norm = block.out_layers[0]
    h = F.group_norm(h, groups, norm.weight, norm.bias, 1e-5) * (1 + scale) + shift
    h = block.out_layers[3](F.silu(h))
    return block.skip_connection(x) + h


def test_image_path_modules_forward_jvp_match_torch_func_jvp_of_the_official_order():
    """float64, tangents in the latents / tokens and in σ: patch_embed with time_embed, final_layer
    with time_embed_2, timestep_emb; primal and tangent against ``torch.func.jvp`` of the
    official order written out."""
    from models.hunyuan_image3.model import FinalLayer, PatchEmbed, TimestepEmbedder

    config = _tiny_config(params_dtype=torch.float64)
    groups = config.image_norm_groups
    torch.manual_seed(0)
    embedder, patch_embed, final_layer = TimestepEmbedder(config), PatchEmbed(config), FinalLayer(config)
    for i, module in enumerate((embedder, patch_embed, final_layer)):
        _randomise(module, 20 + i)
    g = torch.Generator().manual_seed(12)
    latents = torch.randn(2, config.latent_channels, 2, 3, generator=g, dtype=torch.float64)
    tlatents = torch.randn_like(latents)
    tokens = torch.randn(2, 6, HIDDEN, generator=g, dtype=torch.float64)
    ttokens = torch.randn_like(tokens)
    sigma, tsigma = torch.tensor([0.3, 0.9], dtype=torch.float64), torch.tensor([1.0, -0.5], dtype=torch.float64)

    def patch_reference(lat, s):
        x = patch_embed.model[0](lat)
        x = _reference_resblock(patch_embed.model[1], x, _reference_timestep_embedder(embedder, s), groups)
        return x.flatten(2).transpose(1, 2)  # b c h w -> b (h w) c

    def final_reference(tok, s):
        x = tok.transpose(1, 2).unflatten(2, (2, 3))
        x = _reference_resblock(final_layer.model[0], x, _reference_timestep_embedder(embedder, s), groups)
        out = final_layer.model[1]
        return out[2](F.silu(F.group_norm(x, groups, out[0].weight, out[0].bias, 1e-5)))

    with torch.no_grad():
        expected, expected_tangent = torch.func.jvp(patch_reference, (latents, sigma), (tlatents, tsigma))
        emb, temb = embedder.forward_jvp(sigma, tsigma)
        y, ty = patch_embed.forward_jvp(latents, tlatents, emb, temb)
        torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ty, expected_tangent, rtol=1e-9, atol=1e-9)
        expected, expected_tangent = torch.func.jvp(final_reference, (tokens, sigma), (ttokens, tsigma))
        y, ty = final_layer.forward_jvp(tokens, ttokens, (2, 3), emb, temb)
        torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ty, expected_tangent, rtol=1e-9, atol=1e-9)
    # The sinusoid is [cos, sin]: [sin, cos] would give another embedding.
    from models.hunyuan_image3.model import timestep_sinusoid

    sinusoid, _ = timestep_sinusoid(1000 * sigma, None, config.timestep_embedding_dim)
    half = config.timestep_embedding_dim // 2
    torch.testing.assert_close(sinusoid[:, 0], torch.cos(1000 * sigma))  # frequency 1: cos first
    torch.testing.assert_close(sinusoid[:, half], torch.sin(1000 * sigma))
    assert not torch.allclose(sinusoid, torch.cat([sinusoid[:, half:], sinusoid[:, :half]], dim=1))


# --------------------------------------------------------------------------- the whole image forward

PROMPTS = [[10, 11, 12], [13, 14, 15, 16, 17]]  # different lengths: sample 0 is padded
LATENT_HW = (2, 3)


def _image_batch(config, seed=30, dtype=torch.float32, prompts=PROMPTS, length=None):
    from models.hunyuan_image3.sequence import build_image_sequences

    g = torch.Generator().manual_seed(seed)
    sequence = build_image_sequences(prompts, LATENT_HW, _tokens(), length=length)
    latents = torch.randn(len(prompts), config.latent_channels, *LATENT_HW, generator=g, dtype=torch.float64).to(dtype)
    sigma = torch.rand(len(prompts), generator=g, dtype=torch.float64).to(dtype)
    return sequence, latents, sigma


def _nemo_reference():
    """NeMo Automodel 0.7.0's ``hunyuan_image3`` (an independent port) at the tiny sizes, float32.
    It hard-codes 32 GroupNorm groups and a 256-wide sinusoid."""
    nemo_model = pytest.importorskip("nemo_automodel.components.models.hunyuan_image3.model")
    from nemo_automodel.components.models.common import BackendConfig
    from nemo_automodel.components.models.hunyuan_image3.config import HunyuanImage3Config as NemoConfig

    config = NemoConfig(
        vocab_size=128, hidden_size=HIDDEN, intermediate_size=32, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=GROUPS, attention_head_dim=HEAD_DIM, num_experts=8,
        moe_topk=3, patch_embed_hidden_dim=32, image_token_id=TOKENS["img"], timestep_token_id=TOKENS["timestep"],
        vae={"latent_channels": 4}, torch_dtype="float32", pad_token_id=TOKENS["pad"], bos_token_id=TOKENS["bos"],
        eos_token_id=TOKENS["eoi"],
    )
    backend = BackendConfig(attn="sdpa", linear="torch", rms_norm="torch_fp32", rope="torch", experts="torch",
                            dispatcher="torch", enable_hf_state_dict_adapter=True)
    model = nemo_model.HunyuanImage3ForCausalMM(config, backend=backend)
    generator = torch.Generator().manual_seed(31)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator)
            fan_in = param[0].numel() if param.ndim > 1 else 1
            param.copy_(1 + 0.2 * noise if param.ndim == 1 else min(0.3, 2 / fan_in ** 0.5) * noise)
    return model


def _to_ours(released: dict, config) -> dict:
    """Released keys -> our full names: the trunk through ``state_dict_adapter``, the image path
    by identity."""
    from models.hunyuan_image3.model import IMAGE_PATH_MODULES
    from models.hunyuan_image3.state_dict_adapter import to_megatron

    ours, rest = to_megatron(released, config)
    image = {k: v for k, v in rest.items() if k.split(".")[0] in IMAGE_PATH_MODULES}
    assert set(rest) == set(image), set(rest) - set(image)
    return {**ours, **image}


def test_image_forward_and_every_gradient_match_nemo_automodel():
    """The whole image forward (sequence, 2-D RoPE, mask, three embedders, image path, no ln_f)
    against NeMo Automodel's port, fp32, two prompts of different lengths; and every parameter's
    gradient. NeMo's weights go through its own HF export, then our conversion."""
    from models.hunyuan_image3.parallelize import build_hunyuan_model, load_full_weights

    nemo = _nemo_reference()
    config = _tiny_config(image_norm_groups=32, timestep_embedding_dim=256)
    sequence, latents, sigma = _image_batch(config)
    # NeMo torch.compiles its SwiGLU; dynamo trips over the CPU platform patches other tests
    # install (mfmegatron.parallel.cpu_platform), and eager is the same math.
    with torch._dynamo.config.patch(disable=True):
        expected = nemo(sequence.input_ids, latents, 1000 * sigma, valid_lengths=torch.tensor(sequence.lengths))[0]
        loss_weights = torch.linspace(-1, 1, expected.numel()).view(expected.shape)
        (expected * loss_weights).sum().backward()
    released = {k: v.detach().clone() for k, v in nemo.state_dict_adapter.to_hf(nemo.state_dict()).items()}
    released_grads = nemo.state_dict_adapter.to_hf({n: p.grad for n, p in nemo.named_parameters()})
    with parallel_context():
        model = build_hunyuan_model(config)
        load_full_weights(model, _to_ours(released, config))
        velocity = model.velocity(sequence, latents, sigma)
        (velocity * loss_weights).sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(velocity, expected.detach(), rtol=2e-5, atol=2e-5)
    expected_grads = _to_ours({k: v for k, v in released_grads.items()}, config)
    # ln_f and lm_head are not on the image path: no gradient in either model.
    assert set(expected_grads) - set(grads) == {"final_layernorm.weight", "output_layer.weight"}
    for name, grad in grads.items():
        want = expected_grads[name]
        atol = 2e-5 * max(1.0, want.abs().max().item())
        torch.testing.assert_close(grad, want, rtol=2e-4, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


def test_a_padded_sample_equals_the_sample_alone():
    """Right padding after <eoi> changes nothing: each sample of a padded batch (per-sample spans,
    two different spans in one batch) gives the velocity it gives alone."""
    from models.hunyuan_image3.parallelize import build_hunyuan_model

    config = _tiny_config()
    sequence, latents, sigma = _image_batch(config, length=20)
    assert sequence.input_ids.shape[1] == 20 and sequence.lengths == [15, 17]
    with parallel_context():
        torch.manual_seed(0)
        model = build_hunyuan_model(config)
        _randomise(model, 5, scale=0.2)
        batch = model.velocity(sequence, latents, sigma)
        for i in range(2):
            alone = model.velocity(sequence.sample(i), latents[i:i + 1], sigma[i:i + 1])
            torch.testing.assert_close(batch[i:i + 1], alone, rtol=1e-5, atol=1e-5)


def test_image_head_reads_the_last_hidden_states_without_ln_f():
    """ln_f (and lm_head) take no part in the velocity; the text logits do use ln_f."""
    from models.hunyuan_image3.parallelize import build_hunyuan_model

    config = _tiny_config()
    sequence, latents, sigma = _image_batch(config)
    with parallel_context():
        torch.manual_seed(0)
        model = build_hunyuan_model(config)
        _randomise(model, 6, scale=0.2)
        before = model.velocity(sequence, latents, sigma)
        logits_before = model(sequence.input_ids)
        with torch.no_grad():
            model.final_layernorm.weight.mul_(3.0)
        torch.testing.assert_close(model.velocity(sequence, latents, sigma), before, rtol=0, atol=0)
        assert (model(sequence.input_ids) - logits_before).abs().max() > 1e-3


# --------------------------------------------------------------------------- multi-rank

TP_LENGTH = 18  # the longest sample (17) padded to a multiple of TP
PP_MICRO_BATCHES = 2


def _loss_weights(shape):
    return torch.linspace(-1, 1, torch.Size(shape).numel()).view(shape)


def _tangents(batch, seed):
    """Tangents in the latents and σ for ``velocity_jvp``."""
    _, latents, sigma = batch
    g = torch.Generator().manual_seed(seed)
    return torch.randn(latents.shape, generator=g), torch.randn(sigma.shape, generator=g)


def _multi_rank_checks(full_state: dict, student_state: dict) -> dict:
    """Every two-rank layout in one spawn (each rank pays megatron-core's import once); also the
    few-step student's PP=2 and TP=2 + SP checks (``tests/test_hunyuan_image3_student.py``)."""
    from tests.test_hunyuan_image3_student import _two_rank_student_checks

    return {"ep2": _ep_rank(full_state), "tp2_sp": _tp_rank(full_state), "tp2": _tp_rank(full_state, False),
            "tp2_etp1": _tp_rank(full_state, False, expert_tensor_parallel_size=1),
            "pp2": _pp_rank(full_state), "student": _two_rank_student_checks(student_state)}


def _ep_rank(full_state):
    """EP=2: each rank its own batch; the velocity and this rank's gradients."""
    from mfmegatron.parallel import initialize_parallel
    from models.hunyuan_image3.parallelize import build_hunyuan_model, load_full_weights, local_weights

    initialize_parallel(expert_parallel_size=2)
    config = _tiny_config(expert_model_parallel_size=2)
    model = build_hunyuan_model(config)
    load_full_weights(model, full_state)
    batch = _image_batch(config, seed=40 + torch.distributed.get_rank())
    velocity = model.velocity(*batch)
    (velocity * _loss_weights(velocity.shape)).sum().backward()
    grads = {name: p.grad.clone() for (name, _), p in zip(local_weights(model), model.parameters()) if p.grad is not None}
    _, tangent = model.velocity_jvp(*batch, *_tangents(batch, 41))
    return {"velocity": velocity.detach(), "grads": grads, "tangent": tangent}


def _tp_rank(full_state, sequence_parallel=True, expert_tensor_parallel_size=None):
    """TP=2 with or without sequence parallel, the same batch on both ranks, in training mode: the
    (replicated) velocity, its JVP and full gradients; the image path's replicated gradients as
    each rank has them. Without sequence parallel each rank dispatches half the (replicated)
    tokens to the routed experts: ``dispatched`` counts the rows this rank's MoE layers sent.
    ``expert_tensor_parallel_size`` 1: whole experts on each rank, their gradients this rank's
    share (the expert-data-parallel reduction sums them)."""
    from mfmegatron.parallel import initialize_parallel
    from models.hunyuan_image3.model import IMAGE_PATH_MODULES
    from models.hunyuan_image3.parallelize import build_hunyuan_model, load_full_weights
    from tests.test_hunyuan_image3 import _full_grads

    etp = {} if expert_tensor_parallel_size is None else {"expert_tensor_parallel_size": expert_tensor_parallel_size}
    initialize_parallel(tensor_parallel_size=2, **etp)
    config = _tiny_config(tensor_model_parallel_size=2, sequence_parallel=sequence_parallel, **etp)
    model = build_hunyuan_model(config)
    load_full_weights(model, full_state)
    model.train(True)
    batch = _image_batch(config, seed=50, length=TP_LENGTH)
    dispatched = []
    hooks = [layer.mlp.token_dispatcher for layer in model.layers]
    original = type(hooks[0]).dispatch_preprocess

    def counting_preprocess(dispatcher, hidden_states, *args, **kwargs):
        dispatched.append(hidden_states.reshape(-1, hidden_states.shape[-1]).shape[0])
        return original(dispatcher, hidden_states, *args, **kwargs)

    for dispatcher in hooks:
        dispatcher.dispatch_preprocess = counting_preprocess.__get__(dispatcher)
    velocity = model.velocity(*batch)
    (velocity * _loss_weights(velocity.shape)).sum().backward()
    _, tangent = model.velocity_jvp(*batch, *_tangents(batch, 51))
    local_image_grads = {n: p.grad.clone() for n, p in model.named_parameters() if n.split(".")[0] in IMAGE_PATH_MODULES}
    for param in model.parameters():  # ln_f and lm_head are not on the image path
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    grads = _full_grads(model)
    return {"velocity": velocity.detach(), "grads": grads, "local_image_grads": local_image_grads, "tangent": tangent,
            "dispatched": dispatched, "tokens": batch[0].input_ids.numel(),
            "uneven": None if sequence_parallel else _uneven_replicated_tokens()}


def _uneven_replicated_tokens() -> dict:
    """``collectives.split_replicated_tokens`` / ``gather_replicated_tokens`` on 7 replicated rows
    over TP=2 (4 and 3 rows), with a tangent: the rows kept, the gathered rows, and the gradient
    of ``sum(weights * gathered²)`` with respect to the replicated input."""
    from megatron.core import parallel_state

    from mfmegatron.parallel import collectives

    group = parallel_state.get_tensor_model_parallel_group()
    x = torch.arange(21.0).view(7, 3).requires_grad_()
    splits = collectives.replicated_token_splits(7, group)
    kept, tkept = collectives.split_replicated_tokens(x, -x.detach(), group, splits)
    gathered, tgathered = collectives.gather_replicated_tokens(kept * 2, tkept * 2, group, splits)
    (_loss_weights(gathered.shape) * gathered**2).sum().backward()
    return {"splits": splits, "kept": kept.detach(), "gathered": gathered.detach(), "tangent": tgathered,
            "grad": x.grad}


def _pp_rank(full_state):
    """PP=2 under megatron's 1F1B schedule, two micro-batches: the losses on the last stage and
    this stage's gradients (full names)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mfmegatron.parallel import initialize_parallel
    from models.hunyuan_image3.parallelize import build_hunyuan_model, load_full_weights, local_weights

    initialize_parallel(pipeline_parallel_size=2)
    config = _tiny_config(pipeline_model_parallel_size=2, pipeline_dtype=torch.float32)
    model = build_hunyuan_model(config)
    load_full_weights(model, full_state)
    batches = iter([_image_batch(config, seed=60 + mb) for mb in range(PP_MICRO_BATCHES)])

    def forward_step(data_iterator, model):
        out = model.velocity(*next(data_iterator))

        def loss_func(output):
            loss = (output * _loss_weights(output.shape)).sum()
            return loss, {"loss": loss.detach().clone()}

        return out, loss_func

    sequence_length = _image_batch(config)[0].input_ids.shape[1]
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=batches, model=[model], num_microbatches=PP_MICRO_BATCHES,
        seq_length=sequence_length, micro_batch_size=len(PROMPTS), forward_only=False,
    )
    grads = {name: p.grad.clone() for (name, _), p in zip(local_weights(model), model.parameters()) if p.grad is not None}
    # A JVP step through the schedule (the stage activation carries the tangent's rows after the
    # primal's, [2s, b, h]), with backward through the primal only, as a MeanFlow step does.
    batch = _image_batch(config, seed=60)
    tangents = []

    def jvp_step(data_iterator, model):
        velocity, tangent = model.velocity_jvp(*batch, *_tangents(batch, 61))

        def loss_keeping_the_tangent(output):
            tangents.append(tangent)
            return (output * _loss_weights(output.shape)).sum(), {}

        return velocity, loss_keeping_the_tangent

    model.zero_grad(set_to_none=True)
    get_forward_backward_func()(
        forward_step_func=jvp_step, data_iterator=None, model=[model], num_microbatches=1,
        seq_length=2 * sequence_length, micro_batch_size=len(PROMPTS), forward_only=False,
    )
    jvp_grads = {name: p.grad.clone() for (name, _), p in zip(local_weights(model), model.parameters()) if p.grad is not None}
    stage = parallel_state.get_pipeline_model_parallel_rank()
    modules = {name for name, _ in model.named_children()}
    return {"stage": stage, "losses": [d["loss"] for d in losses] if losses else None, "grads": grads,
            "modules": modules, "tangent": tangents[0] if tangents else None, "jvp_grads": jvp_grads}


@pytest.fixture(scope="module")
def multi_rank():
    from mfmegatron.parallel import run_on_ranks
    from models.hunyuan_image3.parallelize import build_hunyuan_model, local_weights

    config = _tiny_config()
    with parallel_context():
        torch.manual_seed(0)
        model = build_hunyuan_model(config)
        _randomise(model, 7, scale=0.2)
        full = {name: t.clone() for name, t in local_weights(model)}
    from tests.test_hunyuan_image3_student import student_weights

    student = student_weights()
    return {"full": full, "student": student,
            "ranks": run_on_ranks(_multi_rank_checks, 2, full, student, timeout=300)}


def _one_rank(full, batches, micro_batches=1, tangent_seeds=None):
    """The one-rank model on each batch: velocity, loss and that batch's gradients (of the loss
    divided by ``micro_batches``); with ``tangent_seeds`` also the velocity's JVP."""
    from models.hunyuan_image3.parallelize import build_hunyuan_model, load_full_weights

    config = _tiny_config()
    results = []
    with parallel_context():
        model = build_hunyuan_model(config)
        load_full_weights(model, full)
        for batch in batches:
            model.zero_grad(set_to_none=True)
            velocity = model.velocity(*batch)
            loss = (velocity * _loss_weights(velocity.shape)).sum()
            (loss / micro_batches).backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results.append({"velocity": velocity.detach(), "loss": loss.detach(), "grads": grads})
        for result, batch, seed in zip(results, batches, tangent_seeds or []):
            result["tangent"] = model.velocity_jvp(*batch, *_tangents(batch, seed))[1]
    return results


def _assert_grad(got, want, what):
    atol = 1e-5 * max(1.0, want.abs().max().item())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=atol, msg=lambda m: f"{what}: {m}")


def test_expert_parallel_2_image_forward_matches_one_rank(multi_rank):
    """Each rank's velocity, its JVP and dense gradients equal the one-rank model's on that rank's batch;
    an expert's gradient (tokens from both ranks) equals the sum over both batches."""
    config = _tiny_config()
    expected = _one_rank(multi_rank["full"], [_image_batch(config, seed=40 + r) for r in range(2)], tangent_seeds=[41, 41])
    for rank, result in enumerate(r["ep2"] for r in multi_rank["ranks"]):
        torch.testing.assert_close(result["velocity"], expected[rank]["velocity"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(result["tangent"], expected[rank]["tangent"], rtol=1e-5, atol=1e-5)
        for name, grad in result["grads"].items():
            if ".local_experts." in name:
                want = sum(e["grads"].get(name, torch.zeros_like(grad)) for e in expected)
            else:
                want = expected[rank]["grads"][name]
            _assert_grad(grad, want, f"rank {rank} {name}")
        assert any(n.startswith("patch_embed.") for n in result["grads"])


@pytest.mark.parametrize("layout", ["tp2_sp", "tp2", "tp2_etp1"])
def test_tensor_parallel_2_image_forward_matches_one_rank(multi_rank, layout):
    """Velocity, its JVP and every gradient; the replicated image path gets the same (full) gradient on
    both ranks although each rank's layers see half the sequence. "tp2_etp1" (no SP, whole experts
    on each rank): the MoE's output gathered over the attention's TP group, not the expert-TP one
    (a single rank there: the output had been half the sequence)."""
    config = _tiny_config()
    (expected,) = _one_rank(multi_rank["full"], [_image_batch(config, seed=50, length=TP_LENGTH)], tangent_seeds=[51])
    ranks = [r[layout] for r in multi_rank["ranks"]]
    for rank, result in enumerate(ranks):
        torch.testing.assert_close(result["velocity"], expected["velocity"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(result["tangent"], expected["tangent"], rtol=1e-5, atol=1e-5)
        assert set(result["grads"]) == set(expected["grads"]) | {"final_layernorm.weight", "output_layer.weight"}
        for name, want in expected["grads"].items():
            got = result["grads"][name]
            if layout == "tp2_etp1" and ".local_experts." in name:
                got = sum(r["grads"][name] for r in ranks)
            _assert_grad(got, want, f"rank {rank} {name}")
        # Each MoE layer (forward, then the JVP's forward) dispatched this rank's half of the
        # tokens: the sequence-parallel chunk, or without SP its share of the replicated tokens.
        assert result["dispatched"] == [result["tokens"] // 2] * (2 * config.num_layers), result["dispatched"]
    for name, grad in ranks[0]["local_image_grads"].items():
        torch.testing.assert_close(ranks[1]["local_image_grads"][name], grad, rtol=0, atol=0)
        _assert_grad(grad, expected["grads"][name], name)
    if layout == "tp2":
        # Any number of tokens: 7 rows share out as 4 + 3; gathered back whole with the tangent;
        # the replicated input's gradient is whole on both ranks (d/dx of w·(2x)² = 8wx).
        x = torch.arange(21.0).view(7, 3)
        for rank, result in enumerate(r["uneven"] for r in ranks):
            assert result["splits"] == [4, 3]
            assert torch.equal(result["kept"], x[:4] if rank == 0 else x[4:])
            assert torch.equal(result["gathered"], 2 * x) and torch.equal(result["tangent"], -2 * x)
            torch.testing.assert_close(result["grad"], 8 * _loss_weights((7, 3)) * x)


def test_pipeline_parallel_2_image_forward_matches_one_rank(multi_rank):
    """The image input path on the first stage, the image head on the last; losses and every
    gradient equal the one-rank model's (the schedule averages over micro-batches); and a JVP
    step through the schedule (primal and tangent rows in one stage activation): the tangent and
    the gradients of its primal loss."""
    config = _tiny_config()
    expected = _one_rank(multi_rank["full"], [_image_batch(config, seed=60 + mb) for mb in range(PP_MICRO_BATCHES)],
                         micro_batches=PP_MICRO_BATCHES)
    stages = {r["pp2"]["stage"]: r["pp2"] for r in multi_rank["ranks"]}
    assert {"patch_embed", "time_embed", "timestep_emb", "word_embeddings"} <= stages[0]["modules"]
    assert not {"final_layer", "time_embed_2"} & stages[0]["modules"]
    assert {"final_layer", "time_embed_2"} <= stages[1]["modules"]
    assert not {"patch_embed", "time_embed", "timestep_emb"} & stages[1]["modules"]
    for got, want in zip(stages[1]["losses"], [e["loss"] for e in expected]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    (jvp,) = _one_rank(multi_rank["full"], [_image_batch(config, seed=60)], tangent_seeds=[61])
    torch.testing.assert_close(stages[1]["tangent"], jvp["tangent"], rtol=1e-5, atol=1e-5)
    jvp_grads = {**stages[0]["jvp_grads"], **stages[1]["jvp_grads"]}
    assert set(jvp_grads) == set(jvp["grads"])
    for name, grad in jvp_grads.items():
        _assert_grad(grad, jvp["grads"][name], f"JVP step {name}")
    summed = {n: expected[0]["grads"][n] + expected[1]["grads"][n] for n in expected[0]["grads"]}
    seen = set()
    for stage in stages.values():
        for name, grad in stage["grads"].items():
            if name in summed:
                _assert_grad(grad, summed[name], f"stage {stage['stage']} {name}")
                seen.add(name)
    assert seen == set(summed)


def test_few_step_student_under_pipeline_and_tensor_parallel_2_matches_one_rank(multi_rank):
    """The "tokens" student (tangents in the latents, σ and σ_r): PP=2, a JVP step through the
    schedule (guidance_emb / timestep_r_emb on the first stage only; the last gets σ_r and w but only
    the activation), tangent and every gradient; TP=2 + SP, velocity and tangent."""
    from tests.test_hunyuan_image3_student import check_two_rank_student

    check_two_rank_student(multi_rank["student"], [r["student"] for r in multi_rank["ranks"]])


# --------------------------------------------------------------------------- dense reference, traps

WRONG_WAYS = {
    "qkv_blocks": "the fused qkv_proj read as [all q; all k; all v], not per KV group",
    "norm_before_rope": "q/k RMSNorm before RoPE (megatron's order), not after",
    "glu_halves": "gate_and_up_proj read as [gate; up], not [up; gate]",
    "rope_halves": "2-D RoPE axes split by halves of the frequencies, not by parity",
    "rope_uncentred": "the image grid at (L, L), not centred in its span",
    "sin_cos": "the timestep sinusoid as [sin, cos], not [cos, sin]",
    "ln_f": "ln_f applied to the image hidden states",
    "causal_image": "a causal image block, not a bidirectional one",
}


def _released_weights(full: dict, config) -> dict:
    """Our full names -> the released keys: the trunk through ``state_dict_adapter``, the image
    path by identity."""
    from models.hunyuan_image3.model import IMAGE_PATH_MODULES
    from models.hunyuan_image3.state_dict_adapter import from_megatron

    image = {k: v for k, v in full.items() if k.split(".")[0] in IMAGE_PATH_MODULES}
    return {**from_megatron({k: v for k, v in full.items() if k not in image}, config), **image}


def reference_velocity(w: dict, config, sequence, latents, sigma, wrong: str | None = None, sigma_r=None,
                       guidance=None):
    """A dense, single-process rewrite of the official ``gen_image`` forward (``hunyuan.py``) on the
    released weight names, batch-first, in the inputs' dtype; ``wrong`` does one documented trap
    the other way (``WRONG_WAYS``). A few-step student (``config.cfg_distilled`` /
    ``use_meanflow``): ``guidance_emb(guidance)`` and ``timestep_r_emb(sigma_r)`` go into the
    ``<guidance>`` / ``<timestep_r>`` rows ("tokens") or are added to ``<timestep>``'s
    ("embedding")."""
    b, s = sequence.input_ids.shape
    h_lat, w_lat = sequence.latent_hw
    eps, groups, d = config.layernorm_epsilon, config.image_norm_groups, HEAD_DIM

    def linear(x, name, bias=True):
        return F.linear(x, w[name + ".weight"], w.get(name + ".bias") if bias else None)

    def embedder(prefix, value=None):
        value = sigma if value is None else value
        half = config.timestep_embedding_dim // 2
        freqs = torch.exp(-torch.log(torch.tensor(10000.0, dtype=value.dtype)) * torch.arange(half, dtype=value.dtype) / half)
        args = (1000 * value)[:, None] * freqs[None]
        parts = [args.sin(), args.cos()] if wrong == "sin_cos" else [args.cos(), args.sin()]
        return linear(F.gelu(linear(torch.cat(parts, dim=-1), prefix + ".mlp.0")), prefix + ".mlp.2")

    def conv(x, name, padding):
        return F.conv2d(x, w[name + ".weight"], w[name + ".bias"], padding=padding)

    def group_norm(x, name):
        return F.group_norm(x, groups, w[name + ".weight"], w[name + ".bias"], 1e-5)

    def resblock(x, prefix, emb):
        h = conv(F.silu(group_norm(x, prefix + ".in_layers.0")), prefix + ".in_layers.2", 1)
        scale, shift = linear(F.silu(emb), prefix + ".emb_layers.1")[:, :, None, None].chunk(2, dim=1)
        h = group_norm(h, prefix + ".out_layers.0") * (1 + scale) + shift
        h = conv(F.silu(h), prefix + ".out_layers.3", 1)
        skip = prefix + ".skip_connection"
        return (conv(x, skip, 0) if skip + ".weight" in w else x) + h

    def rms(x, weight):
        return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    def swiglu(x, prefix):
        first, second = linear(x, prefix + ".gate_and_up_proj", False).chunk(2, dim=-1)
        up, gate = (second, first) if wrong == "glu_halves" else (first, second)
        return linear(up * F.silu(gate), prefix + ".down_proj", False)

    # Input: wte, <timestep> and <img> rows replaced.
    x = w["model.wte.weight"][sequence.input_ids].clone()
    image = resblock(conv(latents, "patch_embed.model.0", 1), "patch_embed.model.1", embedder("time_embed"))
    image = image.flatten(2).transpose(1, 2)
    step = embedder("timestep_emb")
    student_rows = []
    if config.cfg_distilled:
        student_rows.append((sequence.guidance_positions, embedder("guidance_emb", guidance)))
    if config.use_meanflow:
        student_rows.append((sequence.timestep_r_positions, embedder("timestep_r_emb", sigma_r)))
    if config.student_conditioning == "embedding":
        for _, rows in student_rows:
            step = step + rows
    for i, (start, end) in enumerate(sequence.image_spans):
        x[i, sequence.timestep_positions[i]] = step[i]
        if config.student_conditioning == "tokens":
            for positions, rows in student_rows:
                x[i, positions[i]] = rows[i]
        x[i, start:end] = image[i]

    # 2-D RoPE, the official build_2d_rope: theta [d/4, 2] times (y, x) per token.
    theta = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
    cos, sin = [], []
    for start, _ in sequence.image_spans:
        if wrong == "rope_uncentred":
            y, xx = image_rope_positions_independent(s, start, 1, 1)  # text positions ...
            rows = torch.arange(h_lat).repeat_interleave(w_lat)
            cols = torch.arange(w_lat).repeat(h_lat)
            y, xx = y.clone(), xx.clone()
            y[start:start + h_lat * w_lat], xx[start:start + h_lat * w_lat] = start + rows, start + cols
        else:
            y, xx = image_rope_positions_independent(s, start, h_lat, w_lat)
        if wrong == "rope_halves":
            angles = torch.cat([y[:, None] * theta[: d // 4], xx[:, None] * theta[d // 4:]], dim=1)
        else:
            angles = (torch.stack([y, xx], dim=1)[:, None, :] * theta.reshape(1, d // 4, 2)).reshape(s, d // 2)
        angles = angles.repeat(1, 2)
        cos.append(angles.cos())
        sin.append(angles.sin())
    cos, sin = torch.stack(cos).to(x.dtype), torch.stack(sin).to(x.dtype)
    spans = [(start, start) for start, _ in sequence.image_spans] if wrong == "causal_image" else sequence.image_spans
    mask = official_dense_mask(s, spans)

    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        attn_weights = [w[p + f"self_attn.{n}.weight"] for n in ("qkv_proj", "query_layernorm", "key_layernorm", "o_proj")]
        attn_wrong = wrong if wrong in ("qkv_blocks", "norm_before_rope") else None
        x = x + reference_attention(rms(x, w[p + "input_layernorm.weight"]), *attn_weights, cos, sin, mask, eps, attn_wrong)
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        probs = torch.softmax(F.linear(h, w[p + "mlp.gate.wg.weight"]), dim=-1)
        top, chosen = probs.topk(config.moe_router_topk, dim=-1)
        top = top / top.sum(-1, keepdim=True)
        moe = swiglu(h, p + "mlp.shared_mlp")
        for e in range(config.num_moe_experts):
            weight = (top * (chosen == e)).sum(-1, keepdim=True)
            moe = moe + weight * swiglu(h, p + f"mlp.experts.{e}")
        x = x + moe

    if wrong == "ln_f":
        x = rms(x, w["model.ln_f.weight"])
    tokens = torch.stack([x[i, start:end] for i, (start, end) in enumerate(sequence.image_spans)])
    grid = tokens.transpose(1, 2).unflatten(2, (h_lat, w_lat))
    out = resblock(grid, "final_layer.model.0", embedder("time_embed_2"))
    return conv(F.silu(group_norm(out, "final_layer.model.1.0")), "final_layer.model.1.2", 1)


@pytest.fixture(scope="module")
def float64_model_run():
    """The float64 model (router too) on a padded batch: weights, velocity and its JVP along
    tangents in the latents and σ."""
    from models.hunyuan_image3.parallelize import build_hunyuan_model, local_weights

    config = _tiny_config(params_dtype=torch.float64, moe_router_dtype="fp64")
    sequence, latents, sigma = _image_batch(config, seed=70, dtype=torch.float64)
    g = torch.Generator().manual_seed(71)
    tlatents = torch.randn(latents.shape, generator=g, dtype=torch.float64)
    tsigma = torch.randn(sigma.shape, generator=g, dtype=torch.float64)
    with parallel_context():
        torch.manual_seed(0)
        model = build_hunyuan_model(config)
        _randomise(model, 8, scale=0.2)
        full = {name: t.clone() for name, t in local_weights(model)}
        velocity, tangent = model.velocity_jvp(sequence, latents, sigma, tlatents, tsigma)
        plain = model.velocity(sequence, latents, sigma)
    return dict(config=config, sequence=sequence, latents=latents, sigma=sigma, tlatents=tlatents, tsigma=tsigma,
                released=_released_weights(full, config), velocity=velocity, tangent=tangent, plain=plain)


def test_whole_image_forward_jvp_matches_torch_func_jvp_of_the_dense_official_order(float64_model_run):
    """float64, tangents in the latents and in σ: the velocity equals the dense rewrite of the
    official forward, and ``velocity_jvp``'s tangent equals ``torch.func.jvp`` of it."""
    run = float64_model_run
    with sdpa_kernel(SDPBackend.MATH):
        expected, expected_tangent = torch.func.jvp(
            lambda lat, sig: reference_velocity(run["released"], run["config"], run["sequence"], lat, sig),
            (run["latents"], run["sigma"]), (run["tlatents"], run["tsigma"]),
        )
    assert expected.abs().max() > 0.1 and expected_tangent.abs().max() > 0.1
    # megatron's router takes the softmax over the chosen logits in float32 whatever the dtype
    # (moe_utils.topk_routing_with_score_function), as the official code: agreement is to ~1e-8
    # of the output scale, not float64 round-off.
    for got, want in ((run["velocity"], expected), (run["tangent"], expected_tangent)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7 * want.abs().max().item())
    torch.testing.assert_close(run["plain"], run["velocity"], rtol=0, atol=0)
    assert run["velocity"].requires_grad and not run["tangent"].requires_grad


@pytest.mark.parametrize("wrong", sorted(WRONG_WAYS))
def test_each_documented_trap_done_the_other_way_changes_the_velocity(float64_model_run, wrong):
    """The model equals the official order (previous test); each trap done the other way gives a
    clearly different velocity, so that test pins it."""
    run = float64_model_run
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        other = reference_velocity(run["released"], run["config"], run["sequence"], run["latents"], run["sigma"], wrong)
    difference = (other - run["velocity"]).abs().max() / run["velocity"].abs().max()
    assert difference > 1e-3, f"{WRONG_WAYS[wrong]}: relative difference only {difference:.2e}"


def test_bf16_image_forward_stays_near_fp32():
    """bf16 weights and activations (sinusoid, RoPE, norms, router in float32 or wider as the
    official code): the velocity is close to the fp32 model's and gradients flow in bf16."""
    from models.hunyuan_image3.parallelize import build_hunyuan_model, load_full_weights, local_weights

    config = _tiny_config()
    sequence, latents, sigma = _image_batch(config)
    with parallel_context():
        torch.manual_seed(0)
        model = build_hunyuan_model(config)
        _randomise(model, 9, scale=0.2)
        full = {name: t.clone() for name, t in local_weights(model)}
        expected = model.velocity(sequence, latents, sigma).detach()
        bf16 = build_hunyuan_model(_tiny_config(bf16=True, params_dtype=torch.bfloat16))
        load_full_weights(bf16, full)
        velocity = bf16.velocity(sequence, latents.bfloat16(), sigma)
        velocity.float().sum().backward()
        assert bf16.patch_embed.model[0].weight.grad.dtype == torch.bfloat16
    assert velocity.dtype == torch.bfloat16
    assert (velocity.float() - expected).abs().max() < 0.05 * expected.abs().max()


def test_image_forward_jvp_saves_nothing_tangent_related_and_recompute_matches():
    """The whole image forward with tangents saves exactly what the primal alone saves for
    backward; with activation recompute (every layer) the velocity, its tangent and every
    gradient are unchanged."""
    from models.hunyuan_image3.parallelize import build_hunyuan_model, load_full_weights, local_weights
    from tests.test_hunyuan_image3_jvp import saved_for_backward

    config = _tiny_config()
    batch = _image_batch(config)
    tangents = _tangents(batch, 81)

    results = {}
    with parallel_context():
        torch.manual_seed(0)
        model = build_hunyuan_model(config)
        _randomise(model, 10, scale=0.2)
        full = {name: t.clone() for name, t in local_weights(model)}
        primal_only, _ = saved_for_backward(lambda: model.velocity(*batch))
        with_tangent, _ = saved_for_backward(lambda: model.velocity_jvp(*batch, *tangents))
        assert with_tangent == primal_only and sum(primal_only.values()) > 0
        recompute = build_hunyuan_model(_tiny_config(recompute_granularity="full", recompute_method="uniform",
                                                     recompute_num_layers=1))
        load_full_weights(recompute, full)
        for name, run in (("plain", model), ("recompute", recompute)):
            velocity, tangent = run.velocity_jvp(*batch, *tangents)
            (velocity * _loss_weights(velocity.shape)).sum().backward()
            grads = {n: p.grad.clone() for n, p in run.named_parameters() if p.grad is not None}
            results[name] = (velocity.detach(), tangent, grads)
    (v, t, g), (rv, rt, rg) = results["plain"], results["recompute"]
    torch.testing.assert_close(rv, v, rtol=0, atol=0)
    torch.testing.assert_close(rt, t, rtol=0, atol=0)
    assert rg.keys() == g.keys()
    for name in g:
        torch.testing.assert_close(rg[name], g[name], rtol=1e-6, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
