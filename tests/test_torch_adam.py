"""The torch-Adam adapter of the distributed optimizer (mfmegatron/training/torch_adam.py), on a
bare torch AdamW fed the way megatron-core 0.19's DistributedOptimizer feeds it. The trainer's
end-to-end resume with it is in tests/test_trainer.py."""

import copy

import torch

from mfmegatron.training.torch_adam import TorchAdamStepAdapter


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3, 2))]


def _step(optimizer: torch.optim.Optimizer, params, scale: float) -> None:
    for i, param in enumerate(params):
        param.grad = torch.full_like(param, scale * (i + 1)) + param.detach()
    optimizer.step()


def test_state_taken_before_the_first_step_is_the_first_steps_and_changes_nothing():
    reference_params, params = _params(), _params()
    reference = torch.optim.AdamW(reference_params, lr=0.1, weight_decay=0.1)
    adam = torch.optim.AdamW(params, lr=0.1, weight_decay=0.1)
    TorchAdamStepAdapter(adam)
    state = adam.state_dict()["state"]  # megatron reads the step count from here
    assert {float(s["step"]) for s in state.values()} == {0.0} and len(state) == len(params)
    for scale in (1.0, -0.5):
        _step(reference, reference_params, scale)
        _step(adam, params, scale)
    for got, expected in zip(params, reference_params):
        assert torch.equal(got, expected)


def test_a_load_with_one_shared_step_continues_like_the_saved_optimizer():
    saved_params = _params()
    saved = torch.optim.AdamW(saved_params, lr=0.1)
    for scale in (1.0, 2.0, 0.5):
        _step(saved, saved_params, scale)
    # What DistributedOptimizer.load_state_dict hands torch: one step tensor for every parameter.
    state_dict = copy.deepcopy(saved.state_dict())
    shared = torch.tensor(3.0)
    for state in state_dict["state"].values():
        state["step"] = shared

    params = [torch.nn.Parameter(p.detach().clone()) for p in saved_params]
    adam = torch.optim.AdamW(params, lr=0.1)
    adapter = TorchAdamStepAdapter(adam)
    adam.load_state_dict(state_dict)
    # megatron then copies the checkpoint's tensors into every tensor of each state: no step.
    assert all("step" not in state for state in adam.state.values()) and adapter.loaded_step == 3.0
    _step(saved, saved_params, -1.0)
    _step(adam, params, -1.0)
    for got, expected in zip(params, saved_params):
        assert torch.equal(got, expected)
    steps = [state["step"] for state in adam.state.values()]
    assert [float(s) for s in steps] == [4.0, 4.0] and steps[0] is not steps[1] and shared.item() == 3.0
    # ... and a state dict taken right after a load has the step back.
    again = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in saved_params], lr=0.1)
    TorchAdamStepAdapter(again)
    again.load_state_dict(state_dict)
    assert {float(s["step"]) for s in again.state_dict()["state"].values()} == {3.0}
