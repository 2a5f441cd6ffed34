"""The student's EMA sharded over data-parallel ranks against the replicated one (2 gloo ranks, one
spawn): the same EMA weights after a few updates, 1/DP of the float32 bytes per rank, and
checkpoints that hold the same whole tensors either way and load into either kind at another
layout (DP=2 -> TP=2)."""

from __future__ import annotations

import torch

from mfmegatron.parallel import run_on_ranks

DECAY = 0.9


def _student(tensor_parallel_size: int = 1):
    from models.flux.config import tiny_flux_config
    from models.flux.parallelize import build_flux_model

    model = build_flux_model(
        tiny_flux_config(mean_flow_student=True, tensor_model_parallel_size=tensor_parallel_size)
    )
    return model


def _perturb(model: torch.nn.Module, step: int) -> None:
    # The same new weights on every data-parallel rank (replicas step alike).
    generator = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.1)


def _save(ema, model, directory: str) -> None:
    import os

    from megatron.core import dist_checkpointing

    os.makedirs(directory, exist_ok=True)
    dist_checkpointing.save({"ema": ema.sharded_state_dict(model.sharded_state_dict(), "ema.")}, directory)


def _load(ema, model, directory: str) -> None:
    from megatron.core import dist_checkpointing

    ema.load_state_dict(dist_checkpointing.load(
        {"ema": ema.sharded_state_dict(model.sharded_state_dict(), "ema.")}, directory)["ema"])


def _whole(ema, model) -> dict[str, torch.Tensor]:
    with ema.applied():
        return {name: param.detach().clone() for name, param in model.named_parameters()}


def _worker(directory: str) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing import load_plain_tensors

    from mfmegatron.parallel import initialize_parallel
    from mfmegatron.training.ema import ParameterEMA

    initialize_parallel(tensor_parallel_size=1)  # data-parallel size 2
    dp_group = parallel_state.get_data_parallel_group()
    model = _student()
    for param in model.parameters():
        dist.broadcast(param.data, src=0)
    replicated = ParameterEMA(model, DECAY)
    sharded = ParameterEMA(model, DECAY, group=dp_group)
    for step in range(3):
        _perturb(model, step)
        replicated.update()
        sharded.update()
    result = {
        "replicated_numel": sum(t.numel() for t in replicated.shadow.values()),
        "sharded_numel": sum(t.numel() for t in sharded.shadow.values()),
        "whole_rows": [name for name, rows in sharded.rows.items() if rows is None],
    }
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    whole = _whole(sharded, model)
    result["applied_equal"] = all(torch.equal(whole[name], replicated.shadow[name]) for name in whole)
    result["restored"] = all(torch.equal(param, before[name]) for name, param in model.named_parameters())

    # Checkpoints: the sharded EMA writes each rank's rows, the replicated one whole tensors; both
    # store the same whole tensors under the same keys, and each loads into the other kind.
    _save(sharded, model, f"{directory}/sharded")
    _save(replicated, model, f"{directory}/replicated")
    stored = [load_plain_tensors(f"{directory}/{kind}") for kind in ("sharded", "replicated")]
    result["stored_keys_equal"] = stored[0].keys() == stored[1].keys()
    result["stored_equal"] = all(torch.equal(stored[0][key], stored[1][key]) for key in stored[0])
    result["stored_is_ema"] = all(torch.equal(stored[0][f"ema.{key}"], replicated.shadow[key]) for key in whole)
    for source, target in (("sharded", "replicated"), ("replicated", "sharded")):
        fresh = ParameterEMA(model, DECAY, group=dp_group if target == "sharded" else None)
        _load(fresh, model, f"{directory}/{source}")
        result[f"{source}_into_{target}"] = all(
            torch.equal(tensor, expected) for tensor, expected in zip(_whole(fresh, model).values(), whole.values())
        )

    # Another layout: TP=2 (data-parallel size 1) loads the DP=2 sharded checkpoint.
    initialize_parallel(tensor_parallel_size=2)
    model_tp2 = _student(tensor_parallel_size=2)
    ema_tp2 = ParameterEMA(model_tp2, DECAY, group=parallel_state.get_data_parallel_group())
    _load(ema_tp2, model_tp2, f"{directory}/sharded")
    ema_tp2_state = ema_tp2.sharded_state_dict(model_tp2.sharded_state_dict(), "ema.")
    result["tp2_matches"] = all(
        torch.equal(entry.data, stored[0][entry.key][entry.global_slice()])
        for entry in ema_tp2_state.values()
    )

    # Expert parallel (EP=2, data-parallel size 2, expert data-parallel size 1): the two ranks hold
    # different experts, so the experts' EMA must not be sharded over the data-parallel group.
    from models.hunyuan_image3.config import tiny_hunyuan_image3_config
    from models.hunyuan_image3.parallelize import build_hunyuan_model

    initialize_parallel(expert_parallel_size=2)
    moe = build_hunyuan_model(tiny_hunyuan_image3_config(image_path=True, expert_model_parallel_size=2))
    experts = {name for name, param in moe.named_parameters() if not getattr(param, "allreduce", True)}
    for name, param in moe.named_parameters():
        if name not in experts:
            dist.broadcast(param.data, src=0)
    replicated = ParameterEMA(moe, DECAY)
    sharded = ParameterEMA(moe, DECAY, group=parallel_state.get_data_parallel_group(),
                           expert_group=parallel_state.get_expert_data_parallel_group())
    for step in range(3):
        _perturb(moe, step)
        replicated.update()
        sharded.update()
    whole = _whole(sharded, moe)
    result["moe_experts"] = len(experts)
    result["moe_experts_whole"] = all(sharded.rows[name] is None for name in experts)
    result["moe_dense_sharded"] = sum(sharded.rows[name] is not None for name in whole if name not in experts)
    result["moe_applied_equal"] = all(torch.equal(whole[name], replicated.shadow[name]) for name in whole)
    _save(sharded, moe, f"{directory}/moe_sharded")
    _save(replicated, moe, f"{directory}/moe_replicated")
    stored = [load_plain_tensors(f"{directory}/moe_{kind}") for kind in ("sharded", "replicated")]
    result["moe_stored_equal"] = stored[0].keys() == stored[1].keys() and all(
        torch.equal(stored[0][key], stored[1][key]) for key in stored[0])
    return result


def test_sharded_ema_equals_the_replicated_one_and_checkpoints_alike(tmp_path):
    results = run_on_ranks(_worker, 2, str(tmp_path))
    for result in results:
        # Every parameter of the tiny student splits evenly over 2 ranks: half the float32 bytes.
        assert result["whole_rows"] == []
        assert result["sharded_numel"] * 2 == result["replicated_numel"]
        assert result["applied_equal"] and result["restored"]
        assert result["stored_keys_equal"] and result["stored_equal"] and result["stored_is_ema"]
        assert result["sharded_into_replicated"] and result["replicated_into_sharded"]
        assert result["tp2_matches"]
        # Expert parallel: the experts' EMA stays whole (expert data-parallel size 1), the dense
        # parameters are sharded, and the gathered EMA and the checkpoint equal the replicated one.
        assert result["moe_experts"] > 0 and result["moe_experts_whole"] and result["moe_dense_sharded"] > 0
        assert result["moe_applied_equal"] and result["moe_stored_equal"]
