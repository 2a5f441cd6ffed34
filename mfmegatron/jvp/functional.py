"""Forward-mode rules: each function maps (x, tx) to (y, ty).

The primal ``y`` is computed with autograd (it is trained); the tangent ``ty`` is computed under
``torch.no_grad()`` from detached primal intermediates, so it never holds a graph or saved
activations. Tangents of ``None`` mean "primal only": every rule then returns ``(y, None)``, so a
module's plain forward is its ``forward_jvp`` without tangents and the math exists once. Within one
call the tangents are either all tensors or all ``None``. Each rule is the derivative written out;
the tests check them against ``torch.func.jvp``.

On CUDA each rule's tangent math runs as one ``torch.compile``d kernel (``fused_on_cuda``). Eagerly
it is 5-15 memory-bound kernels over activation-sized tensors, which on an H200 cost a 1024 px
differential MeanFlow step more time than its tangent GEMMs (1.46x a flow-matching step eager,
1.25x fused). ``MFMEGATRON_FUSE_TANGENTS=0`` (or ``tangent_fusion(False)``) runs them eagerly.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import torch
import torch.nn.functional as F

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_TANGENT_CHUNKS = 4
_fuse_tangents = os.environ.get("MFMEGATRON_FUSE_TANGENTS", "1") != "0"


@contextlib.contextmanager
def tangent_fusion(enabled: bool):
    """Within the block, fuse the rules' tangent math on CUDA (True) or run it eagerly (False)."""
    global _fuse_tangents
    previous, _fuse_tangents = _fuse_tangents, enabled
    try:
        yield
    finally:
        _fuse_tangents = previous


def fused_on_cuda(tangent_fn):
    """``tangent_fn`` (tensor code without a graph) compiled into one kernel when its first argument
    is a CUDA tensor and fusion is on; eager otherwise (CPU, where compiling costs more than it
    saves). Compiled on first use; shapes that vary make Inductor recompile once, dynamically."""
    compiled = None

    @functools.wraps(tangent_fn)
    def run(*args):
        nonlocal compiled
        if not fusing(args[0]):
            return tangent_fn(*args)
        if compiled is None:
            compiled = run.compiled = torch.compile(tangent_fn, fullgraph=True)
        return compiled(*args)

    run.compiled = None  # the compiled function, once made (tests look)
    return run


def fusing(x: torch.Tensor) -> bool:
    """Whether ``fused_on_cuda`` functions compile for tensors like ``x``."""
    return _fuse_tangents and x.is_cuda


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
        ty = _layer_norm_tangent(tx, y.detach(), rstd.detach())
    return y, ty


@fused_on_cuda
def _layer_norm_tangent(tx, y, rstd):
    centred = tx - tx.mean(-1, keepdim=True)
    # CUDA returns rstd in float32 for bf16 / fp16 inputs (CPU in the input dtype): the product is
    # float32 there, and the tangent goes back to its own dtype.
    return (rstd * (centred - y * (y * centred).mean(-1, keepdim=True))).to(tx.dtype)


def rms_norm(x, tx, weight, eps: float):
    """RMSNorm over the last dim with a scale (FLUX's per-head QK norms)."""
    y = F.rms_norm(x, (x.shape[-1],), weight, eps)
    if tx is None:
        return y, None
    with torch.no_grad():
        ty = _rms_norm_tangent(tx, x.detach(), weight.detach(), eps)
    return y, ty


@fused_on_cuda
def _rms_norm_tangent(tx, x, weight, eps: float):
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    normed = x * rstd
    return weight * rstd * (tx - normed * (normed * tx).mean(-1, keepdim=True))


def rms_norm_float32(x, tx, weight, eps: float):
    """RMSNorm in the LLaMA / HunyuanImage 3.0 order: normalise in float32 (or wider: float64 stays
    float64), cast back to x's dtype, then multiply by the scale (``weight * normed`` promotes as
    torch does, e.g. a bf16 scale on float32 q/k gives float32)."""
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    x_wide = x.to(compute_dtype)
    rstd = torch.rsqrt(x_wide.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * (x_wide * rstd).to(x.dtype)
    if tx is None:
        return y, None
    with torch.no_grad():
        ty = weight.detach() * _rms_norm_float32_tangent(tx, x_wide.detach(), rstd.detach())
    return y, ty


@fused_on_cuda
def _rms_norm_float32_tangent(tx, x_wide, rstd):
    normed = x_wide * rstd
    t_wide = tx.to(x_wide.dtype)
    return (rstd * (t_wide - normed * (normed * t_wide).mean(-1, keepdim=True))).to(tx.dtype)


def gelu(x, tx):
    """Exact (erf) GELU: slope Φ(x) + x φ(x)."""
    y = F.gelu(x)
    if tx is None:
        return y, None
    with torch.no_grad():
        ty = _gelu_tangent(tx, x.detach())
    return y, ty


@fused_on_cuda
def _gelu_tangent(tx, x):
    cdf = 0.5 * (1 + torch.erf(x * (0.5 ** 0.5)))
    pdf = torch.exp(-0.5 * x.square()) * (0.5 / math.pi) ** 0.5
    return (cdf + x * pdf) * tx


def group_norm(x, tx, num_groups: int, weight, bias, eps: float):
    """GroupNorm over [b, c, *spatial] with a per-channel affine (the UNet blocks' norms), computed
    in float32 or wider and returned in x's dtype (HunyuanImage 3.0's sampler runs its model under
    bf16 autocast, which runs group_norm in float32)."""
    wide = torch.promote_types(x.dtype, torch.float32)
    y = F.group_norm(x.to(wide), num_groups, weight.to(wide), bias.to(wide), eps).to(x.dtype)
    if tx is None:
        return y, None
    with torch.no_grad():
        ty = _group_norm_tangent(tx.to(wide), x.detach().to(wide), num_groups, weight.detach().to(wide), eps)
    return y, ty.to(tx.dtype)


@fused_on_cuda
def _group_norm_tangent(tx, x, num_groups: int, weight, eps: float):
    # Per (sample, group): the LayerNorm tangent rstd·(tc − n·mean(n·tc)), n = (x − mean) rstd.
    shape = x.shape
    x_g = x.reshape(shape[0], num_groups, -1)
    t_g = tx.reshape(shape[0], num_groups, -1)
    centred = x_g - x_g.mean(-1, keepdim=True)
    rstd = torch.rsqrt(centred.square().mean(-1, keepdim=True) + eps)
    normed = centred * rstd
    t_centred = t_g - t_g.mean(-1, keepdim=True)
    t_normed = rstd * (t_centred - normed * (normed * t_centred).mean(-1, keepdim=True))
    channel_shape = (1, -1) + (1,) * (len(shape) - 2)
    return t_normed.reshape(shape) * weight.reshape(channel_shape)


def conv2d(x, tx, weight, bias=None, padding: int = 0):
    """A 2-D convolution: linear in x, so the tangent is the same convolution without the bias."""
    y = F.conv2d(x, weight, bias, padding=padding)
    if tx is None:
        return y, None
    with torch.no_grad():
        return y, F.conv2d(tx, weight, None, padding=padding)


def gelu_tanh(x, tx, overwrite_tangent: bool = False):
    """``overwrite_tangent``: the caller no longer needs ``tx``, and the tangent is written into it
    (the MLP's hidden is the widest activation: this saves a copy of it at the step's peak)."""
    y = F.gelu(x, approximate="tanh")
    if tx is None:
        return y, None
    with torch.no_grad():
        ty = tx if overwrite_tangent else torch.empty_like(tx)
        if fusing(tx):  # one kernel, no temporaries
            _gelu_tanh_tangent_into(tx, x.detach(), ty)
        else:
            # Eagerly each step makes a temporary as large as its input; a MeanFlow step reaches
            # its peak memory while this runs in the last blocks, so it runs in row chunks.
            chunks = min(_GELU_TANGENT_CHUNKS, max(1, x.shape[0]))
            for parts in zip(tx.chunk(chunks), x.detach().chunk(chunks), ty.chunk(chunks)):
                _gelu_tanh_tangent_into(*parts)
    return y, ty


@fused_on_cuda
def _gelu_tanh_tangent_into(tx, x, out):
    # slope = ½(1 + tanh u) + ½·x·(1 − tanh² u)·c·(1 + 3a·x²), u = c·(x + a·x³); in place on
    # temporaries, so that eagerly at most two of x's size are live.
    a, c = 0.044715, _SQRT_2_OVER_PI
    x_squared = x.square()
    tanh = (x_squared * a).add_(1).mul_(x).mul_(c).tanh_()
    tail = x_squared.mul_(3 * a).add_(1).mul_(x).mul_(0.5 * c)  # ½·x·c·(1 + 3a·x²)
    tail.mul_(tanh.square().neg_().add_(1))
    out.copy_(tanh.add_(1).mul_(0.5).add_(tail).mul_(tx))


def silu(x, tx):
    y = F.silu(x)
    if tx is None:
        return y, None
    with torch.no_grad():
        sigmoid = torch.sigmoid(x.detach())
        ty = sigmoid * (1 + x.detach() * (1 - sigmoid)) * tx
    return y, ty


def swiglu(x, tx):
    """``silu(gate) * up`` with ``x = [gate; up]`` along the last dim (megatron's GLU order)."""
    gate, up = torch.chunk(x, 2, dim=-1)
    y = F.silu(gate) * up
    if tx is None:
        return y, None
    with torch.no_grad():
        ty = _swiglu_tangent(tx, gate.detach(), up.detach())
    return y, ty


@fused_on_cuda
def _swiglu_tangent(tx, gate, up):
    tgate, tup = torch.chunk(tx, 2, dim=-1)
    sigmoid = torch.sigmoid(gate)
    silu_slope = sigmoid * (1 + gate * (1 - sigmoid))
    return silu_slope * tgate * up + gate * sigmoid * tup


def modulate(x, tx, shift, tshift, scale, tscale):
    """adaLN: ``x * (1 + scale) + shift`` (shift/scale already broadcastable to x)."""
    y = x * (1 + scale) + shift
    if tx is None:
        return y, None
    with torch.no_grad():
        ty = _modulate_tangent(tx, x.detach(), scale.detach(), tshift, tscale)
    return y, ty


@fused_on_cuda
def _modulate_tangent(tx, x, scale, tshift, tscale):
    return tx * (1 + scale) + x * tscale + tshift


def gated_residual(residual, tresidual, gate, tgate, update, tupdate):
    """``residual + gate * update`` (adaLN-Zero's gated branch)."""
    y = residual + gate * update
    if tresidual is None:
        return y, None
    with torch.no_grad():
        ty = _gated_residual_tangent(tresidual, tgate, update.detach(), gate.detach(), tupdate)
    return y, ty


@fused_on_cuda
def _gated_residual_tangent(tresidual, tgate, update, gate, tupdate):
    return tresidual + tgate * update + gate * tupdate


def add(a, ta, b, tb):
    y = a + b
    if ta is None:
        return y, None
    with torch.no_grad():
        return y, ta + tb
