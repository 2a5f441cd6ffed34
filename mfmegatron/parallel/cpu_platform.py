"""Lets megatron-core run on machines without CUDA (gloo backend, CPU tensors).

megatron-core assumes a GPU in a handful of places: it asks for the current CUDA device, creates
CUDA streams and RNG states, and builds a few tensors with ``device="cuda"``. On a CPU-only
machine (laptops, CI) every such spot is redirected here, in this one module, and nowhere else.
Nothing is applied when CUDA is available.

Each redirect checks that the thing it replaces still exists, so a megatron-core upgrade that
renames or removes one fails loudly in :func:`apply_cpu_platform_support` (and in
``tests/test_cpu_platform.py``) instead of silently running the CUDA code path.
"""

from __future__ import annotations

import importlib
import types
from dataclasses import dataclass
from typing import Any

import torch


class PlatformSupportError(RuntimeError):
    """A megatron-core spot this module redirects is no longer where we expect it."""


@dataclass(frozen=True)
class Redirect:
    """One replaced attribute: ``module.attribute`` now points to our CPU version."""

    module: str
    attribute: str
    why: str


_APPLIED: list[Redirect] = []


# --- CPU stand-ins ----------------------------------------------------------------------------


class _CpuEvent:
    """What megatron does with a CUDA event: record it, then wait on or synchronize with it."""

    def synchronize(self) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True


class _CpuStream:
    """A CUDA stream stand-in: CPU work runs in program order, so every ordering call is a no-op."""

    def __init__(self, device: Any = None, priority: int = 0, **_: Any) -> None:
        self.device = torch.device("cpu")

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> _CpuEvent:
        return event if event is not None else _CpuEvent()

    def synchronize(self) -> None:
        pass


_DEFAULT_CPU_STREAM = _CpuStream()


def _current_cpu_stream(device: Any = None) -> _CpuStream:
    return _DEFAULT_CPU_STREAM


class _cpu_stream_context:
    """``torch.cuda.stream(s)`` as a context manager that does nothing on CPU."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def __enter__(self) -> Any:
        return self.stream

    def __exit__(self, *exc: Any) -> None:
        return None


def _cpu_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _set_cpu_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _move_tensor_to_cpu_as_after_d2h(
    tensor: Any, as_numpy: bool = False, record_stream: bool = False
) -> Any:
    # On GPU the alltoall dispatcher copies its split sizes to the host and then relies on them
    # being numpy arrays (it indexes and sums them as such). The original skips CPU tensors, which
    # leaves torch tensors behind on a CPU-only machine; convert them the way the D2H copy would.
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.detach().cpu().numpy()
    return tensor


class _TorchWithCudaTensorsOnCpu(types.ModuleType):
    """The ``torch`` module as seen by one megatron module, with ``device="cuda"`` mapped to CPU.

    The pipeline schedules build their token counter with ``torch.zeros(..., device="cuda")``;
    replacing ``torch`` in that module's namespace only (not globally) keeps the redirect scoped.
    """

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def zeros(*size: Any, device: Any = None, **kwargs: Any) -> torch.Tensor:
        if device is not None and torch.device(device).type == "cuda":
            device = "cpu"
        return torch.zeros(*size, device=device, **kwargs)


# --- applying the redirects -------------------------------------------------------------------


def _replace(module_name: str, attribute: str, value: Any, why: str) -> None:
    module = importlib.import_module(module_name)
    if not hasattr(module, attribute):
        raise PlatformSupportError(
            f"{module_name}.{attribute} no longer exists (megatron-core/torch changed?); "
            f"mfmegatron.parallel.cpu_platform redirects it because: {why}"
        )
    setattr(module, attribute, value)
    _APPLIED.append(Redirect(module_name, attribute, why))


def apply_cpu_platform_support() -> list[Redirect]:
    """Apply every redirect once, if and only if CUDA is unavailable. Returns what was applied."""
    if torch.cuda.is_available():
        return []
    if _APPLIED:
        return list(_APPLIED)

    why_device = "megatron allocates buffers on torch.cuda.current_device() (mappings, "
    # torch.cuda.* functions that would raise without a CUDA build/driver. Redirected globally
    # because megatron calls them through the `torch` module in many files; none of them can
    # succeed on a machine without CUDA, so no working code path changes.
    _replace(
        "torch.cuda",
        "current_device",
        torch.cpu.current_device,
        why_device + "GlobalMemoryBuffer, MoE router, p2p shapes); on CPU that is 'cpu'",
    )
    _replace(
        "torch.cuda",
        "Stream",
        _CpuStream,
        "the MoE alltoall dispatcher and DDP's grad-sync create side streams; CPU has one order",
    )
    _replace(
        "torch.cuda",
        "current_stream",
        _current_cpu_stream,
        "the MoE alltoall dispatcher and DDP wait on the current stream",
    )
    _replace(
        "torch.cuda",
        "stream",
        _cpu_stream_context,
        "`with torch.cuda.stream(s):` in the dispatcher and DDP becomes a no-op context",
    )
    _replace(
        "torch.cuda",
        "synchronize",
        torch.cpu.synchronize,
        "dist_checkpointing, p2p and DDP synchronize the device; CPU work is already done",
    )

    # The CUDA RNG tracker (dropout/init streams per TP/EP rank) keeps CUDA generator states.
    # On CPU the same tracker forks the CPU default generator instead.
    random = "megatron.core.tensor_parallel.random"
    _replace(random, "_get_cuda_rng_state", _cpu_rng_state, "the RNG tracker reads CUDA RNG state")
    _replace(random, "_set_cuda_rng_state", _set_cpu_rng_state, "the RNG tracker sets CUDA RNG state")
    _replace(
        "torch.cuda",
        "get_rng_state",
        _cpu_rng_state,
        "CudaRNGStatesTracker.add saves and restores torch.cuda.get_rng_state()",
    )
    _replace(
        "torch.cuda",
        "manual_seed",
        torch.manual_seed,
        "model_parallel_cuda_manual_seed and the tracker seed the CUDA generator",
    )

    _replace(
        "megatron.core.transformer.moe.token_dispatcher",
        "maybe_move_tensor_to_cpu",
        _move_tensor_to_cpu_as_after_d2h,
        "the alltoall dispatcher's split sizes must be numpy arrays as after its D2H copy",
    )
    _replace(
        "megatron.core.pipeline_parallel.schedules",
        "torch",
        _TorchWithCudaTensorsOnCpu(),
        "the schedules create their token counter with torch.zeros(device='cuda')",
    )
    return list(_APPLIED)


def applied_redirects() -> list[Redirect]:
    return list(_APPLIED)

