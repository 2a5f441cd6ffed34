"""megatron-core's parallel layers on CPU (gloo) against dense single-process references.

All distributed checks share one spawn of two ranks (each rank pays seconds of imports): the
worker re-initialises megatron's parallel groups for each layout (TP=2, EP=2, PP=2) and returns
shards, outputs and gradients; the dense references are computed here, in the pytest process,
from the gathered weights.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mfmegatron.parallel import (
    ParallelConfigError,
    RankFailure,
    initialize_parallel,
    run_on_ranks,
)

HIDDEN = 16
FFN = 32
SEQ = 8
BATCH = 2


def _transformer_config(**overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    settings = dict(
        num_layers=2,
        hidden_size=HIDDEN,
        num_attention_heads=4,
        ffn_hidden_size=FFN,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    settings.update(overrides)
    return TransformerConfig(**settings)


def _causal_mask():
    # An explicit mask: megatron's default causal mask is built on a CUDA device.
    return torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1).view(1, 1, SEQ, SEQ)


def _output_weights(shape):
    # A non-uniform loss weighting so that every output element's gradient path is checked.
    return torch.linspace(-1, 1, torch.Size(shape).numel()).view(shape)


# --------------------------------------------------------------------------- rank-side checks


def _tp_linear_pair(sequence_parallel: bool) -> dict:
    """Column→Row parallel linears at TP=2: outputs, input grad and every parameter grad."""
    from megatron.core import tensor_parallel
    from megatron.core.model_parallel_config import ModelParallelConfig

    initialize_parallel(tensor_parallel_size=2, seed=7)
    config = ModelParallelConfig(
        tensor_model_parallel_size=2,
        sequence_parallel=sequence_parallel,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        gradient_accumulation_fusion=False,
    )
    init = lambda w: torch.nn.init.normal_(w, std=0.2)  # noqa: E731
    column = tensor_parallel.ColumnParallelLinear(
        HIDDEN, FFN, config=config, init_method=init, bias=True, gather_output=False
    )
    row = tensor_parallel.RowParallelLinear(
        FFN, HIDDEN, config=config, init_method=init, bias=True, input_is_parallel=True,
        skip_bias_add=False,
    )
    with torch.no_grad():  # non-zero biases so their gradients and placement are checked too
        column.bias.normal_()
        row.bias.normal_()
    torch.manual_seed(100)  # the same full input on both ranks
    x_full = torch.randn(SEQ, BATCH, HIDDEN)
    tp_rank = torch.distributed.get_rank()
    x = x_full.chunk(2, dim=0)[tp_rank].clone() if sequence_parallel else x_full.clone()
    x.requires_grad_(True)
    hidden, _ = column(x)
    y, _ = row(F.gelu(hidden))
    output_weights = _output_weights((SEQ, BATCH, HIDDEN))
    if sequence_parallel:
        output_weights = output_weights.chunk(2, dim=0)[tp_rank]
    (y * output_weights).sum().backward()
    return {
        "x": x_full,
        "y": y.detach(),
        "x_grad": x.grad,
        "column_weight": column.weight.detach(),
        "column_bias": column.bias.detach(),
        "row_weight": row.weight.detach(),
        "row_bias": row.bias.detach(),
        "column_weight_grad": column.weight.grad,
        "column_bias_grad": column.bias.grad,
        "row_weight_grad": row.weight.grad,
        "row_bias_grad": row.bias.grad,
    }


def _transformer_layer(tensor_parallel_size: int) -> dict:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    initialize_parallel(tensor_parallel_size=tensor_parallel_size, seed=11)
    config = _transformer_config(tensor_model_parallel_size=tensor_parallel_size)
    layer = build_module(get_gpt_layer_local_spec(), config=config, layer_number=1)
    torch.manual_seed(200)
    x = torch.randn(SEQ, BATCH, HIDDEN, requires_grad=True)
    y, _ = layer(x, attention_mask=_causal_mask())
    (y * torch.cos(torch.arange(y.numel(), dtype=torch.float32)).view_as(y)).sum().backward()
    return {"y": y.detach(), "x_grad": x.grad}


def _moe_layer() -> dict:
    """MoELayer at EP=2 with the alltoall dispatcher, 4 experts (2 per rank), top-2 routing."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.process_groups_config import ProcessGroupCollection

    initialize_parallel(expert_parallel_size=2, seed=13)
    config = _transformer_config(
        num_moe_experts=4,
        moe_router_topk=2,
        moe_token_dispatcher_type="alltoall",
        moe_aux_loss_coeff=0.0,
        moe_grouped_gemm=False,
        expert_model_parallel_size=2,
        add_bias_linear=False,
    )
    build_moe = get_moe_module_spec(use_te=False, num_experts=4, moe_grouped_gemm=False)
    moe = build_moe(config=config, pg_collection=ProcessGroupCollection.use_mpu_process_groups())
    rank = torch.distributed.get_rank()
    torch.manual_seed(300 + rank)  # each rank routes its own tokens
    x = torch.randn(SEQ, BATCH, HIDDEN, requires_grad=True)
    y, _ = moe(x)
    y.square().sum().backward()
    experts = {
        f"expert{rank * 2 + local}": {
            "fc1": mlp.linear_fc1.weight.detach(),
            "fc2": mlp.linear_fc2.weight.detach(),
        }
        for local, mlp in enumerate(moe.experts.local_experts)
    }
    return {
        "x": x.detach(),
        "y": y.detach(),
        "x_grad": x.grad,
        "router": moe.router.weight.detach(),
        "experts": experts,
    }


class _PipelineStage(torch.nn.Module):
    """A TransformerBlock stage with an input projection on the first stage and a head on the last."""

    def __init__(self, config, pre_process: bool, post_process: bool):
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.transformer.transformer_block import TransformerBlock

        super().__init__()
        self.config = config  # the schedules read it from the model
        self.pre_process, self.post_process = pre_process, post_process
        self.embed = torch.nn.Linear(4, HIDDEN) if pre_process else None
        self.block = TransformerBlock(
            config, get_gpt_layer_local_spec(), pre_process=pre_process, post_process=post_process
        )
        self.head = torch.nn.Linear(HIDDEN, 1) if post_process else None

    def set_input_tensor(self, tensors):
        # The schedules pass a list (one tensor per model chunk input); the block takes one.
        self.block.set_input_tensor(tensors[0] if isinstance(tensors, list) else tensors)

    def forward(self, inputs):
        hidden = self.embed(inputs) if self.pre_process else None
        out = self.block(hidden, attention_mask=_causal_mask())
        return self.head(out) if self.post_process else out


def _pipeline_parallel(num_microbatches: int = 4) -> dict:
    """PP=1 reference (plain autograd over microbatches), then PP=2 with megatron's 1F1B."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    torch.manual_seed(400)
    inputs = torch.randn(num_microbatches, SEQ, BATCH, 4)
    targets = torch.randn(num_microbatches, SEQ, BATCH, 1)

    initialize_parallel(pipeline_parallel_size=1, seed=17)
    config = _transformer_config(num_layers=4)
    full = _PipelineStage(config, pre_process=True, post_process=True)
    full_state = {k: v.clone() if torch.is_tensor(v) else v for k, v in full.state_dict().items()}
    reference_loss = 0.0
    for mb in range(num_microbatches):
        loss = F.mse_loss(full(inputs[mb]), targets[mb]) / num_microbatches
        loss.backward()
        reference_loss += loss.item()
    reference_grads = {n: p.grad.clone() for n, p in full.named_parameters()}

    initialize_parallel(pipeline_parallel_size=2, seed=17)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    config = _transformer_config(num_layers=4, pipeline_model_parallel_size=2, pipeline_dtype=torch.float32)
    model = _PipelineStage(
        config,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    layers_per_stage = 2
    stage_to_full = {}
    for name in model.state_dict():
        full_name = name
        if name.startswith("block.layers."):
            local = int(name.split(".")[2])
            full_name = name.replace(f"block.layers.{local}.", f"block.layers.{local + stage * layers_per_stage}.", 1)
        stage_to_full[name] = full_name
    model.load_state_dict({name: full_state[full_name] for name, full_name in stage_to_full.items()})

    batches = iter([(inputs[mb], targets[mb]) for mb in range(num_microbatches)])

    def forward_step(data_iterator, model):
        x, target = next(data_iterator)
        out = model(x)

        def loss_func(output):
            loss = F.mse_loss(output, target)
            return loss, {"loss": loss.detach().clone()}  # megatron scales `loss` in place

        return out, loss_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=batches,
        model=[model],
        num_microbatches=num_microbatches,
        seq_length=SEQ,
        micro_batch_size=BATCH,
        forward_only=False,
    )
    pipeline_loss = sum(d["loss"].item() for d in losses) / num_microbatches if losses else None
    grads = {stage_to_full[n]: p.grad.clone() for n, p in model.named_parameters()}
    return {
        "reference_loss": reference_loss,
        "reference_grads": reference_grads,
        "pipeline_loss": pipeline_loss,
        "pipeline_grads": grads,
        "stage": stage,
    }


def _optimizer_steps(use_distributed_optimizer: bool, bf16: bool) -> dict:
    """megatron DDP + (distributed) Adam on 2 data-parallel ranks that see different inputs."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    initialize_parallel(seed=19)
    config = _transformer_config(bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32)
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(HIDDEN, FFN), torch.nn.GELU(), torch.nn.Linear(FFN, 1))
    initial = [p.detach().clone() for p in module.parameters()]
    module = module.to(config.params_dtype)
    ddp = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(
            use_distributed_optimizer=use_distributed_optimizer, grad_reduce_in_fp32=True
        ),
        module=module,
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=1e-2, weight_decay=0.1, clip_grad=0.5, bf16=bf16,
            use_distributed_optimizer=use_distributed_optimizer, params_dtype=config.params_dtype,
        ),
        [ddp],
    )
    from mfmegatron.training.torch_adam import make_torch_adam_checkpointable

    # The adapter the trainer installs (torch's Adam in the distributed optimizer) changes no step;
    # a state dict taken before the first step (what loading a checkpoint does) neither.
    adapters = len(make_torch_adam_checkpointable(optimizer))
    optimizer.state_dict()
    rank = torch.distributed.get_rank()
    torch.manual_seed(500 + rank)
    inputs = [torch.randn(4, HIDDEN) for _ in range(3)]
    for x in inputs:
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        ddp(x.to(config.params_dtype)).float().square().mean().backward()
        ddp.finish_grad_sync()
        succeeded, grad_norm, _ = optimizer.step()
        assert succeeded
    return {
        "inputs": inputs,
        "initial": initial,
        "final": [p.detach().float().clone() for p in module.parameters()],
        "adapters": adapters,
    }


def _all_checks() -> dict:
    return {
        "optimizer": _optimizer_steps(use_distributed_optimizer=False, bf16=False),
        "distributed_optimizer": _optimizer_steps(use_distributed_optimizer=True, bf16=False),
        "distributed_optimizer_bf16": _optimizer_steps(use_distributed_optimizer=True, bf16=True),
        "tp_linear": _tp_linear_pair(sequence_parallel=False),
        "tp_linear_sp": _tp_linear_pair(sequence_parallel=True),
        "layer_tp1": _transformer_layer(1),
        "layer_tp2": _transformer_layer(2),
        "moe": _moe_layer(),
        "pipeline": _pipeline_parallel(),
    }


@pytest.fixture(scope="module")
def rank_results():
    return run_on_ranks(_all_checks, 2, timeout=300)


# --------------------------------------------------------------------------- dense references


def _dense_linear_pair(results: list[dict], sequence_parallel: bool):
    """nn.Linear pair with the gathered weights, run on the same input: outputs and grads."""
    column = torch.nn.Linear(HIDDEN, FFN)
    row = torch.nn.Linear(FFN, HIDDEN)
    with torch.no_grad():
        column.weight.copy_(torch.cat([r["column_weight"] for r in results], dim=0))
        column.bias.copy_(torch.cat([r["column_bias"] for r in results], dim=0))
        row.weight.copy_(torch.cat([r["row_weight"] for r in results], dim=1))
        row.bias.copy_(results[0]["row_bias"])
    x = results[0]["x"].clone().requires_grad_(True)
    y = row(F.gelu(column(x)))
    (y * _output_weights(y.shape)).sum().backward()
    return x, y, column, row


@pytest.mark.parametrize("key,sequence_parallel", [("tp_linear", False), ("tp_linear_sp", True)])
def test_column_row_parallel_linear_matches_dense(rank_results, key, sequence_parallel):
    results = [r[key] for r in rank_results]
    x, y, column, row = _dense_linear_pair(results, sequence_parallel)
    if sequence_parallel:  # each rank holds its sequence chunk of input, output and input grad
        y_parallel = torch.cat([r["y"] for r in results], dim=0)
        x_grad_parallel = torch.cat([r["x_grad"] for r in results], dim=0)
    else:
        y_parallel = results[0]["y"]
        x_grad_parallel = results[0]["x_grad"]
        torch.testing.assert_close(results[1]["y"], y_parallel, rtol=0, atol=0)
    torch.testing.assert_close(y_parallel, y.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_grad_parallel, x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        torch.cat([r["column_weight_grad"] for r in results], 0), column.weight.grad, rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        torch.cat([r["column_bias_grad"] for r in results], 0), column.bias.grad, rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        torch.cat([r["row_weight_grad"] for r in results], 1), row.weight.grad, rtol=1e-5, atol=1e-5
    )
    # The row bias is replicated; with SP each rank's grad covers its own sequence chunk.
    row_bias_grad = (
        sum(r["row_bias_grad"] for r in results) if sequence_parallel else results[0]["row_bias_grad"]
    )
    torch.testing.assert_close(row_bias_grad, row.bias.grad, rtol=1e-5, atol=1e-5)


def test_transformer_layer_tp2_matches_tp1(rank_results):
    for rank in rank_results:
        torch.testing.assert_close(rank["layer_tp2"]["y"], rank["layer_tp1"]["y"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            rank["layer_tp2"]["x_grad"], rank["layer_tp1"]["x_grad"], rtol=1e-5, atol=1e-5
        )


def test_moe_expert_parallel_matches_hand_routed_dense(rank_results):
    experts = {}
    for rank in rank_results:
        experts.update(rank["moe"]["experts"])
    router = rank_results[0]["moe"]["router"]
    torch.testing.assert_close(rank_results[1]["moe"]["router"], router, rtol=0, atol=0)
    for rank in rank_results:
        x = rank["moe"]["x"].clone().requires_grad_(True)
        tokens = x.reshape(-1, HIDDEN)
        logits = tokens @ router.t()
        top_logits, top_experts = logits.topk(2, dim=-1)
        weights = top_logits.softmax(dim=-1)  # megatron's default: softmax over the top-k logits
        y = torch.zeros_like(tokens)
        for token in range(tokens.shape[0]):
            for slot in range(2):
                expert = experts[f"expert{top_experts[token, slot].item()}"]
                hidden = F.gelu(tokens[token] @ expert["fc1"].t())
                y[token] = y[token] + weights[token, slot] * (hidden @ expert["fc2"].t())
        y = y.view_as(x)
        y.square().sum().backward()
        torch.testing.assert_close(rank["moe"]["y"], y.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rank["moe"]["x_grad"], x.grad, rtol=1e-5, atol=1e-5)


def test_pipeline_1f1b_matches_single_stage(rank_results):
    last = next(r["pipeline"] for r in rank_results if r["pipeline"]["stage"] == 1)
    assert last["pipeline_loss"] == pytest.approx(last["reference_loss"], rel=1e-6, abs=1e-7)
    checked = set()
    for rank in rank_results:
        pipeline = rank["pipeline"]
        for name, grad in pipeline["pipeline_grads"].items():
            torch.testing.assert_close(grad, pipeline["reference_grads"][name], rtol=1e-5, atol=1e-6)
            checked.add(name)
    assert checked == set(rank_results[0]["pipeline"]["reference_grads"])


# --------------------------------------------------------------------------- errors


def _bad_layout():
    initialize_parallel(tensor_parallel_size=3)


def test_bad_parallel_size_is_a_clear_error_not_a_hang():
    with pytest.raises(RankFailure, match="not divisible by tensor_parallel_size \\(3\\)"):
        run_on_ranks(_bad_layout, 2, timeout=120)


def test_validation_messages_name_the_sizes(monkeypatch):
    from mfmegatron.parallel import ParallelConfig, validate_parallel_sizes

    assert validate_parallel_sizes(ParallelConfig(tensor_parallel_size=2, pipeline_parallel_size=2), 8) == 2
    with pytest.raises(ParallelConfigError, match="expert_parallel_size \\(3\\)"):
        validate_parallel_sizes(ParallelConfig(expert_parallel_size=3), 4)
    with pytest.raises(ParallelConfigError, match="positive integer"):
        validate_parallel_sizes(ParallelConfig(tensor_parallel_size=0), 4)
    with pytest.raises(ParallelConfigError, match="virtual_pipeline"):
        validate_parallel_sizes(ParallelConfig(virtual_pipeline_parallel_size=2), 4)


@pytest.mark.parametrize("key", ["optimizer", "distributed_optimizer", "distributed_optimizer_bf16"])
def test_megatron_ddp_and_optimizer_match_torch_adamw_on_the_averaged_gradient(rank_results, key):
    """megatron DDP + optimizer (fp32, distributed, bf16 with fp32 main params) on CPU against
    torch.optim.AdamW with the gradient averaged over the two ranks' inputs and norm clipping."""
    from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE

    results = [r[key] for r in rank_results]
    assert results[0]["adapters"] == (0 if HAVE_APEX_OR_TE or key == "optimizer" else 1)
    module = torch.nn.Sequential(torch.nn.Linear(HIDDEN, FFN), torch.nn.GELU(), torch.nn.Linear(FFN, 1))
    with torch.no_grad():
        for param, value in zip(module.parameters(), results[0]["initial"]):
            param.copy_(value)
    bf16 = key.endswith("bf16")
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8)
    for step in range(3):
        optimizer.zero_grad()
        losses = []
        for rank in results:
            x = rank["inputs"][step]
            if bf16:  # the model computes in bf16 from bf16 weights; the reference can't, so compare loosely
                x = x.bfloat16().float()
            losses.append(module(x).square().mean())
        (sum(losses) / len(losses)).backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 0.5)
        optimizer.step()
    for rank in results:
        for got, expected in zip(rank["final"], module.parameters()):
            tolerance = dict(rtol=2e-2, atol=2e-2) if bf16 else dict(rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got, expected.detach(), **tolerance)
