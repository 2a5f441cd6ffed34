"""The adaptive weighted MeanFlow loss and its per-group diagnostics, against autograd."""

import pytest
import torch

from mfmegatron.meanflow import AdaptiveLossConfig, adaptive_weighted_loss


def _prediction_and_target(batch=6):
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(batch, 3, 4, 4, generator=generator, dtype=torch.float64)
    # Samples of very different error sizes, as in distillation: the r = t rows start near zero.
    scale = torch.tensor([1e-4, 1e-3, 1e-2, 0.3, 1.0, 3.0], dtype=torch.float64)[:batch]
    noise = torch.randn(target.shape, generator=generator, dtype=torch.float64)
    prediction = (target + scale.view(-1, 1, 1, 1) * noise).requires_grad_(True)
    return prediction, target


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_the_output_gradient_norm_is_autograds_per_sample_gradient(reduction):
    prediction, target = _prediction_and_target()
    config = AdaptiveLossConfig(c=1e-3, p=1.0, reduction=reduction)
    output = adaptive_weighted_loss(prediction, target, config)

    delta = (prediction - target).detach()
    squared = delta.square().flatten(1).sum(1)
    if reduction == "mean":
        squared = squared / delta[0].numel()
    assert torch.allclose(output.squared_error, squared)
    assert torch.allclose(output.loss, (squared / (squared + config.c)).mean())

    # The loss is a batch mean: B times its gradient is each sample's own.
    (gradient,) = torch.autograd.grad(output.loss, prediction)
    per_sample = (gradient * prediction.shape[0]).flatten(1).norm(dim=1)
    assert torch.allclose(output.output_gradient_norm(), per_sample, rtol=1e-10)


def test_group_stats_split_the_batch_and_show_which_rows_pull_hardest():
    prediction, target = _prediction_and_target()
    output = adaptive_weighted_loss(prediction, target, AdaptiveLossConfig())
    below = torch.tensor([False, False, False, True, True, True])
    stats = output.stats("meanflow_", average_velocity=below)

    assert stats["meanflow_squared_error_r_below_t"] + stats["meanflow_squared_error_r_equals_t"] == pytest.approx(
        stats["meanflow_squared_error"]
    )
    gradient = output.output_gradient_norm()
    assert stats["meanflow_output_gradient_r_equals_t"] == pytest.approx(float(gradient[:3].sum() / 6))
    assert stats["meanflow_output_gradient_r_below_t"] == pytest.approx(float(gradient[3:].sum() / 6))
    # With p = 1 the pull is 2 ||Δ|| / (||Δ||² + c): largest at ||Δ||² = c, so a row with a tiny
    # error (the r = t rows next to their teacher) can pull harder than one a thousand times off.
    assert gradient[2] > gradient[5]
    # Without the mask only the batch means are reported.
    assert set(output.stats("meanflow_")) == {"meanflow_loss", "meanflow_squared_error", "meanflow_weight_mean"}
