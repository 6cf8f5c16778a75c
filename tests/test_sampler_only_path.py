"""Unchecked steps: samplers alone compute their layers' gradients, autograd computes only input gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers import check_update
from mbclip import MicroBatchClipping
from reference import assert_close_update, reference_update, weights_into


def wrap(model, *, microbatch_size, max_grad_norm, verify_gradients="first", params=None):
    """``make_clipped`` with SGD over ``params`` (default: the model's parameters)."""
    optimizer = torch.optim.SGD(model.parameters() if params is None else params, lr=0.1)
    return MicroBatchClipping().make_clipped(
        module=model,
        optimizer=optimizer,
        microbatch_size=microbatch_size,
        max_grad_norm=max_grad_norm,
        verify_gradients=verify_gradients,
    )


def _model():
    return nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=True), nn.LayerNorm(6), nn.Linear(6, 3))


def _losses(x, y):
    return lambda m, samples: nn.functional.cross_entropy(m(x[samples]), y[samples], reduction="none")


def test_second_step_skips_autograd_weight_gradients_and_matches_reference():
    torch.manual_seed(1)
    model = _model()
    plain = copy.deepcopy(model)
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    wrapped, clipped, _ = MicroBatchClipping().make_clipped(
        module=model, optimizer=optimizer, microbatch_size=2, max_grad_norm=0.1
    )
    assert wrapped.check_gradients  # the first step is checked
    clipped.zero_grad()
    _losses(x, y)(wrapped, slice(None)).mean().backward()
    assert all(p.grad is not None for p in model.parameters())  # autograd computed them beside the samplers
    clipped.step()
    assert not wrapped.check_gradients

    expected = reference_update(weights_into(plain, model), _losses(x, y), 6, 2, "fixed", 0.1)
    clipped.zero_grad()
    loss = _losses(x, y)(wrapped, slice(None)).mean()
    assert all(p.requires_grad for p in model.parameters())  # switched back on after each layer's forward
    loss.backward()
    assert all(p.grad is None for p in model.parameters())  # autograd computed no weight gradient
    assert clipped.pre_step()
    assert_close_update([p.grad for p in model.parameters()], expected.update)


def test_always_checks_every_step():
    model = _model()
    x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    wrapped, clipped, _ = wrap(model, microbatch_size=2, max_grad_norm=1.0, verify_gradients=True)
    for _ in range(2):
        clipped.zero_grad()
        _losses(x, y)(wrapped, slice(None)).mean().backward()
        assert all(p.grad is not None for p in model.parameters())
        clipped.step()
    assert wrapped.check_gradients


def test_forward_that_raises_gives_requires_grad_back():
    class Failing(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            self.linear(x)
            raise RuntimeError("user error mid-forward")

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Sequential(nn.Linear(4, 4), Failing())

        def forward(self, x):
            return self.inner(x)

    model = Outer()
    wrapped, _, _ = wrap(model, microbatch_size=2, max_grad_norm=1.0, verify_gradients="never")
    with pytest.raises(RuntimeError, match="user error mid-forward"):
        wrapped(torch.randn(4, 4))
    assert all(p.requires_grad for p in model.parameters())
    assert not wrapped._switched_off


def test_frozen_parameters_stay_frozen():
    model = _model()
    model[0].bias.requires_grad_(False)
    x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    trainable = [p for p in model.parameters() if p.requires_grad]
    wrapped, clipped, _ = wrap(model, microbatch_size=2, max_grad_norm=1.0, verify_gradients="never", params=trainable)
    _losses(x, y)(wrapped, slice(None)).mean().backward()
    assert not model[0].bias.requires_grad and model[0].bias.grad is None
    assert clipped.pre_step()
    assert model[0].bias.grad is None


def test_inputs_that_need_grad_still_get_it():
    """Switching parameters off must not cost the user the gradient of an input that requires one."""
    model = _model()
    x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    expected_x = x.clone().requires_grad_()
    nn.functional.cross_entropy(model(expected_x), y).backward()
    model.zero_grad()
    wrapped, _, _ = wrap(model, microbatch_size=2, max_grad_norm=1.0, verify_gradients="never")
    actual_x = x.clone().requires_grad_()
    nn.functional.cross_entropy(wrapped(actual_x), y).backward()
    torch.testing.assert_close(actual_x.grad, expected_x.grad, rtol=1e-12, atol=1e-15)


def test_tied_weights_of_two_sampled_layers_add_up():
    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(7, 4)
            self.head = nn.Linear(4, 7, bias=False)
            self.head.weight = self.embedding.weight

        def forward(self, tokens):
            return self.head(torch.tanh(self.embedding(tokens)))

    torch.manual_seed(2)
    model = TiedLM()
    tokens, targets = torch.randint(0, 7, (6, 3)), torch.randint(0, 7, (6, 3))

    def losses(m, samples):
        logits = m(tokens[samples])
        return nn.functional.cross_entropy(logits.transpose(1, 2), targets[samples], reduction="none").mean(dim=1)

    expected = reference_update(model, losses, 6, 2, "fixed", 0.2)
    wrapped, clipped, _ = wrap(model, microbatch_size=2, max_grad_norm=0.2, verify_gradients="never")
    losses(wrapped, slice(None)).mean().backward()
    assert clipped.pre_step()
    assert_close_update([p.grad for p in model.parameters()], expected.update)


def test_unused_output_of_a_first_layer_is_fine():
    """A tapped output nobody uses gets no gradient; the step still works."""

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(5, 3)
            self.unused = nn.Linear(5, 3)

        def forward(self, x):
            self.unused(x)
            return self.used(x)

    model = TwoHeads()
    x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    expected = reference_update(model, _losses(x, y), 4, 2, "fixed", 0.3)
    wrapped, clipped, _ = wrap(model, microbatch_size=2, max_grad_norm=0.3, verify_gradients="never")
    _losses(x, y)(wrapped, slice(None)).mean().backward()
    assert clipped.pre_step()
    assert model.unused.weight.grad is None or not model.unused.weight.grad.any()
    assert_close_update([p.grad for p in model.used.parameters()], expected.update[:2])


@pytest.mark.parametrize("verify", ["always", "never"])
def test_two_losses_backpropagated_separately_through_one_forward(verify):
    """CTC + attention style: two backward calls through one forward (retain_graph) add up, as in autograd."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.MultiheadAttention(8, 2, batch_first=True))

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = model

        def forward(self, x):
            h = self.body[1](self.body[0](x))
            return self.body[2](h, h, h)[0]

    encoder = Encoder()
    x = torch.randn(6, 4, 5)

    def two_losses(m, samples):
        out = m(x[samples])
        return out.pow(2).sum(dim=(1, 2)), out.sin().sum(dim=(1, 2))

    expected = reference_update(encoder, lambda m, s: sum(two_losses(m, s)), 6, 2, "fixed", 0.3)
    wrapped, clipped, _ = wrap(encoder, microbatch_size=2, max_grad_norm=0.3, verify_gradients=verify)
    first, second = two_losses(wrapped, slice(None))
    first.mean().backward(retain_graph=True)
    second.mean().backward()
    assert clipped.pre_step()
    assert_close_update([p.grad for p in encoder.parameters()], expected.update)


@pytest.mark.parametrize("verify", ["always", "never"])
def test_a_layer_recorded_in_one_call_and_differentiated_by_autograd_in_the_next(verify):
    """One attention layer applied twice in a row: self-attention (recorded, parameters switched off), then
    cross-attention with dropout (batched autograd, parameters on). The fallback must not count the first call
    again through its input."""
    torch.manual_seed(6)

    class TwoCalls(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.MultiheadAttention(4, 2, batch_first=True, dropout=0.4)

        def forward(self, x, memory):
            h = self.attention(x, x, x)[0]
            return self.attention(h, memory, memory)[0]

    model = TwoCalls()
    x, memory = torch.randn(6, 3, 4), torch.randn(6, 5, 4)

    def losses(m, samples):
        torch.manual_seed(9)
        return m(x[samples], memory[samples]).pow(2).sum(dim=(1, 2))

    expected = reference_update(model, losses, 6, 6, "fixed", 1e9)  # one micro-batch: the same dropout masks
    wrapped, clipped, _ = wrap(model, microbatch_size=6, max_grad_norm=1e9, verify_gradients=verify)
    losses(wrapped, slice(None)).mean().backward()
    assert clipped.pre_step()
    assert_close_update([p.grad for p in model.parameters()], expected.update)


def test_fallback_layer_applied_twice_in_a_row_counts_each_call_once():
    """Weights shared across depth through the autograd fallback (raw parameter): each call's own gradient only."""

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.linspace(0.5, 1.5, 4))

        def forward(self, x):
            return torch.tanh(x * self.weight)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = Scale()
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.scale(self.scale(x)))

    x = torch.randn(6, 4)
    check_update(Twice(), lambda m: m(x).pow(2).sum(dim=1), 6, 2)


@pytest.mark.parametrize("verify", ["always", "never"])
def test_input_changed_in_place_after_the_layer_is_an_error_not_a_wrong_gradient(verify):
    """The layer's input is needed as it was; an in-place change after the layer must not go unnoticed."""

    class Overwrites(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Linear(4, 4)
            self.second = nn.Linear(4, 2)

        def forward(self, x):
            h = torch.tanh(self.first(x))
            out = self.second(h)
            h.mul_(2.0)  # changes the second layer's input after it ran
            return out

    model = Overwrites()
    wrapped, clipped, _ = wrap(model, microbatch_size=2, max_grad_norm=1.0, verify_gradients=verify)
    with pytest.raises(RuntimeError, match="modified by an inplace operation|changed in place"):
        wrapped(torch.randn(4, 4)).pow(2).mean().backward()
    assert all(p.requires_grad for p in model.parameters())


def test_inputs_are_released_during_backward():
    """Held by autograd, not by mbclip: a layer's input is freed once backward is past the layer, as in plain
    training, not kept until backward ends."""
    import gc
    import weakref

    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    wrapped, clipped, _ = wrap(model, microbatch_size=4, max_grad_norm=1.0, verify_gradients="never")
    second_input, alive_when_first_layer_reached = [], []
    model[1].register_forward_hook(lambda m, a, out: second_input.append(weakref.ref(out)))

    def on_first_output(module, args, out):
        def check(grad):
            gc.collect()
            alive_when_first_layer_reached.append(second_input[0]() is not None)

        out.register_hook(check)

    model[0].register_forward_hook(on_first_output)
    wrapped(torch.randn(64, 4)).pow(2).mean().backward()
    assert alive_when_first_layer_reached == [False]
    assert clipped.pre_step()
