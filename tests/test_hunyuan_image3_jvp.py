"""Forward mode through HunyuanImage 3.0's MoE and decoder layers (``mfmegatron.jvp.moe``,
``DecoderLayer.forward_jvp``), against ``torch.func.jvp`` of transformers' ``hunyuan_v1_moe``
(the trunk family; see tests/test_hunyuan_image3.py) in float64.

The reference's gate softmax runs in float32 whatever the model dtype (transformers casts it),
so agreement is to ~1e-7 of the output scale, not float64 round-off; the tolerances say so.
"""

from __future__ import annotations

import collections

import pytest
import torch

from mfmegatron.parallel import parallel_context, run_on_ranks
from tests.test_hunyuan_image3 import TINY, _released_layout, _transformers_reference

TOKENS = 24  # sequence length: with batch 2, 48 tokens x top-3 reach all 8 experts
BATCH = 2
F64 = torch.float64


def _config(**overrides):
    from models.hunyuan_image3.config import tiny_hunyuan_image3_config

    # float64 throughout, the router too (its default is float32, the released model's).
    return tiny_hunyuan_image3_config(**{"params_dtype": F64, "moe_router_dtype": "fp64", **overrides})


def _pair(seed: int, length: int = TOKENS):
    """An activation [s, b, h] and its tangent, float64, large enough to route unevenly."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(length, BATCH, TINY["hidden"], generator=generator, dtype=F64)
    return x, torch.randn(x.shape, generator=generator, dtype=F64)


def _loss_weights(shape, seed=7):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _close(got, want, what=""):
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * scale, msg=lambda m: f"{what}: {m}")


def _build(config, full_state):
    from models.hunyuan_image3.parallelize import build_hunyuan_model, load_full_weights

    model = build_hunyuan_model(config)
    load_full_weights(model, full_state)
    return model


@pytest.fixture(scope="module")
def reference():
    """transformers' model in float64 (eager experts: its grouped-mm path has no forward AD) and
    our full weights converted from it."""
    from models.hunyuan_image3.state_dict_adapter import to_megatron

    hf = _transformers_reference()
    released = _released_layout(dict(hf.state_dict()))
    hf = hf.double()
    hf.config._experts_implementation = "eager"
    ours, _ = to_megatron(released, _config())
    return {"hf": hf, "ours": ours}


def _hf_moe_jvp(hf, layer: int, x, tx):
    """torch.func.jvp of transformers' MoE block on [s, b, h] activations."""
    moe = hf.model.layers[layer].mlp
    y, ty = torch.func.jvp(moe, (x.transpose(0, 1).contiguous(),), (tx.transpose(0, 1).contiguous(),))
    return y.transpose(0, 1), ty.transpose(0, 1)


def _hf_trunk_jvp(hf, x, tx):
    """torch.func.jvp of transformers' decoder layers and final norm on input embeddings."""

    def trunk(embeds):
        return hf.model(inputs_embeds=embeds).last_hidden_state

    y, ty = torch.func.jvp(trunk, (x.transpose(0, 1).contiguous(),), (tx.transpose(0, 1).contiguous(),))
    return y.transpose(0, 1), ty.transpose(0, 1)


# --------------------------------------------------------------------------- one rank


def test_moe_forward_jvp_matches_torch_func_jvp_at_one_rank(reference):
    """Layer 1's MoE (routed + shared expert): primal and tangent equal transformers' under
    torch.func.jvp; every expert receives tokens; the primal equals megatron's MoELayer.forward
    exactly, with or without tangents."""
    from mfmegatron.jvp.moe import moe_forward_jvp

    x, tx = _pair(1)
    with parallel_context():
        moe = _build(_config(), reference["ours"]).layers[1].mlp
        _, routing_map = moe.router(x)
        y, ty = moe_forward_jvp(moe, x, tx)
        y_plain, none = moe_forward_jvp(moe, x, None)
        y_megatron, _ = moe(x)
    assert (routing_map.sum(0) > 0).all(), routing_map.sum(0)
    assert none is None and not ty.requires_grad
    assert torch.equal(y, y_megatron) and torch.equal(y_plain, y_megatron)
    want_y, want_ty = _hf_moe_jvp(reference["hf"], 1, x, tx)
    _close(y, want_y, "primal")
    _close(ty, want_ty, "tangent")


def test_the_gate_probability_tangent_is_engaged(reference, monkeypatch):
    """Without the tangent of the renormalised top-k probabilities the result is far off."""
    import mfmegatron.jvp.moe as moe_jvp

    x, tx = _pair(2)
    _, want_ty = _hf_moe_jvp(reference["hf"], 0, x, tx)
    original = moe_jvp.route_jvp

    def without_probability_tangent(moe, x, tx):
        probs, routing_map, tprobs = original(moe, x, tx)
        return probs, routing_map, torch.zeros_like(tprobs)

    with parallel_context():
        moe = _build(_config(), reference["ours"]).layers[0].mlp
        _, ty = moe_jvp.moe_forward_jvp(moe, x, tx)
        monkeypatch.setattr(moe_jvp, "route_jvp", without_probability_tangent)
        _, ty_dropped = moe_jvp.moe_forward_jvp(moe, x, tx)
    _close(ty, want_ty, "tangent")
    error = (ty_dropped - want_ty).abs().max().item()
    assert error > 0.05 * want_ty.abs().max().item(), error


def saved_for_backward(run) -> tuple[collections.Counter, object]:
    """(shape, dtype) counts of every tensor autograd saves while ``run()`` executes, and its
    result (shared with the image path's test)."""
    saved = collections.Counter()

    def pack(tensor):
        saved[(tuple(tensor.shape), tensor.dtype)] += 1
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = run()
    return saved, out


def test_nothing_tangent_related_is_saved_for_backward(reference):
    """forward_jvp saves exactly what the primal-only forward saves (same tensors, shapes and
    dtypes); the tangent has no graph."""
    from mfmegatron.jvp.moe import moe_forward_jvp

    x, tx = _pair(3)
    with parallel_context():
        moe = _build(_config(), reference["ours"]).layers[0].mlp
        primal_only, _ = saved_for_backward(lambda: moe_forward_jvp(moe, x.requires_grad_(), None))
        with_tangent, (y, ty) = saved_for_backward(lambda: moe_forward_jvp(moe, x, tx))
    assert with_tangent == primal_only and sum(primal_only.values()) > 0
    assert y.requires_grad and ty.grad_fn is None and not ty.requires_grad


# --------------------------------------------------------------------------- decoder layers


def _decoder_jvp(model, x, tx, length=None):
    """Both decoder layers then ln_f on input embeddings [s, b, h] (text positions, causal);
    ``length``: the whole sequence's when x is a sequence-parallel chunk."""
    from models.hunyuan_image3.model import rope_tables, text_rope_positions

    config = model.config
    rope = rope_tables(*text_rope_positions(length or x.shape[0]), config.kv_channels, config.rope_theta)
    h, th = model.decoder_forward_jvp(x, tx, rope)
    return model.final_layernorm.forward_jvp(h, th)


def test_decoder_layers_jvp_matches_torch_func_jvp_of_the_trunk(reference):
    """Tangents in the input embeddings (where the image path's latent and t tangents enter)
    through both decoder layers and ln_f equal torch.func.jvp of transformers' trunk."""
    x, tx = _pair(4, length=12)
    with parallel_context():
        model = (_build(_config(), reference["ours"]))
        y, ty = _decoder_jvp(model, x, tx)

    want_y, want_ty = _hf_trunk_jvp(reference["hf"], x, tx)
    _close(y, want_y, "primal")
    _close(ty, want_ty, "tangent")


def test_recompute_rebuilds_the_graph_from_the_primal_only(reference, monkeypatch):
    """recompute_granularity="full": same outputs, tangents and gradients as without; in backward
    every layer's MoE runs again primal only, never with a tangent."""
    import models.hunyuan_image3.model as hunyuan_model

    calls = collections.Counter()
    original = hunyuan_model.moe_forward_jvp

    def counting(moe, x, tx=None):
        calls["tangent" if tx is not None else "primal"] += 1
        return original(moe, x, tx)

    monkeypatch.setattr(hunyuan_model, "moe_forward_jvp", counting)
    x, tx = _pair(5, length=12)
    x.requires_grad_()  # as a stage input is: checkpoint_primal's output needs a graph input
    results = {}
    with parallel_context():
        for recompute in (False, True):
            settings = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
            model = (_build(_config(**(settings if recompute else {})), reference["ours"]))
            y, ty = _decoder_jvp(model, x, tx)
            before = dict(calls)
            (y * _loss_weights(y.shape)).sum().backward()
            results[recompute] = {
                "y": y.detach(), "ty": ty,
                "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                "backward_calls": {k: calls[k] - before.get(k, 0) for k in ("tangent", "primal")},
            }
    plain, recomputed = results[False], results[True]
    assert torch.equal(recomputed["y"], plain["y"]) and torch.equal(recomputed["ty"], plain["ty"])
    assert set(recomputed["grads"]) == set(plain["grads"]) and len(plain["grads"]) > 20
    for name, grad in plain["grads"].items():
        torch.testing.assert_close(recomputed["grads"][name], grad, rtol=1e-10, atol=1e-10, msg=name)
    assert plain["backward_calls"] == {"tangent": 0, "primal": 0}
    assert recomputed["backward_calls"] == {"tangent": 0, "primal": TINY["layers"]}


# --------------------------------------------------------------------------- two ranks


def _moe_rank(model, x, tx, weights):
    """forward_jvp and its backward, then megatron's own MoELayer forward and backward on the same
    input: the packed primal+tangent collectives must give megatron's gradients."""
    from mfmegatron.jvp.moe import moe_forward_jvp

    moe = model.layers[0].mlp
    y, ty = moe_forward_jvp(moe, x, tx)
    (y * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in moe.named_parameters()}
    moe.zero_grad(set_to_none=True)
    y_megatron, _ = moe(x)
    (y_megatron * weights).sum().backward()
    megatron_grads = {n: p.grad.clone() for n, p in moe.named_parameters()}
    _, routing_map = moe.router(x)
    return {
        "y": y.detach(), "ty": ty, "y_megatron": y_megatron.detach(), "grads": grads,
        "megatron_grads": megatron_grads, "tokens_per_expert": routing_map.sum(0),
        "local_experts": len(moe.experts.local_experts),
    }


def _two_rank_checks(full_state) -> dict:
    from mfmegatron.parallel import initialize_parallel

    results = {}
    # EP=2: each rank its own tokens; experts 0-3 on rank 0, 4-7 on rank 1.
    initialize_parallel(expert_parallel_size=2)
    rank = torch.distributed.get_rank()
    model = _build(_config(expert_model_parallel_size=2), full_state)
    x, tx = _pair(20 + rank)
    results["ep2"] = _moe_rank(model, x, tx, _loss_weights(x.shape, 30 + rank))
    results["ep2"]["decoder"] = tuple(t.detach() for t in _decoder_jvp(model, x, tx))
    # TP=2 + SP: the same tokens on both ranks, each holding its sequence chunk; every expert
    # and the shared expert split in half over the ranks.
    initialize_parallel(tensor_parallel_size=2)
    model = _build(_config(tensor_model_parallel_size=2, sequence_parallel=True), full_state)
    x, tx = _pair(40)
    chunk = slice(rank * TOKENS // 2, (rank + 1) * TOKENS // 2)
    results["tp2_sp"] = _moe_rank(model, x[chunk], tx[chunk], _loss_weights(x.shape, 50)[chunk])
    results["tp2_sp"]["decoder"] = tuple(t.detach() for t in _decoder_jvp(model, x[chunk], tx[chunk], TOKENS))
    results["tp2_sp"]["fc1_shape"] = tuple(model.layers[0].mlp.experts.local_experts[0].linear_fc1.weight.shape)
    return results


@pytest.fixture(scope="module")
def rank_results(reference):
    return run_on_ranks(_two_rank_checks, 2, reference["ours"], timeout=300)


def _check_megatron_agreement(result, what):
    assert torch.equal(result["y"], result["y_megatron"]), what
    assert set(result["grads"]) == set(result["megatron_grads"])
    for name, grad in result["grads"].items():
        torch.testing.assert_close(grad, result["megatron_grads"][name], rtol=1e-12, atol=1e-12, msg=f"{what} {name}")


def test_expert_parallel_2_forward_jvp_matches_torch_func_jvp(reference, rank_results):
    """Each rank's tokens go to experts on both ranks (primal and tangent in one all-to-all);
    the MoE's and both decoder layers' outputs and tangents equal the one-rank reference; the MoE's
    gradients equal megatron's own MoE's."""
    for rank, result in enumerate(r["ep2"] for r in rank_results):
        assert result["local_experts"] == TINY["experts"] // 2
        # Tokens of this rank reach experts held by both ranks.
        per_rank = result["tokens_per_expert"].view(2, -1).sum(1)
        assert (per_rank > 0).all(), per_rank
        x, tx = _pair(20 + rank)
        want_y, want_ty = _hf_moe_jvp(reference["hf"], 0, x, tx)
        _close(result["y"], want_y, f"rank {rank} primal")
        _close(result["ty"], want_ty, f"rank {rank} tangent")
        _check_megatron_agreement(result, f"ep2 rank {rank}")
        want_y, want_ty = _hf_trunk_jvp(reference["hf"], x, tx)
        _close(result["decoder"][0], want_y, f"rank {rank} decoder primal")
        _close(result["decoder"][1], want_ty, f"rank {rank} decoder tangent")


def test_tensor_parallel_2_with_sequence_parallel_forward_jvp_matches_torch_func_jvp(reference, rank_results):
    """Sequence chunks per rank, experts split over TP (the dispatcher's all-gather and
    reduce-scatter carry primal and tangent together): the MoE's and the decoder layers' chunks
    concatenate to the reference."""
    results = [r["tp2_sp"] for r in rank_results]
    assert results[0]["fc1_shape"] == (TINY["width"], TINY["hidden"])  # [gate_r; up_r], half each
    x, tx = _pair(40)
    want_y, want_ty = _hf_moe_jvp(reference["hf"], 0, x, tx)
    _close(torch.cat([r["y"] for r in results]), want_y, "primal")
    _close(torch.cat([r["ty"] for r in results]), want_ty, "tangent")
    for rank, result in enumerate(results):
        _check_megatron_agreement(result, f"tp2 rank {rank}")
    want_y, want_ty = _hf_trunk_jvp(reference["hf"], x, tx)
    _close(torch.cat([r["decoder"][0] for r in results]), want_y, "decoder primal")
    _close(torch.cat([r["decoder"][1] for r in results]), want_ty, "decoder tangent")


def test_bf16_moe_forward_jvp_is_close_to_the_float64_reference(reference):
    """The production dtype: bf16 activations and weights, router and probabilities in float32.
    Outputs and tangents are bf16 and near the float64 reference (bf16 rounding)."""
    from mfmegatron.jvp.moe import moe_forward_jvp

    x, tx = _pair(6)
    with parallel_context():
        config = _config(params_dtype=torch.bfloat16, bf16=True, moe_router_dtype="fp32")
        moe = _build(config, reference["ours"]).layers[1].mlp
        assert moe.router.weight.dtype == torch.float32
        y, ty = moe_forward_jvp(moe, x.bfloat16(), tx.bfloat16())
    assert y.dtype == ty.dtype == torch.bfloat16
    want_y, want_ty = _hf_moe_jvp(reference["hf"], 1, x, tx)
    for got, want in ((y, want_y), (ty, want_ty)):
        relative = ((got.double() - want).norm() / want.norm()).item()
        assert relative < 0.02, relative
