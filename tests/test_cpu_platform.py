"""The CPU platform support: every redirect still has its target in megatron-core/torch."""

import torch

from mfmegatron.parallel import run_on_ranks


def _apply_and_report():
    import importlib

    from mfmegatron.parallel.cpu_platform import apply_cpu_platform_support

    applied = apply_cpu_platform_support()
    again = apply_cpu_platform_support()  # idempotent: applying twice changes nothing
    report = []
    for redirect in applied:
        value = importlib.import_module(redirect.module)
        for part in redirect.attribute.split("."):  # "Class.method" for patched methods
            value = getattr(value, part)
        # Every replacement is one of ours (wrappers keep the original as __wrapped__) or torch's
        # CPU counterpart, never the CUDA original.
        owner = "mfmegatron.parallel.cpu_platform (wrapper)" if hasattr(value, "__wrapped__") else (
            getattr(value, "__module__", None) or type(value).__module__
        )
        report.append((redirect.module, redirect.attribute, owner))
    return report, len(again)


def _apply_with_cuda_present():
    from mfmegatron.parallel import cpu_platform

    torch.cuda.is_available = lambda: True
    original = torch.cuda.current_device
    applied = cpu_platform.apply_cpu_platform_support()
    return len(applied), torch.cuda.current_device is original


def test_redirects_apply_once_and_point_to_cpu_versions():
    (report, applied_again), (count_with_cuda, untouched) = (
        run_on_ranks(_apply_and_report, 1)[0],
        run_on_ranks(_apply_with_cuda_present, 1)[0],
    )
    names = {f"{module}.{attribute}" for module, attribute, _ in report}
    assert {
        "torch.cuda.current_device",
        "torch.cuda.Stream",
        "torch.cuda.synchronize",
        "megatron.core.tensor_parallel.random._get_cuda_rng_state",
        "megatron.core.tensor_parallel.random._set_cuda_rng_state",
        "megatron.core.transformer.moe.token_dispatcher.maybe_move_tensor_to_cpu",
        "megatron.core.pipeline_parallel.schedules.torch",
        "megatron.core.optimizer.optimizer.torch",
        "megatron.core.optimizer.optimizer.Float16OptimizerWithFloat16Params.__init__",
        "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer.__init__",
        "megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32",
    } <= names
    assert applied_again == len(report)
    for module, attribute, owner in report:
        assert owner.startswith(("mfmegatron.parallel.cpu_platform", "torch.cpu", "torch.random")), (
            module, attribute, owner
        )
    assert count_with_cuda == 0 and untouched


def test_missing_target_fails_loudly(monkeypatch):
    import pytest

    from mfmegatron.parallel import cpu_platform

    with pytest.raises(cpu_platform.PlatformSupportError, match="no longer exists"):
        cpu_platform._replace("megatron.core.tensor_parallel.random", "_renamed_in_a_future_release", None, "test")
