"""Forward-mode rules: each function maps (x, tx) to (y, ty).

The primal ``y`` is computed with autograd (it is trained); the tangent ``ty`` is computed under
``torch.no_grad()`` from detached primal intermediates, so it never holds a graph or saved
activations. Tangents of ``None`` mean "primal only": every rule then returns ``(y, None)``, so a
module's plain forward is its ``forward_jvp`` without tangents and the math exists once. Within one
call the tangents are either all tensors or all ``None``. Each rule is the derivative written out;
the tests check them against ``torch.func.jvp``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def linear(x, tx, weight, bias=None):
    y = F.linear(x, weight, bias)
    if tx is None:
        return y, None
    with torch.no_grad():
        ty = F.linear(tx, weight)
    return y, ty


def layer_norm(x, tx, eps: float):
    """LayerNorm over the last dim without affine parameters (FLUX's norms)."""
    y, _, rstd = torch.native_layer_norm(x, (x.shape[-1],), None, None, eps)
    if tx is None:
        return y, None
    with torch.no_grad():
        y_, rstd_ = y.detach(), rstd.detach()
        centred = tx - tx.mean(-1, keepdim=True)
        # CUDA returns rstd in float32 for bf16 / fp16 inputs (CPU in the input dtype): the
        # product is float32 there, and the tangent goes back to its own dtype.
        ty = (rstd_ * (centred - y_ * (y_ * centred).mean(-1, keepdim=True))).to(tx.dtype)
    return y, ty


def rms_norm(x, tx, weight, eps: float):
    """RMSNorm over the last dim with a scale (FLUX's per-head QK norms)."""
    y = F.rms_norm(x, (x.shape[-1],), weight, eps)
    if tx is None:
        return y, None
    with torch.no_grad():
        x_ = x.detach()
        rstd = torch.rsqrt(x_.pow(2).mean(-1, keepdim=True) + eps)
        normed = x_ * rstd
        ty = weight.detach() * rstd * (tx - normed * (normed * tx).mean(-1, keepdim=True))
    return y, ty


def gelu_tanh(x, tx):
    y = F.gelu(x, approximate="tanh")
    if tx is None:
        return y, None
    with torch.no_grad():
        x_ = x.detach()
        inner = _SQRT_2_OVER_PI * (x_ + 0.044715 * x_.pow(3))
        tanh = torch.tanh(inner)
        slope = 0.5 * (1 + tanh) + 0.5 * x_ * (1 - tanh.square()) * _SQRT_2_OVER_PI * (
            1 + 3 * 0.044715 * x_.square()
        )
        ty = slope * tx
    return y, ty


def silu(x, tx):
    y = F.silu(x)
    if tx is None:
        return y, None
    with torch.no_grad():
        sigmoid = torch.sigmoid(x.detach())
        ty = sigmoid * (1 + x.detach() * (1 - sigmoid)) * tx
    return y, ty


def modulate(x, tx, shift, tshift, scale, tscale):
    """adaLN: ``x * (1 + scale) + shift`` (shift/scale already broadcastable to x)."""
    y = x * (1 + scale) + shift
    if tx is None:
        return y, None
    with torch.no_grad():
        ty = tx * (1 + scale.detach()) + x.detach() * tscale + tshift
    return y, ty


def gated_residual(residual, tresidual, gate, tgate, update, tupdate):
    """``residual + gate * update`` (adaLN-Zero's gated branch)."""
    y = residual + gate * update
    if tresidual is None:
        return y, None
    with torch.no_grad():
        ty = tresidual + tgate * update.detach() + gate.detach() * tupdate
    return y, ty


def add(a, ta, b, tb):
    y = a + b
    if ta is None:
        return y, None
    with torch.no_grad():
        return y, ta + tb
