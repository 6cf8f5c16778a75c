"""Whole passes: on unchecked steps a batch that is one micro-batch (``microbatch_size >= B``) takes autograd's own
gradient, records nothing, and must still equal the brute-force reference, alone or beside sampled passes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mbclip import MicroBatchClipping
from mbclip.errors import BatchError
from mbclip.models import ConformerEncoder
from reference import assert_close_update, reference_update, weights_into
from toy_models import TinyConformerBlock, TinyLM


class LSTMTagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(16, 6, num_layers=2, batch_first=True)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(self.lstm(x)[0])


class RelPosConformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = ConformerEncoder(num_features=16, d_model=8, num_heads=2, num_blocks=1, kernel_size=3,
                                        norm="batch_norm", subsampling_channels=4)  # fmt: skip
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.long)
        return self.out(self.encoder(x, lengths)[0])


class Gain(nn.Module):
    """A raw parameter: differentiated by the autograd fallback."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, 3))

    def forward(self, x):
        return x * self.gain


def _cnn():
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
    )  # fmt: skip


def _frames(model, batch_size):
    x, y = torch.randn(batch_size, 16, 16), torch.randint(0, 3, (batch_size, 16))

    def losses(m, samples):
        logits = m(x[samples])
        targets = y[samples][:, : logits.shape[1]]
        return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(dim=1)

    return model, losses


def _case(name, batch_size=6):
    torch.manual_seed(0)
    if name == "cnn":
        x, y = torch.randn(batch_size, 2, 9, 9), torch.randint(0, 3, (batch_size,))
        return _cnn(), lambda m, samples: F.cross_entropy(m(x[samples]), y[samples], reduction="none")
    if name == "lm":
        tokens, targets = torch.randint(0, 11, (batch_size, 6)), torch.randint(0, 11, (batch_size, 6))

        def losses(m, samples):
            return F.cross_entropy(m(tokens[samples]).transpose(1, 2), targets[samples], reduction="none").mean(1)

        return TinyLM(), losses
    if name == "gain":
        x, y = torch.randn(batch_size, 3), torch.randint(0, 3, (batch_size,))
        model = nn.Sequential(nn.Linear(3, 3), Gain())
        return model, lambda m, samples: F.cross_entropy(m(x[samples]), y[samples], reduction="none")
    model = {"lstm": LSTMTagger, "conformer_mha": TinyConformerBlock, "conformer_relpos": RelPosConformer}[name]()
    if name == "conformer_mha":
        x, y = torch.randn(batch_size, 5, 6), torch.randint(0, 5, (batch_size, 5))

        def losses(m, samples):
            return F.cross_entropy(m(x[samples]).transpose(1, 2), y[samples], reduction="none").mean(dim=1)

        return model, losses
    return _frames(model, batch_size)


def _wrap(model, microbatch_size, max_grad_norm=0.05, verify_gradients="never"):
    return MicroBatchClipping().make_clipped(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        microbatch_size=microbatch_size,
        max_grad_norm=max_grad_norm,
        verify_gradients=verify_gradients,
    )[:2]


CASES = ["cnn", "lstm", "conformer_mha", "conformer_relpos", "lm", "gain"]


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("microbatch_size", [6, 9])
def test_whole_batch_matches_reference_and_records_nothing(case, microbatch_size):
    model, losses = _case(case)
    expected = reference_update(model, losses, 6, microbatch_size, "fixed", 0.05)
    wrapped, optimizer = _wrap(model, microbatch_size)
    optimizer.zero_grad()
    losses(wrapped, slice(None)).mean().backward()
    assert list(wrapped._whole_passes) == [0] and not wrapped._open_calls  # autograd's gradient, no layer recorded
    assert optimizer.pre_step()
    assert_close_update([p.grad for p in model.parameters()], expected.update)
    torch.testing.assert_close(optimizer.last_step.microbatch_norms, expected.norms, rtol=1e-10, atol=0)
    assert not wrapped._whole_passes  # the step forgets its passes


def test_first_step_is_checked_then_whole():
    """verify_gradients='first': the first step runs the samplers (and checks them), later ones are whole."""
    model, losses = _case("conformer_relpos")
    plain = copy.deepcopy(model)
    wrapped, optimizer = _wrap(model, 6, verify_gradients="first")
    for step in range(2):
        expected = reference_update(weights_into(plain, model), losses, 6, 6, "fixed", 0.05)
        optimizer.zero_grad()
        losses(wrapped, slice(None)).mean().backward()
        assert bool(wrapped._whole_passes) == (step == 1)
        assert optimizer.pre_step()
        assert_close_update([p.grad for p in model.parameters()], expected.update)
        optimizer.original_optimizer.step()


@pytest.mark.parametrize("case", ["lstm", "gain"])
def test_accumulated_passes_whole_and_sampled_match_reference(case):
    """Passes of 4, 2 and 3 samples at b = 3: the first is sampled (two micro-batches), the others whole."""
    model, losses = _case(case, batch_size=9)
    expected = reference_update(model, losses, 9, 3, "fixed", 0.05)
    # the reference splits 0..8 into [0:3], [3:6], [6:9]; passes [0:6] (sampled), [6:9] (whole) give the same
    wrapped, optimizer = _wrap(model, 3)
    optimizer.zero_grad()
    losses(wrapped, slice(0, 6)).mean().backward()
    losses(wrapped, slice(6, 9)).mean().backward()
    assert list(wrapped._whole_passes) == [1]
    assert optimizer.pre_step()
    # each pass's mean loss is scaled back to a sum of per-sample terms, as with sampled passes
    assert_close_update([p.grad for p in model.parameters()], expected.update)


def test_two_losses_backpropagated_separately_add_up():
    """Two backward calls through one whole pass (retain_graph): one micro-batch, the sum of both gradients."""
    model, losses = _case("conformer_mha")
    expected = reference_update(model, lambda m, s: losses(m, s) + 0.5 * losses(m, s) ** 2, 6, 6, "fixed", 0.05)
    wrapped, optimizer = _wrap(model, 6)
    optimizer.zero_grad()
    per_sample = losses(wrapped, slice(None))
    per_sample.mean().backward(retain_graph=True)
    (0.5 * per_sample**2).mean().backward()
    assert optimizer.pre_step()
    assert_close_update([p.grad for p in model.parameters()], expected.update)


def test_user_gradient_is_set_aside_and_put_back():
    """Between backward and step, ``p.grad`` is what it was before the backward (as on the sampled path)."""
    model, losses = _case("cnn")
    wrapped, optimizer = _wrap(model, 6)
    before = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, grad in zip(model.parameters(), before):
        p.grad = grad
    losses(wrapped, slice(None)).mean().backward()
    assert all(p.grad is grad and bool((grad == 7.0).all()) for p, grad in zip(model.parameters(), before))


def test_second_forward_before_the_first_backward_is_sampled():
    """Forward, forward, one backward: the second pass is sampled, so the two micro-batches stay apart."""
    model, losses = _case("cnn")
    expected = reference_update(model, losses, 6, 3, "fixed", 0.05)
    wrapped, optimizer = _wrap(model, 3)
    optimizer.zero_grad()
    first, second = losses(wrapped, slice(0, 3)).mean(), losses(wrapped, slice(3, 6)).mean()
    (first + second).backward()
    assert list(wrapped._whole_passes) == [0]
    assert optimizer.pre_step()
    assert_close_update([p.grad for p in model.parameters()], expected.update)


def test_one_backward_over_a_whole_pass_and_an_autograd_written_pass_is_refused():
    """With a layer that autograd differentiates in the second pass, the gradients would mix: a clear error."""
    model, losses = _case("gain")
    wrapped, optimizer = _wrap(model, 3)
    first, second = losses(wrapped, slice(0, 3)).mean(), losses(wrapped, slice(3, 6)).mean()
    with pytest.raises(BatchError, match="Call backward\\(\\) after each forward pass"):
        (first + second).backward()
    assert all(p.grad is None for p in model.parameters())  # what was set aside is back


def test_gradient_outside_the_model_output_is_caught_at_the_step():
    """A term that reaches a parameter without passing through the model's output is not in the whole pass's
    gradient (it went to the set-aside ``p.grad``): refused at the step, as on the sampled path."""
    model, losses = _case("cnn")
    wrapped, optimizer = _wrap(model, 6)
    losses(wrapped, slice(None)).mean().backward()
    model[0].weight.pow(2).sum().backward()  # a separate backward that never reaches the model's output
    with pytest.raises(BatchError, match="could not split"):
        optimizer.pre_step()


class Boxed:
    """An output type torch's tree utilities do not open."""

    def __init__(self, logits):
        self.logits = logits


class BoxedOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _cnn()

    def forward(self, x):
        return Boxed(self.body(x))


def test_output_mbclip_cannot_hook_still_gives_the_whole_gradient():
    """No hookable tensor in the output: the gradient is ``p.grad`` itself at the step, as it was ``None`` before."""
    torch.manual_seed(0)
    model = BoxedOutput()
    x, y = torch.randn(6, 2, 9, 9), torch.randint(0, 3, (6,))

    def losses(m, samples):
        return F.cross_entropy(m(x[samples]).logits, y[samples], reduction="none")

    expected = reference_update(model, losses, 6, 6, "fixed", 0.05)
    wrapped, optimizer = _wrap(model, 6)
    optimizer.zero_grad()
    losses(wrapped, slice(None)).mean().backward()
    assert optimizer.pre_step()
    assert_close_update([p.grad for p in model.parameters()], expected.update)

    for p in model.parameters():  # a gradient left from before: it cannot be told apart, so refused
        p.grad = torch.ones_like(p)
    losses(wrapped, slice(None)).mean().backward()
    with pytest.raises(BatchError, match="did not pass through the model's output"):
        optimizer.pre_step()


def test_loss_term_on_a_parameter_is_part_of_the_one_microbatch_gradient():
    """``loss + penalty(w)`` through one backward: at b = B the micro-batch gradient is the whole loss's, as in the
    reference (the checked first step refuses it, as at every b: it cannot be split into micro-batches)."""
    model, losses = _case("cnn")

    def with_penalty(m, samples):
        weight = getattr(m, "_module", m)[0].weight  # the reference's copy, or the wrapped model's own
        return losses(m, samples) + 0.1 * weight.pow(2).sum()

    expected = reference_update(model, with_penalty, 6, 6, "fixed", 0.05)
    wrapped, optimizer = _wrap(model, 6)
    with_penalty(wrapped, slice(None)).mean().backward()
    assert optimizer.pre_step()
    assert_close_update([p.grad for p in model.parameters()], expected.update)

    checked, checked_optimizer = _wrap(_case("cnn")[0], 6, verify_gradients="always")
    with_penalty(checked, slice(None)).mean().backward()
    with pytest.raises(BatchError, match="do not add up"):
        checked_optimizer.pre_step()
