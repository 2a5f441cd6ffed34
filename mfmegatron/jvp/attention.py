"""Attention and its forward-mode derivative (JVP).

Layout is SDPA's: ``q``, ``k``, ``v`` are ``[batch, heads, seq, head_dim]``; no mask by default
(FLUX attends bidirectionally over text + image tokens); the default scale is ``head_dim ** -0.5``.
Keys and values may have their own sequence length (cross-attention); ``v`` may have its own
head_dim.

``causal=True`` (HunyuanImage 3.0's text tokens) masks with the causal mask aligned to the *last*
key: query ``i`` of ``Lq`` sees keys ``0 .. i + Lk - Lq``. With ``Lq == Lk`` that is the usual
causal mask; with fewer queries it is the mask of the last ``Lq`` rows of a causal ``Lk × Lk``
attention (the tokens after an image block). The fused kernels' ``is_causal`` is aligned to the
first key, so they serve the ``Lq == Lk`` case; the other case runs the online-softmax pass. The
tile passes skip key tiles that lie wholly above the diagonal and mask the ones it crosses.

The math, per (batch, head), with ``t`` marking a tangent::

    S  = Q Kᵀ · scale                    tS = (tQ Kᵀ + Q tKᵀ) · scale
    P  = softmax(S)  (rows)              tP = P ∘ (tS − μ),  μ = rowsum(P ∘ tS)
    O  = P V                             tO = tP V + P tV = (P ∘ tS) V − μ ∘ O + P tV

Three functions:

- ``attention``: the primal, ``scaled_dot_product_attention``.
- ``attention_jvp_reference``: the formulas above, materialising the L×L matrices. Readable, and
  the memory hog that ``attention_jvp`` avoids.
- ``attention_jvp``: the memory-efficient JVP used in training. The primal comes from one of
  torch's fused attention kernels *with* autograd (backprop through ``o`` is the fused backward);
  the tangent comes from a blockwise pass *without* autograd that never holds more than a
  ``query_block × key_block`` tile per (batch, head).

Design (chosen by measurement, see ``tools/bench_attention_jvp.py``): the fused kernels that
SDPA dispatches to also return the row log-sum-exp ``lse`` of ``S``
(``_scaled_dot_product_flash_attention_for_cpu`` on CPU, ``_scaled_dot_product_flash_attention``
for bf16/fp16 and ``_scaled_dot_product_efficient_attention`` for fp32 on CUDA). Given ``lse`` a
tile's probabilities are exact, ``P = exp(S − lse)``, so the tangent pass needs no running max,
no rescaling, and it reuses the primal ``O`` for the ``μ ∘ O`` term. Where no such kernel applies
(CUDA float64, unsupported head_dim, another device) the fallback is the classic online-softmax
pass (running max ``m``, normaliser ``l``, Σe·v, Σe·tS, Σe·tS·v, Σe·tv; at the end
``O = Σe·v / l``, ``μ = Σe·tS / l``, ``tO = (Σe·tS·v + Σe·tv) / l − μ O``) next to an SDPA primal.
``tangent_pass="online"`` forces that path (tests and benchmark use it).

On CUDA, for bf16 / fp16 with head_dim and v head_dim in 16..128 (powers of two), ``"auto"`` runs
the log-sum-exp tangent as one fused Triton kernel instead (``attention_triton.py``: S, P, tS stay
in registers; same 10N FLOPs) when Triton is importable; ``tangent_pass="triton"`` asks for it
explicitly (also float32). ``explain_tangent_pass`` says which pass runs and why; ``attention_jvp``
logs it once per distinct reason. CPU keeps the PyTorch passes.

FLOPs, per (batch, head), counting a multiply-add as 2, with ``N = Lq · Lk · head_dim``:

- primal forward (QKᵀ, PV): ``4N``.
- log-sum-exp tangent pass: S (2N) + [tQ | Q][K | tK]ᵀ (4N) + (P∘tS)V (2N) + P tV (2N) = ``10N``,
  2.5× the primal; primal + tangent = 3.5×.
- online-softmax tangent pass: as above plus Σe·v (2N) = ``12N``, 3×; with the SDPA primal 4×.
- reference: 12N as well, but with L×L intermediates in memory.

Measured (``tools/bench_attention_jvp.py``; H200, torch 2.11, bf16, 24 heads, head_dim 128,
4096 tokens, batch 1): primal 0.36-0.39 ms; the PyTorch log-sum-exp pass 9.3 ms / 0.53 GiB,
online softmax 11.6 ms, the reference 21.4 ms / 7.8 GiB, ``compile_tangent=True`` 4.1 ms /
1.4 GiB, and the fused Triton kernel 1.7 ms / 48 MiB (its default tiles since that run). The
PyTorch passes are memory-bound: every elementwise step reads and writes float32 tiles while the
fused kernels keep them on chip.

Low precision: bf16 / fp16 inputs are accumulated in float32. On CUDA the tile matmuls take the
bf16 operands and return float32 (``torch.bmm(..., out_dtype=torch.float32)``, tensor cores);
elsewhere the operands are upcast to float32 once. Outputs come back in the input dtype.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

__all__ = ["attention", "attention_jvp", "attention_jvp_reference", "causal_mask", "default_block_sizes",
           "explain_tangent_pass"]

logger = logging.getLogger(__name__)

TANGENT_PASSES = ("auto", "logsumexp", "online", "triton")

_LOW_PRECISION = (torch.bfloat16, torch.float16)

# Recent torch on CUDA: bf16/fp16 bmm with a float32 result (S and tS are never rounded to bf16,
# as in the fused kernels).
_BMM_HAS_OUT_DTYPE = "dtype" in torch.ops.aten.bmm.overloads()

# (key block, query block) per device type; None for the query block means all queries at once.
# CPU: 256 x 256 float32 tiles (256 KiB per (batch, head)); 256..1024 measured within noise in
# time, and 256 keeps the CPU MeanFlow bench's differential step at 1.08x flow matching's peak
# memory (512: 1.11x), the tiles being what is live at its peak.
# CUDA (H200, bf16, 24 heads, 4608 tokens, eager): 1024 x 1024 took 11.8 ms and 0.56 GiB peak;
# 1024 keys x all queries 10.5 ms / 1.6 GiB; 4608 x 4608 9.7 ms / 5.1 GiB; 512 x 512 13.5 ms /
# 0.33 GiB. 1024 x 1024 keeps the extra memory independent of the sequence length at ~12% cost.
_DEFAULT_BLOCK_SIZES = {"cpu": (256, 256), "cuda": (1024, 1024)}


def default_block_sizes(device: torch.device) -> tuple[int, int | None]:
    """(key block, query block) that ``attention_jvp`` uses on ``device`` when none is given."""
    return _DEFAULT_BLOCK_SIZES.get(torch.device(device).type, _DEFAULT_BLOCK_SIZES["cpu"])


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
              causal: bool = False) -> torch.Tensor:
    """Primal attention, ``[batch, heads, seq, head_dim]``; no mask, or ``causal`` (see the module
    docstring: aligned to the last key)."""
    _check_causal(q, k, causal)
    if not causal or q.shape[2] == k.shape[2]:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=causal)
    return F.scaled_dot_product_attention(q, k, v, scale=scale, attn_mask=causal_mask(q.shape[2], k.shape[2], q.device))


def causal_mask(q_len: int, k_len: int, device=None) -> torch.Tensor:
    """[q_len, k_len] boolean, True where query i may see key j: ``j <= i + k_len - q_len``."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)


def attention_jvp_reference(q, k, v, tq, tk, tv, scale=None, causal=False):
    """(o, to): the JVP written as the formulas, with L×L intermediates.

    ``o`` carries the autograd graph of q, k, v; ``to`` carries none. bf16 / fp16 are computed in
    float32 and returned in the input dtype.
    """
    _check_shapes(q, k, v, tq, tk, tv)
    _check_causal(q, k, causal)
    scale = _default_scale(q, scale)
    input_dtype = q.dtype
    compute_dtype = torch.float32 if input_dtype in _LOW_PRECISION else input_dtype
    q, k, v = (x.to(compute_dtype) for x in (q, k, v))
    scores = q @ k.transpose(-1, -2) * scale
    if causal:
        scores = scores.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    o = probs @ v
    with torch.no_grad():
        tq, tk, tv = (x.to(compute_dtype) for x in (tq, tk, tv))
        t_scores = (tq @ k.transpose(-1, -2) + q @ tk.transpose(-1, -2)) * scale
        t_probs = probs * (t_scores - (probs * t_scores).sum(dim=-1, keepdim=True))
        to = t_probs @ v + probs @ tv
    return o.to(input_dtype), to.to(input_dtype)


def attention_jvp(q, k, v, tq, tk, tv, scale=None, block_size=None, query_block_size=None,
                  tangent_pass="auto", compile_tangent=False, causal=False):
    """(o, to): attention and its JVP along (tq, tk, tv), without L×L intermediates.

    Args:
        q, k, v: ``[batch, heads, seq, head_dim]`` (k, v share their seq; v may differ in head_dim),
            float32, float64, bfloat16 or float16.
        tq, tk, tv: tangents, same shapes and dtype as q, k, v.
        scale: softmax scale, default ``head_dim ** -0.5``.
        block_size: keys per tile; default ``default_block_sizes(device)[0]``.
        query_block_size: queries per tile; default ``default_block_sizes(device)[1]`` (None
            there means all queries in one tile).
        tangent_pass: ``"auto"`` (the Triton kernel on CUDA for bf16 / fp16 where supported, else
            the log-sum-exp pass when a fused kernel returns lse, else online softmax; see
            ``explain_tangent_pass``), ``"logsumexp"``, ``"triton"`` (errors if unavailable) or
            ``"online"``. ``block_size`` and ``query_block_size`` are the PyTorch passes' tiles;
            the Triton kernel uses its own (``attention_triton.default_config``).
        compile_tangent: run the PyTorch tangent pass through ``torch.compile`` (made once per pass;
            recompiles per new shape / dtype / block size). Inductor fuses each tile's elementwise
            chain (exp, products, row sums, casts); on an H200 this made the bf16 tangent 2.3x
            faster at 4096 tokens, at 2.6x its peak memory. Off by default: the first call
            compiles (seconds on CUDA; ~30 s on CPU, with a C++ compiler), the tile loops are
            unrolled (small blocks on long sequences compile for minutes), and every new shape
            compiles again. With ``"auto"`` it keeps the PyTorch passes; with ``"triton"`` it is
            an error.
        causal: mask causally, aligned to the last key (module docstring); needs ``Lq <= Lk``.
            The Triton kernel has no mask: causal calls take the PyTorch passes.

    Returns:
        ``o`` with the autograd graph of q, k, v (the fused SDPA backward); ``to`` without any
        graph (computed under no_grad), both in the input dtype.
    """
    _check_shapes(q, k, v, tq, tk, tv)
    _check_causal(q, k, causal)
    scale = _default_scale(q, scale)
    default_keys, default_queries = default_block_sizes(q.device)
    block_size = default_keys if block_size is None else block_size
    if query_block_size is None:
        query_block_size = default_queries or q.shape[2]
    if block_size < 1 or query_block_size < 1:
        raise ValueError(f"block sizes must be positive, got {block_size} and {query_block_size}")
    chosen, why = explain_tangent_pass(q, k, v, tangent_pass, compile_tangent, causal)
    _log_choice_once(tangent_pass, chosen, why)

    if chosen == "triton":
        o, lse = _fused_attention_with_logsumexp(q, k, v, scale)
        to = _triton_module().attention_tangent(q, k, v, tq, tk, tv, o.detach(), lse.detach(), scale)
    elif chosen == "logsumexp":
        o, lse = _fused_attention_with_logsumexp(q, k, v, scale, causal=causal)
        tangent_fn = _compiled(_tangent_from_logsumexp) if compile_tangent else _tangent_from_logsumexp
        to = tangent_fn(q, k, v, tq, tk, tv, o.detach(), lse.detach(), scale, block_size,
                        query_block_size, causal)
    else:
        o = attention(q, k, v, scale, causal)
        tangent_fn = _compiled(_tangent_online_softmax) if compile_tangent else _tangent_online_softmax
        to = tangent_fn(q, k, v, tq, tk, tv, scale, block_size, query_block_size, causal)
    return o, to


# "auto" uses the fused Triton kernel only once its CUDA tests have passed on GPU hardware:
# `tools/gpu_checks.sh` on an H200 (torch 2.11, triton 3.6), 2026-11-28. False makes it opt-in.
TRITON_VERIFIED_ON_GPU = True


def explain_tangent_pass(q, k, v, tangent_pass="auto", compile_tangent=False, causal=False) -> tuple[str, str]:
    """(the tangent pass ``attention_jvp`` runs for these inputs, why), without computing anything.

    The pass is ``"triton"``, ``"logsumexp"`` or ``"online"``. Raises ValueError for an unknown
    ``tangent_pass`` and RuntimeError when an explicitly requested pass cannot run.
    """
    if tangent_pass not in TANGENT_PASSES:
        raise ValueError(f"tangent_pass must be one of {', '.join(map(repr, TANGENT_PASSES))}, "
                         f"got {tangent_pass!r}")
    if tangent_pass == "online":
        return "online", "requested"
    if tangent_pass == "triton" and compile_tangent:
        raise ValueError("compile_tangent=True compiles the PyTorch tangent passes; it does not "
                         "apply to tangent_pass='triton'")
    if tangent_pass == "triton" and causal:
        raise RuntimeError("tangent_pass='triton' unavailable: the Triton kernel has no causal mask")
    lse_kernel = _logsumexp_kernel(q, k, v, causal)
    if lse_kernel is None:
        no_lse = (f"no fused attention kernel returns the log-sum-exp for {q.dtype} on "
                  f"{q.device.type} with head_dim {q.shape[-1]} / {v.shape[-1]}")
        if causal and q.shape[2] != k.shape[2]:
            no_lse = (f"the fused kernels' causal mask is aligned to the first key; {q.shape[2]} "
                      f"queries and {k.shape[2]} keys need it aligned to the last")
        if tangent_pass != "auto":
            raise RuntimeError(f"{no_lse}; use tangent_pass='online'")
        return "online", no_lse
    if causal:
        return "logsumexp", f"lse from {lse_kernel} (causal: the Triton kernel has no mask)"
    if tangent_pass == "triton":
        reason = _triton_unsupported_reason(q, k, v)
        if reason is not None:
            raise RuntimeError(f"tangent_pass='triton' unavailable: {reason}")
        return "triton", "requested"
    if tangent_pass == "logsumexp":
        return "logsumexp", "requested"
    # auto: the Triton kernel only where it is meant to run in training (CUDA, bf16 / fp16), and
    # only once it has been verified on GPU hardware; until then it is opt-in.
    if not TRITON_VERIFIED_ON_GPU:
        reason = "the Triton kernel is opt-in (tangent_pass='triton') until verified on a GPU"
    elif q.device.type != "cuda":
        reason = f"the Triton kernel is for CUDA, inputs are on {q.device.type}"
    elif compile_tangent:
        reason = "compile_tangent=True asks for the compiled PyTorch pass"
    elif q.dtype not in _LOW_PRECISION:
        reason = f"'auto' uses the Triton kernel for bfloat16 / float16, inputs are {q.dtype}"
    else:
        reason = _triton_unsupported_reason(q, k, v)
        if reason is None:
            return "triton", f"fused Triton kernel for {q.dtype} on CUDA, lse from {lse_kernel}"
    return "logsumexp", f"lse from {lse_kernel}; not Triton: {reason}"


_LOGGED_CHOICES = set()


def _log_choice_once(requested, chosen, why):
    if (requested, chosen, why) not in _LOGGED_CHOICES:
        _LOGGED_CHOICES.add((requested, chosen, why))
        logger.info("attention_jvp(tangent_pass=%r) runs the %s tangent pass: %s",
                    requested, chosen, why)


@functools.cache
def _triton_module():
    """mfmegatron.jvp.attention_triton, or None when Triton cannot be imported."""
    try:
        from mfmegatron.jvp import attention_triton
    except ImportError as error:
        logger.debug("Triton attention tangent unavailable: %s", error)
        return None
    return attention_triton


def _triton_unsupported_reason(q, k, v):
    """None when the Triton tangent kernel can run on these inputs, else why not."""
    module = _triton_module()
    if module is None:
        return "triton is not importable"
    reason = module.unsupported_reason(q, k, v)
    return None if reason is None else f"the Triton kernel does not support {reason}"


# ----------------------------------------------------------------------------------------------
# Primal with log-sum-exp


def _logsumexp_kernel(q, k, v, causal=False):
    """Name of the fused kernel that returns (o, lse) for these inputs, or None. Runs on every
    attention call: it checks only as far as the first kernel that applies."""
    return next(_logsumexp_kernels(q, k, v, causal), None)


def logsumexp_kernels(q, k, v, causal=False) -> list[str]:
    """The fused kernels that return (o, lse) for these inputs, best first: SDPA's own kernels in
    SDPA's order of preference (on Hopper cuDNN's attention is about twice as fast as flash
    attention, forward and backward)."""
    return list(_logsumexp_kernels(q, k, v, causal))


def _logsumexp_kernels(q, k, v, causal=False):
    if causal and q.shape[2] != k.shape[2]:
        return  # the kernels' is_causal is aligned to the first key, ours to the last
    if q.device.type == "cpu":
        if v.shape[-1] == q.shape[-1]:  # the CPU kernel needs equal head sizes
            yield "cpu flash attention"
    elif q.device.type == "cuda":
        params = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, causal, False)
        if q.dtype in _LOW_PRECISION and torch.backends.cuda.can_use_cudnn_attention(params):
            yield "cudnn attention"
        if q.dtype in _LOW_PRECISION and torch.backends.cuda.can_use_flash_attention(params):
            yield "flash attention"
        if q.dtype != torch.float64 and torch.backends.cuda.can_use_efficient_attention(params):
            yield "efficient attention"


def _fused_attention_with_logsumexp(q, k, v, scale, kernel=None, causal=False):
    """(o, lse) from a fused kernel (``kernel``: one of ``logsumexp_kernels``, default the best),
    ``o`` with autograd, ``lse`` float32/64 ``[b, h, Lq]`` (natural log of the scaled logits; may be
    a strided view); None where no kernel applies."""
    kernel = kernel or _logsumexp_kernel(q, k, v, causal)
    if kernel == "cpu flash attention":
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, scale=scale)
        return o, lse
    if kernel == "cudnn attention":
        out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
        lse = out[1]
        return out[0], (lse[..., 0] if lse.dim() == 4 else lse)  # [b, h, Lq, 1] in torch 2.x
    if kernel == "flash attention":
        out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        return out[0], out[1]
    if kernel == "efficient attention":
        out = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, 0.0, causal, scale=scale)
        # The efficient kernel pads lse's sequence dimension (to a multiple of 32).
        return out[0], out[1][..., : q.shape[2]]
    return None


# ----------------------------------------------------------------------------------------------
# Tangent passes (no autograd graph)


@torch.no_grad()
def _tangent_from_logsumexp(q, k, v, tq, tk, tv, o, lse, scale, block_size, query_block_size, causal=False):
    """tO given the primal's O and lse: per tile P = exp(S − lse) exactly; 10N FLOPs."""
    batch, heads, q_len, _ = q.shape
    k_len, v_dim = k.shape[2], v.shape[-1]
    operand_dtype, acc_dtype = _tangent_dtypes(q)
    q_b, k_t, tq_q, k_tk_t, v_b, tv_b = _tangent_operands(q, k, v, tq, tk, tv, operand_dtype)
    lse_b = lse.reshape(batch * heads, q_len, 1).to(acc_dtype)
    o_b = _batched(o, acc_dtype)

    to = torch.empty(batch * heads, q_len, v_dim, dtype=acc_dtype, device=q.device)
    for q_start in range(0, q_len, query_block_size):
        rows = slice(q_start, q_start + query_block_size)
        n_rows = min(query_block_size, q_len - q_start)
        # Sums over keys; "ts" is the unscaled tangent logits tQ Kᵀ + Q tKᵀ (scale applied at the
        # end, on these small accumulators instead of on every tile).
        sum_p_ts_v = q.new_zeros(batch * heads, n_rows, v_dim, dtype=acc_dtype)
        sum_p_tv = torch.zeros_like(sum_p_ts_v)
        sum_p_ts = q.new_zeros(batch * heads, n_rows, 1, dtype=acc_dtype)
        for k_start in range(0, _keys_seen(q_start, n_rows, q_len, k_len, causal), block_size):
            cols = slice(k_start, k_start + block_size)
            logits = _logits_minus(q_b[:, rows], k_t[:, :, cols], lse_b[:, rows], scale, acc_dtype)
            p = _mask_above_diagonal(logits, q_start, k_start, q_len, k_len, causal).exp_()
            p_ts = _matmul(tq_q[:, rows], k_tk_t[:, :, cols], acc_dtype).mul_(p)
            sum_p_ts += p_ts.sum(dim=-1, keepdim=True)
            _accumulate_matmul(sum_p_ts_v, p_ts.to(operand_dtype), v_b[:, cols])
            _accumulate_matmul(sum_p_tv, p.to(operand_dtype), tv_b[:, cols])
        # tO = (P∘tS)V − μ∘O + P tV with tS = scale·ts, μ = scale·rowsum(P∘ts).
        to[:, rows] = scale * (sum_p_ts_v - sum_p_ts * o_b[:, rows]) + sum_p_tv
    return to.view(batch, heads, q_len, v_dim).to(q.dtype)


@torch.no_grad()
def _tangent_online_softmax(q, k, v, tq, tk, tv, scale, block_size, query_block_size, causal=False):
    """tO by online softmax over key blocks (no lse needed); recomputes O itself; 12N FLOPs."""
    batch, heads, q_len, _ = q.shape
    k_len, v_dim = k.shape[2], v.shape[-1]
    operand_dtype, acc_dtype = _tangent_dtypes(q)
    q_b, k_t, tq_q, k_tk_t, v_b, tv_b = _tangent_operands(q, k, v, tq, tk, tv, operand_dtype)

    to = torch.empty(batch * heads, q_len, v_dim, dtype=acc_dtype, device=q.device)
    for q_start in range(0, q_len, query_block_size):
        rows = slice(q_start, q_start + query_block_size)
        n_rows = min(query_block_size, q_len - q_start)
        # Per query row, all relative to the running max m: l = Σe, Σe·v, Σe·ts, Σe·ts·v, Σe·tv
        # with e = exp(S − m) and ts the unscaled tangent logits.
        running_max = q.new_full((batch * heads, n_rows, 1), float("-inf"), dtype=acc_dtype)
        sum_e = q.new_zeros(batch * heads, n_rows, 1, dtype=acc_dtype)
        sum_e_ts = torch.zeros_like(sum_e)
        sum_e_v = q.new_zeros(batch * heads, n_rows, v_dim, dtype=acc_dtype)
        sum_e_ts_v = torch.zeros_like(sum_e_v)
        sum_e_tv = torch.zeros_like(sum_e_v)
        # Causal: every row sees key 0, so the first tile gives each row a finite running max.
        for k_start in range(0, _keys_seen(q_start, n_rows, q_len, k_len, causal), block_size):
            cols = slice(k_start, k_start + block_size)
            scores = _matmul(q_b[:, rows], k_t[:, :, cols], acc_dtype).mul_(scale)
            scores = _mask_above_diagonal(scores, q_start, k_start, q_len, k_len, causal)
            new_max = torch.maximum(running_max, scores.amax(dim=-1, keepdim=True))
            # Rescale what was summed against the old max (exp(-inf) = 0 on the first block).
            rescale = torch.exp(running_max - new_max)
            running_max = new_max
            e = scores.sub_(new_max).exp_()
            e_ts = _matmul(tq_q[:, rows], k_tk_t[:, :, cols], acc_dtype).mul_(e)
            sum_e.mul_(rescale).add_(e.sum(dim=-1, keepdim=True))
            sum_e_ts.mul_(rescale).add_(e_ts.sum(dim=-1, keepdim=True))
            for acc in (sum_e_v, sum_e_ts_v, sum_e_tv):
                acc.mul_(rescale)
            e_op = e.to(operand_dtype)
            _accumulate_matmul(sum_e_v, e_op, v_b[:, cols])
            _accumulate_matmul(sum_e_ts_v, e_ts.to(operand_dtype), v_b[:, cols])
            _accumulate_matmul(sum_e_tv, e_op, tv_b[:, cols])
        o_rows = sum_e_v / sum_e
        mu = scale * sum_e_ts / sum_e
        to[:, rows] = (scale * sum_e_ts_v + sum_e_tv) / sum_e - mu * o_rows
    return to.view(batch, heads, q_len, v_dim).to(q.dtype)


# ----------------------------------------------------------------------------------------------
# Helpers

_COMPILED_PASSES = {}


def _compiled(tangent_pass_fn):
    """torch.compile of a tangent pass, made on first use and kept (compiling is per process)."""
    if tangent_pass_fn not in _COMPILED_PASSES:
        _COMPILED_PASSES[tangent_pass_fn] = torch.compile(tangent_pass_fn)
    return _COMPILED_PASSES[tangent_pass_fn]


def _check_shapes(q, k, v, tq, tk, tv):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [batch, heads, seq, head_dim], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"incompatible q, k, v shapes {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    for name, x, tx in (("q", q, tq), ("k", k, tk), ("v", v, tv)):
        if tx.shape != x.shape or tx.dtype != x.dtype:
            raise ValueError(f"t{name} must match {name}: {tuple(tx.shape)} {tx.dtype} vs "
                             f"{tuple(x.shape)} {x.dtype}")


def _check_causal(q, k, causal):
    if causal and q.shape[2] > k.shape[2]:
        raise ValueError(f"causal attention needs no more queries than keys, got {q.shape[2]} and {k.shape[2]}")


def _keys_seen(q_start, n_rows, q_len, k_len, causal):
    """The end of the keys that queries [q_start, q_start + n_rows) see: all, or up to the
    diagonal (the tiles past it are skipped)."""
    return min(k_len, q_start + n_rows + k_len - q_len) if causal else k_len


def _mask_above_diagonal(logits, q_start, k_start, q_len, k_len, causal):
    """logits [b·h, rows, cols] of the tile at (q_start, k_start) with -inf where a key lies past
    its query's diagonal (causal; in place); unchanged when the tile is wholly visible."""
    rows, cols = logits.shape[1:]
    offset = k_len - q_len
    if not causal or k_start + cols - 1 <= q_start + offset:
        return logits
    query = torch.arange(q_start, q_start + rows, device=logits.device)[:, None]
    key = torch.arange(k_start, k_start + cols, device=logits.device)[None, :]
    return logits.masked_fill_(key > query + offset, float("-inf"))


def _default_scale(q, scale):
    return q.shape[-1] ** -0.5 if scale is None else scale


def _tangent_dtypes(x):
    """(matmul operand dtype, accumulation dtype) of the tangent pass."""
    if x.dtype not in _LOW_PRECISION:
        return x.dtype, x.dtype
    if x.is_cuda and _BMM_HAS_OUT_DTYPE:
        return x.dtype, torch.float32
    return torch.float32, torch.float32


def _tangent_operands(q, k, v, tq, tk, tv, dtype):
    """The tile passes' batched operands ``[b·h, L, d]`` in ``dtype``: Q, Kᵀ, [tQ | Q], [K | tK]ᵀ,
    V, tV. [tQ | Q] @ [K | tK]ᵀ = tQ Kᵀ + Q tKᵀ: one matmul with a 2·head_dim inner dimension
    instead of two, and no pass over the tile to add them. Costs O(L·head_dim) memory, once."""
    return (
        _batched(q, dtype),
        _batched(k, dtype).transpose(1, 2),
        _batched(torch.cat([tq, q], dim=-1), dtype),
        _batched(torch.cat([k, tk], dim=-1), dtype).transpose(1, 2),
        _batched(v, dtype),
        _batched(tv, dtype),
    )


def _batched(x, dtype):
    """[b, h, L, d] -> [b·h, L, d] in ``dtype`` (a view when already contiguous and in dtype)."""
    return x.reshape(-1, x.shape[-2], x.shape[-1]).to(dtype)


def _matmul(a, b, acc_dtype):
    if a.dtype == acc_dtype:
        return torch.bmm(a, b)
    return torch.bmm(a, b, out_dtype=acc_dtype)


def _logits_minus(q_rows, k_t_cols, shift, scale, acc_dtype):
    """scale · q kᵀ − shift, in ``acc_dtype``."""
    if q_rows.dtype == acc_dtype:
        return torch.baddbmm(shift, q_rows, k_t_cols, beta=-1, alpha=scale)
    # Not baddbmm(..., out_dtype=): torch.compile cannot trace its beta/alpha (torch 2.11).
    return _matmul(q_rows, k_t_cols, acc_dtype).mul_(scale).sub_(shift)


def _accumulate_matmul(acc, a, b):
    """acc += a @ b, in place, in acc's dtype."""
    if a.dtype == acc.dtype:
        acc.baddbmm_(a, b)
    else:
        acc += torch.bmm(a, b, out_dtype=acc.dtype)
