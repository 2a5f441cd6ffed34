"""Checks of the Triton attention-tangent kernel in Triton's CPU interpreter.

Run as ``TRITON_INTERPRET=1 python -m tests.triton_interpreter_checks [case ...]``: the variable
must be set before triton is imported, so ``tests/test_attention_triton.py`` runs this module in a
subprocess (nothing leaks into the other tests). Prints one JSON object, case name -> result
(``error``, ``tolerance``, ``ok``, ``detail``). Importing this module imports neither triton nor
the kernel (the CUDA tests reuse its inputs and comparisons).

bfloat16: Triton's interpreter does not support bf16 arithmetic. It stores bf16 as uint16, its
``tl.dot`` multiplies the bit patterns (triton-lang/triton#11584), and its float32 -> bf16 cast
truncates where the GPU rounds to nearest even. ``main`` patches both, for this process only, to
the GPU's semantics (``emulate_gpu_bfloat16``): bf16 dot operands are widened to float32 (exact;
tensor cores multiply bf16 exactly and accumulate in float32) and the cast rounds to nearest even.
Loads, stores and the bf16 -> float32 cast run unpatched.

Two checks per low-precision case: against the float64 oracle (``TOLERANCE``), and against
``emulate_kernel_rounding``, the kernel's precision contract written in torch (the same roundings
at the same points), within one unit in the last place of the largest entry.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch

from mfmegatron.jvp.attention import attention_jvp_reference  # imports no triton

# name -> (dtype, batch, heads, q_len, k_len, head_dim, v_dim, tile config or None for the default,
#          which tangents are non-zero, how the inputs are laid out)
# Tile configs are small so that every case runs several ragged query and key blocks.
SMALL = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
CASES = {
    "float32_d16_ragged": ("float32", 1, 2, 37, 45, 16, 16, SMALL, "all", "contiguous"),
    "float32_d32_cross_attention_v64": ("float32", 2, 2, 21, 77, 32, 64,
                                        {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1},
                                        "all", "contiguous"),
    "float32_d64_default_tiles": ("float32", 1, 2, 150, 150, 64, 64, None, "all", "contiguous"),
    "float32_d128_even_key_blocks": ("float32", 1, 1, 50, 128, 128, 128,
                                     {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1},
                                     "all", "contiguous"),
    "float32_one_query": ("float32", 1, 2, 1, 19, 16, 16, SMALL, "all", "contiguous"),
    "float32_only_tq": ("float32", 1, 2, 33, 40, 16, 16, SMALL, "q", "contiguous"),
    "float32_only_tk": ("float32", 1, 2, 33, 40, 16, 16, SMALL, "k", "contiguous"),
    "float32_only_tv": ("float32", 1, 2, 33, 40, 16, 16, SMALL, "v", "contiguous"),
    # Views of [seq, batch, heads, dim] tensors permuted to [batch, heads, seq, dim], as the FLUX
    # blocks pass them, and an lse that is a slice of a padded buffer (CUDA's efficient kernel).
    "float32_strided_views": ("float32", 2, 3, 29, 29, 32, 32, SMALL, "all", "strided"),
    "float16_d64": ("float16", 2, 2, 70, 70, 64, 64, SMALL, "all", "contiguous"),
    "bfloat16_d64": ("bfloat16", 2, 2, 70, 70, 64, 64, SMALL, "all", "contiguous"),
    "bfloat16_d128_default_tiles": ("bfloat16", 1, 2, 100, 100, 128, 128, None, "all", "contiguous"),
    # attention_jvp end to end: lse and O from the CPU flash kernel, tO from the Triton kernel.
    "attention_jvp_float32": ("float32", 2, 2, 45, 45, 32, 32, None, "all", "attention_jvp"),
    "attention_jvp_bfloat16": ("bfloat16", 1, 2, 45, 45, 64, 64, None, "all", "attention_jvp"),
}

# Allowed max |tO − oracle| / max |oracle|, the oracle being the float64 reference on the same
# (rounded) inputs. float32: accumulation order only (measured ~1e-6). float16 / bfloat16: the
# kernel rounds P and P∘ts to the input dtype before their matmuls (as the CUDA PyTorch pass does)
# and rounds tO at the end; over 6 seeds at 70 tokens, head_dim 64 the max was 1.1e-3 (fp16) and
# 9.0e-3 (bf16), equal to that of ``emulate_kernel_rounding``; the bounds leave ~1.7x.
TOLERANCE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.5e-2}
# Allowed max |tO − emulation| / max |oracle|: one ulp at the largest entry (finfo.eps = 2^-7 for
# bf16, 2^-10 for fp16); measured up to 2.5e-3 (bf16) and 3.8e-4 (fp16) — where the float32 sums
# differ by rounding order, a few P entries or outputs round to the neighbouring value.
EMULATION_TOLERANCE = {"float16": torch.finfo(torch.float16).eps,
                       "bfloat16": torch.finfo(torch.bfloat16).eps}


def make_inputs(dtype, batch, heads, q_len, k_len, head_dim, v_dim, tangents, layout, seed):
    generator = torch.Generator().manual_seed(seed)

    def randn(seq, dim, factor=1.0):
        if layout == "strided":  # [seq, batch, heads, dim] storage, a permuted view
            x = torch.randn(seq, batch, heads, dim, generator=generator, dtype=torch.float64)
            return (factor * x).to(dtype).permute(1, 2, 0, 3)
        x = torch.randn(batch, heads, seq, dim, generator=generator, dtype=torch.float64)
        return (factor * x).to(dtype)

    # Queries scaled by 2: logits of a few units, as in trained models (a peakier softmax).
    q, k, v = randn(q_len, head_dim, 2.0), randn(k_len, head_dim), randn(k_len, v_dim)
    tq, tk, tv = randn(q_len, head_dim), randn(k_len, head_dim), randn(k_len, v_dim)
    keep = {"q", "k", "v"} if tangents == "all" else {tangents}
    tq, tk, tv = (t if name in keep else torch.zeros_like(t) for name, t in zip("qkv", (tq, tk, tv)))
    return q, k, v, tq, tk, tv


def primal_and_lse(q, k, v, scale, layout):
    """O (input dtype) and lse (float32) from float64 math; lse as a strided view when asked."""
    logits = q.double() @ k.double().transpose(-1, -2) * scale
    o = (torch.softmax(logits, dim=-1) @ v.double()).to(q.dtype)
    lse = torch.logsumexp(logits, dim=-1).float()
    if layout == "strided":
        padded = torch.full((*lse.shape[:-1], lse.shape[-1] + 7), float("nan"))
        padded[..., : lse.shape[-1]] = lse
        lse = padded[..., : lse.shape[-1]]
    return o, lse


def emulate_kernel_rounding(q, k, v, tq, tk, tv, o, lse, scale):
    """tO with the kernel's roundings: float32 logits, P and P∘ts rounded to the input dtype for
    their matmuls with V and tV (float32 accumulation), tO rounded at the end."""
    dtype = q.dtype
    q, k, v, tq, tk, tv, o = (x.float() for x in (q, k, v, tq, tk, tv, o))
    p = torch.exp(q @ k.transpose(-1, -2) * scale - lse.float()[..., None])
    p_ts = p * (tq @ k.transpose(-1, -2) + q @ tk.transpose(-1, -2))
    to = (scale * (p_ts.to(dtype).float() @ v - p_ts.sum(-1, keepdim=True) * o)
          + p.to(dtype).float() @ tv)
    return to.to(dtype)


def compare(to, inputs, o, lse, scale):
    """Result dict: error against the float64 oracle and, for fp16 / bf16, against the emulation."""
    dtype_name = str(to.dtype).removeprefix("torch.")
    expected = attention_jvp_reference(*(x.double() for x in inputs), scale=scale)[1]
    largest = expected.abs().max()
    error = ((to.double() - expected).abs().max() / largest).item()
    result = {"error": error, "tolerance": TOLERANCE[dtype_name],
              "ok": error <= TOLERANCE[dtype_name], "detail": ""}
    if dtype_name in EMULATION_TOLERANCE:
        emulated = emulate_kernel_rounding(*inputs, o, lse, scale)
        emulation_error = ((to.double() - emulated.double()).abs().max() / largest).item()
        result["emulation_error"] = emulation_error
        result["emulation_tolerance"] = EMULATION_TOLERANCE[dtype_name]
        result["ok"] = result["ok"] and emulation_error <= EMULATION_TOLERANCE[dtype_name]
    return result


def run_case(name):
    from mfmegatron.jvp import attention_triton
    from mfmegatron.jvp.attention import (_fused_attention_with_logsumexp, attention_jvp,
                                          explain_tangent_pass)

    dtype_name, batch, heads, q_len, k_len, head_dim, v_dim, config, tangents, layout = CASES[name]
    dtype = getattr(torch, dtype_name)
    inputs = make_inputs(dtype, batch, heads, q_len, k_len, head_dim, v_dim, tangents, layout,
                         seed=sum(map(ord, name)))
    q, k, v, tq, tk, tv = inputs
    scale = head_dim ** -0.5
    detail = ""
    if layout == "attention_jvp":
        o, lse = _fused_attention_with_logsumexp(q, k, v, scale)  # what attention_jvp uses
        # "auto" must not pick the kernel on CPU, even with the interpreter on.
        auto_choice = explain_tangent_pass(q, k, v)[0]
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        o_jvp, to = attention_jvp(*leaves, tq, tk, tv, tangent_pass="triton")
        if auto_choice == "triton" or o_jvp.grad_fn is None or to.requires_grad:
            raise AssertionError(f"auto picked {auto_choice}; o.grad_fn {o_jvp.grad_fn}; "
                                 f"to.requires_grad {to.requires_grad}")
        detail = f"auto on CPU picks {auto_choice}"
    else:
        o, lse = primal_and_lse(q, k, v, scale, layout)
        to = attention_triton.attention_tangent(q, k, v, tq, tk, tv, o, lse, scale, config=config)
    if to.dtype != dtype or to.shape != (batch, heads, q_len, v_dim):
        raise AssertionError(f"tO is {to.dtype} {tuple(to.shape)}")
    result = compare(to, inputs, o, lse, scale)
    result["detail"] = detail
    return result


def emulate_gpu_bfloat16():
    """Give bf16 the GPU's semantics in the interpreter (see the module docstring): tl.dot widens
    bf16 operands to float32, and float32 -> bf16 casts round to nearest even."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    def widen(x):
        if x.dtype.scalar != tl.bfloat16:
            return x
        return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    original_dot = interpreter.InterpreterBuilder.create_dot
    original_cast = interpreter.InterpreterBuilder.cast_impl

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32)
            rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16  # finite inputs only
            return interpreter.TensorHandle(rounded.astype(np.uint16), tl.bfloat16)
        return original_cast(self, src, dst_type)

    interpreter.InterpreterBuilder.create_dot = create_dot
    interpreter.InterpreterBuilder.cast_impl = cast_impl


def main(names):
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("set TRITON_INTERPRET=1 (before triton is imported)")
    torch.set_num_threads(1)
    emulate_gpu_bfloat16()
    results = {}
    for name in names or CASES:
        try:
            results[name] = run_case(name)
        except Exception:  # reported per case, so one failure does not hide the others
            results[name] = {"ok": False, "error": None, "tolerance": None,
                             "detail": traceback.format_exc()}
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
