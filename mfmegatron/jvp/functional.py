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
_GELU_TANGENT_CHUNKS = 4


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
        # slope = ½(1 + tanh u) + ½·x·(1 − tanh² u)·c·(1 + 3a·x²), u = c·(x + a·x³). This runs on
        # the widest activation (the MLP's hidden), and a MeanFlow step's peak memory is reached
        # while it runs in the last blocks: so in place, and in row chunks, keeping its
        # temporaries to a fraction of x's size.
        a, c = 0.044715, _SQRT_2_OVER_PI
        ty = torch.empty_like(tx)
        chunks = min(_GELU_TANGENT_CHUNKS, max(1, x.shape[0]))
        for x_, tx_, ty_ in zip(x.detach().chunk(chunks), tx.chunk(chunks), ty.chunk(chunks)):
            x_squared = x_.square()
            tanh = (x_squared * a).add_(1).mul_(x_).mul_(c).tanh_()
            tail = x_squared.mul_(3 * a).add_(1).mul_(x_).mul_(0.5 * c)  # ½·x·c·(1 + 3a·x²)
            tail.mul_(tanh.square().neg_().add_(1))
            torch.mul(tanh.add_(1).mul_(0.5).add_(tail), tx_, out=ty_)
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
