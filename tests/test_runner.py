"""The trainer's NetworkRunner: no-grad evaluations in micro-batches sized by rows, not by the
training passes' micro-batch count, with the same outputs."""

from __future__ import annotations

import torch

from mfmegatron.parallel import run_on_ranks


def _evaluations(batch):
    from mfmegatron.parallel import initialize_parallel
    from mfmegatron.training.runner import NetworkRunner
    from models.flux.config import tiny_flux_config
    from models.flux.meanflow import FluxCondition
    from models.flux.parallelize import build_flux_model
    from models.flux.training import FluxFamily

    initialize_parallel()
    torch.manual_seed(0)
    model = build_flux_model(tiny_flux_config(mean_flow_student=True))
    family = FluxFamily()
    calls = []
    stage_forward = family.stage_forward

    def counted(model, z, r, t, cond, tangents):
        calls.append(z.shape[0])
        return stage_forward(model, z, r, t, cond, tangents)

    family.stage_forward = counted
    cond = FluxCondition(batch["encoder_hidden_states"], batch["pooled_projections"], batch["img_ids"],
                         batch["txt_ids"], batch["guidance"])
    z, t = batch["hidden_states"], batch["timestep"]
    r, tangents = t * 0.5, (torch.randn_like(z), torch.zeros_like(t), torch.ones_like(t))
    results = {}
    # 8 rows; the training passes would use 4 micro-batches of 2.
    for name, rows, jvp_rows in (("training micro-batches", None, None), ("budget", 8, 3), ("one row", 1, 1)):
        runner = NetworkRunner(family, model, 4, no_grad_rows=rows, no_grad_jvp_rows=jvp_rows)
        calls.clear()
        u = runner.mean_velocity(z, r, t, cond)
        plain_calls = list(calls)
        calls.clear()
        ju, du = runner.mean_velocity_jvp(z, r, t, cond, tangents)
        results[name] = {"u": u, "ju": ju, "du": du, "plain_calls": plain_calls, "jvp_calls": list(calls),
                         "forwards": runner.sample_forwards}
    return results


def test_no_grad_micro_batches_are_sized_by_rows_and_give_the_same_outputs():
    from tests.flux_fixtures import flux_batch

    batch = flux_batch(torch.float32)
    batch = {k: torch.cat([v] * 4) if k not in ("img_ids", "txt_ids") else v for k, v in batch.items()}
    results = run_on_ranks(_evaluations, 1, batch, timeout=300)[0]
    assert results["training micro-batches"]["plain_calls"] == [2, 2, 2, 2]
    assert results["budget"]["plain_calls"] == [8] and results["budget"]["jvp_calls"] == [3, 3, 2]
    assert results["one row"]["plain_calls"] == [1] * 8
    reference = results["training micro-batches"]
    for name in ("budget", "one row"):
        for key in ("u", "ju", "du"):
            # float32: a GEMM over 8 rows rounds differently from one over 2
            torch.testing.assert_close(results[name][key], reference[key], rtol=1e-4, atol=1e-5)
        assert results[name]["u"].dtype == torch.float32
        # 8 rows without and 8 with a tangent: 8 + 16 sample forwards, however they are split.
        assert results[name]["forwards"] == 24.0
