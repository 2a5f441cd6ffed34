"""Attention JVP: the reference and the memory-efficient pass against torch.func.jvp of SDPA."""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mfmegatron.jvp import attention as attention_module
from mfmegatron.jvp.attention import attention, attention_jvp, attention_jvp_reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Small blocks so that every test runs several key and query blocks with a ragged last one.
JVP_FUNCTIONS = {
    "reference": attention_jvp_reference,
    "blockwise": functools.partial(attention_jvp, block_size=16, query_block_size=8),
    "blockwise_online": functools.partial(attention_jvp, block_size=16, query_block_size=8,
                                          tangent_pass="online"),
}


def sdpa_jvp_oracle(q, k, v, tq, tk, tv, scale=None):
    """torch's own forward-mode AD through SDPA's math backend: code nobody here wrote."""
    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(lambda q_, k_, v_: F.scaled_dot_product_attention(q_, k_, v_, scale=scale),
                              (q, k, v), (tq, tk, tv))


def random_inputs(batch, heads, q_len, k_len, head_dim, *, v_dim=None, dtype=torch.float64,
                  device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(seq, dim):
        return torch.randn(batch, heads, seq, dim, generator=generator, dtype=torch.float64).to(device, dtype)

    v_dim = v_dim or head_dim
    q, k, v = randn(q_len, head_dim), randn(k_len, head_dim), randn(k_len, v_dim)
    tq, tk, tv = randn(q_len, head_dim), randn(k_len, head_dim), randn(k_len, v_dim)
    return q, k, v, tq, tk, tv


def keep_tangents(inputs, which):
    """Zero all tangents but the named ones ("all" keeps every tangent)."""
    q, k, v, tq, tk, tv = inputs
    keep = {"q", "k", "v"} if which == "all" else {which}
    tangents = [t if name in keep else torch.zeros_like(t) for name, t in zip("qkv", (tq, tk, tv))]
    return (q, k, v, *tangents)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("function", sorted(JVP_FUNCTIONS))
@pytest.mark.parametrize("tangents", ["all", "q", "k", "v"])
def test_jvp_matches_torch_func_jvp_of_sdpa_in_float64(device, function, tangents):
    # 37 queries and keys: not a multiple of the blocks (16 keys, 8 queries); batch 2, 3 heads.
    inputs = keep_tangents(random_inputs(2, 3, 37, 37, 8, device=device), tangents)
    o_expected, to_expected = sdpa_jvp_oracle(*inputs)
    o, to = JVP_FUNCTIONS[function](*inputs)
    torch.testing.assert_close(o, o_expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(to, to_expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("function", sorted(JVP_FUNCTIONS))
def test_cross_attention_lengths_values_width_and_explicit_scale(device, function):
    # 21 queries against 45 keys, values 12 wide (the CPU fused kernel needs equal head sizes, so
    # this also covers the fallback from "auto" to the online pass).
    inputs = random_inputs(1, 2, 21, 45, 8, v_dim=12, device=device, seed=1)
    o_expected, to_expected = sdpa_jvp_oracle(*inputs, scale=0.7)
    o, to = JVP_FUNCTIONS[function](*inputs, scale=0.7)
    torch.testing.assert_close(o, o_expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(to, to_expected, rtol=1e-10, atol=1e-10)


def test_cpu_runs_the_logsumexp_pass_for_every_dtype():
    # The fast path must really be taken on CPU (the tests above would pass on the fallback too).
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        q, k, v, *_ = random_inputs(1, 2, 9, 9, 8, dtype=dtype)
        assert attention_module._fused_attention_with_logsumexp(q, k, v, 8 ** -0.5) is not None
    inputs = random_inputs(2, 3, 37, 37, 8, seed=2)
    o, to = attention_jvp(*inputs, block_size=16, query_block_size=8, tangent_pass="logsumexp")
    torch.testing.assert_close(to, sdpa_jvp_oracle(*inputs)[1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tangent_pass", ["auto", "online"])
def test_small_blocks_on_a_longer_sequence_and_gradient_through_the_primal(device, tangent_pass):
    # 300 tokens in 32-key x 48-query tiles: 10 x 7 tiles, both ragged.
    q, k, v, tq, tk, tv = random_inputs(2, 2, 300, 300, 16, device=device, seed=3)
    o_ref, to_ref = attention_jvp_reference(q, k, v, tq, tk, tv)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o, to = attention_jvp(*leaves, tq, tk, tv, block_size=32, query_block_size=48,
                          tangent_pass=tangent_pass)
    torch.testing.assert_close(o.detach(), o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(to, to_ref, rtol=1e-10, atol=1e-10)

    output_grad = torch.randn_like(o)
    grads = torch.autograd.grad(o, leaves, output_grad)
    sdpa_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    expected = torch.autograd.grad(F.scaled_dot_product_attention(*sdpa_leaves), sdpa_leaves, output_grad)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("function", sorted(JVP_FUNCTIONS))
def test_tangent_carries_no_graph_and_primal_does(device, function):
    q, k, v, tq, tk, tv = random_inputs(1, 2, 20, 20, 8, dtype=torch.float32, device=device)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    tq.requires_grad_()  # even a tangent that has a graph upstream must not extend it
    o, to = JVP_FUNCTIONS[function](q, k, v, tq, tk, tv)
    assert o.requires_grad and o.grad_fn is not None
    assert to.requires_grad is False and to.grad_fn is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("function", sorted(JVP_FUNCTIONS))
def test_low_precision_is_close_to_float64(device, dtype, function):
    # head_dim 64 and queries scaled by 2 for logits of a few units, as in trained models; the
    # oracle sees the same rounded inputs, in float64.
    q, *rest = random_inputs(2, 2, 70, 70, 64, dtype=dtype, device=device, seed=4)
    inputs = ((2 * q).to(dtype), *rest)
    o_expected, to_expected = sdpa_jvp_oracle(*(x.double() for x in inputs))
    o, to = JVP_FUNCTIONS[function](*inputs)
    assert o.dtype == to.dtype == dtype
    # Errors relative to the largest entry. float32: accumulation only. bfloat16: the output
    # rounding (2^-9) plus bf16 tiles where the CUDA pass feeds P to tensor cores; measured
    # <= 0.4% on CPU, where computing the tiles in bf16 instead of float32 gives 1.3-2%.
    tolerance = 1e-4 if dtype == torch.float32 else 1e-2
    for got, want in ((o, o_expected), (to, to_expected)):
        error = (got.double() - want).abs().max().item()
        assert error <= tolerance * want.abs().max().item(), (error, want.abs().max().item())


def _kernels_with_logsumexp():
    cases = []
    for device in DEVICES:
        for dtype in ((torch.bfloat16, torch.float16, torch.float32) if device == "cuda" else (torch.float32,)):
            probe = random_inputs(2, 3, 77, 77, 64, dtype=dtype, device=device)[:3]
            cases += [(device, dtype, kernel) for kernel in attention_module.logsumexp_kernels(*probe)]
    return cases


@pytest.mark.parametrize("device, dtype, kernel", _kernels_with_logsumexp())
def test_every_logsumexp_kernel_gives_the_output_lse_and_gradients(device, dtype, kernel):
    # Each fused kernel the tangent passes take (o, lse) from (on CUDA: cuDNN, flash, efficient),
    # against float64 SDPA math: o and its gradients (the primal is trained through it) and lse,
    # the natural log-sum-exp of the scaled logits, [b, h, Lq].
    q, k, v, *_ = random_inputs(2, 3, 77, 77, 64, dtype=dtype, device=device, seed=7)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o, lse = attention_module._fused_attention_with_logsumexp(*leaves, 0.2, kernel=kernel)
    reference_leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    with sdpa_kernel(SDPBackend.MATH):
        o_expected = F.scaled_dot_product_attention(*reference_leaves, scale=0.2)
    lse_expected = torch.logsumexp(0.2 * reference_leaves[0] @ reference_leaves[1].transpose(-1, -2), dim=-1)
    output_grad = torch.randn_like(o_expected)
    grads = torch.autograd.grad(o, leaves, output_grad.to(dtype))
    expected = torch.autograd.grad(o_expected, reference_leaves, output_grad)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    assert lse.shape == lse_expected.shape and lse.dtype in (torch.float32, torch.float64)
    assert (lse.double() - lse_expected).abs().max().item() <= tolerance * lse_expected.abs().max().item()
    for got, want in ((o, o_expected), *zip(grads, expected)):
        error = (got.double() - want).abs().max().item()
        assert error <= tolerance * want.abs().max().item(), (kernel, error, want.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: compiling takes ~30 s on CPU")
@pytest.mark.parametrize("tangent_pass", ["auto", "online"])
def test_compiled_tangent_pass_matches_the_oracle(tangent_pass):
    inputs = random_inputs(2, 3, 70, 70, 64, dtype=torch.float32, device="cuda", seed=6)
    o, to = attention_jvp(*inputs, block_size=32, query_block_size=48, tangent_pass=tangent_pass,
                          compile_tangent=True)
    to_expected = sdpa_jvp_oracle(*(x.double() for x in inputs))[1]
    assert to.grad_fn is None
    assert (to.double() - to_expected).abs().max().item() <= 1e-4 * to_expected.abs().max().item()


class LargestAllocation(TorchDispatchMode):
    """Records the largest storage (bytes) produced by any aten op run under it."""

    def __init__(self):
        super().__init__()
        self.largest_bytes = 0
        self.largest_op = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.untyped_storage().nbytes() > self.largest_bytes:
                self.largest_bytes = leaf.untyped_storage().nbytes()
                self.largest_op = func
        return out


@pytest.mark.parametrize("tangent_pass", ["auto", "online"])
def test_no_sequence_by_sequence_tensor_is_allocated(tangent_pass):
    batch, heads, seq, head_dim = 1, 2, 256, 8
    inputs = random_inputs(batch, heads, seq, seq, head_dim, dtype=torch.float32, seed=5)
    q, k, v = (x.requires_grad_() for x in inputs[:3])
    one_score_matrix = batch * heads * seq * seq * 4  # bytes of one float32 L×L per (batch, head)

    with LargestAllocation() as reference_allocations:
        attention_jvp_reference(q, k, v, *inputs[3:])
    # The probe sees L×L tensors where they exist ...
    assert reference_allocations.largest_bytes >= one_score_matrix

    with LargestAllocation() as blockwise_allocations:
        o, to = attention_jvp(q, k, v, *inputs[3:], block_size=32, query_block_size=64,
                              tangent_pass=tangent_pass)
    # ... and attention_jvp's largest is one 64 x 32 tile per (batch, head), 1/32 of L×L.
    tile_bytes = batch * heads * 64 * 32 * 4
    assert blockwise_allocations.largest_bytes <= max(tile_bytes, 4 * q.numel() * 4), (
        blockwise_allocations.largest_op, blockwise_allocations.largest_bytes)
    assert blockwise_allocations.largest_bytes < one_score_matrix / 8


def test_rejects_mismatched_tangents_and_unknown_pass():
    q, k, v, tq, tk, tv = random_inputs(1, 1, 4, 4, 8)
    with pytest.raises(ValueError, match="tk must match k"):
        attention_jvp(q, k, v, tq, tk[..., :4], tv)
    with pytest.raises(ValueError, match="tangent_pass"):
        attention_jvp(q, k, v, tq, tk, tv, tangent_pass="fast")


def test_attention_is_sdpa():
    q, k, v, *_ = random_inputs(2, 2, 5, 7, 8)
    torch.testing.assert_close(attention(q, k, v, scale=0.3),
                               F.scaled_dot_product_attention(q, k, v, scale=0.3))
