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

    return tiny_hunyuan_image3_config(**overrides)


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
