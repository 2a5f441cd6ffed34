"""FLUX on megatron-core against diffusers' FluxTransformer2DModel (the reference).

One spawn of two gloo ranks checks every layout (TP=1, TP=2, TP=2 with sequence parallel, PP=2
under megatron's 1F1B schedule); the diffusers outputs and `torch.func.jvp` references are
computed here in the pytest process.
"""

from __future__ import annotations

import pytest
import torch

from mfmegatron.parallel import run_on_ranks
from tests.flux_fixtures import BATCH, diffusers_flux, flux_batch, flux_inputs, megatron_flux

LAYOUTS = [("tp1", 1, False), ("tp2", 2, False), ("tp2_sp", 2, True)]


def _loss_weights(shape):
    return torch.linspace(-1, 1, torch.Size(shape).numel()).view(shape)


def _synced_full_grads(model, sequence_parallel: bool) -> dict:
    """Every parameter's gradient as the full (TP-gathered) tensor, global key names.

    Replicated parameters whose gradient is partial per TP rank are summed first, as megatron's
    finalize_model_grads does: QK-norm weights (each rank sees its own heads) and, with sequence
    parallel, the parameters used on sequence chunks (marked `sequence_parallel`).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    from models.flux.state_dict_adapter import megatron_block_key_to_global

    group = parallel_state.get_tensor_model_parallel_group()
    world = parallel_state.get_tensor_model_parallel_world_size()
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad.clone()
        partial = "layernorm" in name or (sequence_parallel and getattr(param, "sequence_parallel", False))
        if partial and world > 1:
            dist.all_reduce(grad, group=group)
        if getattr(param, "tensor_model_parallel", False) and world > 1:
            parts = [torch.empty_like(grad) for _ in range(world)]
            dist.all_gather(parts, grad.contiguous(), group=group)
            grad = torch.cat(parts, dim=param.partition_dim)
        grads[megatron_block_key_to_global(name, model.block_range, model.config)] = grad
    return grads


def _tensor_parallel_checks(state32, state64, batch32, batch64, tangents64) -> dict:
    from mfmegatron.parallel import initialize_parallel
    from models.flux.model import FluxTangents
    from models.flux.parallelize import full_weights

    from mfmegatron.parallel import collectives

    results = {}
    for key, tp, sp in LAYOUTS:
        initialize_parallel(tensor_parallel_size=tp)
        model = megatron_flux(state32, tensor_model_parallel_size=tp, sequence_parallel=sp)
        collectives.reset_chunk_counters()
        out = model(flux_inputs(batch32))
        (out * _loss_weights(out.shape)).sum().backward()
        chunk_counters = dict(collectives.chunk_counters)
        model64 = megatron_flux(state64, torch.float64, tensor_model_parallel_size=tp, sequence_parallel=sp)
        out64, tangent64 = model64.forward_jvp(flux_inputs(batch64), FluxTangents(*tangents64))
        results[key] = {
            "out": out.detach(),
            "grads": _synced_full_grads(model, sp),
            "out64": out64.detach(),
            "tangent64": tangent64,
            "tangent_requires_grad": tangent64.requires_grad,
            "chunk_counters": chunk_counters,
            "weights": dict(full_weights(model)),
        }
    return results


def _pipeline_checks(state32, batch32, tangents32) -> dict:
    """PP=2 with megatron's 1F1B schedule: two micro-batches, primal and JVP."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mfmegatron.parallel import initialize_parallel
    from models.flux.model import FluxTangents
    from models.flux.parallelize import pipeline_seq_length

    initialize_parallel(pipeline_parallel_size=2)
    results = {"stage": parallel_state.get_pipeline_model_parallel_rank()}
    for with_tangent in (False, True):
        model = megatron_flux(
            state32, pipeline_model_parallel_size=2, pipeline_dtype=torch.float32,
            pipeline_stage_blocks=(3, 1),  # a stage boundary inside the single-stream blocks
        )
        micro_batches = []
        for mb in range(BATCH):
            batch = {k: (v[mb : mb + 1] if k not in ("img_ids", "txt_ids") else v) for k, v in batch32.items()}
            tangents = FluxTangents(tangents32[0][mb : mb + 1], tangents32[1][mb : mb + 1])
            micro_batches.append((flux_inputs(batch), tangents))
        outputs = []

        def forward_step(data_iterator, model):
            inputs, tangents = next(data_iterator)
            result = model.forward_jvp(inputs, tangents if with_tangent else None)
            if not parallel_state.is_pipeline_last_stage():
                return result, None
            out, tangent = result
            outputs.append((out.detach(), None if tangent is None else tangent))

            def loss_func(output):
                # megatron divides by the number of micro-batches; undo it so the summed loss is
                # the full batch's (out * weights).sum(), as in the single-stage run.
                weights = _loss_weights((BATCH,) + tuple(output.shape[1:]))[len(outputs) - 1]
                loss = (output * weights).sum() * BATCH
                return loss, {"loss": loss.detach().clone()}

            return out, loss_func

        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=[model],
            num_microbatches=BATCH,
            seq_length=pipeline_seq_length(model.config, batch32["txt_ids"].shape[0], batch32["img_ids"].shape[0], with_tangent),
            micro_batch_size=1,
            forward_only=False,
        )
        key = "jvp" if with_tangent else "primal"
        results[key] = {"outputs": outputs, "grads": _synced_full_grads(model, False)}
    return results


def _recompute_checks(state32, batch32, tangents32) -> dict:
    """TP=2, forward_jvp + backward with and without activation recompute."""
    import models.flux.model as flux_model
    from mfmegatron.parallel import initialize_parallel
    from models.flux.model import FluxTangents

    calls = {"attention_jvp": 0, "attention": 0}
    original_jvp, original_attention = flux_model.attention_jvp, flux_model.attention

    def counting_jvp(*args, **kwargs):
        calls["attention_jvp"] += 1
        return original_jvp(*args, **kwargs)

    def counting_attention(*args, **kwargs):
        calls["attention"] += 1
        return original_attention(*args, **kwargs)

    flux_model.attention_jvp, flux_model.attention = counting_jvp, counting_attention
    initialize_parallel(tensor_parallel_size=2)
    results = {}
    for recompute in (False, True):
        settings = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        model = megatron_flux(state32, tensor_model_parallel_size=2, **(settings if recompute else {}))
        out, tangent = model.forward_jvp(flux_inputs(batch32), FluxTangents(*tangents32))
        before_backward = dict(calls)
        (out * _loss_weights(out.shape)).sum().backward()
        results[recompute] = {
            "out": out.detach(),
            "tangent": tangent,
            "grads": _synced_full_grads(model, False),
            "backward_calls": {k: calls[k] - before_backward[k] for k in calls},
        }
    return results


def _all_checks(state32, state64, batch32, batch64, tangents64, tangents32):
    results = _tensor_parallel_checks(state32, state64, batch32, batch64, tangents64)
    results["pp2"] = _pipeline_checks(state32, batch32, tangents32)
    results["recompute"] = _recompute_checks(state32, batch32, tangents32)
    return results


@pytest.fixture(scope="module")
def flux_results():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    reference32 = diffusers_flux(torch.float32)
    reference64 = diffusers_flux(torch.float64)
    batch32, batch64 = flux_batch(torch.float32), flux_batch(torch.float64)
    g = torch.Generator().manual_seed(5)
    tangent_z = torch.randn(batch64["hidden_states"].shape, generator=g, dtype=torch.float64)
    tangent_t = torch.randn(BATCH, generator=g, dtype=torch.float64)

    with torch.no_grad():
        expected32 = reference32(**batch32).sample

    def velocity(z, t):
        return reference64(**{**batch64, "hidden_states": z, "timestep": t}).sample

    with sdpa_kernel(SDPBackend.MATH):
        expected64, expected_tangent = torch.func.jvp(
            velocity, (batch64["hidden_states"], batch64["timestep"]), (tangent_z, tangent_t)
        )
    ranks = run_on_ranks(
        _all_checks,
        2,
        reference32.state_dict(),
        reference64.state_dict(),
        batch32,
        batch64,
        (tangent_z, tangent_t),
        (tangent_z.float(), tangent_t.float()),
        timeout=600,
    )
    return {
        "ranks": ranks,
        "expected32": expected32,
        "expected64": expected64,
        "expected_tangent": expected_tangent,
        "reference_state": reference32.state_dict(),
    }


@pytest.mark.parametrize("layout", [key for key, _, _ in LAYOUTS])
def test_forward_matches_diffusers(flux_results, layout):
    for rank in flux_results["ranks"]:
        torch.testing.assert_close(rank[layout]["out"], flux_results["expected32"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", [key for key, _, _ in LAYOUTS])
def test_forward_jvp_matches_torch_func_jvp_through_diffusers(flux_results, layout):
    # Tangents in the latents and the timestep, float64. diffusers computes RoPE in float32 even
    # for float64 inputs; that rounding (~1e-8 relative) is the whole remaining difference.
    for rank in flux_results["ranks"]:
        torch.testing.assert_close(rank[layout]["out64"], flux_results["expected64"], rtol=1e-7, atol=1e-7)
        torch.testing.assert_close(
            rank[layout]["tangent64"], flux_results["expected_tangent"], rtol=1e-6, atol=1e-6
        )
        assert not rank[layout]["tangent_requires_grad"]


@pytest.mark.parametrize("layout", ["tp2", "tp2_sp"])
def test_tensor_parallel_gradients_match_tp1(flux_results, layout):
    reference = flux_results["ranks"][0]["tp1"]["grads"]
    for rank in flux_results["ranks"]:
        grads = rank[layout]["grads"]
        assert grads.keys() == reference.keys()
        for key, grad in grads.items():
            torch.testing.assert_close(grad, reference[key], rtol=1e-4, atol=1e-5, msg=key)


def test_sequence_parallel_column_linears_save_their_chunk(flux_results):
    # Under SP every column-parallel linear of the blocks (QKV and MLP in, per stream in a double
    # block; both readers of the single block's one gather) saved its input's chunk for backward
    # and gathered it again there once; the gradients above equal TP=1's.
    from tests.flux_fixtures import TINY

    columns = 4 * TINY["num_layers"] + 2 * TINY["num_single_layers"]
    for rank in flux_results["ranks"]:
        assert rank["tp2_sp"]["chunk_counters"] == {"chunks_saved": columns, "regathers": columns}
        assert rank["tp2"]["chunk_counters"] == {"chunks_saved": 0, "regathers": 0}


def test_tensor_parallel_shards_gather_back_to_the_imported_weights(flux_results):
    tp1, tp2 = flux_results["ranks"][0]["tp1"]["weights"], flux_results["ranks"][1]["tp2"]["weights"]
    assert tp1.keys() == tp2.keys()
    for key in tp1:
        assert torch.equal(tp1[key], tp2[key]), key


@pytest.mark.parametrize("mode", ["primal", "jvp"])
def test_pipeline_parallel_matches_single_stage(flux_results, mode):
    ranks = flux_results["ranks"]
    last = next(r["pp2"] for r in ranks if r["pp2"]["stage"] == 1)
    outputs = torch.cat([out for out, _ in last[mode]["outputs"]])
    torch.testing.assert_close(outputs, flux_results["expected32"], rtol=1e-5, atol=1e-5)
    if mode == "jvp":
        tangents = torch.cat([t for _, t in last[mode]["outputs"]])
        tp1_tangent = ranks[0]["tp1"]["tangent64"].float()
        torch.testing.assert_close(tangents, tp1_tangent, rtol=1e-4, atol=1e-4)
    # Gradients of every parameter on both stages equal the single-stage model's (the tangent
    # travelling with the primal changes nothing in backward).
    reference = ranks[0]["tp1"]["grads"]
    seen = set()
    for rank in ranks:
        for key, grad in rank["pp2"][mode]["grads"].items():
            torch.testing.assert_close(grad, reference[key], rtol=1e-4, atol=1e-5, msg=key)
            seen.add(key)
    assert seen == set(reference)


def test_recompute_reproduces_outputs_and_grads_and_recomputes_only_the_primal(flux_results):
    for rank in flux_results["ranks"]:
        plain, recomputed = rank["recompute"][False], rank["recompute"][True]
        torch.testing.assert_close(recomputed["out"], plain["out"], rtol=0, atol=0)
        torch.testing.assert_close(recomputed["tangent"], plain["tangent"], rtol=0, atol=0)
        for key, grad in plain["grads"].items():
            torch.testing.assert_close(recomputed["grads"][key], grad, rtol=1e-6, atol=1e-7, msg=key)
        # Without recompute backward runs no attention at all; with it, each of the 4 blocks
        # recomputes its primal attention once and never the attention tangent.
        assert plain["backward_calls"] == {"attention_jvp": 0, "attention": 0}
        assert recomputed["backward_calls"] == {"attention_jvp": 0, "attention": 4}
