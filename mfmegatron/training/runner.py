"""Running a network stage through megatron's schedules, with or without pipeline parallelism.

The MeanFlow objective calls networks in two ways (see ``mfmegatron.meanflow.passes``):

- no-grad evaluations (teacher velocities, ODE steps, student rollouts, the fake network): here
  ``velocity`` / ``mean_velocity`` / ``mean_velocity_jvp``, which run megatron's forward-only
  schedule and hand the last stage's output (float32) to every pipeline stage, so the
  objective's Python runs identically on all ranks. Their micro-batches are sized by rows (a
  memory budget, see ``no_grad_rows``), not by the training passes' micro-batch count: nothing
  is kept for backward, so far more rows fit;
- training passes: ``run_pass`` runs forward (and the tangent), the pass's loss on the last
  stage, and backward, through megatron's forward-backward schedule (1F1B with PP > 1).
Gradients accumulate in megatron DDP's buffers until the trainer finalises them.

One code path serves PP = 1 too (megatron's no-pipelining schedule loops the micro-batches).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from mfmegatron.flow_matching import time_dtype
from mfmegatron.meanflow.passes import TrainingPass, slice_rows


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def no_grad_max_rows(config, family) -> tuple[int, int]:
    """The most batch rows one no-grad micro-batch holds without and with a tangent: as many as
    fill ``parallel.no_grad_memory_gb`` of activations by the family's estimate per row."""
    budget = config.parallel.no_grad_memory_gb * 1e9
    return tuple(max(1, int(budget // family.no_grad_activation_bytes_per_sample(config, with_tangent)))
                 for with_tangent in (False, True))


def training_slices(batch_size: int, num_microbatches: int) -> list[slice]:
    """The training passes' micro-batches: ``num_microbatches`` equal slices of the batch."""
    if batch_size % num_microbatches:
        raise ValueError(f"batch of {batch_size} does not split into {num_microbatches} micro-batches")
    size = batch_size // num_microbatches
    return [slice(i * size, (i + 1) * size) for i in range(num_microbatches)]


def no_grad_slices(batch_size: int, max_rows: int | None, num_microbatches: int,
                   pipeline_stages: int) -> list[slice]:
    """A no-grad evaluation's micro-batches: at most ``max_rows`` rows each (None: the training
    passes' micro-batches). The planner counts the runner's calls with it."""
    if max_rows is None:
        return training_slices(batch_size, num_microbatches)
    max_rows = max(1, max_rows)
    if pipeline_stages > 1:
        # Pipeline stages exchange fixed shapes, so micro-batches must be equal; at least as
        # many as stages (when the batch allows) keeps every stage busy.
        max_rows = min(max_rows, max(1, batch_size // pipeline_stages))
        max_rows = max(d for d in range(1, max_rows + 1) if batch_size % d == 0)
    return [slice(i, min(i + max_rows, batch_size)) for i in range(0, batch_size, max_rows)]


class NetworkRunner:
    """One network (teacher, student or fake) of this rank's pipeline stage.

    ``family`` knows the backbone's inputs (see ``mfmegatron.training.family.ModelFamily``);
    ``model`` is the stage module, wrapped in megatron DDP when it is trained.
    ``no_grad_rows`` / ``no_grad_jvp_rows``: the most batch rows one no-grad micro-batch holds
    without / with a tangent (None: the training passes' micro-batches).
    """

    def __init__(
        self,
        family,
        model,
        num_microbatches: int,
        no_grad_rows: int | None = None,
        no_grad_jvp_rows: int | None = None,
    ):
        self.family = family
        self.model = model
        self.num_microbatches = num_microbatches
        self.no_grad_rows = no_grad_rows
        self.no_grad_jvp_rows = no_grad_jvp_rows
        # Network evaluations x batch rows since the last reset: a no-grad forward counts 1 per
        # row, with a tangent 2; a training pass 3 (forward + backward), with a tangent 4.
        self.sample_forwards = 0.0

    # -- helpers -------------------------------------------------------------------------------

    def _row_slices(self, batch_size: int) -> list[slice]:
        return training_slices(batch_size, self.num_microbatches)

    def _no_grad_slices(self, batch_size: int, with_tangent: bool) -> list[slice]:
        max_rows = self.no_grad_jvp_rows if with_tangent else self.no_grad_rows
        return no_grad_slices(batch_size, max_rows, self.num_microbatches,
                              parallel_state.get_pipeline_model_parallel_world_size())

    def _schedule(
        self,
        z: torch.Tensor,
        r: torch.Tensor | None,
        t: torch.Tensor,
        cond: Any,
        tangents: tuple | None,
        on_output: Callable,
        forward_only: bool,
        slices: list[slice],
    ):
        """Runs the schedule over ``slices`` of the batch; ``on_output(u, du, rows)`` on the
        last stage returns the loss."""
        batch_size = z.shape[0]
        module = _unwrap(self.model)

        def forward_step(data_iterator, model):
            rows = next(data_iterator)
            pick = lambda x: slice_rows(x, rows, batch_size)  # noqa: E731
            result = self.family.stage_forward(
                _unwrap(model),
                pick(z),
                None if r is None else pick(r),
                pick(t),
                self.family.slice_condition(cond, rows, batch_size),
                None if tangents is None else tuple(pick(x) for x in tangents),
            )
            if not parallel_state.is_pipeline_last_stage():
                return result, None
            u, du = result

            def loss_func(output):
                loss = on_output(output, du, rows)
                return loss, {}

            return u, loss_func

        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(slices),
            model=[self.model],
            num_microbatches=len(slices),
            seq_length=self.family.pipeline_seq_length(module, cond, with_tangent=tangents is not None),
            micro_batch_size=slices[0].stop - slices[0].start,
            forward_only=forward_only,
        )

    def _evaluate(self, z, r, t, cond, tangents):
        """No-grad outputs for the whole batch, in float32 (float64 for a float64 network), on
        every pipeline stage."""
        outputs: list = []
        dtype = time_dtype(_unwrap(self.model).config.params_dtype)

        def keep(u, du, rows):
            # Contiguous: the broadcast to the other stages sends the storage in memory order (a
            # velocity made by permuting a token grid, HunyuanImage 3.0's, is not row-major).
            outputs.append((u.detach().to(dtype).contiguous(),
                            None if du is None else du.detach().to(dtype).contiguous()))
            return torch.zeros((), device=u.device)

        batch_size = z.shape[0]
        with torch.no_grad():
            slices = self._no_grad_slices(batch_size, with_tangent=tangents is not None)
            self._schedule(z, r, t, cond, tangents, keep, forward_only=True, slices=slices)
        self.sample_forwards += batch_size * (1.0 if tangents is None else 2.0)
        # Velocities have the latents' shape; stages other than the last receive them.
        empty = lambda: torch.empty(z.shape, dtype=dtype, device=z.device)  # noqa: E731
        u = torch.cat([o[0] for o in outputs]) if outputs else empty()
        _broadcast_from_last_stage(u)
        if tangents is None:
            return u
        du = torch.cat([o[1] for o in outputs]) if outputs else empty()
        _broadcast_from_last_stage(du)
        return u, du

    # -- the FlowTeacher / MeanFlowStudent protocols (no grad) ----------------------------------

    def velocity(self, z, t, cond):
        return self._evaluate(z, None, t, cond, None)

    def mean_velocity(self, z, r, t, cond):
        return self._evaluate(z, r, t, cond, None)

    def mean_velocity_jvp(self, z, r, t, cond, tangents):
        return self._evaluate(z, r, t, cond, tangents)

    # -- training ------------------------------------------------------------------------------

    def run_pass(self, training_pass: TrainingPass, cond) -> tuple[float, dict[str, float]]:
        """Forward (+ tangent), loss and backward of one pass; returns (loss, stats) on every rank.

        The loss is ``training_pass.weight`` times the mean over micro-batches of the pass's
        loss (megatron divides each micro-batch's loss by their number).
        """
        p = training_pass
        losses: list[torch.Tensor] = []
        stats: list[dict[str, float]] = []

        def loss(u, du, rows):
            value, pass_stats = p.loss_fn(u, du, rows)
            losses.append(value.detach())
            stats.append(pass_stats)
            return value * p.weight

        r = None if p.network == "flow" else p.r
        batch_size = p.z.shape[0]
        self._schedule(p.z, r, p.t, cond, p.tangents, loss, forward_only=False, slices=self._row_slices(batch_size))
        self.sample_forwards += batch_size * (3.0 if p.tangents is None else 4.0)
        summary = None
        if parallel_state.is_pipeline_last_stage():
            mean_stats = {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]} if stats else {}
            summary = (float(torch.stack(losses).mean()), mean_stats)
        return _broadcast_object_from_last_stage(summary)


def _last_stage_rank() -> int:
    return parallel_state.get_pipeline_model_parallel_last_rank()


def _broadcast_from_last_stage(tensor: torch.Tensor) -> None:
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return
    dist.broadcast(tensor, src=_last_stage_rank(), group=parallel_state.get_pipeline_model_parallel_group())


def _broadcast_object_from_last_stage(value):
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(
        holder, src=_last_stage_rank(), group=parallel_state.get_pipeline_model_parallel_group()
    )
    return holder[0]
