"""Activation recompute that recomputes only the primal.

In a forward-mode step a block computes its primal output (trained) and its tangent (a
stop-gradient target). With recompute, the forward runs both without saving activations; the
backward re-runs the block *primal only* to rebuild the graph. The tangent has no graph and is not
needed in backward, so it is never recomputed. (FLUX blocks have no dropout, so no RNG state needs
to be replayed.)

With Transformer Engine layers in FP8 the recompute must replay the FP8 scaling state of the first
forward (delayed scaling's amax history and scales): both phases run inside TE's
activation-recompute context (``fp8.recompute_phase``), as megatron's ``te_checkpoint`` does. The
first phase stashes state only when a backward will follow (grad enabled), so that a no-grad use
leaves nothing behind for a later recompute to pick up.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch

from mfmegatron.jvp import fp8

# run(primals, tangents or None) -> (outputs, output_tangents or None); one tangent per output.
BlockFunction = Callable[[tuple, tuple | None], tuple[Sequence[torch.Tensor], Sequence[torch.Tensor] | None]]


class _RecomputePrimal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run: BlockFunction, num_primals: int, anchor: torch.Tensor, *inputs):
        primals, tangents = inputs[:num_primals], inputs[num_primals:]
        ctx.run = run
        ctx.num_tangents = len(tangents)
        ctx.save_for_backward(*primals)
        with torch.no_grad(), (fp8.recompute_phase(first=True) if anchor.requires_grad else contextlib.nullcontext()):
            outputs, output_tangents = run(tuple(primals), tuple(tangents) if tangents else None)
        ctx.num_outputs = len(outputs)
        # An input passed through unchanged that needs no gradient (FLUX's temb in a LoRA fake
        # network) keeps needing none: the anchor below must not make it a trained path.
        passed_through = [o for o in outputs if any(o is p and not p.requires_grad for p in primals)]
        ctx.mark_non_differentiable(*passed_through, *(output_tangents or ()))
        if output_tangents is None:
            return tuple(outputs)
        return tuple(outputs) + tuple(output_tangents)

    @staticmethod
    def backward(ctx, *grads):
        primals = tuple(p.detach().requires_grad_(p.requires_grad) for p in ctx.saved_tensors)
        with torch.enable_grad(), fp8.recompute_phase(first=False):
            outputs, _ = ctx.run(primals, None)
        pairs = [
            (output, grad)
            for output, grad in zip(outputs, grads[: ctx.num_outputs])
            if grad is not None and output.requires_grad
        ]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        primal_grads = tuple(p.grad if p.requires_grad else None for p in primals)
        return (None, None, None) + primal_grads + (None,) * ctx.num_tangents


def checkpoint_primal(
    run: BlockFunction,
    primals: Sequence[torch.Tensor],
    tangents: Sequence[torch.Tensor] | None,
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...] | None]:
    """Runs ``run(primals, tangents)`` without saving activations; backward recomputes the primal.

    ``run`` must compute the same primal outputs whether or not tangents are given (it is called
    with ``None`` in backward). Returns ``(outputs, output_tangents)``.
    """
    tangents = tuple(tangents) if tangents is not None else ()
    # autograd records the Function only when one of its inputs requires grad. A block whose
    # inputs are all frozen may still train parameters (the first block of a LoRA fake network,
    # after its frozen embedders): without this empty input that requires grad, no block of such
    # a network would get a gradient.
    anchor = torch.empty(0, requires_grad=torch.is_grad_enabled())
    results = _RecomputePrimal.apply(run, len(primals), anchor, *primals, *tangents)
    if not tangents:
        return tuple(results), None
    half = len(results) // 2
    return tuple(results[:half]), tuple(results[half:])
