"""Non-finite micro-batches, empty and odd batches, accumulation, mixed precision: nothing poisons a step."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mbclip import BatchError, MicroBatchClipping, NonFiniteGradientWarning
from reference import assert_close_update, reference_update, weights_into
from toy_models import small_data, small_model, squared_error_losses


def wrap(model, microbatch_size=3, clipping="fixed", max_grad_norm=1.0, lr=0.1, momentum=0.9, **kwargs):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    wrapped, clipped, _ = MicroBatchClipping().make_clipped(
        module=model,
        optimizer=optimizer,
        microbatch_size=microbatch_size,
        clipping=clipping,
        max_grad_norm=max_grad_norm,
        **kwargs,
    )
    return wrapped, clipped


def backward(wrapped, x, y):
    ((wrapped(x) - y) ** 2).sum(dim=1).mean().backward()


def grads(model):
    return [p.grad for p in model.parameters()]


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def momentum_buffers(optimizer):
    return [optimizer.state[p]["momentum_buffer"].clone() for p in optimizer.params if p in optimizer.state]


# -- non-finite gradients -----------------------------------------------------------------------------


@pytest.mark.parametrize("clipping,max_grad_norm", [("fixed", 1.0), ("adaptive", None), ("per_layer", 0.5)])
def test_nan_microbatch_is_dropped_and_the_rest_averaged(clipping, max_grad_norm):
    model = small_model()
    x, y = small_data(10)
    kept = torch.tensor([0, 1, 2, 6, 7, 8, 9])  # micro-batch 1 (samples 3..5) of b=3 is dropped
    expected = reference_update(model, squared_error_losses(x[kept], y[kept]), 7, 3, clipping, max_grad_norm)
    y = y.clone()
    y[4] = float("nan")  # the loss of one sample, as log(0) in a CTC loss would give
    wrapped, optimizer = wrap(model, clipping=clipping, max_grad_norm=max_grad_norm)
    optimizer.zero_grad()
    backward(wrapped, x, y)  # autograd's p.grad is NaN: the step-time verification must not raise
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step()
    assert_close_update(grads(model), expected.update)
    step = optimizer.last_step
    assert step.applied and step.dropped_microbatches == 1 and step.num_microbatches == 4
    assert torch.isnan(step.microbatch_norms[1]) and torch.isfinite(step.microbatch_norms[[0, 2, 3]]).all()
    assert (step.sample_weights[3:6] == 0).all() and (step.sample_weights[[0, 1, 2, 6, 7, 8, 9]] > 0).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_inf_input_with_samplers_only_drops_its_microbatch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = small_data(8)
    kept = torch.tensor([0, 1, 4, 5, 6, 7])
    expected = reference_update(model, squared_error_losses(x[kept], y[kept]), 6, 2, "fixed", 1.0)
    x = x.clone()
    x[3, 1] = float("inf")
    wrapped, optimizer = wrap(model, microbatch_size=2)
    optimizer.zero_grad()
    backward(wrapped, x, y)
    optimizer.step()
    assert optimizer.last_step.dropped_microbatches == 1
    assert_close_update(grads(model), expected.update)


def test_all_microbatches_non_finite_leaves_parameters_and_momentum_unchanged():
    model = small_model()
    plain = copy.deepcopy(model)
    x, y = small_data(6)
    wrapped, optimizer = wrap(model)
    optimizer.zero_grad()
    backward(wrapped, x, y)
    optimizer.step()  # a good step first, so there is momentum state to protect
    params, buffers = snapshot(model), momentum_buffers(optimizer)
    optimizer.zero_grad()
    backward(wrapped, x, torch.full_like(y, float("nan")))
    with pytest.warns(NonFiniteGradientWarning, match="skipped"):
        optimizer.step()
    assert not optimizer.last_step.applied
    assert optimizer.last_step.dropped_microbatches == optimizer.last_step.num_microbatches == 2
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(buffers, momentum_buffers(optimizer)))
    # and the next good step is exact again
    expected = reference_update(weights_into(plain, model), squared_error_losses(x, y), 6, 3, "fixed", 1.0)
    optimizer.zero_grad()
    backward(wrapped, x, y)
    optimizer.step()
    assert_close_update(grads(model), expected.update)


def test_raise_policy_names_the_problem_and_changes_nothing():
    model = small_model()
    plain = copy.deepcopy(model)
    x, y = small_data(6)
    wrapped, optimizer = wrap(model, nonfinite="raise")
    params = snapshot(model)
    bad = y.clone()
    bad[0] = float("inf")
    optimizer.zero_grad()
    backward(wrapped, x, bad)
    with pytest.raises(BatchError, match="not finite.*nonfinite='skip'"):
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    expected = reference_update(weights_into(plain, model), squared_error_losses(x, y), 6, 3, "fixed", 1.0)
    optimizer.zero_grad()
    backward(wrapped, x, y)
    optimizer.step()
    assert_close_update(grads(model), expected.update)


# -- empty, small and changing batches ------------------------------------------------------------------


def test_empty_batch_is_a_no_op_step():
    model = small_model()
    plain = copy.deepcopy(model)
    x, y = small_data(5)
    wrapped, optimizer = wrap(model)
    params = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.zero_grad()
        backward(wrapped, x[:0], y[:0])
        assert optimizer.step() is None
    assert not optimizer.last_step.applied and optimizer.last_step.num_samples == 0
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert not optimizer.original_optimizer.state  # the user's optimizer never stepped
    expected = reference_update(weights_into(plain, model), squared_error_losses(x, y), 5, 3, "fixed", 1.0)
    optimizer.zero_grad()
    backward(wrapped, x, y)
    optimizer.step()
    assert_close_update(grads(model), expected.update)


def test_step_without_any_batch_is_a_no_op():
    model = small_model()
    _, optimizer = wrap(model)
    params = snapshot(model)
    optimizer.zero_grad()
    optimizer.step()
    assert not optimizer.last_step.applied
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))


def test_empty_poisson_batch_on_the_dp_path_is_a_noise_only_step():
    model = small_model()
    x, y = small_data(20)
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    engine = MicroBatchClipping(accountant="rdp")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(3)
    wrapped, clipped, dp_loader = engine.make_clipped(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        microbatch_size=1,
        max_grad_norm=1.0,
        noise_multiplier=1.0,
        noise_generator=generator,
    )
    params = snapshot(model)
    clipped.zero_grad()
    backward(wrapped, x[:0], y[:0])  # what Opacus's DPDataLoader yields for an empty Poisson batch
    clipped.step()
    step = clipped.last_step
    assert step.applied and step.num_samples == 0 and step.noise_std == pytest.approx(1.0 / 5)
    assert all(not torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert len(engine.accountant.history) == 1 and engine.get_epsilon(1e-5) > 0


def test_batch_smaller_than_the_microbatch_is_one_microbatch():
    model = small_model()
    x, y = small_data(2)
    expected = reference_update(model, squared_error_losses(x, y), 2, 5, "fixed", 0.3)
    wrapped, optimizer = wrap(model, microbatch_size=5, max_grad_norm=0.3)
    optimizer.zero_grad()
    backward(wrapped, x, y)
    optimizer.step()
    assert optimizer.last_step.num_microbatches == 1
    assert_close_update(grads(model), expected.update)


def test_batch_size_changing_every_step():
    model = small_model()
    plain = copy.deepcopy(model)
    wrapped, optimizer = wrap(model, momentum=0.0)
    for step, batch_size in enumerate([7, 1, 4, 10, 3, 2]):
        x, y = small_data(batch_size, seed=10 + step)
        losses = squared_error_losses(x, y)
        expected = reference_update(weights_into(plain, model), losses, batch_size, 3, "fixed", 1.0)
        optimizer.zero_grad()
        backward(wrapped, x, y)
        optimizer.step()
        assert optimizer.last_step.num_samples == batch_size
        assert_close_update(grads(model), expected.update)


def test_several_backward_passes_average_over_all_microbatches_since_the_step():
    model = small_model()
    (x1, y1), (x2, y2) = small_data(5, seed=2), small_data(4, seed=3)
    first = reference_update(model, squared_error_losses(x1, y1), 5, 2, "fixed", 0.5)
    second = reference_update(model, squared_error_losses(x2, y2), 4, 2, "fixed", 0.5)
    factors = torch.cat([first.factors, second.factors])
    gradients = first.gradients + second.gradients
    expected = [sum(f * g[i] for f, g in zip(factors, gradients)) / len(gradients) for i in range(len(gradients[0]))]
    wrapped, optimizer = wrap(model, microbatch_size=2, max_grad_norm=0.5)
    optimizer.zero_grad()
    backward(wrapped, x1, y1)
    backward(wrapped, x2, y2)
    backward(wrapped, x2[:0], y2[:0])  # an empty pass among them changes nothing
    optimizer.step()
    assert optimizer.last_step.num_microbatches == 5
    assert_close_update(grads(model), expected)


def test_nan_in_one_of_several_passes_drops_only_that_microbatch():
    model = small_model()
    (x1, y1), (x2, y2) = small_data(4, seed=2), small_data(4, seed=3)
    first = reference_update(model, squared_error_losses(x1, y1), 4, 2, "fixed", 0.5)
    second = reference_update(model, squared_error_losses(x2, y2), 4, 2, "fixed", 0.5)
    factors = torch.cat([first.factors, second.factors[1:]])
    gradients = first.gradients + second.gradients[1:]
    expected = [sum(f * g[i] for f, g in zip(factors, gradients)) / len(gradients) for i in range(len(gradients[0]))]
    wrapped, optimizer = wrap(model, microbatch_size=2, max_grad_norm=0.5)
    optimizer.zero_grad()
    backward(wrapped, x1, y1)
    bad = y2.clone()
    bad[1] = float("nan")
    backward(wrapped, x2, bad)
    optimizer.step()
    assert optimizer.last_step.dropped_microbatches == 1
    assert_close_update(grads(model), expected)


# -- unwrap ---------------------------------------------------------------------------------------------


def traces(model: nn.Module):
    """Everything of a model that a wrapper could leave behind: attributes, hooks, buffers."""
    modules = [
        (name, sorted(vars(m)), len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
        for name, m in model.named_modules()
    ]
    params = [(name, sorted(vars(p)), p._backward_hooks) for name, p in model.named_parameters()]
    return modules, params, [name for name, _ in model.named_buffers()]


def test_unwrap_gives_back_the_original_and_wrapping_again_works():
    model = small_model()
    before = traces(model)
    x, y = small_data(6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = MicroBatchClipping()
    wrapped, clipped, _ = engine.make_clipped(module=model, optimizer=optimizer, microbatch_size=2, max_grad_norm=1.0)
    clipped.zero_grad()
    backward(wrapped, x, y)
    clipped.step()
    original, original_optimizer = engine.unwrap(wrapped, clipped)
    assert original is model and original_optimizer is optimizer
    assert traces(model) == before
    expected = reference_update(model, squared_error_losses(x, y), 6, 3, "fixed", 0.7)
    wrapped, clipped, _ = engine.make_clipped(module=model, optimizer=optimizer, microbatch_size=3, max_grad_norm=0.7)
    clipped.zero_grad()
    backward(wrapped, x, y)
    clipped.step()
    assert_close_update(grads(model), expected.update)
    engine.unwrap(wrapped)
    assert traces(model) == before


def test_unwrap_refuses_what_make_clipped_did_not_return():
    from mbclip import ConfigurationError

    with pytest.raises(ConfigurationError, match="make_clipped returned"):
        MicroBatchClipping.unwrap(small_model())


# -- mixed precision ------------------------------------------------------------------------------------

# Documented tolerances: the update under autocast against the float32 update, relative over all parameters.
AUTOCAST_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3}


def float32_update(autocast_dtype=None, verify="always"):
    model = small_model(dtype=torch.float32)
    x, y = small_data(12, dtype=torch.float32)
    wrapped, optimizer = wrap(model, momentum=0.0, verify_gradients=verify)
    optimizer.zero_grad()
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        loss = ((wrapped(x).float() - y) ** 2).sum(dim=1).mean()
    loss.backward()
    optimizer.pre_step()  # with verification on: its tolerance follows the autocast dtype
    return grads(model), optimizer.last_step


@pytest.mark.parametrize("dtype", list(AUTOCAST_TOLERANCE))
@pytest.mark.parametrize("verify", ["always", "never"])
def test_autocast_matches_float32_with_norms_in_float32(dtype, verify):
    expected, _ = float32_update()
    actual, step = float32_update(dtype, verify)
    assert all(g.dtype == torch.float32 for g in actual)
    assert step.microbatch_norms.dtype == torch.float32
    assert_close_update(actual, expected, rtol=AUTOCAST_TOLERANCE[dtype])


def test_bfloat16_model_keeps_norms_in_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).float()
    x, y = small_data(9, dtype=torch.float32)
    expected = reference_update(model, squared_error_losses(x, y), 9, 3, "fixed", 1.0)
    model = model.to(torch.bfloat16)
    wrapped, optimizer = wrap(model, momentum=0.0)
    optimizer.zero_grad()
    backward(wrapped, x.bfloat16(), y.bfloat16())
    optimizer.pre_step()
    assert optimizer.last_step.microbatch_norms.dtype == torch.float32
    assert all(p.grad.dtype == torch.bfloat16 for p in model.parameters())
    assert_close_update([p.grad.float() for p in model.parameters()], expected.update, rtol=5e-2)
