"""The forward-mode rules of ``mfmegatron/jvp/functional.py``, one by one, against torch.func.jvp."""

import pytest
import torch
import torch.nn.functional as F

from mfmegatron.jvp import functional as jf

EPS = 1e-6


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 16, generator=g, dtype=torch.float64).to(dtype)
    tx = torch.randn(3, 5, 16, generator=g, dtype=torch.float64).to(dtype)
    a = torch.randn(3, 1, 16, generator=g, dtype=torch.float64).to(dtype)
    ta = torch.randn(3, 1, 16, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(3, 1, 16, generator=g, dtype=torch.float64).to(dtype)
    tb = torch.randn(3, 1, 16, generator=g, dtype=torch.float64).to(dtype)
    weight = torch.randn(8, 16, generator=g, dtype=torch.float64).to(dtype)
    norm_weight = torch.randn(16, generator=g, dtype=torch.float64).to(dtype)
    return x, tx, a, ta, b, tb, weight, norm_weight


def _rules(dtype):
    """name -> (our rule as (primals, tangents) -> (y, ty), the plain function, primals, tangents)."""
    x, tx, a, ta, b, tb, weight, norm_weight = _inputs(dtype)
    return {
        "linear": (lambda p, t: jf.linear(p[0], t[0], weight), lambda x: F.linear(x, weight), (x,), (tx,)),
        "layer_norm": (lambda p, t: jf.layer_norm(p[0], t[0], EPS),
                       lambda x: F.layer_norm(x, (16,), eps=EPS), (x,), (tx,)),
        "rms_norm": (lambda p, t: jf.rms_norm(p[0], t[0], norm_weight, EPS),
                     lambda x: F.rms_norm(x, (16,), norm_weight, EPS), (x,), (tx,)),
        "gelu_tanh": (lambda p, t: jf.gelu_tanh(p[0], t[0]), lambda x: F.gelu(x, approximate="tanh"), (x,), (tx,)),
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
