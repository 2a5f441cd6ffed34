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

import functools
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


def _cpu_if_cuda(device: Any) -> Any:
    if device is not None and torch.device(device).type == "cuda":
        return "cpu"
    return device


def _on_cpu(factory):
    def create(*args: Any, device: Any = None, **kwargs: Any) -> torch.Tensor:
        return factory(*args, device=_cpu_if_cuda(device), **kwargs)

    return create


class _TorchWithCudaTensorsOnCpu(types.ModuleType):
    """The ``torch`` module as seen by one megatron module, with ``device="cuda"`` mapped to CPU.

    Some megatron modules build small bookkeeping tensors with an explicit ``device="cuda"``
    (the schedules' token counter, the optimizers' loss scale and found-inf flags, grad-norm
    buffers). Replacing ``torch`` in those modules' namespaces only keeps the redirect scoped.
    """

    tensor = staticmethod(_on_cpu(torch.tensor))
    zeros = staticmethod(_on_cpu(torch.zeros))
    ones = staticmethod(_on_cpu(torch.ones))
    empty = staticmethod(_on_cpu(torch.empty))
    full = staticmethod(_on_cpu(torch.full))

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _reporting_cuda_type_names(function):
    """Run ``function`` while CPU tensors' ``.type()`` reads like CUDA's ('torch.cuda.FloatTensor').

    megatron's optimizers sort parameters by comparing ``param.type()`` with CUDA type names and
    reject anything else; on CPU the same parameters are 'torch.FloatTensor' etc. The swap lasts
    for the call only.
    """

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        original = torch.Tensor.type

        def cuda_style_type(self, dtype=None, non_blocking=False, **more):
            if dtype is None and not self.is_cuda:
                return original(self).replace("torch.", "torch.cuda.", 1)
            return original(self, dtype, non_blocking, **more)

        torch.Tensor.type = cuda_style_type
        try:
            return function(*args, **kwargs)
        finally:
            torch.Tensor.type = original

    return wrapper


# --- applying the redirects -------------------------------------------------------------------


def _gather_uneven_on_gloo(original):
    """megatron's ``_gather_along_first_dim`` for gloo, whose all_gather needs equal sizes: with
    ``output_split_sizes`` (the MoE dispatcher's token counts under expert TP) each rank's part is
    padded to the largest, gathered, and the padding cut off."""

    def gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return original(input_, group, output_split_sizes, use_global_buffer)
        padded = input_.new_zeros((max(output_split_sizes), *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        parts = [torch.empty_like(padded) for _ in output_split_sizes]
        torch.distributed.all_gather(parts, padded, group=group)
        return torch.cat([part[:size] for part, size in zip(parts, output_split_sizes)])

    return gather


def _reduce_scatter_uneven_on_gloo(original):
    """megatron's ``_reduce_scatter_along_first_dim`` for gloo, which has no uneven reduce-scatter:
    with ``input_split_sizes`` the whole tensor is all-reduced and this rank keeps its rows."""

    def reduce_scatter(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return original(input_, group, input_split_sizes, use_global_buffer)
        total = input_.clone()
        torch.distributed.all_reduce(total, group=group)
        return total.split(list(input_split_sizes))[group.rank()].contiguous()

    return reduce_scatter


def _replace(module_name: str, attribute: str, value: Any, why: str) -> None:
    module = importlib.import_module(module_name)
    if not hasattr(module, attribute):
        raise PlatformSupportError(
            f"{module_name}.{attribute} no longer exists (megatron-core/torch changed?); "
            f"mfmegatron.parallel.cpu_platform redirects it because: {why}"
        )
    setattr(module, attribute, value)
    _APPLIED.append(Redirect(module_name, attribute, why))


def _replace_attribute(owner: type, attribute: str, value: Any, why: str) -> None:
    if attribute not in vars(owner):
        raise PlatformSupportError(
            f"{owner.__module__}.{owner.__qualname__}.{attribute} no longer exists "
            f"(megatron-core changed?); mfmegatron.parallel.cpu_platform redirects it because: {why}"
        )
    setattr(owner, attribute, value)
    _APPLIED.append(Redirect(owner.__module__, f"{owner.__qualname__}.{attribute}", why))


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
    mappings = importlib.import_module("megatron.core.tensor_parallel.mappings")
    _replace(
        "megatron.core.tensor_parallel.mappings", "_gather_along_first_dim",
        _gather_uneven_on_gloo(mappings._gather_along_first_dim),
        "the MoE dispatcher gathers uneven token counts over expert TP; gloo's all_gather needs equal sizes",
    )
    _replace(
        "megatron.core.tensor_parallel.mappings", "_reduce_scatter_along_first_dim",
        _reduce_scatter_uneven_on_gloo(mappings._reduce_scatter_along_first_dim),
        "its backward reduce-scatters uneven token counts; gloo has no uneven reduce-scatter",
    )
    for module, what in (
        ("megatron.core.pipeline_parallel.schedules", "the token counter"),
        ("megatron.core.optimizer.optimizer", "loss scale, found-inf flags"),
        ("megatron.core.optimizer.distrib_optimizer", "main-param buffers"),
        ("megatron.core.optimizer.clip_grads", "grad-norm and zero-count buffers"),
        ("megatron.core.optimizer.grad_scaler", "loss-scale state"),
        ("megatron.core.utils", "the local multi-tensor l2-norm result"),
    ):
        _replace(module, "torch", _TorchWithCudaTensorsOnCpu(), f"torch.*(device='cuda') for {what}")

    optimizer = importlib.import_module("megatron.core.optimizer.optimizer")
    distrib_optimizer = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
    clip_grads = importlib.import_module("megatron.core.optimizer.clip_grads")
    for owner, name in (
        (optimizer.Float16OptimizerWithFloat16Params, "__init__"),
        (distrib_optimizer.DistributedOptimizer, "__init__"),
    ):
        _replace_attribute(
            owner, name, _reporting_cuda_type_names(getattr(owner, name)),
            "sorts parameters by param.type() == 'torch.cuda.*Tensor'",
        )
    clip = _reporting_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
    why = "asserts param.grad.type() == 'torch.cuda.FloatTensor'"
    _replace("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32", clip, why)
    _replace("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32", clip, why)
    return list(_APPLIED)


