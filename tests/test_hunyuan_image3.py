"""HunyuanImage 3.0's trunk on megatron-core: sizes, conversion, and transformers' HunYuanMoEV1 as
the reference for text-only sequences.

The reference is transformers' ``hunyuan_v1_moe`` (the Hunyuan-A13B trunk family): separate
q/k/v and gate/up projections, q/k RMSNorm after RoPE, softmax over all experts then top-k
renormalised, no capacity. Its weights are re-laid out here into the released HunyuanImage 3.0
keys (fused per-KV-group ``qkv_proj``, ``gate_and_up_proj`` = ``[up; gate]``) and then converted by
our ``state_dict_adapter``, so the comparison also checks the conversion.
"""

from __future__ import annotations

import pytest
import torch

from mfmegatron.parallel import parallel_context, run_on_ranks

SEQ = 9
MICRO_BATCHES = 2
TP_SEQ = 10  # divisible by the TP size (sequence parallel)
BATCH = 2
TINY = dict(hidden=64, heads=4, groups=2, head_dim=16, layers=2, vocab=128, experts=8, topk=3, width=32)


# --------------------------------------------------------------------------- reference


def _transformers_reference():
    from transformers import HunYuanMoEV1Config, HunYuanMoEV1ForCausalLM

    config = HunYuanMoEV1Config(
        vocab_size=TINY["vocab"],
        hidden_size=TINY["hidden"],
        intermediate_size=TINY["width"],
        num_hidden_layers=TINY["layers"],
        num_attention_heads=TINY["heads"],
        num_key_value_heads=TINY["groups"],
        head_dim=TINY["head_dim"],
        num_experts=TINY["experts"],
        moe_topk=TINY["topk"],
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = HunYuanMoEV1ForCausalLM(config).float().eval()
    # Weights large enough that routing, attention and norms all matter (the default init's 0.02
    # leaves the residual stream nearly unchanged).
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.copy_(1 + 0.2 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    return model


def _released_layout(hf: dict) -> dict:
    """transformers' HunYuanMoEV1 tensors -> the released HunyuanImage 3.0 keys and fused layouts."""
    heads, groups, d = TINY["heads"], TINY["groups"], TINY["head_dim"]
    out = {
        "model.wte.weight": hf["model.embed_tokens.weight"],
        "model.ln_f.weight": hf["model.norm.weight"],
        "lm_head.weight": hf["lm_head.weight"],
    }
    for i in range(TINY["layers"]):
        src, dst = f"model.layers.{i}.", f"model.layers.{i}."
        q = hf[src + "self_attn.q_proj.weight"].view(groups, heads // groups, d, -1)
        k = hf[src + "self_attn.k_proj.weight"].view(groups, 1, d, -1)
        v = hf[src + "self_attn.v_proj.weight"].view(groups, 1, d, -1)
        out[dst + "self_attn.qkv_proj.weight"] = torch.cat([q, k, v], dim=1).flatten(0, 2)
        for name in ("self_attn.query_layernorm.weight", "self_attn.key_layernorm.weight",
                     "self_attn.o_proj.weight", "input_layernorm.weight",
                     "post_attention_layernorm.weight", "mlp.gate.wg.weight"):
            out[dst + name] = hf[src + name]
        gate_up = hf[src + "mlp.experts.gate_up_proj"]  # [E, 2I, H], gate first
        down = hf[src + "mlp.experts.down_proj"]  # [E, H, I]
        for e in range(TINY["experts"]):
            gate, up = gate_up[e].chunk(2, dim=0)
            out[dst + f"mlp.experts.{e}.gate_and_up_proj.weight"] = torch.cat([up, gate], dim=0)
            out[dst + f"mlp.experts.{e}.down_proj.weight"] = down[e]
        out[dst + "mlp.shared_mlp.gate_and_up_proj.weight"] = torch.cat(
            [hf[src + "mlp.shared_mlp.up_proj.weight"], hf[src + "mlp.shared_mlp.gate_proj.weight"]], dim=0
        )
        out[dst + "mlp.shared_mlp.down_proj.weight"] = hf[src + "mlp.shared_mlp.down_proj.weight"]
    return {k: v.detach().clone() for k, v in out.items()}


def _tiny_config(**overrides):
    from models.hunyuan_image3.config import tiny_hunyuan_image3_config

    return tiny_hunyuan_image3_config(**overrides)


def _input_ids(seed: int, length: int = SEQ):
    # Not token 0: the reference's embedding has padding_idx 0, whose row gets no gradient.
    return torch.randint(1, TINY["vocab"], (BATCH, length), generator=torch.Generator().manual_seed(seed))


def _loss_weights(shape):
    return torch.linspace(-1, 1, torch.Size(shape).numel()).view(shape)


@pytest.fixture(scope="module")
def reference():
    """transformers' model, its logits / final hidden states / grads on one batch, and the
    released-layout weights."""
    model = _transformers_reference()
    ids = _input_ids(10)
    out = model(input_ids=ids, output_hidden_states=True)
    (out.logits * _loss_weights(out.logits.shape)).sum().backward()
    grads = {}
    for name, param in model.named_parameters():
        grads[name] = param.grad.detach().clone()
    released = _released_layout(dict(model.state_dict()))
    return {
        "ids": ids,
        "logits": out.logits.detach(),
        "final_hidden": out.hidden_states[-1].detach(),
        "released": released,
        "released_grads": _released_layout(grads),
    }


def _save(model, directory: str) -> None:
    from megatron.core import dist_checkpointing

    torch.distributed.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), directory)
    torch.distributed.barrier()


def _all_rank_checks(full_state: dict, checkpoint_root: str) -> dict:
    """Every two-rank check in one spawn (each rank pays megatron-core's import once)."""
    return {
        "ep2": _expert_parallel_rank(full_state, f"{checkpoint_root}/ep2"),
        "tp2_sp": _tensor_parallel_rank(full_state, f"{checkpoint_root}/tp2_sp"),
        "pp2": _pipeline_rank(full_state, f"{checkpoint_root}/pp2"),
    }


@pytest.fixture(scope="module")
def rank_results(reference, tmp_path_factory):
    """Two gloo ranks: EP=2, TP=2 + SP and PP=2 runs of the converted reference weights, each
    saving a dist checkpoint."""
    from models.hunyuan_image3.state_dict_adapter import to_megatron

    ours, _ = to_megatron(reference["released"], _tiny_config())
    root = tmp_path_factory.mktemp("hunyuan_checkpoints")
    for layout in ("ep2", "tp2_sp", "pp2"):
        (root / layout).mkdir()
    ranks = run_on_ranks(_all_rank_checks, 2, ours, str(root), timeout=300)
    return {"ours": ours, "ranks": ranks, "root": root}


# --------------------------------------------------------------------------- checks


def test_reference_is_the_current_hunyuan_v1_moe():
    """The facts this comparison relies on: q/k norm after RoPE, no capacity, softmax-then-top-k
    renormalised routing. An older transformers normalised q/k before RoPE and dropped tokens."""
    import inspect

    from transformers.models.hunyuan_v1_moe import modeling_hunyuan_v1_moe as hf

    attention = inspect.getsource(hf.HunYuanMoEV1Attention.forward)
    assert attention.index("apply_rotary_pos_emb(") < attention.index("self.query_layernorm(")
    gate = inspect.getsource(hf.HunYuanMoEV1Gate.forward)
    assert gate.index("softmax") < gate.index("topk") < gate.index("routing_weights /=")
    assert "capacity" not in inspect.getsource(hf)


def test_full_config_parameter_counts_from_the_built_modules():
    from models.hunyuan_image3.config import hunyuan_image3_config
    from models.hunyuan_image3.model import parameter_counts
    from models.hunyuan_image3.parallelize import meta_full_model

    with parallel_context():
        model = meta_full_model(hunyuan_image3_config())
        counts = parameter_counts(model)
    assert counts["total"] == 80_958_730_240
    assert counts["layers"] == 79_868_207_104
    assert counts["word_embeddings"] == counts["output_layer"] == 545_259_520
    assert counts["activated_per_token_layers"] == 381_952_256 * 32
    assert counts["image_path"] == 340_402_208
    assert counts["image_path.patch_embed"] == 226_819_072 and counts["image_path.final_layer"] == 60_081_184
    assert counts["image_path.timestep_emb"] == counts["image_path.time_embed_2"] == 17_833_984
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes["layers.0.self_attention.linear_qkv.weight"] == (6144, 4096)
    assert shapes["layers.31.mlp.experts.local_experts.63.linear_fc1.weight"] == (6144, 4096)
    assert shapes["layers.31.mlp.experts.local_experts.63.linear_fc2.weight"] == (4096, 3072)
    assert shapes["layers.0.mlp.router.weight"] == (64, 4096)


def test_sizes_tool_prints_the_counts(capsys):
    from tools.hunyuan_image3_sizes import main

    assert main(["--preset", "hunyuan-image3"]) == 0
    printed = capsys.readouterr().out
    assert "80,958,730,240" in printed and "12,222,472,192" in printed and "381,952,256" in printed
    assert "image head" in printed and "340,402,208" in printed


def test_conversion_round_trip_is_exact_and_names_what_does_not_fit(reference):
    from models.hunyuan_image3.state_dict_adapter import (
        CheckpointMismatchError,
        from_megatron,
        to_megatron,
    )

    config = _tiny_config()
    released = dict(reference["released"])
    released["patch_embed.model.0.weight"] = torch.zeros(3)  # an image-path key: passed through
    ours, rest = to_megatron(released, config)
    assert set(rest) == {"patch_embed.model.0.weight"}
    # [up; gate] released -> [gate; up] ours
    up_gate = released["model.layers.1.mlp.experts.5.gate_and_up_proj.weight"]
    fc1 = ours["layers.1.mlp.experts.local_experts.5.linear_fc1.weight"]
    torch.testing.assert_close(fc1[: TINY["width"]], up_gate[TINY["width"]:], rtol=0, atol=0)
    back = from_megatron(ours, config)
    assert set(back) == set(reference["released"])
    for key, value in back.items():
        assert torch.equal(value, reference["released"][key]), key
    del released["model.layers.0.mlp.experts.3.down_proj.weight"]
    with pytest.raises(CheckpointMismatchError, match="experts.3.down_proj"):
        to_megatron(released, config)


def test_text_trunk_matches_transformers_hunyuan_v1_moe(reference):
    """fp32, world of one: logits, final hidden states and every parameter gradient."""
    from models.hunyuan_image3.parallelize import build_hunyuan_model, load_full_weights
    from models.hunyuan_image3.state_dict_adapter import to_megatron

    config = _tiny_config()
    with parallel_context():
        model = build_hunyuan_model(config)
        ours, _ = to_megatron(reference["released"], config)
        load_full_weights(model, ours)
        ids = reference["ids"]
        hidden = model.hidden_states(ids)
        final = model.final_layernorm(hidden).transpose(0, 1)
        logits = model(ids)
        (logits * _loss_weights(logits.shape)).sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
    torch.testing.assert_close(final, reference["final_hidden"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, reference["logits"], rtol=1e-5, atol=1e-5)
    expected_grads, _ = to_megatron(reference["released_grads"], config)
    assert set(grads) == set(expected_grads)
    for name, grad in grads.items():
        expected = expected_grads[name]
        # Gradients reach tens here (weights of std 0.3): an absolute 1e-5 relative to the scale.
        atol = 1e-5 * max(1.0, expected.abs().max().item())
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


# --------------------------------------------------------------------------- expert parallel


def _expert_parallel_rank(full_state: dict, checkpoint: str) -> dict:
    """EP=2 on two gloo ranks (alltoall dispatcher): each rank its own batch; outputs and grads.
    Then saves a megatron dist checkpoint of the model."""
    from mfmegatron.parallel import initialize_parallel
    from models.hunyuan_image3.parallelize import build_hunyuan_model, load_full_weights, local_weights

    initialize_parallel(expert_parallel_size=2)
    model = build_hunyuan_model(_tiny_config(expert_model_parallel_size=2))
    load_full_weights(model, full_state)
    rank = torch.distributed.get_rank()
    logits = model(_input_ids(20 + rank))
    (logits * _loss_weights(logits.shape)).sum().backward()
    names = [name for name, _ in local_weights(model)]
    _save(model, checkpoint)
    return {
        "logits": logits.detach(),
        "grads": {name: p.grad.clone() for name, p in zip(names, model.parameters())},
        "local_experts": len(model.layers[0].mlp.experts.local_experts),
    }


def test_expert_parallel_2_matches_one_rank(rank_results):
    """Each rank's logits and its dense parameters' gradients equal the one-rank model's on that
    rank's batch; an expert's gradient (the expert lives on one rank, tokens come from both)
    equals the sum of the one-rank gradients over both batches."""
    from models.hunyuan_image3.parallelize import build_hunyuan_model, load_full_weights

    config = _tiny_config()
    ours = rank_results["ours"]
    ranks = [r["ep2"] for r in rank_results["ranks"]]

    expected = []
    with parallel_context():
        model = build_hunyuan_model(config)
        load_full_weights(model, ours)
        for rank in range(2):
            model.zero_grad(set_to_none=True)
            logits = model(_input_ids(20 + rank))
            (logits * _loss_weights(logits.shape)).sum().backward()
            expected.append({"logits": logits.detach(), "grads": {n: p.grad.clone() for n, p in model.named_parameters()}})

    experts_seen = set()
    for rank, result in enumerate(ranks):
        assert result["local_experts"] == TINY["experts"] // 2
        torch.testing.assert_close(result["logits"], expected[rank]["logits"], rtol=1e-5, atol=1e-5)
        for name, grad in result["grads"].items():
            if ".local_experts." in name:
                want = expected[0]["grads"][name] + expected[1]["grads"][name]
                experts_seen.add(name)
            else:
                want = expected[rank]["grads"][name]
            atol = 1e-5 * max(1.0, want.abs().max().item())
            torch.testing.assert_close(grad, want, rtol=1e-4, atol=atol, msg=lambda m, name=name: f"rank {rank} {name}: {m}")
    all_experts = {n for n in expected[0]["grads"] if ".local_experts." in n}
    assert experts_seen == all_experts  # every expert checked once, on the rank that holds it


# --------------------------------------------------------------------------- tensor parallel


def _full_grads(model) -> dict:
    """Every parameter's gradient as the full tensor under its full name: TP parts gathered (the
    SwiGLU fc1 per half), and the grads that are partial per TP rank summed, as megatron's
    finalize_model_grads does: the q/k norms (each rank sees its own heads) and the parameters
    applied to sequence chunks (marked ``sequence_parallel``: norms, router)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from models.hunyuan_image3.parallelize import _is_routed_expert, local_weights, unshard_tensor

    tp_group = parallel_state.get_tensor_model_parallel_group()
    names = [name for name, _ in local_weights(model)]
    grads = {}
    for name, param in zip(names, model.parameters()):
        grad = param.grad.clone()
        partial = "layernorm" in name and "self_attention" in name
        if partial or getattr(param, "sequence_parallel", False):
            dist.all_reduce(grad, group=tp_group)
        if getattr(param, "tensor_model_parallel", False):
            group = (parallel_state.get_expert_tensor_parallel_group() if _is_routed_expert(name) else tp_group)
            parts = [torch.empty_like(grad) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, grad.contiguous(), group=group)
            grad = unshard_tensor(name, parts, param)
        grads[name] = grad
    return grads


def _tensor_parallel_rank(full_state: dict, checkpoint: str) -> dict:
    """TP=2 with sequence parallel (experts split over the expert-tensor-parallel group of 2):
    the same batch on both ranks; the full logits and full gradients. Then saves a checkpoint."""
    import torch.distributed as dist

    from mfmegatron.parallel import initialize_parallel
    from models.hunyuan_image3.parallelize import build_hunyuan_model, load_full_weights

    initialize_parallel(tensor_parallel_size=2)
    model = build_hunyuan_model(_tiny_config(tensor_model_parallel_size=2, sequence_parallel=True))
    load_full_weights(model, full_state)
    logits = model(_input_ids(30, TP_SEQ))  # [b, s, vocab / 2]
    parts = [torch.empty_like(logits) for _ in range(2)]
    dist.all_gather(parts, logits.detach().contiguous())
    full_logits = torch.cat(parts, dim=-1)
    weights = _loss_weights(full_logits.shape).chunk(2, dim=-1)[dist.get_rank()]
    (logits * weights).sum().backward()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    grads = _full_grads(model)
    _save(model, checkpoint)
    return {"logits": full_logits, "grads": grads, "shapes": shapes}


def test_tensor_parallel_2_with_sequence_parallel_matches_one_rank(rank_results):
    from models.hunyuan_image3.parallelize import build_hunyuan_model, load_full_weights

    config = _tiny_config()
    ours = rank_results["ours"]
    ranks = [r["tp2_sp"] for r in rank_results["ranks"]]
    with parallel_context():
        model = build_hunyuan_model(config)
        load_full_weights(model, ours)
        logits = model(_input_ids(30, TP_SEQ))
        (logits * _loss_weights(logits.shape)).sum().backward()
        expected = {n: p.grad for n, p in model.named_parameters()}
    for rank, result in enumerate(ranks):
        # Split as intended: whole KV groups, vocab rows, experts' and shared expert's halves.
        shapes = result["shapes"]
        assert shapes["layers.0.self_attention.linear_qkv.weight"] == (64, 64)
        assert shapes["word_embeddings.weight"] == shapes["output_layer.weight"] == (64, 64)
        assert shapes["layers.0.mlp.experts.local_experts.7.linear_fc1.weight"] == (32, 64)
        assert shapes["layers.0.mlp.shared_experts.linear_fc2.weight"] == (64, 16)
        torch.testing.assert_close(result["logits"], logits.detach(), rtol=1e-5, atol=1e-5)
        assert set(result["grads"]) == set(expected)
        for name, grad in result["grads"].items():
            want = expected[name]
            atol = 1e-5 * max(1.0, want.abs().max().item())
            torch.testing.assert_close(grad, want, rtol=1e-4, atol=atol, msg=lambda m, name=name: f"rank {rank} {name}: {m}")


def test_bf16_keeps_the_router_in_float32(reference):
    """The released router weight is float32 and routes in float32; megatron would store it in
    params_dtype. A bf16 trunk keeps it exactly and stays close to the fp32 trunk."""
    from models.hunyuan_image3.parallelize import build_hunyuan_model, load_full_weights
    from models.hunyuan_image3.state_dict_adapter import to_megatron

    ours, _ = to_megatron(reference["released"], _tiny_config())
    with parallel_context():
        model = build_hunyuan_model(_tiny_config(bf16=True, params_dtype=torch.bfloat16))
        load_full_weights(model, ours)
        router = model.layers[1].mlp.router.weight
        assert router.dtype == torch.float32
        assert torch.equal(router.detach(), ours["layers.1.mlp.router.weight"])
        assert model.layers[1].self_attention.linear_qkv.weight.dtype == torch.bfloat16
        logits = model(reference["ids"])
        logits.float().sum().backward()
        assert router.grad.dtype == torch.float32
    assert logits.dtype == torch.bfloat16
    scale = reference["logits"].abs().max()
    assert (logits.float() - reference["logits"]).abs().max() < 0.05 * scale


# --------------------------------------------------------------------------- pipeline parallel


def _pipeline_rank(full_state: dict, checkpoint: str) -> dict:
    """PP=2 (one layer per stage) under megatron's 1F1B schedule, two micro-batches; this stage's
    gradients under full names. Then saves a checkpoint."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mfmegatron.parallel import initialize_parallel
    from models.hunyuan_image3.parallelize import build_hunyuan_model, load_full_weights, local_weights

    initialize_parallel(pipeline_parallel_size=2)
    model = build_hunyuan_model(_tiny_config(pipeline_model_parallel_size=2, pipeline_dtype=torch.float32))
    load_full_weights(model, full_state)
    batches = iter([_input_ids(40 + mb) for mb in range(MICRO_BATCHES)])

    def forward_step(data_iterator, model):
        out = model(next(data_iterator))

        def loss_func(output):
            loss = (output * _loss_weights(output.shape)).sum()
            return loss, {"loss": loss.detach().clone()}  # megatron scales `loss` in place

        return out, loss_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=batches, model=[model],
        num_microbatches=MICRO_BATCHES, seq_length=SEQ, micro_batch_size=BATCH, forward_only=False,
    )
    names = [name for name, _ in local_weights(model)]
    grads = {name: p.grad.clone() for name, p in zip(names, model.parameters())}
    _save(model, checkpoint)
    return {
        "stage": parallel_state.get_pipeline_model_parallel_rank(),
        "losses": [d["loss"] for d in losses] if losses else None,
        "grads": grads,
    }


def test_pipeline_parallel_2_matches_one_rank(rank_results):
    """Losses on the last stage and every stage's gradients equal the one-rank trunk's (the
    schedule averages over micro-batches)."""
    from models.hunyuan_image3.parallelize import build_hunyuan_model, load_full_weights

    ours = rank_results["ours"]
    with parallel_context():
        model = build_hunyuan_model(_tiny_config())
        load_full_weights(model, ours)
        losses = []
        for mb in range(MICRO_BATCHES):
            logits = model(_input_ids(40 + mb))
            loss = (logits * _loss_weights(logits.shape)).sum()
            (loss / MICRO_BATCHES).backward()
            losses.append(loss.detach())
        expected = {n: p.grad for n, p in model.named_parameters()}
    stages = {r["pp2"]["stage"]: r["pp2"] for r in rank_results["ranks"]}
    assert set(stages) == {0, 1}
    for got, want in zip(stages[1]["losses"], losses):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert set(stages[0]["grads"]) | set(stages[1]["grads"]) == set(expected)
    assert not set(stages[0]["grads"]) & set(stages[1]["grads"])
    assert "word_embeddings.weight" in stages[0]["grads"] and "output_layer.weight" in stages[1]["grads"]
    for stage in stages.values():
        for name, grad in stage["grads"].items():
            want = expected[name]
            atol = 1e-5 * max(1.0, want.abs().max().item())
            torch.testing.assert_close(grad, want, rtol=1e-4, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


# --------------------------------------------------------------------------- dist checkpointing


@pytest.mark.parametrize("layout", ["ep2", "tp2_sp", "pp2"])
def test_dist_checkpoint_saved_parallel_loads_on_one_rank_with_every_expert(rank_results, layout):
    """Saved at EP=2 (each rank half the experts), TP=2 + SP (every weight split) or PP=2 (each
    rank one layer), loaded at one rank: every tensor, every expert, equal to the weights that
    were loaded."""
    from megatron.core import dist_checkpointing

    from models.hunyuan_image3.parallelize import build_hunyuan_model

    ours = rank_results["ours"]
    with parallel_context():
        model = build_hunyuan_model(_tiny_config())
        with torch.no_grad():
            for param in model.parameters():
                param.zero_()
        directory = str(rank_results["root"] / layout)
        loaded = dist_checkpointing.load(model.sharded_state_dict(), directory)
        model.load_state_dict(loaded, strict=True)
        state = {n: p.detach() for n, p in model.named_parameters()}
    assert set(state) == set(ours)
    for name, value in ours.items():
        assert torch.equal(state[name], value), name
