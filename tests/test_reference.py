"""The brute-force reference stays independent of mbclip: it refuses a wrapped model and works on a plain twin."""

import copy

import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from mbclip import MicroBatchClipping
from reference import reference_update, weights_into


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


def _losses(x, y):
    return lambda m, samples: ((m(x[samples]) - y[samples]) ** 2).sum(dim=1)


def test_reference_refuses_a_model_with_mbclips_hooks():
    model = _model()
    x, y = torch.randn(4, 4), torch.randn(4, 2)
    wrapped, _, _ = MicroBatchClipping().make_clipped(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), microbatch_size=2, max_grad_norm=1.0
    )
    for hooked in (model, wrapped):  # the module the wrapper was given, and the wrapper itself
        with pytest.raises(TypeError, match="plain model.*copy.deepcopy.*weights_into"):
            reference_update(hooked, _losses(x, y), 4, 2, "fixed", 1.0)


def test_reference_refuses_an_opacus_wrapper_or_a_model_inside_one():
    outer = nn.Sequential(_model())
    GradSampleModule(outer[0])
    x, y = torch.randn(4, 4), torch.randn(4, 2)
    with pytest.raises(TypeError, match="'0' carries per-sample gradient hooks"):
        reference_update(outer, _losses(x, y), 4, 2, "fixed", 1.0)


def test_a_plain_twin_with_the_trained_weights_gives_the_reference_of_the_trained_model():
    model = _model()
    plain = copy.deepcopy(model)
    x, y = torch.randn(6, 4), torch.randn(6, 2)
    wrapped, clipped, _ = MicroBatchClipping().make_clipped(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), microbatch_size=2, max_grad_norm=0.5
    )
    clipped.zero_grad()
    _losses(x, y)(wrapped, slice(None)).mean().backward()
    clipped.step()  # the wrapped model has trained; the twin still has the initial weights
    trained = copy.deepcopy(_model())
    trained.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
    expected = reference_update(trained, _losses(x, y), 6, 2, "fixed", 0.5)
    twin = reference_update(weights_into(plain, model), _losses(x, y), 6, 2, "fixed", 0.5)
    for a, b in zip(twin.update, expected.update):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
