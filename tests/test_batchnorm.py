"""BatchNorm under micro-batch clipping: each micro-batch normalised with its own statistics, exact gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import on_both_paths
from mbclip import BatchError, ConfigurationError, MicroBatchClipping, UnsupportedModuleError
from mbclip.layers import MicroBatchBatchNorm2d
from reference import assert_close_update, reference_update

B = 7
DT = torch.float64


def cnn(**bn_options) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4, **bn_options),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 3),
    ).to(DT)


class SequenceModel(nn.Module):
    """Conv1d + BatchNorm1d over time, mean-pooled, then a classifier."""

    def __init__(self, **bn_options):
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm1d(4, **bn_options)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.conv(x))).mean(dim=2))


def sequence_model(**bn_options) -> nn.Module:
    torch.manual_seed(0)
    return SequenceModel(**bn_options).to(DT)


def data(model: nn.Module):
    generator = torch.Generator().manual_seed(1)
    shape = (B, 2, 6, 6) if isinstance(model, nn.Sequential) else (B, 3, 8)
    classes = 3 if isinstance(model, nn.Sequential) else 2
    x = torch.randn(shape, generator=generator, dtype=DT) * 2 + 0.5
    y = torch.randint(0, classes, (B,), generator=generator)
    return x, y


def losses_fn(model: nn.Module):
    x, y = data(model)

    def per_sample_losses(m: nn.Module, samples) -> torch.Tensor:
        return F.cross_entropy(m(x[samples]), y[samples], reduction="none")

    return per_sample_losses


def wrap(model: nn.Module, microbatch_size: int, clipping: str = "fixed", max_grad_norm=0.3, verify="first"):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    return MicroBatchClipping().make_clipped(
        module=model,
        optimizer=optimizer,
        microbatch_size=microbatch_size,
        max_grad_norm=max_grad_norm if clipping != "adaptive" else None,
        clipping=clipping,
        verify_gradients=verify,
    )


def clipped_update(model: nn.Module, per_sample_losses, microbatch_size: int, clipping: str):
    def run(verify_gradients: str):
        wrapped, optimizer, _ = wrap(model, microbatch_size, clipping, verify=verify_gradients)
        optimizer.zero_grad()
        per_sample_losses(wrapped, slice(None)).mean().backward()
        assert optimizer.pre_step()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad], optimizer

    update, optimizer = on_both_paths(model, run)
    return update, optimizer.grad_module


@pytest.mark.parametrize("make_model", [cnn, sequence_model], ids=["cnn", "conv1d"])
@pytest.mark.parametrize("clipping", ["fixed", "adaptive"])
@pytest.mark.parametrize("microbatch_size", [2, 3, B])
def test_batchnorm_gradients_match_reference(make_model, clipping, microbatch_size):
    model = make_model()
    per_sample_losses = losses_fn(model)
    expected = reference_update(
        model, per_sample_losses, B, microbatch_size, clipping, 0.3 if clipping == "fixed" else None
    )
    actual, wrapped = clipped_update(model, per_sample_losses, microbatch_size, clipping)
    assert_close_update(actual, expected.update)
    assert dict(wrapped.hooked_layers())["1" if isinstance(model, nn.Sequential) else "norm"] == "batch_norm_sampler"


@pytest.mark.parametrize(
    "bn_options", [{"affine": False}, {"track_running_stats": False}], ids=["no-affine", "no-stats"]
)
def test_batchnorm_variants_match_reference(bn_options):
    model = cnn(**bn_options)
    per_sample_losses = losses_fn(model)
    expected = reference_update(model, per_sample_losses, B, 3, "fixed", 0.3)
    actual, _ = clipped_update(model, per_sample_losses, 3, "fixed")
    assert_close_update(actual, expected.update)


def test_frozen_batchnorm_still_normalises_per_microbatch():
    """A BatchNorm without trainable parameters still mixes samples in training mode: it must be swapped too."""
    model = cnn()
    model[1].requires_grad_(False)
    per_sample_losses = losses_fn(model)
    expected = reference_update(model, per_sample_losses, B, 2, "fixed", 0.3)
    actual, _ = clipped_update(model, per_sample_losses, 2, "fixed")
    assert_close_update(actual, expected.update)


def test_forward_output_is_per_microbatch():
    model = cnn()
    x, _ = data(model)
    alone = copy.deepcopy(model)
    expected = torch.cat([alone(x[start : start + 3]) for start in range(0, B, 3)])
    wrapped, _, _ = wrap(model, 3)
    torch.testing.assert_close(wrapped(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics_average_microbatch_statistics(momentum):
    model = cnn(momentum=momentum)
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    model[1].num_batches_tracked.fill_(3)
    before = copy.deepcopy(model[1])
    x, _ = data(model)
    wrapped, _, _ = wrap(model, 3)
    wrapped(x)
    features = model[0](x).detach()
    sizes = [3, 3, 1]
    chunks = features.split(3)
    weights = torch.tensor(sizes, dtype=DT) / B
    mean = sum(w * c.mean(dim=(0, 2, 3)) for w, c in zip(weights, chunks))
    variance = sum(w * c.transpose(0, 1).reshape(4, -1).var(dim=1) for w, c in zip(weights, chunks))
    factor = 0.1 if momentum is not None else 1 / 4
    bn = model[1]
    assert int(bn.num_batches_tracked) == 4
    torch.testing.assert_close(bn.running_mean, (1 - factor) * before.running_mean + factor * mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        bn.running_var, (1 - factor) * before.running_var + factor * variance, rtol=1e-12, atol=0
    )


def test_running_mean_is_whole_batch_mean_for_equal_microbatches():
    model = sequence_model(momentum=1.0)
    x, _ = data(model)
    x = x[:6]
    wrapped, _, _ = wrap(model, 2)
    wrapped(x)
    features = model.conv(x).detach()
    torch.testing.assert_close(model.norm.running_mean, features.mean(dim=(0, 2)), rtol=1e-12, atol=1e-14)
    pooled = torch.stack([c.transpose(0, 1).reshape(4, -1).var(dim=1) for c in features.split(2)]).mean(dim=0)
    torch.testing.assert_close(model.norm.running_var, pooled, rtol=1e-12, atol=0)


def test_eval_mode_is_unchanged():
    model = cnn()
    model[1].running_mean.uniform_(-1, 1)
    plain = copy.deepcopy(model).eval()
    x, _ = data(model)
    wrapped, _, _ = wrap(model, 3)
    wrapped.eval()
    stats = model[1].running_mean.clone()
    torch.testing.assert_close(wrapped(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(model[1].running_mean, stats, rtol=0, atol=0)
    assert int(model[1].num_batches_tracked) == 0


def test_state_dict_round_trip_and_unwrap_restores_types():
    model = cnn()
    saved = copy.deepcopy(model.state_dict())
    bn = model[1]
    wrapped, optimizer, _ = wrap(model, 2)
    assert bn is model[1] and type(bn) is MicroBatchBatchNorm2d
    assert list(wrapped._module.state_dict()) == list(saved)
    wrapped.load_state_dict({f"_module.{k}": v for k, v in saved.items()})
    x, y = data(model)
    optimizer.zero_grad()
    F.cross_entropy(wrapped(x), y).backward()
    optimizer.step()
    trained = copy.deepcopy(model.state_dict())
    restored = wrapped.to_standard_module()
    assert restored is model and type(restored[1]) is nn.BatchNorm2d
    assert not hasattr(restored[1], "_mbclip_layout")
    assert list(restored.state_dict()) == list(saved)
    fresh = cnn()
    fresh.load_state_dict(trained)
    torch.testing.assert_close(fresh.eval()(x), restored.eval()(x), rtol=0, atol=0)


def test_microbatch_size_one_is_refused_and_model_untouched():
    model = cnn()
    with pytest.raises(ConfigurationError, match="GroupNorm"):
        wrap(model, 1)
    assert type(model[1]) is nn.BatchNorm2d
    assert not hasattr(model, "autograd_grad_sample_hooks")
    assert not model._forward_hooks and not model[0]._forward_hooks


def test_one_value_per_channel_microbatch_is_a_clear_error():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).to(DT)
    wrapped, _, _ = wrap(model, 2)
    with pytest.raises(BatchError, match="one value per channel"):
        wrapped(torch.randn(5, 3, dtype=DT))
    wrapped(torch.randn(6, 3, dtype=DT))


def test_flattened_frames_are_a_clear_error():
    class FramesNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.BatchNorm1d(3)

        def forward(self, x):
            return self.norm(x.reshape(-1, 3)).reshape(x.shape).sum(dim=1)

    wrapped, _, _ = wrap(FramesNorm().to(DT), 2)
    with pytest.raises(BatchError, match="rows on dim 0"):
        wrapped(torch.randn(4, 5, 3, dtype=DT))


@pytest.mark.parametrize(
    "layer", [nn.SyncBatchNorm(4), nn.LazyBatchNorm2d(), type("MyBatchNorm", (nn.BatchNorm2d,), {})(4)]
)
def test_other_batchnorms_are_refused(layer):
    model = nn.Sequential(nn.Conv2d(2, 4, 1), layer)
    with pytest.raises(UnsupportedModuleError, match="BatchNorm"):
        wrap(model, 2)


def test_batchnorm_in_eval_mode_inside_training_uses_running_statistics():
    """Fine-tuning with frozen statistics (``bn.eval()`` in a training model): per-sample exact, stats untouched."""
    model = cnn()
    model[1].running_mean.uniform_(-1, 1)
    model[1].eval()
    stats = model[1].running_mean.clone()
    per_sample_losses = losses_fn(model)
    expected = reference_update(model, per_sample_losses, B, 2, "fixed", 0.3)
    actual, _ = clipped_update(model, per_sample_losses, 2, "fixed")
    assert_close_update(actual, expected.update)
    torch.testing.assert_close(model[1].running_mean, stats, rtol=0, atol=0)


def test_batchnorm3d_matches_reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 2, 2), nn.BatchNorm3d(2), nn.Flatten(), nn.Linear(2 * 8, 2)).to(DT)
    x = torch.randn(5, 1, 3, 3, 3, dtype=DT)
    y = torch.tensor([0, 1, 1, 0, 1])

    def per_sample_losses(m: nn.Module, samples) -> torch.Tensor:
        return F.cross_entropy(m(x[samples]), y[samples], reduction="none")

    expected = reference_update(model, per_sample_losses, 5, 2, "adaptive")
    actual, _ = clipped_update(model, per_sample_losses, 2, "adaptive")
    assert_close_update(actual, expected.update)
