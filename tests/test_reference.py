"""The brute-force reference stays independent of mbclip: it refuses a wrapped model and works on a plain twin."""

import copy

import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from mbclip import MicroBatchClipping
from reference import assert_close_update, reference_update, weights_into


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


def test_a_plain_twin_with_the_trained_weights_gives_the_next_steps_reference():
    model = _model()
    plain = copy.deepcopy(model)
    x, y = torch.randn(6, 4), torch.randn(6, 2)
    wrapped, clipped, _ = MicroBatchClipping().make_clipped(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), microbatch_size=2, max_grad_norm=0.5
    )
    clipped.zero_grad()
    _losses(x, y)(wrapped, slice(None)).mean().backward()
    clipped.step()  # the wrapped model has trained; the twin still has the initial weights
    twin = weights_into(plain, model)
    assert all(torch.equal(a, b) for a, b in zip(twin.parameters(), model.parameters()))
    expected = reference_update(twin, _losses(x, y), 6, 2, "fixed", 0.5)
    clipped.zero_grad()  # the second step (sampler-only path) against the twin's reference
    _losses(x, y)(wrapped, slice(None)).mean().backward()
    assert clipped.pre_step()
    assert_close_update([p.grad for p in model.parameters()], expected.update)
