"""Every refused input gets an mbclip error naming the problem and the fix, and changes nothing."""

import math

import pytest
import torch
from opacus.grad_sample import GradSampleModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mbclip import (
    ConfigurationError,
    MbclipError,
    MicroBatchClipping,
    PrivacyError,
    UnsupportedModuleError,
)


def _model():
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def _snapshot(model):
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "hooks": [(len(m._forward_hooks), len(m._backward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
        "attrs": [sorted(vars(m)) for m in model.modules()],
        "param_attrs": [sorted(vars(p)) for p in model.parameters()],
    }


def _assert_unchanged(model, snapshot):
    after = _snapshot(model)
    assert after["hooks"] == snapshot["hooks"]
    assert after["attrs"] == snapshot["attrs"]
    assert after["param_attrs"] == snapshot["param_attrs"]
    for key, value in snapshot["state"].items():
        assert torch.equal(after["state"][key], value)


def _refused(match, error=ConfigurationError, model=None, **overrides):
    model = model if model is not None else _model()
    optimizer = overrides.pop("optimizer", None) or torch.optim.SGD(model.parameters(), lr=0.1)
    arguments = dict(module=model, optimizer=optimizer, microbatch_size=2, max_grad_norm=1.0)
    arguments.update(overrides)
    snapshot = _snapshot(model) if isinstance(model, nn.Module) else None
    groups_before = [list(g["params"]) for g in getattr(optimizer, "param_groups", [])]
    with pytest.raises(error, match=match) as raised:
        MicroBatchClipping().make_clipped(**arguments)
    assert isinstance(raised.value, MbclipError)
    if snapshot is not None:
        _assert_unchanged(model, snapshot)
    assert [list(g["params"]) for g in getattr(optimizer, "param_groups", [])] == groups_before
    return raised.value


@pytest.mark.parametrize("value", [0, -1, 2.0, "4", None, True])
def test_microbatch_size_must_be_positive_int(value):
    _refused("microbatch_size=.* must be a positive integer", microbatch_size=value)


@pytest.mark.parametrize("value", [0.0, -1.0, math.inf, math.nan, None, "1"])
@pytest.mark.parametrize("clipping", ["fixed", "per_layer"])
def test_max_grad_norm_must_be_positive_finite(value, clipping):
    _refused("max_grad_norm.*positive finite", max_grad_norm=value, clipping=clipping)


def test_per_layer_bounds_count_and_values():
    _refused("got 2 bounds for 4 optimized parameters", clipping="per_layer", max_grad_norm=[1.0, 1.0])
    _refused("positive finite", clipping="per_layer", max_grad_norm=[1.0, 1.0, -1.0, 1.0])


def test_unknown_names():
    _refused("clipping='global' is not known.*'fixed', 'adaptive', 'per_layer'", clipping="global")
    _refused("loss_reduction='avg' is not known", loss_reduction="avg")
    _refused("microbatch_reduction='max' is not known", microbatch_reduction="max")
    with pytest.raises(ConfigurationError, match="accountant='moments' is not known"):
        MicroBatchClipping(accountant="moments")


def test_adaptive_refuses_noise_and_a_bound():
    _refused("noise with clipping='adaptive' is refused", clipping="adaptive", max_grad_norm=None, noise_multiplier=1.0)
    _refused("clipping='adaptive' needs no max_grad_norm", clipping="adaptive", max_grad_norm=1.0)


@pytest.mark.parametrize("value", [-0.5, math.nan, math.inf, "1"])
def test_noise_multiplier_must_be_finite_non_negative(value):
    _refused("noise_multiplier=.* must be a finite number >= 0", noise_multiplier=value)


def test_already_wrapped_module_and_optimizer():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped, clipped, _ = MicroBatchClipping().make_clipped(
        module=model, optimizer=optimizer, microbatch_size=2, max_grad_norm=1.0
    )
    for module in (wrapped, model):
        with pytest.raises(ConfigurationError, match="already wrapped"):
            MicroBatchClipping().make_clipped(
                module=module,
                optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                microbatch_size=2,
                max_grad_norm=1.0,
            )
    with pytest.raises(ConfigurationError, match="optimizer is already wrapped"):
        MicroBatchClipping().make_clipped(module=_model(), optimizer=clipped, microbatch_size=2, max_grad_norm=1.0)
    opacus_model = GradSampleModule(_model())
    _refused("already wrapped", model=opacus_model)


def test_no_trainable_parameters():
    model = _model().requires_grad_(False)
    _refused("no trainable parameters", model=model, optimizer=torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1))


def test_optimizer_of_another_model():
    _refused("not trainable parameters of the model", optimizer=torch.optim.SGD(_model().parameters(), lr=0.1))


def test_wrong_types():
    _refused("module must be a torch.nn.Module", model="model", optimizer=torch.optim.SGD(_model().parameters()))
    _refused("optimizer must be a torch.optim.Optimizer", optimizer=object())


def test_unsupported_layer_is_named_with_reason():
    model = nn.Sequential(nn.Linear(4, 3), nn.Sequential(nn.EmbeddingBag(10, 3)))
    error = _refused(r"layer '1.0' \(EmbeddingBag\).*use nn.Embedding", error=UnsupportedModuleError, model=model)
    assert "EmbeddingBag" in str(error)
    sparse = nn.Sequential(nn.Embedding(10, 3, sparse=True))
    _refused("sparse=True.*Use sparse=False", error=UnsupportedModuleError, model=sparse)
    scaled = nn.Sequential(nn.Embedding(10, 3, scale_grad_by_freq=True))
    _refused("scale_grad_by_freq", error=UnsupportedModuleError, model=scaled)


def test_poisson_sampling_belongs_to_the_dp_path():
    loader = DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4)
    _refused("Poisson sampling belongs to the DP path", data_loader=loader, poisson_sampling=True)


def test_no_epsilon_without_proof():
    model = _model()
    engine = MicroBatchClipping()
    with pytest.raises(PrivacyError, match="make_clipped has not been called"):
        engine.get_epsilon(1e-5)
    engine.make_clipped(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), microbatch_size=1, max_grad_norm=1.0
    )
    with pytest.raises(PrivacyError, match="without noise micro-batch clipping is a training method"):
        engine.get_epsilon(1e-5)
    model = _model()
    engine = MicroBatchClipping()
    loader = DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4)
    engine.make_clipped(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        microbatch_size=2,
        max_grad_norm=1.0,
        noise_multiplier=1.0,
        data_loader=loader,
    )
    with pytest.raises(PrivacyError, match="no epsilon is claimed for microbatch_size > 1"):
        engine.get_epsilon(1e-5)


def test_uncleared_gradients_are_named_on_checked_steps():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped, clipped, _ = MicroBatchClipping().make_clipped(
        module=model, optimizer=optimizer, microbatch_size=2, max_grad_norm=1.0, verify_gradients="always"
    )
    x = torch.randn(4, 4)
    wrapped(x).sum().backward()
    clipped.step()
    wrapped(x).sum().backward()
    with pytest.raises(MbclipError, match="not cleared since the last step. Call optimizer.zero_grad"):
        clipped.step()


def test_uncleared_gradients_are_harmless_on_unchecked_steps():
    """After the first (checked) step autograd leaves p.grad alone, so a missing zero_grad changes nothing."""
    x = torch.randn(4, 4)
    updates = []
    for clear in (True, False):
        torch.manual_seed(0)
        model = _model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        wrapped, clipped, _ = MicroBatchClipping().make_clipped(
            module=model, optimizer=optimizer, microbatch_size=2, max_grad_norm=1.0
        )
        wrapped(x).sum().backward()
        clipped.step()
        if clear:
            clipped.zero_grad()
        wrapped(x).sum().backward()
        clipped.step()
        updates.append([p.grad.clone() for p in model.parameters()])
    for cleared, uncleared in zip(*updates):
        torch.testing.assert_close(cleared, uncleared, rtol=0, atol=0)


def test_verify_gradients_must_be_known():
    _refused("verify_gradients='sometimes': use one of .*'first', 'always', 'never'", verify_gradients="sometimes")
    _refused("verify_gradients=1", verify_gradients=1)


@pytest.mark.parametrize("verify", ["first", "never"])
def test_parameter_used_outside_its_layer_is_named(verify):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 4)

        def forward(self, x):
            return self.inner(x) @ self.inner.weight  # functional use of a sampled layer's weight

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.tied = Tied()

        def forward(self, x):
            return self.tied(x)

    model = Outer()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped, clipped, _ = MicroBatchClipping().make_clipped(
        module=model, optimizer=optimizer, microbatch_size=2, max_grad_norm=1.0, verify_gradients=verify
    )
    wrapped(torch.randn(4, 4)).pow(2).mean().backward()
    # checked step: the sum is off; unchecked step: autograd computed a gradient that the samplers did not
    match = "'tied.inner.weight' do not add up" if verify == "first" else "'tied.inner.weight' received a gradient"
    with pytest.raises(MbclipError, match=match):
        clipped.step()
