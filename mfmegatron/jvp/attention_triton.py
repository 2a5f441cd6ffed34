"""Fused Triton kernel for the attention tangent, given the primal's output and log-sum-exp.

``attention_jvp(..., tangent_pass="triton")`` (and ``"auto"`` on CUDA for bf16 / fp16) calls
``attention_tangent``. Inputs as in ``attention.py``: ``[batch, heads, seq, head_dim]``, any strides,
no mask; ``lse`` is the natural-log log-sum-exp of the *scaled* logits, ``[batch, heads, q_len]``,
as torch's fused SDPA kernels return it.

The algebra, per query row, with ``P = exp(S − lse)`` exact (already normalised, so unlike the
online-softmax form nothing is divided by a normaliser at the end)::

    S  = Q Kᵀ · scale            ts = tQ Kᵀ + Q tKᵀ      (tS = scale · ts)
    tO = (P ∘ tS) V − μ ∘ O + P tV,     μ = rowsum(P ∘ tS)
       = scale · ((P ∘ ts) V − rowsum(P ∘ ts) ∘ O) + P tV

Tiling: one program per (query block of ``BLOCK_M`` rows, batch · head); it keeps its Q and tQ
tiles, the row ``lse`` and three accumulators in registers — ``Σ P∘ts`` (``BLOCK_M``),
``(P∘ts) V`` and ``P tV`` (``BLOCK_M × v_dim``, float32) — and walks the keys in blocks of
``BLOCK_N``, loading K, tK, V, tV once per block (software-pipelined over ``num_stages``). Per
tile, S, P, ts and P∘ts live only in registers: five ``tl.dot`` (Q Kᵀ, tQ Kᵀ, Q tKᵀ, (P∘ts) V,
P tV; tensor cores for bf16 / fp16) plus one exp2 per score. The epilogue reads O once and writes
tO once.

FLOPs per (batch, head), multiply-add = 2, ``N = Lq · Lk · head_dim``: S 2N + ts 4N + (P∘ts) V 2N +
P tV 2N = ``10N``, the same as the PyTorch log-sum-exp pass (2.5× the primal forward's 4N).

Memory traffic, per score element (CUDA, bf16 operands): the PyTorch pass writes and re-reads
float32 tiles through each step (S, scale, −lse, exp, ts, ·P, row sum, two casts to bf16 and the
matmul reads): about 64 bytes of HBM traffic per element. Here none: per
``BLOCK_M × BLOCK_N`` tile the program loads four ``BLOCK_N × head_dim`` operand tiles, i.e.
``8 · head_dim / BLOCK_M`` bytes per score element (16 B at head_dim 128, BLOCK_M 64), mostly from
L2 (K, tK, V, tV of one head are 4 MiB at 4096 × 128 bf16, and the grid runs a head's query
blocks together); HBM sees each input once and tO once. An estimate, not a measurement.

Precision: bf16 / fp16 operands, float32 accumulation, and ``P`` and ``P∘ts`` rounded to the input
dtype before their matmuls with V and tV (as the PyTorch CUDA pass does). float32 inputs use
IEEE float32 dots (``input_precision="ieee"``, not TF32) so that the explicit
``tangent_pass="triton"`` on float32 matches the other passes.

Block sizes. Per program the two float32 accumulators take ``2 · BLOCK_M · v_dim · 4`` bytes of
registers and the S / ts / P∘ts tiles ``BLOCK_M · BLOCK_N · 4`` each; each pipeline stage holds
four ``BLOCK_N × head_dim`` bf16 tiles in shared memory, plus Q and tQ.

- head_dim ≤ 64: ``BLOCK_M 128, BLOCK_N 64, 8 warps, 3 stages`` (reasoned, not measured).
- head_dim 128: ``BLOCK_M 128, BLOCK_N 32, 8 warps, 3 stages`` where the device's shared memory
  per block holds it (~160 KiB: Hopper, A100): the autotuner's pick on an H200 at 1k, 2k, 4k and
  4.6k tokens; primal + tangent 1.2x (1k) to 1.7x (2k-4.6k) faster than with ``64 × 64, 2
  stages`` (the kernel alone 1.9x at 1.5k), which stays the fallback.
- float32 (any head_dim): ``BLOCK_M 32, BLOCK_N 32, 4 warps, 2 stages`` — a correctness path
  (IEEE float32 dots do not use tensor cores), not tuned.

``autotune=True`` times a small list of alternatives (``AUTOTUNE_CONFIGS``, those whose estimated
shared memory fits the device) once per (head_dim, v_dim, q_len, k_len, dtype) and keeps the
best; ``tools/bench_attention_jvp.py --triton-autotune`` prints the one it picked.

Verified on an H200 (torch 2.11, triton 3.6; ``tools/gpu_checks.sh``): every CUDA test in
``tests/test_attention_triton.py`` passes (bf16 / fp16 / fp32 against a float64 reference, every
autotune config that fits, FLUX's strided layout). Measured there (bf16, 24 heads × 128, batch 1):
primal + tangent = 4.2x the primal forward at 1k tokens and 5.2x at 4.6k, against 13-28x for
the PyTorch lse pass; memory 2x the primal's (its output and tO), flat in length.

Supported: CUDA (compute capability ≥ 8.0), bf16 / fp16 / fp32, head_dim and v_dim in
16 / 32 / 64 / 128, any sequence lengths (ragged last blocks are masked). Under
``TRITON_INTERPRET=1`` (set before triton is imported) the kernel also runs on CPU tensors; that is
how the tests check it without a GPU.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

__all__ = ["AUTOTUNE_CONFIGS", "SUPPORTED_HEAD_DIMS", "attention_tangent", "default_config",
           "interpreting", "last_autotuned_config", "shared_memory_bytes", "unsupported_reason"]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
_SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# (BLOCK_M, BLOCK_N, num_warps, num_stages) for the autotuner; the bf16 / fp16 defaults are among
# them. Configs whose estimated shared memory exceeds the device's are pruned before timing.
AUTOTUNE_CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
    for m, n, w, s in ((64, 64, 8, 2), (64, 64, 4, 2), (128, 64, 8, 2), (128, 32, 8, 3),
                       (128, 64, 8, 3), (64, 128, 8, 2))
]


def interpreting() -> bool:
    """True when triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return bool(triton.knobs.runtime.interpret)


def default_config(head_dim: int, v_dim: int, dtype: torch.dtype = torch.bfloat16,
                   shared_memory_limit: int | None = None) -> dict:
    """Tile sizes and launch parameters used without autotuning (see the module docstring).
    ``shared_memory_limit``: bytes per block the device allows (None: assume the smallest)."""
    if dtype == torch.float32:  # IEEE float32 dots: the correctness path, small tiles
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    if max(head_dim, v_dim) <= 64:
        return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
    # head_dim 128 (FLUX): the autotuner's choice on an H200 at 1k-4.6k tokens (1.7x faster than
    # 64 x 64), where the device's shared memory holds it (Hopper, A100); else 64 x 64 tiles.
    tuned = {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 3}
    if shared_memory_limit is not None and shared_memory_bytes(
            tuned["BLOCK_M"], tuned["BLOCK_N"], tuned["num_stages"], head_dim, v_dim, dtype.itemsize) <= shared_memory_limit:
        return tuned
    return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}


def shared_memory_bytes(block_m, block_n, num_stages, head_dim, v_dim, element_size):
    """Estimated shared memory of one program: K, tK, V, tV tiles per pipeline stage plus Q, tQ."""
    return element_size * (num_stages * block_n * 2 * (head_dim + v_dim) + block_m * 2 * head_dim)


def unsupported_reason(q, k, v) -> str | None:
    """Why the kernel cannot run on these inputs, or None when it can."""
    if q.dtype not in _SUPPORTED_DTYPES:
        return f"dtype {q.dtype} (supported: bfloat16, float16, float32)"
    for name, dim in (("head_dim", q.shape[-1]), ("v head_dim", v.shape[-1])):
        if dim not in SUPPORTED_HEAD_DIMS:
            return f"{name} {dim} (supported: {', '.join(map(str, SUPPORTED_HEAD_DIMS))})"
    if q.device.type == "cuda":
        if torch.cuda.get_device_capability(q.device) < (8, 0):
            return f"compute capability {torch.cuda.get_device_capability(q.device)} < (8, 0)"
    elif not (q.device.type == "cpu" and interpreting()):
        return f"device {q.device.type} (needs CUDA, or TRITON_INTERPRET=1 for CPU tensors)"
    return None


@functools.cache
def _shared_memory_limit(device) -> int | None:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


_last_autotuned = {}


def last_autotuned_config():
    """The config the autotuner chose in its latest run (None before any); for the benchmark."""
    return _last_autotuned.get("config")


@torch.no_grad()
def attention_tangent(q, k, v, tq, tk, tv, o, lse, scale, *, config=None, autotune=False):
    """tO, ``[batch, heads, q_len, v_dim]`` in q's dtype, from the primal ``o`` and ``lse``.

    Args:
        q, k, v, tq, tk, tv: ``[batch, heads, seq, dim]``, any strides; tangents match primals.
        o: primal output ``[batch, heads, q_len, v_dim]``.
        lse: ``[batch, heads, q_len]`` float32, natural log, of the scaled logits.
        scale: the softmax scale used for ``o`` and ``lse``.
        config: ``{"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}``; default ``default_config``.
        autotune: time ``AUTOTUNE_CONFIGS`` instead (first call per shape; ignores ``config``).
    """
    reason = unsupported_reason(q, k, v)
    if reason is not None:
        raise RuntimeError(f"Triton attention tangent unsupported: {reason}")
    batch, heads, q_len, head_dim = q.shape
    k_len, v_dim = k.shape[2], v.shape[-1]
    to = torch.empty(batch, heads, q_len, v_dim, dtype=q.dtype, device=q.device)
    if q_len == 0:
        return to

    def grid(meta):
        return (triton.cdiv(q_len, meta["BLOCK_M"]), batch * heads)

    args = (q, k, v, tq, tk, tv, o, lse, to,
            *q.stride(), *k.stride(), *v.stride(), *tq.stride(), *tk.stride(), *tv.stride(),
            *o.stride(), *lse.stride(), *to.stride(),
            heads, q_len, k_len, float(scale))
    constants = {"HEAD_DIM": head_dim, "V_DIM": v_dim,
                 "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32"}
    # Triton launches on the current CUDA device, not on the tensors' device.
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        if autotune:
            _tangent_kernel_autotuned[grid](*args, **constants)
            _last_autotuned["config"] = _tangent_kernel_autotuned.best_config
        else:
            _tangent_kernel[grid](*args, **constants,
                                  **(config or default_config(head_dim, v_dim, q.dtype, _shared_memory_limit(q.device))))
    return to


@triton.jit
def _tile_pointers(base, stride_b, stride_h, stride_s, stride_d, b, h, rows, cols):
    """Pointers to ``base[b, h, rows, cols]`` (a 2-D tile), batch/head offsets in int64."""
    base += b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
    return base + rows[:, None] * stride_s + cols[None, :] * stride_d


@triton.heuristics({"EVEN_N": lambda args: args["k_len"] % args["BLOCK_N"] == 0})
@triton.jit
def _tangent_kernel(
    Q, K, V, TQ, TK, TV, O, LSE, TO,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_tqb, stride_tqh, stride_tqs, stride_tqd,
    stride_tkb, stride_tkh, stride_tks, stride_tkd,
    stride_tvb, stride_tvh, stride_tvs, stride_tvd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_lb, stride_lh, stride_ls,
    stride_tob, stride_toh, stride_tos, stride_tod,
    heads, q_len, k_len, scale,
    HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    dims = tl.arange(0, HEAD_DIM)
    v_dims = tl.arange(0, V_DIM)
    block_keys = tl.arange(0, BLOCK_N)

    # Query-side tiles, kept for the whole key loop (masked rows read zeros and are not stored).
    q = tl.load(_tile_pointers(Q, stride_qb, stride_qh, stride_qs, stride_qd, b, h, rows, dims),
                mask=row_ok[:, None], other=0.0)
    tq = tl.load(_tile_pointers(TQ, stride_tqb, stride_tqh, stride_tqs, stride_tqd, b, h, rows, dims),
                 mask=row_ok[:, None], other=0.0)
    lse_ptrs = LSE + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + rows * stride_ls
    # exp(scale·s − lse) = exp2(scale·log2(e)·s − log2(e)·lse)
    lse2 = tl.load(lse_ptrs, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
    scale2 = scale * 1.4426950408889634

    sum_p_ts = tl.zeros([BLOCK_M], dtype=tl.float32)           # Σ P∘ts
    acc_p_ts_v = tl.zeros([BLOCK_M, V_DIM], dtype=tl.float32)  # (P∘ts) V
    acc_p_tv = tl.zeros([BLOCK_M, V_DIM], dtype=tl.float32)    # P tV

    k_ptrs = _tile_pointers(K, stride_kb, stride_kh, stride_ks, stride_kd, b, h, block_keys, dims)
    tk_ptrs = _tile_pointers(TK, stride_tkb, stride_tkh, stride_tks, stride_tkd, b, h, block_keys, dims)
    v_ptrs = _tile_pointers(V, stride_vb, stride_vh, stride_vs, stride_vd, b, h, block_keys, v_dims)
    tv_ptrs = _tile_pointers(TV, stride_tvb, stride_tvh, stride_tvs, stride_tvd, b, h, block_keys, v_dims)

    for start_n in range(0, k_len, BLOCK_N):
        key_ok = (start_n + block_keys) < k_len  # only used for a ragged last block
        if EVEN_N:
            k = tl.load(k_ptrs)
            tk = tl.load(tk_ptrs)
            v = tl.load(v_ptrs)
            tv = tl.load(tv_ptrs)
        else:
            k = tl.load(k_ptrs, mask=key_ok[:, None], other=0.0)
            tk = tl.load(tk_ptrs, mask=key_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=key_ok[:, None], other=0.0)
            tv = tl.load(tv_ptrs, mask=key_ok[:, None], other=0.0)

        k_t = tl.trans(k)
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION)
        p = tl.math.exp2(s * scale2 - lse2[:, None])
        if not EVEN_N:
            p = tl.where(key_ok[None, :], p, 0.0)
        ts = tl.dot(tq, k_t, input_precision=DOT_PRECISION)
        ts = tl.dot(q, tl.trans(tk), ts, input_precision=DOT_PRECISION)
        p_ts = p * ts
        sum_p_ts += tl.sum(p_ts, axis=1)
        acc_p_ts_v = tl.dot(p_ts.to(v.dtype), v, acc_p_ts_v, input_precision=DOT_PRECISION)
        acc_p_tv = tl.dot(p.to(tv.dtype), tv, acc_p_tv, input_precision=DOT_PRECISION)

        k_ptrs += BLOCK_N * stride_ks
        tk_ptrs += BLOCK_N * stride_tks
        v_ptrs += BLOCK_N * stride_vs
        tv_ptrs += BLOCK_N * stride_tvs

    o = tl.load(_tile_pointers(O, stride_ob, stride_oh, stride_os, stride_od, b, h, rows, v_dims),
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    to = scale * (acc_p_ts_v - sum_p_ts[:, None] * o) + acc_p_tv
    tl.store(_tile_pointers(TO, stride_tob, stride_toh, stride_tos, stride_tod, b, h, rows, v_dims),
             to.to(TO.dtype.element_ty), mask=row_ok[:, None])


def _configs_that_fit(configs, named_args, **kwargs):
    """Autotuner pruning: drop configs whose estimated shared memory exceeds the device's."""
    q = named_args["Q"]
    limit = torch.cuda.get_device_properties(q.device).shared_memory_per_block_optin
    fitting = [c for c in configs if shared_memory_bytes(
        c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages, kwargs["HEAD_DIM"], kwargs["V_DIM"],
        q.element_size()) <= limit]
    return fitting or configs[:1]


# Tuned once per (head_dim, v_dim, q_len, k_len, dtypes); configs that still fail to compile for
# lack of resources are skipped by the autotuner itself.
_tangent_kernel_autotuned = triton.autotune(
    configs=AUTOTUNE_CONFIGS, key=["HEAD_DIM", "V_DIM", "q_len", "k_len"],
    prune_configs_by={"early_config_prune": _configs_that_fit})(_tangent_kernel)
