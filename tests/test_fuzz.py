"""Random misuse of ``make_clipped`` and the step: every failure is a named mbclip error, nothing changes."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from mbclip import MbclipError, MicroBatchClipping

ODD_VALUES = st.sampled_from(
    [None, 0, -1, 1, 2, 2.5, "x", "meta", float("nan"), float("inf"), True, False, [1.0], [1.0, 2.0], (0.5,) * 2]
)
ARGUMENTS = [
    "microbatch_size",
    "max_grad_norm",
    "clipping",
    "noise_multiplier",
    "loss_reduction",
    "microbatch_reduction",
    "batch_first",
    "poisson_sampling",
    "nonfinite",
    "verify_gradients",
    "noise_generator",
    "data_loader",
]


def model_traces(model: nn.Module):
    return (
        [(n, p.detach().clone(), sorted(vars(p)), p.requires_grad) for n, p in model.named_parameters()],
        [(n, sorted(vars(m)), len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()],
    )


def same(a, b) -> bool:
    params_a, modules_a = a
    params_b, modules_b = b
    return modules_a == modules_b and all(
        na == nb and torch.equal(ta, tb) and va == vb and ra == rb
        for (na, ta, va, ra), (nb, tb, vb, rb) in zip(params_a, params_b)
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes=st.dictionaries(st.sampled_from(ARGUMENTS), ODD_VALUES, min_size=1, max_size=3))
def test_make_clipped_refuses_with_mbclip_errors_and_leaves_the_model_alone(changes):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before, optimizer_state = model_traces(model), optimizer.state_dict()
    arguments = dict(module=model, optimizer=optimizer, microbatch_size=2, max_grad_norm=1.0)
    arguments.update(changes)
    try:
        MicroBatchClipping().make_clipped(**arguments)
    except MbclipError as error:
        assert len(str(error)) > 20
        assert same(model_traces(model), before)
        assert optimizer.state_dict() == optimizer_state


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(0, 6),
    features=st.sampled_from([3, 3, 2]),
    extra_dims=st.lists(st.integers(1, 3), max_size=1),
    dtype=st.sampled_from([torch.float32, torch.float32, torch.float64, torch.int64]),
    microbatch_size=st.integers(1, 4),
    verify=st.sampled_from(["first", "never"]),
)
def test_step_with_odd_inputs_either_works_or_fails_clearly(
    batch, features, extra_dims, dtype, microbatch_size, verify
):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped, clipped, _ = MicroBatchClipping().make_clipped(
        module=model, optimizer=optimizer, microbatch_size=microbatch_size, max_grad_norm=1.0, verify_gradients=verify
    )
    x = torch.ones([batch, *extra_dims, features]).to(dtype)
    clipped.zero_grad()
    try:
        output = wrapped(x)
    except (RuntimeError, ValueError, TypeError):
        # the model itself refuses the input, as it would unwrapped: torch's own error is the right one
        assert all(p.requires_grad for p in model.parameters())  # nothing left switched off
        return
    output.float().pow(2).mean().backward()
    clipped.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
