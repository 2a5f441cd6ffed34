"""torch's Adam inside megatron-core's DistributedOptimizer, made checkpointable.

Without Transformer Engine or apex, megatron-core 0.19 builds its optimizers on torch's
``AdamW``, which keeps Adam's step counter per parameter, as a tensor in ``state[p]["step"]``;
TE's and apex's FusedAdam keep it in the param groups and hold only ``exp_avg``/``exp_avg_sq``
per parameter. The DistributedOptimizer (``megatron/core/optimizer/distrib_optimizer.py``) saves
the step in the param groups and converts in its ``if not HAVE_APEX_OR_TE`` branches, but three
places assume FusedAdam's layout, and each stops a resume with torch's Adam:

1. ``state_dict()`` takes the step from the per-parameter state and asserts there is exactly one
   value. Loading calls ``sharded_state_dict(is_loading=True)``, which calls ``state_dict()``
   on a fresh optimizer whose AdamW state is still empty (torch allocates it at the first step):
   AssertionError. (megatron's Adam ``init_state_fn`` in ``optimizer/__init__.py`` allocates the
   moments without a ``step``, FusedAdam-style, and the DistributedOptimizer does not call it.)
2. ``load_parameter_state_from_fully_reshardable`` leaves ``step`` out of each parameter's loaded
   tensors, then ``_set_main_param_and_optimizer_states`` copies into every tensor of the live
   per-parameter state, ``step`` included: KeyError 'step'.
3. ``load_state_dict()`` puts one and the same step tensor into every parameter's state; torch's
   ``Optimizer.load_state_dict`` does not copy ``step``, and AdamW increments each state's step in
   place, so a shared counter would advance once per parameter per step.

:class:`TorchAdamStepAdapter` gives the DistributedOptimizer FusedAdam's layout where it looks,
using only torch's public hooks on the one torch optimizer object (nothing in megatron is
patched): after a state dict is loaded the step is taken out of the per-parameter state and kept
as one number (2); before a state dict is taken or a step runs, every parameter gets its own
step tensor back (3), and before a state dict is taken, empty state is allocated exactly as
AdamW's first step would (1: step 0, zero moments, so the next step is unchanged). With TE/apex
(FusedAdam) it is not installed.
"""

from __future__ import annotations

import torch


def _scalar_dtype(fused: bool) -> torch.dtype:
    # As torch.optim.optimizer._get_scalar_dtype: the dtype of Adam's step tensor.
    return torch.float64 if torch.get_default_dtype() == torch.float64 and not fused else torch.float32


class TorchAdamStepAdapter:
    """The step bookkeeping between one torch ``Adam``/``AdamW`` and megatron's
    DistributedOptimizer around it. Installed with :func:`make_torch_adam_checkpointable`."""

    def __init__(self, adam: torch.optim.Adam):
        self.adam = adam
        self.loaded_step: float | None = None  # set between a load and the next state use
        adam.register_load_state_dict_post_hook(self._after_load)
        adam.register_state_dict_pre_hook(self._before_state_dict)
        adam.register_step_pre_hook(self._before_step)

    def _step_tensor(self, group: dict, param: torch.Tensor, value: float) -> torch.Tensor:
        # Where AdamW's lazy initialisation puts it: on the parameter's device only for
        # capturable/fused AdamW, on the CPU otherwise.
        fused = group.get("fused") or False
        if group.get("capturable") or fused:
            return torch.tensor(value, dtype=_scalar_dtype(fused), device=param.device)
        return torch.tensor(value, dtype=_scalar_dtype(False))

    def _restore(self, allocate: bool) -> None:
        for group in self.adam.param_groups:
            for param in group["params"]:
                state = self.adam.state[param]
                if not state:
                    if not allocate:
                        continue
                    state["step"] = self._step_tensor(group, param, 0.0)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    if group.get("amsgrad"):
                        state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                elif "step" not in state and self.loaded_step is not None:
                    state["step"] = self._step_tensor(group, param, self.loaded_step)
        self.loaded_step = None

    def _after_load(self, adam: torch.optim.Adam) -> None:
        steps = {float(state.pop("step")) for state in adam.state.values() if "step" in state}
        if len(steps) > 1:
            raise RuntimeError(f"the loaded Adam state has several step counts: {sorted(steps)}")
        self.loaded_step = steps.pop() if steps else None

    def _before_state_dict(self, adam: torch.optim.Adam) -> None:
        self._restore(allocate=True)

    def _before_step(self, adam: torch.optim.Adam, args, kwargs) -> None:
        self._restore(allocate=False)


def make_torch_adam_checkpointable(optimizer) -> list[TorchAdamStepAdapter]:
    """Adapt every torch Adam inside a DistributedOptimizer of ``optimizer`` (a megatron optimizer,
    chained or not). Returns the adapters: none with TE/apex or without the distributed
    optimizer. Call once per optimizer."""
    from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE, DistributedOptimizer

    if HAVE_APEX_OR_TE:  # FusedAdam: megatron's own layout
        return []
    adapters = []
    for megatron_optimizer in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(megatron_optimizer, "optimizer", None)
        if isinstance(megatron_optimizer, DistributedOptimizer) and isinstance(inner, torch.optim.Adam):
            adapters.append(TorchAdamStepAdapter(inner))
    return adapters
