"""Forward mode (JVP) through megatron-core's ``MoELayer``: router, alltoall dispatch, experts,
shared expert.

``moe_forward_jvp(moe, x, tx) -> (y, ty)`` runs the layer megatron builds (``TopKRouter``,
``MoEAlltoAllTokenDispatcher``, ``SequentialMLP`` of ``MLP`` experts, ``SharedExpertMLP``, with
the parallel linears of ``mfmegatron.jvp.linear``) step by step, as ``MoELayer.forward`` does, with
megatron's own routing, metadata and permutation code. ``tx=None`` is the plain forward (equal to
``MoELayer.forward``); models call this function either way so the math exists once.

How the tangent goes through it:

- Routing is decided by the primal: ``moe.route`` gives the top-k probabilities ``p`` (softmax over
  the k chosen logits, float32) and the routing map. The tangent of the logits is
  ``dl = W_router · tx`` (in the router dtype) and the tangent of the renormalised probabilities is
  ``dp = p ⊙ (dl − Σ_k p dl)`` over the chosen set (``p`` is zero elsewhere, so is ``dp``).
- Tokens and their tangents take the same path: the tangent rows are permuted with the primal's
  routing map and permutation; every exchange (the expert-parallel all-to-all, the
  expert-tensor-parallel all-gather and reduce-scatter with per-rank row counts) carries primal and
  tangent in one call (``collectives.all_to_all_tokens`` / ``gather_tokens`` /
  ``reduce_scatter_tokens``), probabilities and their tangents in another (megatron, too, sends
  tokens and probabilities separately, each in its own dtype).
- Experts: ``fc1`` -> SwiGLU -> ``· p`` -> ``fc2``, as megatron's ``MLP`` with ``per_token_scale``.
  The product rule at ``· p`` gives the combine's two terms: ``p · dh + dp · h`` before ``fc2``
  (linear), i.e. ``p · dy + dp · y`` after it.
- The shared expert is the same MLP without ``p``; its column/row linears gather and
  reduce-scatter the sequence under sequence parallel, primal and tangent together.

As everywhere in ``mfmegatron.jvp`` the primal is computed with autograd and the tangent under
``no_grad`` from detached primal values: nothing tangent-related is saved for backward, and a
primal-only recompute (``mfmegatron.jvp.recompute``) rebuilds the whole graph.

Supported: the configuration HunyuanImage 3.0 uses (softmax top-k after selection, no capacity,
no aux loss, no expert bias / groups / scaling, no shared-expert gate or overlap, no latent
projection, unfused permutation). Other settings raise instead of computing a wrong tangent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.moe_utils import permute, sort_chunks_by_idxs, unpermute

from mfmegatron.jvp import functional as jf
from mfmegatron.parallel import collectives


def check_supported(moe) -> None:
    """Raises unless ``moe`` is configured the way ``moe_forward_jvp`` derives."""
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    config = moe.config
    problems = []
    if not isinstance(moe.token_dispatcher, MoEAlltoAllTokenDispatcher):
        problems.append(f"token dispatcher {type(moe.token_dispatcher).__name__} (alltoall only)")
    if config.moe_router_score_function != "softmax" or config.moe_router_pre_softmax:
        problems.append("router scores other than softmax over the chosen top-k")
    if config.moe_router_topk_scaling_factor not in (None, 1.0):
        problems.append("moe_router_topk_scaling_factor")
    if config.moe_router_num_groups or moe.router.expert_bias is not None:
        problems.append("grouped routing or expert bias")
    if config.moe_expert_capacity_factor is not None or config.moe_pad_expert_input_to_capacity:
        problems.append("expert capacity (token dropping)")
    if moe.router.is_aux_loss_enabled() or config.moe_z_loss_coeff or config.moe_input_jitter_eps:
        problems.append("aux / z losses or input jitter")
    if config.moe_shared_expert_overlap or config.moe_shared_expert_gate or config.moe_latent_size:
        problems.append("shared-expert overlap / gate or latent projections")
    if config.moe_permute_fusion or config.moe_apply_probs_on_input or config.moe_router_padding_for_quantization:
        problems.append("fused permutation, probs on input or padding for quantization")
    if not (config.gated_linear_unit and config.activation_func is F.silu) or config.add_bias_linear:
        problems.append("expert MLPs other than bias-free SwiGLU")
    if config.activation_func_clamp_value is not None or config.glu_linear_offset:
        problems.append("clamped or offset GLU")
    if problems:
        raise NotImplementedError("moe_forward_jvp does not derive: " + "; ".join(problems))


# --------------------------------------------------------------------------- router


def route_jvp(moe, x, tx):
    """The primal's routing (megatron's ``route``) and the tangent of its probabilities.

    x [s, b, h] -> probs [tokens, E] (zero off the chosen top-k), routing_map [tokens, E] bool,
    tprobs [tokens, E] or None.
    """
    probs, routing_map = moe.route(x)
    if tx is None:
        return probs, routing_map, None
    with torch.no_grad():
        weight = moe.router.weight.detach()
        router_dtype = probs.dtype
        tlogits = F.linear(tx.reshape(-1, tx.shape[-1]).to(router_dtype), weight.to(router_dtype))
        p = probs.detach()
        tprobs = p * (tlogits - (p * tlogits).sum(-1, keepdim=True))
    return probs, routing_map, tprobs


# --------------------------------------------------------------------------- MLPs


def mlp_forward_jvp(mlp, x, tx, probs=None, tprobs=None):
    """megatron's bias-free SwiGLU ``MLP``: ``fc2(silu(gate) * up [* probs])`` with ``fc1`` rows
    ``[gate; up]``. ``probs`` [tokens]: megatron's ``per_token_scale`` (routed experts)."""
    h, th = mlp.linear_fc1.forward_jvp(x, tx)
    h, th = jf.swiglu(h, th)
    if probs is not None:
        dtype = h.dtype
        scaled = (h * probs.unsqueeze(-1)).to(dtype)
        if th is not None:
            with torch.no_grad():
                th = (th * probs.detach().unsqueeze(-1) + h.detach() * tprobs.unsqueeze(-1)).to(dtype)
        h = scaled
    return mlp.linear_fc2.forward_jvp(h, th)


def experts_forward_jvp(experts, tokens, ttokens, tokens_per_expert, probs, tprobs):
    """megatron's ``SequentialMLP``: rows grouped by local expert, ``tokens_per_expert`` each."""
    counts = tokens_per_expert.tolist()
    pieces = zip(
        experts.local_experts,
        torch.split(tokens, counts),
        torch.split(ttokens, counts) if ttokens is not None else [None] * len(counts),
        torch.split(probs, counts),
        torch.split(tprobs, counts) if tprobs is not None else [None] * len(counts),
    )
    outputs, toutputs = [], []
    for expert, x, tx, p, tp in pieces:
        y, ty = mlp_forward_jvp(expert, x, tx, p, tp)
        outputs.append(y)
        toutputs.append(ty)
    y = torch.cat(outputs)
    if ttokens is None:
        return y, None
    with torch.no_grad():
        return y, torch.cat(toutputs)


# --------------------------------------------------------------------------- the layer


def _sort_chunks(tokens, ttokens, split_sizes, order, probs=None, tprobs=None):
    """megatron's ``sort_chunks_by_idxs`` on the primal (autograd) and the tangent (no graph)."""
    tokens, probs = sort_chunks_by_idxs(tokens, split_sizes, order, probs=probs)
    if ttokens is not None:
        with torch.no_grad():
            ttokens, tprobs = sort_chunks_by_idxs(ttokens, split_sizes, order, probs=tprobs)
    return tokens, ttokens, probs, tprobs


def moe_forward_jvp(moe, x, tx=None):
    """x [s, b, h] (this rank's sequence chunk under sequence parallel) -> (y, ty) [s, b, h]:
    routed experts plus the shared expert, megatron's ``MoELayer.forward`` (see module doc)."""
    check_supported(moe)
    with_tangent = tx is not None
    dispatcher = moe.token_dispatcher

    shared, tshared = (
        mlp_forward_jvp(moe.shared_experts, x, tx) if moe.shared_experts is not None else (None, None)
    )
    probs, routing_map, tprobs = route_jvp(moe, x, tx)

    # Tensor parallel without sequence parallel: every TP rank holds every token. The dispatch
    # below (its expert-TP all-gather in particular) assumes each TP rank brings its own tokens;
    # given the replicated sequence, each expert would compute every token once per TP rank and
    # its weight gradient would count each token that many times. So each TP rank dispatches
    # only its share of the rows (router and shared expert ran on the whole sequence above, so
    # their gradients stay whole, as the non-SP convention wants), exactly as under sequence
    # parallel, and the combined output is all-gathered back to the whole sequence.
    # The attention's TP group, not the dispatcher's expert-TP group (``tp_group`` below), which
    # is a single rank at expert TP 1: the gather back must span the ranks that split the rows.
    whole_shape, splits, attn_tp_group = x.shape, None, getattr(moe, "attn_tp_group", None)
    if not moe.config.sequence_parallel and attn_tp_group is not None and attn_tp_group.size() > 1:
        splits = collectives.replicated_token_splits(probs.shape[0], attn_tp_group)
        x, tx = collectives.split_replicated_tokens(
            x.reshape(-1, whole_shape[-1]), tx.reshape(-1, whole_shape[-1]) if with_tangent else None, attn_tp_group,
            splits,
        )
        probs, tprobs = collectives.split_replicated_tokens(probs, tprobs, attn_tp_group, splits)
        routing_map = collectives.split_replicated_tokens(routing_map, None, attn_tp_group, splits)[0]

    # Metadata (splits, per-expert counts) and permutation 1, megatron's own code, on the primal;
    # the tangent rows (and probability tangents) follow the same routing map.
    tokens, permuted_probs = dispatcher.dispatch_preprocess(x, routing_map, probs)
    ttokens = tpermuted_probs = None
    if with_tangent:
        with torch.no_grad():
            ttokens, tpermuted_probs, *_ = permute(
                tx.reshape(-1, tx.shape[-1]), dispatcher.routing_map, probs=tprobs,
                num_out_tokens=dispatcher.num_out_tokens,
            )

    # Expert-parallel all-to-all (megatron's token_dispatch), then the expert-TP all-gather
    # (dispatch_postprocess); the device->host copies of the splits happen at megatron's points.
    tokens_per_expert = dispatcher._maybe_dtoh_and_synchronize("before_ep_alltoall", dispatcher.tokens_per_expert)
    ep_group, tp_group = dispatcher.ep_group, dispatcher.tp_group
    tokens, ttokens = collectives.all_to_all_tokens(
        tokens, ttokens, ep_group, dispatcher.output_splits, dispatcher.input_splits
    )
    permuted_probs, tpermuted_probs = collectives.all_to_all_tokens(
        permuted_probs, tpermuted_probs, ep_group, dispatcher.output_splits, dispatcher.input_splits
    )
    tp_splits = None
    if dispatcher.tp_size > 1:
        tp_splits = dispatcher.output_splits_tp.tolist() if dispatcher.output_splits_tp is not None else None
        tokens, ttokens = collectives.gather_tokens(tokens, ttokens, tp_group, tp_splits)
        permuted_probs, tpermuted_probs = collectives.gather_tokens(permuted_probs, tpermuted_probs, tp_group, tp_splits)
    tokens_per_expert = dispatcher._maybe_dtoh_and_synchronize("before_permutation_2", tokens_per_expert)
    if dispatcher.num_local_experts > 1:
        tokens, ttokens, permuted_probs, tpermuted_probs = _sort_chunks(
            tokens, ttokens, dispatcher.num_global_tokens_per_local_expert.ravel(),
            dispatcher.sort_input_by_local_experts, permuted_probs, tpermuted_probs,
        )
    tokens_per_expert = dispatcher._maybe_dtoh_and_synchronize("before_finish", tokens_per_expert)
    dispatcher.tokens_per_expert = None

    out, tout = experts_forward_jvp(moe.experts, tokens, ttokens, tokens_per_expert, permuted_probs, tpermuted_probs)

    # combine_preprocess: unsort, expert-TP reduce-scatter (in the probabilities' dtype, as
    # megatron); token_combine: the reverse all-to-all; combine_postprocess: unpermute.
    if dispatcher.num_local_experts > 1:
        out, tout, _, _ = _sort_chunks(
            out, tout, dispatcher.num_global_tokens_per_local_expert.T.ravel(),
            dispatcher.restore_output_by_local_experts,
        )
    if dispatcher.tp_size > 1:
        dtype, reduce_dtype = out.dtype, dispatcher.probs.dtype
        out, tout = collectives.reduce_scatter_tokens(
            out.to(reduce_dtype), tout.to(reduce_dtype) if with_tangent else None, tp_group, tp_splits
        )
        out, tout = out.to(dtype), (tout.to(dtype) if with_tangent else None)
    out, tout = collectives.all_to_all_tokens(out, tout, ep_group, dispatcher.input_splits, dispatcher.output_splits)
    restore = dict(
        sorted_indices=dispatcher.reversed_local_input_permutation_mapping,
        restore_shape=dispatcher.hidden_shape_before_permute,
        routing_map=dispatcher.routing_map,
    )
    y = unpermute(out, **restore).view(dispatcher.hidden_shape)
    ty = None
    if with_tangent:
        with torch.no_grad():
            ty = unpermute(tout, **restore).view(dispatcher.hidden_shape)
    if splits is not None:
        y, ty = collectives.gather_replicated_tokens(y, ty, attn_tp_group, splits)
        y, ty = y.view(whole_shape), (ty.view(whole_shape) if with_tangent else None)
    if shared is not None:
        y, ty = jf.add(y, ty, shared, tshared)
    return y, ty


__all__ = ["moe_forward_jvp", "route_jvp", "mlp_forward_jvp", "experts_forward_jvp", "check_supported"]
