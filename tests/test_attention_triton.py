"""The fused Triton attention-tangent kernel (``mfmegatron/jvp/attention_triton.py``).

Without a GPU the kernel runs in Triton's CPU interpreter, which must be switched on
(``TRITON_INTERPRET=1``) before triton is imported: ``tests/triton_interpreter_checks.py`` runs
every case in one subprocess with that variable set, so it never reaches this process or the other
test modules. The CUDA tests at the end compile the real kernel; they are skipped without a GPU.
"""

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mfmegatron.jvp import attention as attention_module
from mfmegatron.jvp.attention import attention_jvp, explain_tangent_pass
from tests import triton_interpreter_checks as checks

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
REPO_ROOT = Path(__file__).resolve().parents[1]

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_cuda_and_triton = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON),
                                           reason="needs a CUDA device and triton")


def cpu_inputs(dtype=torch.float32, head_dim=64, seq=24, seed=0):
    return checks.make_inputs(dtype, 1, 2, seq, seq, head_dim, head_dim, "all", "contiguous", seed)


# ----------------------------------------------------------------------------------------------
# The kernel in the interpreter (one subprocess for all cases, ~10-15 s)


@pytest.fixture(scope="module")
def interpreter_results():
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    process = subprocess.run([sys.executable, "-m", "tests.triton_interpreter_checks"],
                             cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-4000:]
    return json.loads(process.stdout.strip().splitlines()[-1])


@needs_triton
@pytest.mark.parametrize("case", list(checks.CASES))
def test_kernel_in_the_interpreter_matches_the_float64_reference(interpreter_results, case):
    # Each case: ragged query and key blocks (or even ones), head_dim 16-128, float32 / float16 /
    # bfloat16, cross-attention, strided views, single tangents, and attention_jvp end to end.
    result = interpreter_results[case]
    assert result["ok"], result


# ----------------------------------------------------------------------------------------------
# Choosing the pass (no triton needed)


class FakeTritonModule:
    """Stands in for attention_triton: claims support for everything and must never run."""

    @staticmethod
    def unsupported_reason(q, k, v):
        return None

    @staticmethod
    def attention_tangent(*args, **kwargs):
        raise AssertionError("the Triton kernel ran")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_auto_on_cpu_never_picks_triton(monkeypatch, dtype):
    monkeypatch.setattr(attention_module, "_triton_module", lambda: FakeTritonModule)
    q, k, v, tq, tk, tv = cpu_inputs(dtype)
    monkeypatch.setattr(attention_module, "TRITON_VERIFIED_ON_GPU", False)
    chosen, why = explain_tangent_pass(q, k, v)
    assert chosen == "logsumexp" and "opt-in" in why, (chosen, why)
    # Also once the kernel is marked verified on a GPU: CPU inputs still keep the PyTorch pass.
    monkeypatch.setattr(attention_module, "TRITON_VERIFIED_ON_GPU", True)
    chosen, why = explain_tangent_pass(q, k, v)
    assert chosen == "logsumexp" and "CUDA" in why, (chosen, why)
    attention_jvp(q, k, v, tq, tk, tv)  # would raise if the kernel ran


def test_auto_with_compile_tangent_keeps_the_pytorch_pass_and_rejects_triton():
    q, k, v, *_ = cpu_inputs()
    assert explain_tangent_pass(q, k, v, "auto", compile_tangent=True)[0] == "logsumexp"
    with pytest.raises(ValueError, match="compile_tangent"):
        explain_tangent_pass(q, k, v, "triton", compile_tangent=True)


def test_requesting_triton_where_it_cannot_run_says_why(monkeypatch):
    q, k, v, tq, tk, tv = cpu_inputs()
    # CPU tensors without the interpreter (this process never sets TRITON_INTERPRET).
    expected = "TRITON_INTERPRET" if HAS_TRITON else "not importable"
    with pytest.raises(RuntimeError, match=expected):
        attention_jvp(q, k, v, tq, tk, tv, tangent_pass="triton")
    monkeypatch.setattr(attention_module, "_triton_module", lambda: None)
    with pytest.raises(RuntimeError, match="triton is not importable"):
        explain_tangent_pass(q, k, v, "triton")
    # Unequal head sizes: the CPU fused kernel returns no lse, "auto" falls back to online softmax.
    q2, k2, v2, *_ = checks.make_inputs(torch.float32, 1, 1, 8, 8, 16, 32, "all", "contiguous", 1)
    assert explain_tangent_pass(q2, k2, v2)[0] == "online"
    with pytest.raises(RuntimeError, match="log-sum-exp"):
        explain_tangent_pass(q2, k2, v2, "triton")


def test_the_choice_is_logged_once_per_reason(caplog):
    q, k, v, tq, tk, tv = cpu_inputs(seq=10, head_dim=16)
    attention_module._LOGGED_CHOICES.clear()
    with caplog.at_level(logging.INFO, logger=attention_module.__name__):
        for _ in range(3):
            attention_jvp(q, k, v, tq, tk, tv)
    messages = [r.getMessage() for r in caplog.records if r.name == attention_module.__name__]
    assert len(messages) == 1 and "logsumexp" in messages[0], messages


@needs_triton
def test_autotune_configs_are_pruned_by_shared_memory_and_defaults_fit():
    from mfmegatron.jvp import attention_triton as at

    hopper_limit = 227 * 1024  # shared_memory_per_block_optin on H100 / H200
    for head_dim in at.SUPPORTED_HEAD_DIMS:
        for dtype in (torch.bfloat16, torch.float32):
            c = at.default_config(head_dim, head_dim, dtype)
            size = at.shared_memory_bytes(c["BLOCK_M"], c["BLOCK_N"], c["num_stages"], head_dim,
                                          head_dim, dtype.itemsize)
            assert size <= hopper_limit, (head_dim, dtype, c, size)
    # With the device's limit known, head_dim 128 gets the larger tiles where they fit, else 64 x 64.
    tuned = at.default_config(128, 128, torch.bfloat16, shared_memory_limit=hopper_limit)
    assert (tuned["BLOCK_M"], tuned["BLOCK_N"]) == (128, 32)
    assert at.shared_memory_bytes(128, 32, tuned["num_stages"], 128, 128, 2) <= hopper_limit
    small = at.default_config(128, 128, torch.bfloat16, shared_memory_limit=99 * 1024)
    assert small == at.default_config(128, 128, torch.bfloat16)
    fitting_128 = [c for c in at.AUTOTUNE_CONFIGS if at.shared_memory_bytes(
        c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages, 128, 128, 2) <= hopper_limit]
    assert 2 <= len(fitting_128) < len(at.AUTOTUNE_CONFIGS)


# ----------------------------------------------------------------------------------------------
# The compiled kernel on a GPU (skipped here; for the next session with one)

CUDA_SHAPES = [  # batch, heads, q_len, k_len, head_dim, v_dim
    (1, 3, 333, 333, 128, 128),    # ragged against every block size
    (2, 2, 256, 512, 128, 128),    # even key blocks
    (2, 2, 70, 130, 64, 64),
    (1, 2, 45, 77, 32, 64),        # cross-attention, v wider than q / k
    (1, 1, 1, 17, 16, 16),
]
# Every shape in bf16 (the training dtype); two in fp16 and fp32 (each case compiles a kernel).
CUDA_CASES = ([(torch.bfloat16, shape) for shape in CUDA_SHAPES]
              + [(dtype, shape) for dtype in (torch.float16, torch.float32) for shape in CUDA_SHAPES[:2]])


@needs_cuda_and_triton
@pytest.mark.parametrize("dtype, shape", CUDA_CASES,
                         ids=[f"{str(d)[6:]}-{'x'.join(map(str, s))}" for d, s in CUDA_CASES])
def test_cuda_kernel_matches_the_reference(dtype, shape):
    from mfmegatron.jvp import attention_triton

    batch, heads, q_len, k_len, head_dim, v_dim = shape
    inputs = checks.make_inputs(dtype, batch, heads, q_len, k_len, head_dim, v_dim, "all",
                                "contiguous", seed=q_len)
    inputs = tuple(x.cuda() for x in inputs)
    scale = head_dim ** -0.5
    o, lse = checks.primal_and_lse(*inputs[:3], scale, "contiguous")
    to = attention_triton.attention_tangent(*inputs, o, lse, scale)
    result = checks.compare(to.cpu(), tuple(x.cpu() for x in inputs), o.cpu(), lse.cpu(), scale)
    assert result["ok"], result


@needs_cuda_and_triton
def test_cuda_triton_pass_for_bf16_matches_the_pytorch_pass():
    # FLUX-like: heads x 128, strided [seq, batch, heads, dim] views, a ragged length.
    inputs = checks.make_inputs(torch.bfloat16, 1, 4, 600, 600, 128, 128, "all", "strided", 7)
    q, k, v, tq, tk, tv = (x.cuda() for x in inputs)
    # "auto" picks the kernel only once it is marked verified on a GPU (attention.py).
    from mfmegatron.jvp import attention as attention_module

    assert (explain_tangent_pass(q, k, v)[0] == "triton") == attention_module.TRITON_VERIFIED_ON_GPU
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    o, to = attention_jvp(*leaves, tq, tk, tv, tangent_pass="triton")
    assert o.grad_fn is not None and not to.requires_grad and to.dtype == torch.bfloat16
    _, to_pytorch = attention_jvp(q, k, v, tq, tk, tv, tangent_pass="logsumexp")
    _, to_expected = attention_jvp(*(x.double() for x in (q, k, v, tq, tk, tv)), tangent_pass="online")
    largest = to_expected.abs().max()
    triton_error = ((to.double() - to_expected).abs().max() / largest).item()
    pytorch_error = ((to_pytorch.double() - to_expected).abs().max() / largest).item()
    # Both round P and P∘tS to bf16 for tensor cores; the kernel should be about as accurate.
    assert triton_error <= checks.TOLERANCE["bfloat16"], (triton_error, pytorch_error)
    assert triton_error <= 2 * pytorch_error + 2e-3, (triton_error, pytorch_error)


@needs_cuda_and_triton
@pytest.mark.parametrize("config_index", range(6))
def test_cuda_every_autotune_config_that_fits_is_correct(config_index):
    from mfmegatron.jvp import attention_triton as at

    config = at.AUTOTUNE_CONFIGS[config_index]
    limit = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
    if at.shared_memory_bytes(config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_stages,
                              128, 128, 2) > limit:
        pytest.skip(f"{config} exceeds the shared memory at head_dim 128")
    inputs = checks.make_inputs(torch.bfloat16, 1, 2, 300, 300, 128, 128, "all", "contiguous", 3)
    inputs = tuple(x.cuda() for x in inputs)
    o, lse = checks.primal_and_lse(*inputs[:3], 128 ** -0.5, "contiguous")
    to = at.attention_tangent(*inputs, o, lse, 128 ** -0.5,
                              config={**config.kwargs, "num_warps": config.num_warps,
                                      "num_stages": config.num_stages})
    result = checks.compare(to.cpu(), tuple(x.cpu() for x in inputs), o.cpu(), lse.cpu(), 128 ** -0.5)
    assert result["ok"], result


@needs_cuda_and_triton
def test_cuda_autotune_runs_and_reports_its_choice():
    from mfmegatron.jvp import attention_triton as at

    inputs = checks.make_inputs(torch.bfloat16, 1, 2, 256, 256, 128, 128, "all", "contiguous", 4)
    inputs = tuple(x.cuda() for x in inputs)
    o, lse = checks.primal_and_lse(*inputs[:3], 128 ** -0.5, "contiguous")
    to = at.attention_tangent(*inputs, o, lse, 128 ** -0.5, autotune=True)
    assert at.last_autotuned_config() is not None
    result = checks.compare(to.cpu(), tuple(x.cpu() for x in inputs), o.cpu(), lse.cpu(), 128 ** -0.5)
    assert result["ok"], result
