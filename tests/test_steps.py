"""Whole steps: virtual batches over several backward passes, diagnostics, the data loader, the DP path."""

import copy

import pytest
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers import mbclip_update
from mbclip import MicroBatchClipping
from reference import assert_close_update, clip_and_average, reference_update, weights_into


def _model():
    return nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3))


def _losses(x, y):
    def losses(model, samples):
        return F.cross_entropy(model(x[samples]), y[samples], reduction="none")

    return losses


@pytest.mark.parametrize("clipping,max_grad_norm", [("fixed", 0.05), ("adaptive", None), ("per_layer", 0.03)])
@pytest.mark.parametrize("microbatch_size", [1, 2, 3])
def test_several_backward_passes_give_the_mean_over_every_microbatch(clipping, max_grad_norm, microbatch_size):
    x, y = torch.randn(9, 5), torch.randint(0, 3, (9,))
    model = _model()
    passes = [slice(0, 4), slice(4, 9)]  # unequal batches, each split into its own micro-batches
    gradients = []
    for samples in passes:
        sub_x, sub_y = x[samples], y[samples]
        gradients += reference_update(model, _losses(sub_x, sub_y), len(sub_x), microbatch_size, "fixed", 1.0).gradients
    expected = clip_and_average(gradients, clipping, max_grad_norm)
    update, optimizer = mbclip_update(model, _losses(x, y), microbatch_size, clipping, max_grad_norm, passes=passes)
    assert_close_update(update, expected.update)
    assert optimizer.last_step.num_microbatches == len(gradients)
    assert optimizer.last_step.num_samples == 9
    assert optimizer.accumulated_iterations == 2


@pytest.mark.parametrize("microbatch_size", [1, 2, 3, 7, 10])
@pytest.mark.parametrize("microbatch_reduction", ["mean", "sum"])
def test_diagnostics_describe_the_step(microbatch_size, microbatch_reduction):
    batch = 7
    x, y = torch.randn(batch, 5), torch.randint(0, 3, (batch,))
    model = _model()
    plain = copy.deepcopy(model)
    ref = reference_update(model, _losses(x, y), batch, microbatch_size, "fixed", 0.05, microbatch_reduction)
    update, optimizer = mbclip_update(
        model, _losses(x, y), microbatch_size, "fixed", 0.05, microbatch_reduction=microbatch_reduction
    )
    step = optimizer.last_step
    num = -(-batch // microbatch_size)
    sizes = torch.tensor([min(microbatch_size, batch - j * microbatch_size) for j in range(num)], dtype=torch.float64)
    assert step.num_microbatches == num and step.applied and step.dropped_microbatches == 0
    torch.testing.assert_close(step.microbatch_sizes, sizes)
    torch.testing.assert_close(step.microbatch_norms, ref.norms, rtol=1e-10, atol=0)
    torch.testing.assert_close(step.clip_factors, ref.factors, rtol=1e-10, atol=0)
    assert step.fraction_clipped == pytest.approx(float((ref.factors < 1).double().mean()))
    # the update is the weighted sum of per-sample gradients with these weights
    per_sample = reference_update(weights_into(plain, model), _losses(x, y), batch, 1, "fixed", 1e9, "sum").gradients
    rebuilt = [sum(step.sample_weights[i] * per_sample[i][k] for i in range(batch)) for k in range(len(update))]
    assert_close_update(rebuilt, update)
    if microbatch_size >= batch:  # one micro-batch: global clipping; every sample weighs factor / B
        torch.testing.assert_close(
            step.sample_weights, ref.factors.expand(batch) / (batch if microbatch_reduction == "mean" else 1)
        )


def test_adaptive_diagnostics_scale_every_microbatch_to_the_smallest_norm():
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    update, optimizer = mbclip_update(_model(), _losses(x, y), 2, "adaptive")
    step = optimizer.last_step
    scaled = step.microbatch_norms * step.clip_factors
    torch.testing.assert_close(scaled, torch.full_like(scaled, float(step.microbatch_norms.min())), rtol=1e-5, atol=0)
    assert step.fraction_clipped == pytest.approx(3 / 4)


def test_noise_off_hands_back_the_users_loader_unchanged():
    loader = DataLoader(TensorDataset(torch.randn(10, 5), torch.randint(0, 3, (10,))), batch_size=4, shuffle=False)
    model = _model()
    _, _, returned = MicroBatchClipping().make_clipped(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader,
        microbatch_size=2,
        max_grad_norm=1.0,
    )
    assert returned is loader


def test_training_loop_reduces_the_loss():
    torch.manual_seed(0)
    x = torch.randn(64, 5)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    wrapped, clipped, _ = MicroBatchClipping().make_clipped(
        module=model, optimizer=optimizer, microbatch_size=4, max_grad_norm=1.0
    )
    first = None
    for _ in range(30):
        clipped.zero_grad()
        loss = F.cross_entropy(wrapped(x), y)
        loss.backward()
        clipped.step()
        first = first if first is not None else float(loss)
    assert float(loss) < 0.7 * first


def test_dp_path_reports_opacus_epsilon():
    """b = 1, noise and Poisson sampling: the same epsilon as Opacus's PrivacyEngine for the same run."""
    dataset = TensorDataset(torch.randn(32, 5), torch.randint(0, 3, (32,)))
    epsilons = []
    for library in ("opacus", "mbclip"):
        torch.manual_seed(0)
        model = _model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loader = DataLoader(dataset, batch_size=8)
        if library == "opacus":
            engine = PrivacyEngine(accountant="prv")
            model, optimizer, loader = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.1, max_grad_norm=1.0
            )
        else:
            engine = MicroBatchClipping(accountant="prv")
            model, optimizer, loader = engine.make_clipped(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                microbatch_size=1,
                noise_multiplier=1.1,
                max_grad_norm=1.0,
            )
            assert loader is not None and loader.batch_sampler.__class__.__name__ == "UniformWithReplacementSampler"
        for features, labels in loader:
            optimizer.zero_grad()
            if len(features):
                F.cross_entropy(model(features), labels).backward()
            optimizer.step()
        epsilons.append(engine.get_epsilon(1e-5))
    assert 0 < epsilons[1] < float("inf")
    assert epsilons[1] == pytest.approx(epsilons[0], rel=1e-9)


def _train(order: str, verify_gradients: str, steps: int = 3):
    """A few steps of one loop order; returns the parameters and the last step's diagnostics."""
    torch.manual_seed(0)
    model = _model().double()
    wrapped, optimizer, _ = MicroBatchClipping().make_clipped(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        microbatch_size=2,
        max_grad_norm=0.05,
        verify_gradients=verify_gradients,
    )
    batches = [(torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))) for _ in range(steps)]
    for x, y in batches:
        if order == "zero_grad_first":
            optimizer.zero_grad()
            loss = F.cross_entropy(wrapped(x), y)
        elif order == "forward_first":  # plain PyTorch trains the same with this order
            loss = F.cross_entropy(wrapped(x), y)
            optimizer.zero_grad()
        else:  # a discarded forward/backward (zero_grad drops it), then the real one
            optimizer.zero_grad()
            F.cross_entropy(wrapped(x + 1.0), y).backward()
            optimizer.zero_grad()
            loss = F.cross_entropy(wrapped(x), y)
        loss.backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()], optimizer.last_step


@pytest.mark.parametrize("verify_gradients", ["always", "never"])
@pytest.mark.parametrize("order", ["forward_first", "discarded_pass"])
def test_zero_grad_between_forward_and_backward_trains_the_same(order, verify_gradients):
    expected, expected_step = _train("zero_grad_first", verify_gradients)
    actual, last_step = _train(order, verify_gradients)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-14)
    assert last_step.num_microbatches == expected_step.num_microbatches == 3
