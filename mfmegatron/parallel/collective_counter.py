"""Counting the collectives a process issues: payload bytes, calls and time by group and kind.

``CollectiveCounter`` wraps torch.distributed's collectives everywhere they are referenced
(megatron keeps module-level aliases such as ``dist_all_gather_func``) for the duration of a
``with`` block. Each outermost call is recorded under ``"<group> <kind>"``: the group's name
(``group_names`` maps a process group, or a tuple of ranks, to "tp", "pp", "dp", "ep", ...; the
group object is looked up first, so two groups of the same ranks, such as DP and EP on two ranks,
keep their names; others are "other") and the kind
(all_reduce, all_gather, reduce_scatter, all_to_all, broadcast, send, recv). Bytes are the payload as the
caller holds it whole, the planner's convention (``mfmegatron/planner.py``): an all-gather's
gathered output, a reduce-scatter's input. Calls on groups of one rank, pickled objects and calls
of one number (gradient norms, finiteness flags: ``CONTROL_BYTES``) are not counted.

Time is the wall time of the call. Under CUDA the device is synchronised before and after each
counted call, so the time is the collective's own (and the run is serialised: a measurement,
not a production setting). An asynchronous collective (``async_op=True``) is waited for at once
(the trainer does not overlap them with compute), so its time is the transfer's; an asynchronous
point-to-point call (``isend``, ``irecv``) is timed until it returns, not until its request
completes (waiting could deadlock before the peer posts its side). Calls inside torch's
``_coalescing_manager`` (megatron DDP's gradient reduction) are issued when its block ends; the
block's time is shared among them by their bytes. ``tests/test_planner.py`` checks the planner's bytes
against this count; ``tools/bench_scaling.py`` reports it per layout.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import threading
import time

import torch

_KIND = {  # torch.distributed function -> (kind, which argument is the whole payload)
    "all_reduce": ("all_reduce", 0),
    "all_gather_into_tensor": ("all_gather", 0),  # the gathered output
    "_all_gather_base": ("all_gather", 0),
    "all_gather": ("all_gather", "tensor_list"),  # the list of gathered tensors
    "reduce_scatter_tensor": ("reduce_scatter", 1),  # the input
    "_reduce_scatter_base": ("reduce_scatter", 1),
    "reduce_scatter": ("reduce_scatter", "input_list"),  # uneven rows (the MoE's expert-TP combine)
    "broadcast": ("broadcast", 0),
    "send": ("send", 0),
    "recv": ("recv", 0),
    "isend": ("send", 0),
    "irecv": ("recv", 0),
    "all_to_all_single": ("all_to_all", 1),  # the input (expert-parallel token exchange)
    "broadcast_object_list": (None, None),  # pickled objects: control, not counted
    "all_gather_object": (None, None),
}
# Calls of one number (gradient norms, finiteness flags, loss statistics) are control, not payload.
CONTROL_BYTES = 8


def routing_dependent(key: str, expert_parallel_size: int) -> bool:
    """Whether one rank's bytes under ``key`` ("<group> <kind>") depend on the MoE routing: the
    expert-parallel token exchange, and with EP the expert-TP collectives, which carry the tokens
    a rank received. The planner counts balanced routing, so these match it summed over the
    ranks, not rank by rank."""
    return key == "ep all_to_all" or (expert_parallel_size > 1 and key.startswith("etp "))


def routed_sum_matches(key: str, sent: float, planned: float, backend: str, rel_tol: float = 0.0) -> bool:
    """A routing-dependent key's bytes summed over the ranks against the plan's sum: equal (within
    ``rel_tol``, for per-step averages), but for the expert-TP gather of uneven parts on gloo,
    which pads each part to the largest (``parallel/cpu_platform.py``), so sends at least what
    NCCL would."""
    if backend == "gloo" and key == "etp all_gather":
        return sent >= planned * (1 - rel_tol)
    return abs(sent - planned) <= rel_tol * abs(planned)


def synchronize_device() -> None:
    """Waits for the device (CUDA) to finish queued work, so wall time measures it; a no-op on CPU."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class CollectiveCounter:
    """Counts each outermost collective call's payload bytes, calls and seconds by
    ``"<group> <kind>"``, in total and by ``phase`` (set it between calls to attribute them)."""

    def __init__(self, group_names: dict):
        self.group_names = group_names  # process group or tuple(ranks) -> "tp" / "pp" / "dp" / "ep"
        self.bytes, self.calls, self.seconds = {}, {}, {}
        self.phase = "step"
        self.by_phase = {}  # phase -> {key: [bytes, calls]}
        self._inside = threading.local()
        self._patched = []
        self._coalesced = None  # inside torch's coalescing manager: the (key, bytes) queued

    def _key(self, name, original, args, kwargs) -> tuple[str, int] | None:
        """(key, payload bytes) of a call to count, or None."""
        import torch.distributed as dist

        kind, payload = _KIND[name]
        if kind is None:
            return None
        values = inspect.signature(original).bind(*args, **kwargs).arguments
        group = values.get("group")
        if dist.get_world_size(group) == 1:
            return None
        if isinstance(payload, str):  # the named list of tensors
            size = sum(t.numel() * t.element_size() for t in values[payload])
        else:
            tensor = list(values.values())[payload]
            size = tensor.numel() * tensor.element_size()
        if size <= CONTROL_BYTES:
            return None
        return f"{self.group_name(group)} {kind}", size

    def group_name(self, group) -> str:
        """The name of a call's group: by the group object, else by its ranks, else "other"."""
        import torch.distributed as dist

        group = group if group is not None else dist.group.WORLD
        return self.group_names.get(group) or self.group_names.get(tuple(dist.get_process_group_ranks(group)), "other")

    def _record(self, key: str, size: int, seconds: float) -> None:
        if self._coalesced is not None:  # issued when the coalescing block ends: timed there
            self._coalesced.append((key, size))
            seconds = 0.0
        self.bytes[key] = self.bytes.get(key, 0) + size
        self.calls[key] = self.calls.get(key, 0) + 1
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds
        in_phase = self.by_phase.setdefault(self.phase, {}).setdefault(key, [0, 0])
        in_phase[0] += size
        in_phase[1] += 1

    def _wrap(self, name, original):
        def counted(*args, **kwargs):
            depth = getattr(self._inside, "depth", 0)
            counted_call = self._key(name, original, args, kwargs) if depth == 0 else None
            if counted_call is not None:
                synchronize_device()
                start = time.perf_counter()
            self._inside.depth = depth + 1
            try:
                result = original(*args, **kwargs)
                if counted_call is not None and _KIND[name][0] not in ("send", "recv") and hasattr(result, "wait"):
                    # An asynchronous collective (async_op=True) is waited for here, so its time
                    # is the transfer's; a point-to-point one is not (its peer may not have
                    # posted the matching call yet).
                    result.wait()
                return result
            finally:
                self._inside.depth = depth
                if counted_call is not None:
                    synchronize_device()
                    self._record(*counted_call, time.perf_counter() - start)

        return counted

    def _wrap_coalescing(self, original):
        """torch's ``_coalescing_manager`` (megatron DDP's gradient reduction) queues the calls
        made inside it and issues them together when the block ends; the block's time (waited
        for, when asynchronous) is shared among those calls by their bytes."""

        @contextlib.contextmanager
        def coalesced(*args, **kwargs):
            if self._coalesced is not None or getattr(self._inside, "depth", 0):
                with original(*args, **kwargs) as manager:
                    yield manager
                return
            synchronize_device()
            start = time.perf_counter()
            self._coalesced = []
            try:
                with original(*args, **kwargs) as manager:
                    yield manager
                if manager is not None and kwargs.get("async_ops"):
                    manager.wait()
                synchronize_device()
            finally:
                queued, self._coalesced = self._coalesced, None
            elapsed, total = time.perf_counter() - start, sum(size for _, size in queued)
            for key, size in queued:
                self.seconds[key] = self.seconds.get(key, 0.0) + elapsed * size / total

        return coalesced

    def __enter__(self):
        import torch.distributed as dist

        wrappers = {id(getattr(dist, name)): (getattr(dist, name), self._wrap(name, getattr(dist, name)))
                    for name in _KIND}
        wrappers[id(dist._coalescing_manager)] = (dist._coalescing_manager,
                                                 self._wrap_coalescing(dist._coalescing_manager))
        for module in list(sys.modules.values()):
            if module is None or not module.__name__.startswith(("torch.distributed", "megatron", "mfmegatron")):
                continue
            for attribute, value in list(vars(module).items()):
                if callable(value) and id(value) in wrappers and wrappers[id(value)][0] is value:
                    setattr(module, attribute, wrappers[id(value)][1])
                    self._patched.append((module, attribute, value))
        return self

    def __exit__(self, *error):
        for module, attribute, value in reversed(self._patched):
            setattr(module, attribute, value)
        self._patched = []
