"""With b = 1 mbclip is Opacus's per-sample clipping: same update, with and without noise."""

import copy

import pytest
import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from mbclip import MicroBatchClipping

B = 6


def _model():
    return nn.Sequential(
        nn.Conv1d(3, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4 * 5, 5), nn.LayerNorm(5), nn.Linear(5, 3)
    )


def _step_opacus(model, x, y, noise, loss_reduction, seed):
    module = GradSampleModule(model, loss_reduction=loss_reduction)
    optimizer = DPOptimizer(
        torch.optim.SGD(module.parameters(), lr=1.0),
        noise_multiplier=noise,
        max_grad_norm=0.1,
        expected_batch_size=B,
        loss_reduction=loss_reduction,
    )
    optimizer.zero_grad()
    F.cross_entropy(module(x), y, reduction=loss_reduction).backward()
    torch.manual_seed(seed)
    optimizer.pre_step()
    return [p.grad.clone() for p in model.parameters()]


def _step_mbclip(model, x, y, noise, loss_reduction, seed, verify="first"):
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    module, clipped, _ = MicroBatchClipping().make_clipped(
        module=model,
        optimizer=optimizer,
        microbatch_size=1,
        max_grad_norm=0.1,
        noise_multiplier=noise,
        loss_reduction=loss_reduction,
        verify_gradients=verify,
    )
    clipped.zero_grad()
    F.cross_entropy(module(x), y, reduction=loss_reduction).backward()
    torch.manual_seed(seed)
    clipped.pre_step()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("noise", [0.0, 1.3])
@pytest.mark.parametrize("verify", ["first", "never"])
def test_b1_equals_opacus_update(noise, verify):
    model = _model()
    x, y = torch.randn(B, 3, 7), torch.randint(0, 3, (B,))
    expected = _step_opacus(copy.deepcopy(model), x, y, noise, "mean", seed=5)
    actual = _step_mbclip(copy.deepcopy(model), x, y, noise, "mean", seed=5, verify=verify)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-13)


def test_b1_with_summed_loss_is_opacus_update_over_batch_size():
    """mbclip's update is always the mean over micro-batches; Opacus leaves a summed loss unscaled."""
    model = _model()
    x, y = torch.randn(B, 3, 7), torch.randint(0, 3, (B,))
    expected = _step_opacus(copy.deepcopy(model), x, y, 0.0, "sum", seed=0)
    actual = _step_mbclip(copy.deepcopy(model), x, y, 0.0, "sum", seed=0)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e / B, rtol=1e-10, atol=1e-13)


def test_opacus_keeps_working_beside_mbclip():
    """mbclip registers nothing in Opacus's shared sampler registry."""
    before = dict(GradSampleModule.GRAD_SAMPLERS)
    model = _model()
    _step_mbclip(model, torch.randn(B, 3, 7), torch.randint(0, 3, (B,)), 0.0, "mean", seed=0)
    assert GradSampleModule.GRAD_SAMPLERS == before
    test_b1_equals_opacus_update(0.0, "first")
