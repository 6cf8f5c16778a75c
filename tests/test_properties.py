"""Property-based: random shapes, micro-batch sizes and bounds, always equal to the reference."""

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from helpers import mbclip_update
from reference import assert_close_update, reference_update


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch=st.integers(1, 9),
    steps=st.integers(1, 4),
    d_in=st.integers(1, 5),
    # LayerNorm over one feature is constant: the gradient below it is rounding noise amplified by 1/sqrt(eps),
    # which no two exact ways of summing share
    hidden=st.integers(2, 6),
    microbatch_size=st.integers(1, 11),
    max_grad_norm=st.floats(1e-3, 1e3),
    clipping=st.sampled_from(["fixed", "adaptive", "per_layer"]),
    loss_reduction=st.sampled_from(["mean", "sum"]),
    seed=st.integers(0, 2**16),
)
def test_sequence_model_matches_reference(
    batch, steps, d_in, hidden, microbatch_size, max_grad_norm, clipping, loss_reduction, seed
):
    torch.manual_seed(seed)
    torch.set_default_dtype(torch.float64)
    model = nn.Sequential(nn.Linear(d_in, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, 2))
    x, y = torch.randn(batch, steps, d_in), torch.randn(batch, steps, 2)

    def losses(m, samples):
        return ((m(x[samples]) - y[samples]) ** 2).sum(dim=(1, 2))

    bound = None if clipping == "adaptive" else max_grad_norm
    ref = reference_update(model, losses, batch, microbatch_size, clipping, bound)
    update, _ = mbclip_update(model, losses, microbatch_size, clipping, bound, loss_reduction)
    assert_close_update(update, ref.update)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch=st.integers(1, 6),
    channels=st.integers(1, 4),
    length=st.integers(3, 9),
    kernel=st.integers(1, 3),
    groups_is_depthwise=st.booleans(),
    microbatch_size=st.integers(1, 7),
    max_grad_norm=st.floats(1e-3, 10.0),
    seed=st.integers(0, 2**16),
)
def test_conv_model_matches_reference(
    batch, channels, length, kernel, groups_is_depthwise, microbatch_size, max_grad_norm, seed
):
    torch.manual_seed(seed)
    torch.set_default_dtype(torch.float64)
    groups = channels if groups_is_depthwise else 1
    model = nn.Sequential(
        nn.Conv1d(channels, channels, kernel, groups=groups, padding=kernel // 2),
        nn.GroupNorm(1, channels),
        nn.Flatten(),
        nn.Linear(channels * (length + 2 * (kernel // 2) - kernel + 1), 3),
    )
    x, y = torch.randn(batch, channels, length), torch.randint(0, 3, (batch,))

    def losses(m, samples):
        return F.cross_entropy(m(x[samples]), y[samples], reduction="none")

    ref = reference_update(model, losses, batch, microbatch_size, "fixed", max_grad_norm)
    update, _ = mbclip_update(model, losses, microbatch_size, "fixed", max_grad_norm)
    assert_close_update(update, ref.update)
