"""LoRA on the tensor-parallel linears (``mfmegatron/jvp/linear.py``) against a dense LoRA.

One spawn of two ranks runs a frozen Column→Row pair with LoRA at TP=2, with and without sequence
parallelism; the dense reference (``W + scale · B A`` from the gathered factors) is computed here.
The same spawn checks what a sequence-parallel column-parallel linear keeps for backward (its
chunk of the input, not the gathered sequence) against the same layer saving the gathered input.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mfmegatron.jvp.linear import ColumnParallelLinear, RowParallelLinear
from mfmegatron.parallel import initialize_parallel, parallel_context, run_on_ranks

HIDDEN, FFN, SEQ, BATCH, RANK, ALPHA = 16, 32, 8, 2, 4, 8.0
TOL = dict(rtol=1e-4, atol=1e-4)  # float32 sums in another order
SP_SEQ, SP_HIDDEN, SP_FFN = 64, 64, 128  # the sequence-parallel column linear whose bytes are counted


def _pair(tensor_parallel_size: int, sequence_parallel: bool):
    from megatron.core.model_parallel_config import ModelParallelConfig

    from mfmegatron.jvp.lora import add_lora

    config = ModelParallelConfig(
        tensor_model_parallel_size=tensor_parallel_size, sequence_parallel=sequence_parallel,
        use_cpu_initialization=True, params_dtype=torch.float32, gradient_accumulation_fusion=False,
    )
    init = lambda w: torch.nn.init.normal_(w, std=0.2)  # noqa: E731
    model = torch.nn.Module()
    model.column = ColumnParallelLinear(HIDDEN, FFN, config=config, init_method=init, bias=True,
                                        gather_output=False)
    model.row = RowParallelLinear(FFN, HIDDEN, config=config, init_method=init, bias=True,
                                  input_is_parallel=True, skip_bias_add=False)
    model.requires_grad_(False)  # the frozen teacher weights
    names = add_lora(model, RANK, ALPHA, seed=3)
    return model, names


def _run_pair(sequence_parallel: bool) -> dict:
    initialize_parallel(tensor_parallel_size=2, seed=7)
    model, names = _pair(2, sequence_parallel)
    tp_rank = torch.distributed.get_rank()
    with torch.no_grad():  # a trained-looking B (it starts at zero), the same full B on both ranks
        for layer in (model.column, model.row):
            full = torch.randn(layer.lora.b.shape[0] * (2 if layer is model.column else 1), RANK,
                               generator=torch.Generator().manual_seed(5))
            layer.lora.b.copy_(full.chunk(2)[tp_rank] if layer is model.column else full)
    torch.manual_seed(100)
    x_full, tx_full = torch.randn(SEQ, BATCH, HIDDEN), torch.randn(SEQ, BATCH, HIDDEN)

    def local(t):
        return t.chunk(2, dim=0)[tp_rank].clone() if sequence_parallel else t.clone()

    from mfmegatron.parallel import collectives

    x = local(x_full).requires_grad_(True)
    collectives.reset_chunk_counters()
    hidden, thidden = model.column.forward_jvp(x, local(tx_full))
    y, ty = model.row.forward_jvp(F.gelu(hidden), thidden)  # tangent: gelu skipped, linear only
    weights = local(torch.linspace(-1, 1, SEQ * BATCH * HIDDEN).view(SEQ, BATCH, HIDDEN))
    (y * weights).sum().backward()
    chunk_counters = dict(collectives.chunk_counters)
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    sharded = model.column.sharded_state_dict("column.", metadata={"dp_cp_group": None})
    sharded.update(model.row.sharded_state_dict("row.", metadata={"dp_cp_group": None}))
    return {
        "names": names, "trainable": trainable, "x": x_full, "tx": tx_full, "y": y.detach(), "ty": ty,
        "x_grad": x.grad, "chunk_counters": chunk_counters,
        "params": {n: p.detach() for n, p in model.named_parameters()},
        "grads": {n: p.grad for n, p in model.named_parameters() if p.requires_grad},
        "split_axes": {k: v.global_shape != v.local_shape for k, v in sharded.items() if hasattr(v, "local_shape")},
    }


def _lora_fake(pipeline_parallel_size: int) -> dict:
    """The trainer's LoRA fake network at this PP size: each layer's A, by whole-model name."""
    from mfmegatron.config import load_config
    from mfmegatron.training.config import TrainConfig
    from models.flux.state_dict_adapter import megatron_block_key_to_global
    from models.flux.training import FluxFamily

    config = load_config(TrainConfig, "recipes/flux_tiny_cpu.yaml", [
        "parallel.tensor_parallel_size=1", f"parallel.pipeline_parallel_size={pipeline_parallel_size}",
        "alignment.fake_network=lora", "alignment.lora_rank=4"])
    initialize_parallel(pipeline_parallel_size=pipeline_parallel_size)
    networks = FluxFamily().build_networks(config, torch.device("cpu"), with_fake=True)
    fake = networks.fake
    return {megatron_block_key_to_global(name, fake.block_range, fake.config): param.detach()
            for name, param in fake.named_parameters() if name.endswith("lora.a")}, networks


def _sequence_parallel_column_saves_its_chunk() -> dict:
    """A trained column-parallel linear at TP=2 with SP, forward_jvp then backward, saving its
    chunk (the default) and, for comparison, the gathered input (``saves_sequence_chunk`` off):
    whether the gathered input outlives the forward, the chunk counters, outputs and every
    gradient."""
    import gc
    import weakref

    from megatron.core.model_parallel_config import ModelParallelConfig

    from mfmegatron.parallel import collectives

    initialize_parallel(tensor_parallel_size=2, seed=7)
    config = ModelParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True, use_cpu_initialization=True,
                                 params_dtype=torch.float32, gradient_accumulation_fusion=False)
    tp_rank = torch.distributed.get_rank()
    torch.manual_seed(100)
    x_full, tx_full = torch.randn(SP_SEQ, BATCH, SP_HIDDEN), torch.randn(SP_SEQ, BATCH, SP_HIDDEN)
    weights = torch.linspace(-1, 1, SP_SEQ * BATCH * SP_FFN).view(SP_SEQ, BATCH, SP_FFN)
    results = {}
    for saves_chunk in (True, False):
        layer = ColumnParallelLinear(SP_HIDDEN, SP_FFN, config=config, init_method=lambda w: torch.nn.init.normal_(w, std=0.2),
                                     bias=True, gather_output=False)
        layer.saves_sequence_chunk = saves_chunk
        x = x_full.chunk(2, dim=0)[tp_rank].clone().requires_grad_(True)
        tx = tx_full.chunk(2, dim=0)[tp_rank].clone()
        collectives.reset_chunk_counters()
        gathered = []

        def gather_sequence(*args, **kwargs):
            x_full, tx_full = original_gather(*args, **kwargs)
            gathered.append(weakref.ref(x_full))
            return x_full, tx_full

        original_gather, collectives.gather_sequence = collectives.gather_sequence, gather_sequence
        try:
            y, ty = layer.forward_jvp(x, tx)
        finally:
            collectives.gather_sequence = original_gather
        gc.collect()
        counters_after_forward = dict(collectives.chunk_counters)
        gathered_alive = [ref() is not None for ref in gathered]
        # The output is column-parallel over the whole sequence: this rank's features.
        (y * weights.chunk(2, dim=-1)[tp_rank]).sum().backward()
        results[saves_chunk] = {
            "gathered_alive_after_forward": gathered_alive,
            "counters_after_forward": counters_after_forward, "counters": dict(collectives.chunk_counters),
            "y": y.detach(), "ty": ty, "x_grad": x.grad, "weight": layer.weight.detach(), "bias": layer.bias.detach(),
            "weight_grad": layer.weight.grad, "bias_grad": layer.bias.grad,
        }
    results["x"], results["tx"], results["loss_weights"] = x_full, tx_full, weights
    return results


def _worker():
    return {"pairs": {sp: _run_pair(sp) for sp in (False, True)}, "pp2_lora_a": _lora_fake(2)[0],
            "sp_column": _sequence_parallel_column_saves_its_chunk()}


@pytest.fixture(scope="module")
def results():
    return run_on_ranks(_worker, world_size=2)


def _gather(results, name, dim):
    return torch.cat([r["params"][name] for r in results], dim=dim)


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2_sp"])
def test_lora_pair_matches_a_dense_lora_with_every_gradient(results, sequence_parallel):
    ranks = [r["pairs"][sequence_parallel] for r in results]
    first = ranks[0]
    assert first["names"] == ["column", "row"]
    assert first["trainable"] == ["column.lora.a", "column.lora.b", "row.lora.a", "row.lora.b"]
    scale = ALPHA / RANK
    # The dense LoRA pair, from the gathered frozen weights and factors.
    leaves = {
        "cw": _gather(ranks, "column.weight", 0), "cb": _gather(ranks, "column.bias", 0),
        "ca": first["params"]["column.lora.a"].clone(), "cB": _gather(ranks, "column.lora.b", 0),
        "rw": _gather(ranks, "row.weight", 1), "rb": first["params"]["row.bias"],
        "ra": _gather(ranks, "row.lora.a", 1), "rB": first["params"]["row.lora.b"].clone(),
    }
    for name in ("ca", "cB", "ra", "rB"):
        leaves[name].requires_grad_(True)
    x = first["x"].clone().requires_grad_(True)

    def dense(x, leaves):
        hidden = F.linear(x, leaves["cw"] + scale * leaves["cB"] @ leaves["ca"], leaves["cb"])
        return F.linear(F.gelu(hidden), leaves["rw"] + scale * leaves["rB"] @ leaves["ra"], leaves["rb"])

    y = dense(x, leaves)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    cat = (lambda key: torch.cat([r[key] for r in ranks], dim=0)) if sequence_parallel else (lambda key: first[key])
    torch.testing.assert_close(cat("y"), y.detach(), **TOL)
    torch.testing.assert_close(cat("x_grad"), x.grad, **TOL)
    # Each rank's factor gradients: its shard of the split one, and the whole (summed) other one.
    for rank, result in enumerate(ranks):
        grads = result["grads"]
        torch.testing.assert_close(grads["column.lora.a"], leaves["ca"].grad, **TOL)
        torch.testing.assert_close(grads["column.lora.b"], leaves["cB"].grad.chunk(2, 0)[rank], **TOL)
        torch.testing.assert_close(grads["row.lora.a"], leaves["ra"].grad.chunk(2, 1)[rank], **TOL)
        torch.testing.assert_close(grads["row.lora.b"], leaves["rB"].grad, **TOL)
    # Tangent of the linear part: the adapted weights applied to the tangent (gelu not in the path).
    hidden_t = F.linear(first["tx"], leaves["cw"] + scale * leaves["cB"] @ leaves["ca"])
    ty = F.linear(hidden_t, leaves["rw"] + scale * leaves["rB"] @ leaves["ra"]).detach()
    torch.testing.assert_close(cat("ty"), ty, **TOL)
    # Checkpoint sharding follows the weights: column B and row A split, the others whole.
    assert first["split_axes"] == {
        "column.weight": True, "column.bias": True, "column.lora.a": False, "column.lora.b": True,
        "row.weight": True, "row.bias": False, "row.lora.a": True, "row.lora.b": False,
    }


def test_a_sequence_parallel_lora_saves_the_chunk_of_its_input(results):
    # The frozen column GEMM saves no input; its LoRA's x Aᵀ saves the chunk, gathered again once
    # in backward. Without SP nothing is gathered, so nothing is swapped.
    for result in results:
        assert result["pairs"][True]["chunk_counters"] == {"chunks_saved": 1, "regathers": 1}
        assert result["pairs"][False]["chunk_counters"] == {"chunks_saved": 0, "regathers": 0}


def test_a_sequence_parallel_column_linear_keeps_its_chunk_for_backward(results):
    """TP=2 with SP: once forward_jvp has returned, the gathered input of a trained
    column-parallel linear is gone (autograd saved the rank's chunk in its place); saving the
    gathered input instead keeps it alive until backward. Backward gathers the chunk again once,
    and every output and gradient equals the dense layer's either way."""
    ranks = [r["sp_column"] for r in results]
    for run in ranks:
        chunk, whole = run[True], run[False]
        assert chunk["counters_after_forward"] == {"chunks_saved": 1, "regathers": 0}
        assert chunk["counters"] == {"chunks_saved": 1, "regathers": 1}
        assert whole["counters"] == {"chunks_saved": 0, "regathers": 0}
        assert chunk["gathered_alive_after_forward"] == [False]
        assert whole["gathered_alive_after_forward"] == [True]
    first = ranks[0]
    for saves_chunk in (True, False):
        runs = [run[saves_chunk] for run in ranks]
        dense = torch.nn.Linear(SP_HIDDEN, SP_FFN)
        with torch.no_grad():
            dense.weight.copy_(torch.cat([r["weight"] for r in runs], 0))
            dense.bias.copy_(torch.cat([r["bias"] for r in runs], 0))
        x = first["x"].clone().requires_grad_(True)
        y = dense(x)
        (y * first["loss_weights"]).sum().backward()
        torch.testing.assert_close(torch.cat([r["y"] for r in runs], -1), y.detach(), **TOL)
        torch.testing.assert_close(torch.cat([r["ty"] for r in runs], -1), F.linear(first["tx"], dense.weight).detach(), **TOL)
        torch.testing.assert_close(torch.cat([r["x_grad"] for r in runs], 0), x.grad, **TOL)
        torch.testing.assert_close(torch.cat([r["weight_grad"] for r in runs], 0), dense.weight.grad, **TOL)
        torch.testing.assert_close(torch.cat([r["bias_grad"] for r in runs], 0), dense.bias.grad, **TOL)


def test_a_fresh_lora_leaves_the_layer_unchanged():
    # Single process, TP=1: B = 0 gives the frozen layer's output.
    from mfmegatron.jvp.lora import add_lora

    with parallel_context():
        model, _ = _pair(1, False)
        frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora" not in k and torch.is_tensor(v)}
        x = torch.randn(SEQ, BATCH, HIDDEN)
        with torch.no_grad():
            y_lora, _ = model.row.forward_jvp(model.column.forward_jvp(x)[0])
        with pytest.raises(ValueError, match="rank"):
            add_lora(model, 0, ALPHA)
    hidden = F.linear(x, frozen["column.weight"], frozen["column.bias"])
    torch.testing.assert_close(y_lora, F.linear(hidden, frozen["row.weight"], frozen["row.bias"]))
    assert torch.equal(model.column.lora.b, torch.zeros_like(model.column.lora.b))
    assert model.column.lora.a.shape == (RANK, HIDDEN) and model.row.lora.a.shape == (RANK, FFN)


def test_lora_factors_at_tp2_are_the_tp1_draw_split(results):
    # A is drawn whole and split, so every TP layout starts from the same adapted network.
    with parallel_context():
        tp1, _ = _pair(1, False)
    ranks = [r["pairs"][False] for r in results]
    # The TP=2 run overwrote B with random values; A is still the initial draw.
    torch.testing.assert_close(ranks[0]["params"]["column.lora.a"], tp1.column.lora.a.detach())
    torch.testing.assert_close(_gather(ranks, "row.lora.a", 1), tp1.row.lora.a.detach())


def test_the_lora_fake_network_holds_no_weights_of_its_own_and_starts_alike_at_any_pp(results):
    # The trainer's fake network with alignment.fake_network=lora: the teacher's tensors plus
    # LoRA factors, the only trainable parameters; A drawn by whole-model layer name.
    with parallel_context():
        lora_a, networks = _lora_fake(1)
    teacher = dict(networks.teacher.named_parameters())
    fake = dict(networks.fake.named_parameters())
    trainable = {name for name, param in fake.items() if param.requires_grad}
    assert trainable and all(".lora." in name for name in trainable)
    for name, param in fake.items():
        if name not in trainable:
            assert param is teacher[name], name
    assert {name.rsplit(".lora.", 1)[0] for name in trainable} == {
        name for name, module in networks.fake.named_modules()
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear))
    }
    # Two pipeline stages hold the blocks between them, each with the PP=1 draw.
    stages = [r["pp2_lora_a"] for r in results]
    block_keys = [{k for k in stage if "_blocks." in k} for stage in stages]
    assert block_keys[0] and block_keys[1] and not block_keys[0] & block_keys[1]
    for stage in stages:
        for key, a in stage.items():
            torch.testing.assert_close(a, lora_a[key], rtol=0, atol=0)


def test_a_lora_fake_network_trains_every_block_with_activation_recompute():
    # Recompute wraps each block in an autograd Function, which autograd records only when an
    # input requires grad; the LoRA fake network's blocks get frozen inputs (its embedders are the
    # teacher's), so before the fix no block's factor got a gradient with recompute on.
    from types import SimpleNamespace

    from mfmegatron.config import load_config
    from mfmegatron.training.config import TrainConfig
    from models.flux.training import FluxFamily

    family, grads = FluxFamily(), {}
    for recompute in (False, True):
        config = load_config(TrainConfig, None, [
            "model.preset=tiny", "model.dtype=fp32", "model.image_size=64", "model.text_tokens=8",
            "alignment.enabled=true", "alignment.fake_network=lora", "alignment.lora_rank=4",
            f"model.recompute={str(recompute).lower()}"])
        initialize_parallel(seed=5)
        fake = family.build_networks(config, torch.device("cpu"), with_fake=True).fake
        generator = torch.Generator().manual_seed(0)
        (image, channels), (text_dim, pooled_dim) = family.latent_shape(config), family.text_encoder_dims(config)
        prompts = SimpleNamespace(t5=torch.randn(2, 8, text_dim, generator=generator),
                                  pooled=torch.randn(2, pooled_dim, generator=generator))
        cond = family.condition(prompts, config, torch.device("cpu"), torch.float32)
        z, t = torch.randn(2, image, channels, generator=generator), torch.rand(2, generator=generator)
        out, _ = family.stage_forward(fake, z, None, t, cond, None)
        out.square().mean().backward()
        grads[recompute] = {name: p.grad.clone() for name, p in fake.named_parameters() if p.requires_grad}
    block_b = [name for name in grads[True] if name.startswith("single_blocks.1.") and name.endswith("lora.b")]
    assert block_b and all(grads[True][name].abs().sum() > 0 for name in block_b)
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, **TOL, msg=name)
