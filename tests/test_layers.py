"""Every core layer, every clipping mode, every micro-batch size: equal to the brute-force reference."""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import mbclip_update
from reference import assert_close_update, reference_update

B = 7
MICROBATCH_SIZES = [1, 2, 3, B, B + 3]
MODES = [("fixed", 0.05), ("fixed", 100.0), ("adaptive", None), ("per_layer", 0.02)]


class Transpose(nn.Module):
    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return x.transpose(self.a, self.b)


class RawParameters(nn.Module):
    """A module owning raw parameters used outside any Linear, with dropout and a keyword argument."""

    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(dim))
        self.shift = nn.Parameter(torch.randn(dim))
        self.dropout = nn.Dropout(0.3)

    def forward(self, x, gain=1.0):
        return self.dropout(torch.tanh(x * self.scale + self.shift)) * gain


class KeywordCaller(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.raw = RawParameters(dim)

    def forward(self, x):
        return self.raw(x, gain=2.0)


def sequence_regression(make_input, make_target):
    x, y = make_input(), make_target()

    def losses(model, samples):
        out = model(x[samples])
        return ((out - y[samples]) ** 2).reshape(out.shape[0], -1).mean(dim=1)

    return losses


def classification(x, num_classes):
    y = torch.randint(0, num_classes, (x.shape[0],))

    def losses(model, samples):
        return F.cross_entropy(model(x[samples]), y[samples], reduction="none")

    return losses


def _case(name):
    if name == "linear":
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
        return model, classification(torch.randn(B, 5), 3)
    if name == "linear_sequence":
        model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 4, bias=False))
        return model, sequence_regression(lambda: torch.randn(B, 4, 5), lambda: torch.randn(B, 4, 4))
    if name == "conv1d":
        model = nn.Sequential(
            nn.Conv1d(4, 6, 3, padding=1),
            nn.ReLU(),
            nn.Conv1d(6, 6, 5, groups=6, padding="same", padding_mode="reflect"),  # depthwise
            nn.Conv1d(6, 4, 3, stride=2, dilation=2, groups=2),
            nn.Flatten(),
            nn.Linear(4 * 3, 3),
        )
        return model, classification(torch.randn(B, 4, 9), 3)
    if name == "conv2d":
        model = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"),
            nn.Tanh(),
            nn.Conv2d(4, 4, (3, 2), groups=4, stride=(2, 1)),
            nn.Flatten(),
            nn.Linear(4 * 2 * 4, 3),
        )
        return model, classification(torch.randn(B, 3, 6, 5), 3)
    if name == "conv3d":
        model = nn.Sequential(nn.Conv3d(2, 3, 2), nn.Flatten(), nn.Linear(3 * 8, 2))
        return model, classification(torch.randn(B, 2, 3, 3, 3), 2)
    if name == "depthwise":  # one input channel per group: the einsum path, with multiplier, stride, dilation
        model = nn.Sequential(
            nn.Conv1d(3, 6, 3, groups=3, stride=2, dilation=2, padding=2),
            nn.Tanh(),
            nn.Conv1d(6, 6, 5, groups=6, padding=2, bias=False),  # windows taken in channel chunks
            nn.Unflatten(2, (2, 3)),
            nn.Conv2d(6, 6, (2, 3), groups=6, dilation=(1, 2), padding=(1, 2)),
            nn.Unflatten(2, (3, 1)),
            nn.Conv3d(6, 6, 2, groups=6, padding=(0, 1, 1)),
            nn.Flatten(),
            nn.Linear(96, 3),
        )
        return model, classification(torch.randn(B, 3, 12), 3)
    if name == "depthwise_long_filter":  # filters longer than the input: windows, not per-sample gradients, at b > 1
        model = nn.Sequential(
            nn.Conv1d(4, 8, 7, groups=4, padding=3),  # 8 x 7 weights per sample against 4 x 5 inputs
            nn.Tanh(),
            nn.Conv1d(8, 8, 9, groups=8, padding=4, dilation=1, bias=False),
            nn.Flatten(),
            nn.Linear(8 * 5, 3),
        )
        return model, classification(torch.randn(B, 4, 5), 3)
    if name == "few_taps_conv":  # dense convolutions with <= 32 taps per filter: per-sample products of windows
        model = nn.Sequential(
            nn.Conv2d(3, 27, 3, stride=(1, 2), padding=1),  # 27 taps, as an image model's first layer
            nn.Tanh(),
            nn.Conv2d(27, 4, 1),  # pointwise, in between
            nn.Flatten(2),
            nn.Conv1d(4, 12, 3, stride=2, dilation=2, padding=3, bias=False),  # 12 taps
            nn.Unflatten(1, (1, 12)),
            nn.Unflatten(3, (3, 7)),
            nn.Conv3d(1, 8, 2, padding="same"),  # 8 taps, asymmetric padding applied by the sampler
            nn.Flatten(),
            nn.Linear(8 * 12 * 3 * 7, 3),
        )
        return model, classification(torch.randn(B, 3, 8, 10), 3)
    if name == "few_positions_conv":  # at b = 1, no more output positions than channels: per-sample products too
        model = nn.Sequential(
            nn.Conv2d(4, 16, 3, stride=2, padding=1),  # 36 taps, 3 x 3 = 9 positions <= 16 channels
            nn.Tanh(),
            nn.Flatten(2),
            nn.Conv1d(16, 9, 2, dilation=3),  # 32 taps, 6 positions <= 9 channels
            nn.Flatten(),
            nn.Linear(9 * 6, 3),
        )
        return model, classification(torch.randn(B, 4, 6, 6), 3)
    if name == "channels_last_conv":  # 16 or more input channels: windows copied channels-last (2-d and 3-d)
        model = nn.Sequential(
            nn.Conv2d(16, 20, (3, 2), stride=(2, 1), dilation=(1, 2), padding=1),  # 3 x 6 = 18 positions
            nn.Tanh(),
            nn.Unflatten(1, (20, 1)),
            nn.Conv3d(20, 18, (1, 2, 3), stride=(1, 1, 2), padding=(0, 1, 0), padding_mode="reflect"),  # 8 positions
            nn.Flatten(),
            nn.Linear(18 * 8, 3),
        )
        return model, classification(torch.randn(B, 16, 5, 6), 3)
    if name == "wide_conv":  # over 32 input channels per group: the grouped kernel also for 3 and 4 micro-batches
        model = nn.Sequential(
            nn.Conv1d(40, 66, 3, padding=1),
            nn.Tanh(),
            nn.Conv1d(66, 4, 3, groups=2),  # 33 input channels per group
            nn.Flatten(),
            nn.Linear(4 * 4, 3),
        )
        return model, classification(torch.randn(B, 40, 6), 3)
    if name == "pointwise_conv":  # 1x1 convolutions are sampled as a Linear over positions
        model = nn.Sequential(
            nn.Conv1d(4, 6, 1),
            nn.SiLU(),
            nn.Conv1d(6, 6, 1, padding="same", bias=False),
            nn.Unflatten(2, (3, 3)),
            nn.Conv2d(6, 3, 1),
            nn.Flatten(),
            nn.Linear(3 * 9, 3),
        )
        return model, classification(torch.randn(B, 4, 9), 3)
    if name == "embedding":
        model = nn.Sequential(nn.Embedding(11, 5, padding_idx=0), nn.Linear(5, 3))
        tokens = torch.randint(0, 11, (B, 6))
        tokens[0, :2] = 0
        return model, sequence_regression(lambda: tokens, lambda: torch.randn(B, 6, 3))
    if name == "layer_norm":
        model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 6), nn.LayerNorm([6], bias=False))
        return model, sequence_regression(lambda: torch.randn(B, 3, 5), lambda: torch.randn(B, 3, 6))
    if name == "rms_norm":
        model = nn.Sequential(nn.Linear(5, 6), nn.RMSNorm(6), nn.Linear(6, 2))
        return model, sequence_regression(lambda: torch.randn(B, 3, 5), lambda: torch.randn(B, 3, 2))
    if name == "group_norm":
        model = nn.Sequential(nn.Conv1d(3, 6, 3), nn.GroupNorm(3, 6), nn.Flatten(), nn.Linear(6 * 5, 2))
        return model, classification(torch.randn(B, 3, 7), 2)
    if name == "instance_norm":
        model = nn.Sequential(
            nn.Conv2d(2, 4, 3),
            nn.InstanceNorm2d(4, affine=True),
            nn.Conv2d(4, 2, 1),
            nn.InstanceNorm2d(2, affine=True, track_running_stats=True),
            nn.Flatten(),
            nn.Linear(2 * 9, 2),
        )
        return model, classification(torch.randn(B, 2, 5, 5), 2)
    if name == "instance_norm1d":
        model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.InstanceNorm1d(4, affine=True), nn.Flatten(), nn.Linear(4 * 5, 2))
        return model, classification(torch.randn(B, 2, 7), 2)
    if name == "fallback":  # raw parameters, dropout, keyword arguments: the autograd fallback
        model = nn.Sequential(nn.Linear(5, 6), KeywordCaller(6), RawParameters(6), nn.Linear(6, 3))
        return model, sequence_regression(lambda: torch.randn(B, 4, 5), lambda: torch.randn(B, 4, 3))
    if name == "time_first":  # batch_first=False: sequences [T, B, D]
        model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), RawParameters(6), nn.Linear(6, 2))
        x, y = torch.randn(4, B, 5), torch.randn(4, B, 2)

        def losses(m, samples):
            return ((m(x[:, samples]) - y[:, samples]) ** 2).mean(dim=(0, 2))

        return model, losses
    raise KeyError(name)


LAYER_CASES = [
    "linear",
    "linear_sequence",
    "conv1d",
    "conv2d",
    "conv3d",
    "depthwise",
    "depthwise_long_filter",
    "few_taps_conv",
    "few_positions_conv",
    "channels_last_conv",
    "wide_conv",
    "pointwise_conv",
    "embedding",
    "layer_norm",
    "rms_norm",
    "group_norm",
    "instance_norm",
    "instance_norm1d",
    "fallback",
    "time_first",
]


def _check(case, microbatch_size, clipping, max_grad_norm, loss_reduction="mean", microbatch_reduction="mean"):
    torch.manual_seed(1)
    model, losses = _case(case)
    batch_first = case != "time_first"
    # dropout: the reference and mbclip must see the same masks, so both start from the same RNG state
    rng = torch.get_rng_state()
    if any(isinstance(m, nn.Dropout) for m in model.modules()):
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0  # masks differ between a whole-batch and a per-micro-batch forward; exactness with
                # real dropout masks is covered in test_fallback_dropout_masks_are_the_real_ones
    ref = reference_update(model, losses, B, microbatch_size, clipping, max_grad_norm, microbatch_reduction)
    torch.set_rng_state(rng)
    update, optimizer = mbclip_update(
        model, losses, microbatch_size, clipping, max_grad_norm, loss_reduction, microbatch_reduction, batch_first
    )
    assert_close_update(update, ref.update)
    torch.testing.assert_close(optimizer.last_step.microbatch_norms, ref.norms, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("microbatch_size", [1, 3])
def test_instance_norm_in_eval_mode_uses_running_statistics(microbatch_size):
    """In evaluation, an InstanceNorm that tracks running statistics normalizes with them; its affine gradients too
    (each sample's own statistics there were silently wrong on the sampler-only path)."""
    torch.manual_seed(1)
    model, losses = _case("instance_norm")
    with torch.no_grad():
        for scale in (1.0, 3.0):  # running statistics away from their initial 0 and 1
            model(scale * torch.randn(B, 2, 5, 5) + 1.0)
    model.eval()
    ref = reference_update(model, losses, B, microbatch_size, "fixed", 0.05)
    update, _ = mbclip_update(model, losses, microbatch_size, "fixed", 0.05)
    assert_close_update(update, ref.update)


@pytest.mark.parametrize("case", LAYER_CASES)
@pytest.mark.parametrize("microbatch_size", MICROBATCH_SIZES)
def test_layer_matches_reference_fixed(case, microbatch_size):
    _check(case, microbatch_size, "fixed", 0.05)


@pytest.mark.parametrize("case", LAYER_CASES)
@pytest.mark.parametrize("clipping,max_grad_norm", MODES[1:])
@pytest.mark.parametrize("microbatch_size", [1, 3])
def test_layer_matches_reference_all_modes(case, clipping, max_grad_norm, microbatch_size):
    _check(case, microbatch_size, clipping, max_grad_norm)


@pytest.mark.parametrize("case", ["linear_sequence", "conv1d", "embedding", "fallback"])
@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
@pytest.mark.parametrize("microbatch_reduction", ["mean", "sum"])
def test_reductions(case, loss_reduction, microbatch_reduction):
    _check(case, 3, "fixed", 0.05, loss_reduction, microbatch_reduction)


def test_fallback_dropout_masks_are_the_real_ones():
    """The fallback differentiates the recorded graph, so it uses the masks of the real forward."""
    from mbclip import MicroBatchClipping

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 6), RawParameters(6), nn.Linear(6, 1))
    x = torch.randn(B, 5)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    wrapped, clipped, _ = MicroBatchClipping().make_clipped(
        module=model, optimizer=optimizer, microbatch_size=2, max_grad_norm=1e6
    )
    out = wrapped(x)
    # Without clipping the update is the mean of micro-batch means; rebuild it from per-sample autograd on
    # the same graph (so with the same dropout masks), hooks off meanwhile.
    raw = model[1]
    wrapped.disable_hooks()
    per_sample = []
    for i in range(B):
        mask_out = torch.zeros(B, 1)
        mask_out[i] = 1.0
        (g,) = torch.autograd.grad(out, raw.scale, mask_out, retain_graph=True)
        per_sample.append(g)
    wrapped.enable_hooks()
    out.mean().backward()
    clipped.pre_step()
    sizes = [2, 2, 2, 1]
    groups, start = [], 0
    for size in sizes:
        groups.append(sum(per_sample[start : start + size]) / size)
        start += size
    expected = sum(groups) / len(groups)
    torch.testing.assert_close(raw.scale.grad, expected, rtol=1e-10, atol=1e-12)


class SharedPositions(nn.Module):
    """ESPnet-style: a Linear applied to a tensor shared by all samples, ``[1, L, d]``, plus raw biases."""

    def __init__(self, dim, length):
        super().__init__()
        self.register_buffer("positions", torch.randn(1, length, dim))
        self.linear_pos = nn.Linear(dim, dim, bias=False)
        self.pos_bias = nn.Parameter(torch.randn(dim))

    def forward(self, x):  # x [B, L, d]
        return x * (self.linear_pos(self.positions) + self.pos_bias)


@pytest.mark.parametrize("microbatch_size", [1, 2, 3])
def test_shared_positional_tensor_is_not_read_as_a_batch(microbatch_size):
    """[1, L, d] with L == B must not be taken for a batch on dim 1 (a split of a sum still adds up: silent)."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 4), SharedPositions(4, B), nn.Linear(4, 2))
    losses = sequence_regression(lambda: torch.randn(B, B, 4), lambda: torch.randn(B, B, 2))
    ref = reference_update(model, losses, B, microbatch_size, "fixed", 0.05)
    update, _ = mbclip_update(model, losses, microbatch_size, "fixed", 0.05)
    assert_close_update(update, ref.update)


class _UnderSavedTensorHooks(nn.Module):
    """Runs ``inner`` with autograd's saved tensors offloaded to CPU (saved-tensor hooks, as FSDP or non-reentrant
    checkpointing install): their unpacking is autograd's alone, so samplers must not read them."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        with torch.autograd.graph.save_on_cpu():
            return self.inner(x)


def _two_layer_norms():
    """LayerNorm on the raw input, then one on a Linear's output: ``(model, input shape, target shape)``."""
    return nn.Sequential(nn.LayerNorm(5), nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 2)), (3, 5), (3, 2)


def _two_group_norms():
    """GroupNorm on the raw input, then one on a convolution's output."""
    model = nn.Sequential(
        nn.GroupNorm(2, 4), nn.Conv1d(4, 6, 3, padding=1), nn.GroupNorm(3, 6), nn.Flatten(), nn.Linear(30, 2)
    )
    return model, (4, 5), (2,)


@pytest.mark.parametrize("hooked", [False, True])
@pytest.mark.parametrize("microbatch_size", [1, 3])
@pytest.mark.parametrize("make_model", [_two_layer_norms, _two_group_norms], ids=["layer_norm", "group_norm"])
def test_norms_read_the_forwards_statistics_where_they_may(make_model, hooked, microbatch_size):
    """LayerNorm's x_hat and GroupNorm's affine sums come from the mean and 1/std the forward saved when the layer has
    an autograd node (no second normalization), and are recomputed where no such node exists (a norm on the raw
    input, parameters off) or where saved tensors are behind hooks; every way gives the reference update."""
    from mbclip.samplers import norm

    torch.manual_seed(3)
    inner, input_shape, target_shape = make_model()
    model = _UnderSavedTensorHooks(inner) if hooked else inner
    losses = sequence_regression(
        lambda: 2.0 * torch.randn(B, *input_shape) + 1.0, lambda: torch.randn(B, *target_shape)
    )
    ref = reference_update(model, losses, B, microbatch_size, "fixed", 0.05)
    read = []
    saved_statistics = norm._saved_statistics

    def spy(call, *node_name):
        statistics = saved_statistics(call, *node_name)
        read.append(statistics is not None)
        return statistics

    with mock.patch.object(norm, "_saved_statistics", spy):
        update, _ = mbclip_update(model, losses, microbatch_size, "fixed", 0.05)
    assert_close_update(update, ref.update)
    # backward reaches the second norm first. On the checked run both have a node (their parameters require grad);
    # on the sampler-only run the first, on the raw input with its parameters off, has none
    assert read == ([False] * 4 if hooked else [True, True, True, False]), read
