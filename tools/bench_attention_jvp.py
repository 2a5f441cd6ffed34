"""Time and peak memory of attention, its memory-efficient JVP and the reference JVP.

    python -m tools.bench_attention_jvp --device cpu              # ~1-2 min on 2 cores
    python -m tools.bench_attention_jvp --device cuda --dtype bfloat16 --heads 24 --head-dim 128
    python -m tools.bench_attention_jvp --device cuda --dtype bfloat16 --heads 24 --head-dim 128 \
        --tangent-pass logsumexp --compile-tangent --triton --triton-autotune

For each sequence length, side by side: (i) the primal attention forward, (ii) ``attention_jvp``
(primal + tangent; ``--tangent-pass`` picks its pass, default ``auto``), (iii)
``attention_jvp_reference``, optionally ``attention_jvp`` with the online-softmax tangent pass
(``--online``), with the compiled PyTorch tangent pass (``--compile-tangent``), with the fused
Triton tangent kernel (``--triton``, CUDA only; default tiles) and with that kernel autotuned over
its small config list (``--triton-autotune``; the first call per length tunes, untimed), and the
ratios to (i). For the Triton columns a line after each row gives the largest difference of their
tangent from a PyTorch pass (relative to the largest entry) and the autotuner's choice. q, k, v
require grad, as in training, so the memory includes what each primal keeps for its backward (the
reference keeps its L×L softmax). ``--backward`` adds to every column the backward through its
primal output, as in a training step.

Peak memory is the most bytes allocated at once during the call above what was allocated before
it (inputs excluded; outputs and autograd-saved tensors included). CUDA:
``torch.cuda.max_memory_allocated``. CPU: torch's allocation events recorded by ``torch.profiler``
with ``profile_memory=True`` (every allocation and free through torch's CPU allocator, summed in
time order); measured in a separate, untimed call.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import sys
import tempfile
import time

import torch

from mfmegatron.jvp import attention as attention_module
from mfmegatron.jvp.attention import (TANGENT_PASSES, attention, attention_jvp, attention_jvp_reference,
                                      default_block_sizes, explain_tangent_pass)

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Time and peak memory of attention and its JVPs.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--block-size", type=int, default=None, help="keys per tile (default: per device)")
    parser.add_argument("--query-block-size", type=int, default=None, help="queries per tile")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (median; default 3 cpu, 20 cuda)")
    parser.add_argument("--online", action="store_true", help="also time the online-softmax tangent pass")
    parser.add_argument("--compile-tangent", action="store_true", help="also time the compiled tangent pass")
    parser.add_argument("--tangent-pass", default="auto", choices=TANGENT_PASSES,
                        help="tangent pass of the 'jvp' column (default auto)")
    parser.add_argument("--triton", action="store_true",
                        help="also time the fused Triton tangent kernel (CUDA only)")
    parser.add_argument("--triton-autotune", action="store_true",
                        help="also time the Triton kernel autotuned over its configs (CUDA only)")
    parser.add_argument("--backward", action="store_true", help="include the backward through the primal")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference (its L×L memory)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    args = parser.parse_args(argv)
    if (args.triton or args.triton_autotune) and torch.device(args.device).type != "cuda":
        parser.error("--triton and --triton-autotune need a CUDA device")
    return args


def make_inputs(seq_len, args, device, dtype):
    generator = torch.Generator(device="cpu").manual_seed(seq_len)
    shape = (args.batch, args.heads, seq_len, args.head_dim)

    def randn(requires_grad):
        x = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
        return x.requires_grad_(requires_grad)

    q, k, v = (randn(True) for _ in range(3))
    tq, tk, tv = (randn(False) for _ in range(3))
    return q, k, v, tq, tk, tv


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, repeats):
    fn()  # warm-up (kernel selection, allocator)
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
        del result
    return statistics.median(times)


def peak_bytes(fn, device):
    """Peak bytes allocated during ``fn()`` above the allocation at its start (result kept alive
    until the end, so autograd-saved tensors count)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return peak
    from torch.profiler import ProfilerActivity, profile

    with quiet_profiler_logs(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    del result
    return _cpu_peak_from_profile(prof)


# A line of the profiler's C++ side (Kineto), e.g.
# "USDT:2026-11-30 14:03:00 23588:23588 SyncActivityProfilerHandler.cpp:39] profiler_start" or, on a
# machine without GPUs, "ERROR:... DeviceProperties.cpp:56] gpuGetDeviceCount failed with code 35".
PROFILER_LOG_LINE = re.compile(rb"^(?:VERBOSE|INFO|USDT|STAGE|WARNING|ERROR):\d{4}-\d\d-\d\d [\d:.]+ \d+:\d+ \S+:\d+\] ")


@contextlib.contextmanager
def quiet_profiler_logs():
    """Keeps the profiler's own log lines out of a report. Kineto writes them from C++ straight
    to file descriptor 2, past Python's sys.stderr, so fd 2 is sent to a temporary file for the
    duration; anything else written there (Python warnings, errors) is passed on afterwards."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().splitlines(keepends=True) if not PROFILER_LOG_LINE.match(line)]
            if kept:
                os.write(2, b"".join(kept))


def _cpu_peak_from_profile(prof):
    # Allocation events (alloc_size > 0 for an allocation, < 0 for a free) from the profiler's
    # event tree; their running sum in time order is the bytes allocated since profiling began.
    # The profiler records only what threads it profiles free: a tensor whose last reference a
    # gloo worker thread drops (a collective's input or output, when the worker lets go of it
    # after the caller) is freed unseen. Its address being allocated again proves the free, so
    # an allocation at an address still counted live first takes the old allocation off (what
    # stays unseen stays counted: the peak is never under the truth).
    from torch._C._profiler import _EventType

    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            fields = node.extra_fields
            events.append((node.start_time_ns, fields.alloc_size, fields.ptr))
        stack.extend(node.children)
    live = {}
    running = peak = 0
    for _, size, ptr in sorted(events):
        if size > 0:
            running += size - live.pop(ptr, 0)
            live[ptr] = size
        else:
            running -= live.pop(ptr, -size)
        peak = max(peak, running)
    return peak


def with_backward(fn):
    """``fn`` followed by the backward through its primal output (gradients of q, k, v)."""

    def forward_backward(q, k, v, tq, tk, tv):
        out = fn(q, k, v, tq, tk, tv)
        o = out[0] if isinstance(out, tuple) else out
        return out, torch.autograd.grad(o, (q, k, v), torch.ones_like(o))

    return forward_backward


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    repeats = args.repeats or (20 if device.type == "cuda" else 3)
    key_block, query_block = default_block_sizes(device)
    key_block = args.block_size or key_block
    query_block = args.query_block_size or query_block

    def primal(q, k, v, tq, tk, tv):
        return attention(q, k, v)

    def jvp(q, k, v, tq, tk, tv):
        return attention_jvp(q, k, v, tq, tk, tv, block_size=key_block, query_block_size=query_block,
                             tangent_pass=args.tangent_pass)

    def jvp_online(q, k, v, tq, tk, tv):
        return attention_jvp(q, k, v, tq, tk, tv, block_size=key_block, query_block_size=query_block,
                             tangent_pass="online")

    def jvp_compiled(q, k, v, tq, tk, tv):
        return attention_jvp(q, k, v, tq, tk, tv, block_size=key_block, query_block_size=query_block,
                             compile_tangent=True)

    def jvp_triton(q, k, v, tq, tk, tv):
        return attention_jvp(q, k, v, tq, tk, tv, tangent_pass="triton")

    def jvp_triton_autotuned(q, k, v, tq, tk, tv):
        # What attention_jvp(tangent_pass="triton") does, with the kernel's autotuner on.
        from mfmegatron.jvp import attention_triton

        scale = q.shape[-1] ** -0.5
        o, lse = attention_module._fused_attention_with_logsumexp(q, k, v, scale)
        return o, attention_triton.attention_tangent(q, k, v, tq, tk, tv, o.detach(), lse.detach(),
                                                     scale, autotune=True)

    candidates = [("primal", primal), ("jvp", jvp)]
    if not args.no_reference:
        candidates.append(("reference", attention_jvp_reference))
    if args.online:
        candidates.append(("jvp_online", jvp_online))
    if args.compile_tangent:
        candidates.append(("jvp_compiled", jvp_compiled))
    triton_columns = []
    if args.triton:
        triton_columns.append(("jvp_triton", jvp_triton))
    if args.triton_autotune:
        triton_columns.append(("jvp_triton_tuned", jvp_triton_autotuned))
    candidates += triton_columns
    if args.backward:
        candidates = [(label + "+bwd", with_backward(fn)) for label, fn in candidates]

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name} ({torch.get_num_threads()} threads), torch {torch.__version__}, {args.dtype}, "
          f"batch {args.batch}, heads {args.heads}, head_dim {args.head_dim}, key block {key_block}, "
          f"query block {query_block or 'all'}, median of {repeats}")
    print("memory: " + ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
                        "torch.profiler allocation events (CPU allocator)") + ", above the inputs")
    q, k, v, *_ = make_inputs(args.seq_lens[0], args, device, dtype)
    chosen, why = explain_tangent_pass(q, k, v, args.tangent_pass)
    print(f"jvp column: tangent_pass={args.tangent_pass!r} runs the {chosen} pass ({why})")
    header = f"{'seq':>6}"
    for label, _ in candidates:
        header += f" | {label + ' ms':>14} {label + ' MiB':>15}"
    header += " | " + " ".join(f"{label + '/primal t,mem':>22}" for label, _ in candidates[1:])
    print(header)
    for seq_len in args.seq_lens:
        inputs = make_inputs(seq_len, args, device, dtype)
        row = f"{seq_len:>6}"
        results = []
        for _, fn in candidates:
            ms = time_ms(lambda: fn(*inputs), device, repeats)
            mib = peak_bytes(lambda: fn(*inputs), device) / 2**20
            results.append((ms, mib))
            row += f" | {ms:>14.2f} {mib:>15.1f}"
        base_ms, base_mib = results[0]
        row += " | " + " ".join(f"{ms / base_ms:>12.2f}x {mib / base_mib:>8.2f}x" for ms, mib in results[1:])
        print(row, flush=True)
        if triton_columns:
            print(check_triton(triton_columns, inputs), flush=True)


def check_triton(triton_columns, inputs):
    """How far each Triton column's tangent is from a PyTorch pass on the same inputs, and the
    autotuner's choice; one line."""
    q, k, v = inputs[:3]
    pytorch_pass = "logsumexp" if explain_tangent_pass(q, k, v)[0] != "online" else "online"
    with torch.no_grad():
        expected = attention_jvp(*inputs, tangent_pass=pytorch_pass)[1].float()
        parts = []
        for label, fn in triton_columns:
            got = fn(*inputs)[1].float()
            error = ((got - expected).abs().max() / expected.abs().max()).item()
            parts.append(f"{label} max|dtO|/max|tO| vs the {pytorch_pass} pass {error:.1e}")
    line = "       " + "; ".join(parts)
    if any(label == "jvp_triton_tuned" for label, _ in triton_columns):
        from mfmegatron.jvp import attention_triton

        line += f"; autotuned config {attention_triton.last_autotuned_config()}"
    return line


if __name__ == "__main__":
    main()
