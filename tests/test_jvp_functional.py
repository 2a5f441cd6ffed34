"""The forward-mode rules of ``mfmegatron/jvp/functional.py``, one by one, against torch.func.jvp."""

import pytest
import torch
import torch.nn.functional as F

from mfmegatron.jvp import functional as jf
from models.flux import model as flux_model
from models.flux.model import apply_rope, apply_rope_jvp

EPS = 1e-6


def _inputs(dtype, seed=0, device="cpu", rows=3):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype)

    x, tx = randn(rows, 5, 16), randn(rows, 5, 16)
    a, ta, b, tb = (randn(rows, 1, 16) for _ in range(4))
    return x, tx, a, ta, b, tb, randn(8, 16), randn(16)


def _rules(dtype, device="cpu", rows=3):
    """name -> (our rule as (primals, tangents) -> (y, ty), the plain function, primals, tangents)."""
    x, tx, a, ta, b, tb, weight, norm_weight = _inputs(dtype, device=device, rows=rows)
    return {
        "linear": (lambda p, t: jf.linear(p[0], t[0], weight), lambda x: F.linear(x, weight), (x,), (tx,)),
        "layer_norm": (lambda p, t: jf.layer_norm(p[0], t[0], EPS),
                       lambda x: F.layer_norm(x, (16,), eps=EPS), (x,), (tx,)),
        "rms_norm": (lambda p, t: jf.rms_norm(p[0], t[0], norm_weight, EPS),
                     lambda x: F.rms_norm(x, (16,), norm_weight, EPS), (x,), (tx,)),
        "gelu_tanh": (lambda p, t: jf.gelu_tanh(p[0], t[0]), lambda x: F.gelu(x, approximate="tanh"), (x,), (tx,)),
        "gelu_tanh_overwrite": (
            lambda p, t: jf.gelu_tanh(p[0], None if t[0] is None else t[0].clone(), overwrite_tangent=True),
            lambda x: F.gelu(x, approximate="tanh"), (x,), (tx,)),
        "silu": (lambda p, t: jf.silu(p[0], t[0]), F.silu, (x,), (tx,)),
        "modulate": (lambda p, t: jf.modulate(p[0], t[0], p[1], t[1], p[2], t[2]),
                     lambda x, shift, scale: x * (1 + scale) + shift, (x, a, b), (tx, ta, tb)),
        "gated_residual": (lambda p, t: jf.gated_residual(p[0], t[0], p[1], t[1], p[2], t[2]),
                           lambda r, g, u: r + g * u, (x, a, x.flip(0)), (tx, ta, tx.flip(1))),
        "add": (lambda p, t: jf.add(p[0], t[0], p[1], t[1]), torch.add, (x, x.flip(0)), (tx, tx.flip(0))),
    }


@pytest.mark.parametrize("name", sorted(_rules(torch.float64)))
def test_rule_matches_torch_func_jvp_in_float64(name):
    rule, function, primals, tangents = _rules(torch.float64)[name]
    y, ty = rule(primals, tangents)
    y_expected, ty_expected = torch.func.jvp(function, primals, tangents)
    torch.testing.assert_close(y, y_expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ty, ty_expected, rtol=1e-10, atol=1e-10)
    assert rule(primals, (None,) * len(tangents))[1] is None


@pytest.mark.parametrize("name", sorted(_rules(torch.bfloat16)))
def test_bf16_tangents_stay_bf16(name):
    rule, _, primals, tangents = _rules(torch.bfloat16)[name]
    y, ty = rule(primals, tangents)
    assert y.dtype == ty.dtype == torch.bfloat16


def test_layer_norm_tangent_keeps_its_dtype_when_the_statistics_are_float32(monkeypatch):
    # On CUDA, native_layer_norm returns mean / rstd in float32 for bf16 inputs (on CPU in bf16).
    # The tangent must come back in bf16 anyway: a float32 tangent breaks the next bf16 GEMM.
    native = torch.native_layer_norm

    def cuda_like(x, shape, weight, bias, eps):
        y, mean, rstd = native(x.float(), shape, weight, bias, eps)
        return y.to(x.dtype), mean, rstd

    monkeypatch.setattr(torch, "native_layer_norm", cuda_like)
    x, tx = _inputs(torch.bfloat16)[:2]
    y, ty = jf.layer_norm(x, tx, EPS)
    assert y.dtype == ty.dtype == torch.bfloat16
    _, ty_expected = torch.func.jvp(lambda x: F.layer_norm(x, (16,), eps=EPS), (x.double(),), (tx.double(),))
    assert (ty.double() - ty_expected).abs().max() <= 2e-2 * ty_expected.abs().max()


def test_gelu_overwrite_writes_the_tangent_into_its_input():
    x, tx = _inputs(torch.float32)[:2]
    expected = jf.gelu_tanh(x, tx)[1]
    ty = jf.gelu_tanh(x, tx, overwrite_tangent=True)[1]
    assert ty.data_ptr() == tx.data_ptr()
    torch.testing.assert_close(ty, expected, rtol=0, atol=0)


def _rope_rule(dtype, device="cpu", rows=7):
    g = torch.Generator().manual_seed(1)
    x, tx = (torch.randn(rows, 2, 3, 16, generator=g, dtype=torch.float64).to(device, dtype) for _ in range(2))
    angles = torch.randn(rows, 8, generator=g, dtype=torch.float64).repeat_interleave(2, dim=1)
    cos, sin = (f(angles).to(device, torch.promote_types(dtype, torch.float32)) for f in (torch.cos, torch.sin))
    return (lambda p, t: apply_rope_jvp(p[0], t[0], cos, sin), lambda x: apply_rope(x, cos, sin), (x,), (tx,))


def _fused_tangents():
    """rule name -> the ``fused_on_cuda`` function that computes its tangent."""
    return {"layer_norm": jf._layer_norm_tangent, "rms_norm": jf._rms_norm_tangent,
            "gelu_tanh": jf._gelu_tanh_tangent_into, "gelu_tanh_overwrite": jf._gelu_tanh_tangent_into,
            "modulate": jf._modulate_tangent, "gated_residual": jf._gated_residual_tangent,
            "rope": flux_model._rope_tangent}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: the rules fuse (torch.compile) on CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(_fused_tangents()))
def test_fused_rule_on_cuda_matches_torch_func_jvp(name, dtype):
    # The compiled tangent (one kernel) against torch.func.jvp of the plain function in float64,
    # at two sequence lengths (the second makes Inductor recompile with dynamic shapes).
    for rows in (3, 6):
        if name == "rope":
            rule, function, primals, tangents = _rope_rule(dtype, "cuda", rows)
        else:
            rule, function, primals, tangents = _rules(dtype, "cuda", rows)[name]
        with jf.tangent_fusion(True):
            y, ty = rule(primals, tangents)
        _, ty_expected = torch.func.jvp(function, tuple(p.double() for p in primals),
                                        tuple(t.double() for t in tangents))
        assert ty.dtype == dtype
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        assert (ty.double() - ty_expected).abs().max() <= tolerance * ty_expected.abs().max(), (name, rows)
    assert _fused_tangents()[name].compiled is not None
