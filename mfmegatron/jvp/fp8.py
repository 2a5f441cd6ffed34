"""FP8 for the primal GEMMs only, and the one place a primal GEMM enters it.

A forward-mode step computes the primal (trained, through Transformer Engine's FP8 GEMMs when
``config.fp8`` is set) and the tangent (a stop-gradient target). The tangent GEMM uses the same
weight in bf16 and must never run inside the primal's FP8 autocast: TE keeps per-module amax
histories and scales that a tangent — a different tensor, of a different magnitude — would
corrupt (delayed scaling) or quantize (every recipe).

So every tensor-parallel linear, local or TE, runs its primal GEMM inside ``primal_gemm_region``
and its tangent GEMM through ``tangent_gemm``, which refuses to run while a primal region — or
any TE FP8 autocast, however entered — is active. The region is entered for every primal GEMM
whether or not FP8 is on (on CPU it only does the bookkeeping), so the CPU tests exercise the same
structure a GPU run has. ``counters`` records how often each ran, so a test can show both were
engaged.

Configuration checks (``precision_problem``) run before any model is built: FP8 without TE, FP8
on a machine without FP8 support, and TE requested but not importable are each one line.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import torch
import torch.nn.functional as F

FP8_RECIPES = ("off", "delayed", "tensorwise", "blockwise")
"""``model.fp8`` values: off, delayed scaling (amax history), current (per-tensor) scaling, and
1x128 / 128x128 block scaling (Hopper, CUDA >= 12.9)."""

FP8_TEACHER_WEIGHT_RECIPES = ("tensorwise", "blockwise")
"""Recipes under which the frozen teacher's weights are stored as FP8 tensors. Their scales come
from the weight itself when it is quantized (per tensor / per 128x128 block). Not delayed
scaling: a weight quantized at construction would use the initial scale (1.0, before any amax
history) and, never updated by an optimizer, never be re-quantized."""

FP8_MIN_CAPABILITY = (8, 9)
BLOCKWISE_MIN_CAPABILITY = (9, 0)


class TangentInFP8RegionError(RuntimeError):
    """A tangent GEMM was asked to run inside the primal's FP8 region."""


class _State(threading.local):
    def __init__(self):
        self.depth = 0


_state = _State()
counters = {"primal_regions": 0, "fp8_primal_regions": 0, "tangent_gemms": 0}
"""How many primal GEMM regions were entered (and of them, in an FP8 autocast) and tangent GEMMs
run: tests and ``tools/te_checks.py`` reset and read it to show which paths ran."""


@functools.cache
def transformer_engine_import_error() -> str | None:
    """None when ``transformer_engine.pytorch`` imports; else the error, in one line."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as error:  # ImportError, or OSError from a core library that does not load
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return None


def transformer_engine_available() -> bool:
    return transformer_engine_import_error() is None


def _te_fp8_enabled() -> bool:
    if transformer_engine_import_error() is not None:
        return False
    from transformer_engine.pytorch.fp8 import FP8GlobalStateManager

    return FP8GlobalStateManager.is_fp8_enabled()


def in_primal_fp8_region() -> bool:
    """True inside ``primal_gemm_region`` or any TE FP8 autocast."""
    return _state.depth > 0 or _te_fp8_enabled()


@contextlib.contextmanager
def primal_gemm_region(autocast=None):
    """Where a primal GEMM runs: ``autocast`` (TE's FP8 autocast of the layer's recipe, or None
    for bf16) is entered here and nowhere else."""
    counters["primal_regions"] += 1
    counters["fp8_primal_regions"] += autocast is not None
    _state.depth += 1
    try:
        with autocast if autocast is not None else contextlib.nullcontext():
            yield
    finally:
        _state.depth -= 1


def tangent_gemm(tx, weight):
    """``tx Wᵀ`` without a graph, outside any FP8 region, with ``weight`` in its high-precision
    form (a TE FP8 parameter is dequantized: the teacher's FP8 weights)."""
    if tx is None:
        return None
    if in_primal_fp8_region():
        raise TangentInFP8RegionError(
            "a tangent GEMM ran inside the primal's FP8 region; tangents must stay outside "
            "fp8 autocast (mfmegatron/jvp/fp8.py)"
        )
    counters["tangent_gemms"] += 1
    with torch.no_grad():
        if _is_te_quantized(weight):
            weight = weight.dequantize()
        return F.linear(tx, weight)


def _is_te_quantized(weight) -> bool:
    """A TE FP8 parameter (``QuantizedTensor``: Float8Tensor, the block-scaled one, ...)."""
    if type(weight) in (torch.Tensor, torch.nn.Parameter) or transformer_engine_import_error() is not None:
        return False
    from transformer_engine.pytorch import QuantizedTensor

    return isinstance(weight, QuantizedTensor)


def reset_counters() -> None:
    for key in counters:
        counters[key] = 0


# --------------------------------------------------------------------------- configuration


def megatron_fp8_settings(fp8: str) -> dict:
    """TransformerConfig fields for ``model.fp8``: format (E4M3 forward / E5M2 backward, except
    block scaling, which TE runs in E4M3) and megatron's ``Fp8Recipe``."""
    if fp8 not in FP8_RECIPES:
        raise ValueError(f"fp8 must be one of {', '.join(FP8_RECIPES)}, got {fp8!r}")
    if fp8 == "off":
        return {"fp8": None}
    from megatron.core.enums import Fp8Recipe

    return {"fp8": "e4m3" if fp8 == "blockwise" else "hybrid", "fp8_recipe": Fp8Recipe(fp8)}


def precision_problem(fp8: str, use_transformer_engine: bool | None, device: str | None = None) -> str | None:
    """Why ``model.fp8`` / ``model.use_transformer_engine`` cannot run here, in one line, or None.

    ``device``: "cuda" or "cpu" (None: cuda when available)."""
    if fp8 not in FP8_RECIPES:
        return f"model.fp8={fp8!r} is not one of {', '.join(FP8_RECIPES)}"
    te_error = transformer_engine_import_error()
    if use_transformer_engine and te_error is not None:
        return (f"model.use_transformer_engine=true but Transformer Engine does not import ({te_error}); "
                "install it (README, GPU checks) or set model.use_transformer_engine=null")
    if fp8 == "off":
        return None
    if use_transformer_engine is False:
        return f"model.fp8={fp8} runs through Transformer Engine layers, but model.use_transformer_engine=false"
    if te_error is not None:
        return f"model.fp8={fp8} needs Transformer Engine, which does not import ({te_error}); set model.fp8=off"
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device != "cuda":
        return f"model.fp8={fp8} needs a CUDA GPU with FP8 support (compute capability >= 8.9); this run is on {device}"
    capability = torch.cuda.get_device_capability()
    needed = BLOCKWISE_MIN_CAPABILITY if fp8 == "blockwise" else FP8_MIN_CAPABILITY
    if capability < needed:
        name = torch.cuda.get_device_name()
        return (f"model.fp8={fp8} needs compute capability >= {needed[0]}.{needed[1]}; {name} has "
                f"{capability[0]}.{capability[1]}; set model.fp8=off")
    return None


def teacher_weights_in_fp8(fp8: str, requested: bool) -> bool:
    """Whether the teacher's TE weights become FP8 tensors (``model.fp8_teacher_weights``)."""
    return requested and fp8 in FP8_TEACHER_WEIGHT_RECIPES


def use_transformer_engine_here(use_transformer_engine: bool | None) -> bool:
    """The spec choice: True/False as asked; None: TE when it imports and CUDA is available (TE
    modules are CUDA-only)."""
    if use_transformer_engine is not None:
        return use_transformer_engine
    return transformer_engine_available() and torch.cuda.is_available()


# --------------------------------------------------------------------------- activation recompute


def recompute_phase(first: bool):
    """TE's activation-recompute context (what megatron's ``te_checkpoint`` runs through
    ``transformer_engine.pytorch.distributed.checkpoint``): in the first forward (``first``) TE
    layers with delayed scaling stash the amax history and scale they used, and the backward's
    recompute runs on exactly those, so the recomputed primal equals the first (and the scaling
    state is not advanced twice). A no-op without TE, and for the current-scaling recipes."""
    if transformer_engine_import_error() is not None:
        return contextlib.nullcontext()
    from transformer_engine.pytorch.distributed import activation_recompute_forward

    return activation_recompute_forward(activation_recompute=True, recompute_phase=not first)


@contextlib.contextmanager
def quantized_weights(config):
    """Where the teacher's frozen TE weights are built as FP8 tensors (``config.fp8_param``): TE's
    ``quantized_model_init`` (``fp8_model_init`` before TE 2.8), quantized once at construction and
    at every ``copy_`` into them; no high-precision copy is kept (the teacher is never trained).
    A no-op unless ``config.fp8_param``."""
    if not getattr(config, "fp8_param", False):
        yield
        return
    import transformer_engine.pytorch as te_pytorch
    from megatron.core.fp8_utils import get_fp8_recipe

    init = getattr(te_pytorch, "quantized_model_init", None) or te_pytorch.fp8_model_init
    with init(enabled=True, recipe=get_fp8_recipe(config), preserve_high_precision_init_val=False):
        yield
