"""Backward passes that name what they differentiate (``torch.autograd.grad``, ``backward(inputs=...)``).

They compute gradients for the tensors they name, an input's for adversarial examples (FGSM) say, and leave
mbclip's micro-batch gradients alone: only a plain ``backward()`` feeds the update.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mbclip import MicroBatchClipping
from mbclip.errors import BatchError, NoTrainingBackwardWarning
from reference import assert_close_update, reference_update
from toy_models import ConformerClassifier, small_model

BATCH = 4


class SelfAttention(nn.Module):
    """``nn.MultiheadAttention`` on [B, T, E] (a recorded layer), then a Linear."""

    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.attention(x, x, x, need_weights=False)[0].mean(dim=1))


class Recurrent(nn.Module):
    """``nn.LSTM`` on [B, T, F] (looped over few micro-batches, recorded over many), then a Linear."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


class Checkpointed(nn.Module):
    """A non-reentrant activation checkpoint around Linear, LayerNorm and tanh, then a Linear (reentrant ones refuse
    a backward that names its inputs: torch says so)."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh())
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(checkpoint(self.block, x, use_reentrant=False))


SEQUENCE_MODELS = {  # model class and one sample's [T, F]
    "attention": (SelfAttention, (3, 4)),
    "lstm": (Recurrent, (3, 4)),
    "conformer": (ConformerClassifier, (12, 8)),
}


def _case(name):
    """``(model, x, y)`` in float64: ``x`` [B, 4] for the MLP (samplers and the autograd fallback), [B, T, F]
    for the sequence models."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    if name == "mlp":
        model, shape = small_model(), (BATCH, 4)
    elif name == "checkpointed":
        model, shape = Checkpointed().double(), (BATCH, 4)
    else:
        model_class, sample_shape = SEQUENCE_MODELS[name]
        model, shape = model_class().double(), (BATCH, *sample_shape)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    y = torch.randn(BATCH, 3, generator=generator, dtype=torch.float64)
    return model, x, y


def _plain_copy(case, model):
    """A model without mbclip's hooks and state, with ``model``'s weights, for the reference (a copy of the wrapped
    model mid-step would carry its recorded passes)."""
    plain = _case(case)[0]
    plain.load_state_dict(model.state_dict())
    return plain


def _losses(model, x, y):
    return ((model(x) - y) ** 2).sum(dim=1)


def _wrap(model, microbatch_size=2, verify_gradients="first"):
    """``(wrapped model, clipping optimizer)``: SGD, C = 0.5."""
    wrapped, clipped, _ = MicroBatchClipping().make_clipped(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        microbatch_size=microbatch_size,
        max_grad_norm=0.5,
        verify_gradients=verify_gradients,
    )
    return wrapped, clipped


def _input_gradient(model, x, y, named_by):
    """The gradient of the batch-mean loss with respect to ``x``, by a backward that names ``x`` alone."""
    x = x.clone().requires_grad_()
    loss = _losses(model, x, y).mean()
    if named_by == "autograd.grad":
        return torch.autograd.grad(loss, x)[0]
    loss.backward(inputs=[x])
    return x.grad


@pytest.mark.parametrize("named_by", ["autograd.grad", "backward(inputs=...)"])
@pytest.mark.parametrize("verify_gradients", ["always", "never"])
@pytest.mark.parametrize("microbatch_size", [1, 2, BATCH])
@pytest.mark.parametrize("case", ["mlp", "checkpointed", "attention", "lstm", "conformer"])
def test_fgsm_step_matches_reference(case, microbatch_size, verify_gradients, named_by):
    """An adversarial step: the input gradient through the wrapped model is the plain model's, and the update from
    the adversarial batch is the reference's (the input gradient's backward adds nothing to it)."""
    model, x, y = _case(case)
    plain_gradient = _input_gradient(copy.deepcopy(model), x, y, "autograd.grad")
    wrapped, clipped = _wrap(model, microbatch_size, verify_gradients)
    for _ in range(2):  # the second step: the sampler-only path runs with verify_gradients="never"
        clipped.zero_grad()
        gradient = _input_gradient(wrapped, x, y, named_by)
        if plain_gradient is not None:
            torch.testing.assert_close(gradient, plain_gradient, rtol=1e-12, atol=1e-15)
            plain_gradient = None  # the model trains from here
        adversarial = (x + 0.1 * gradient.sign()).detach()

        def adversarial_losses(m, samples, adversarial=adversarial):
            return _losses(m, adversarial[samples], y[samples])

        expected = reference_update(_plain_copy(case, model), adversarial_losses, BATCH, microbatch_size, "fixed", 0.5)
        _losses(wrapped, adversarial, y).mean().backward()
        assert clipped.pre_step()
        assert_close_update([p.grad for p in model.parameters()], expected.update)
        clipped.original_optimizer.step()


@pytest.mark.parametrize("verify_gradients", ["always", "never"])
@pytest.mark.parametrize("microbatch_size", [1, 2, BATCH])
@pytest.mark.parametrize("case", ["mlp", "checkpointed", "attention", "lstm", "conformer"])
def test_input_gradient_then_training_backward_through_one_graph(case, microbatch_size, verify_gradients):
    """``autograd.grad(loss, x, retain_graph=True)`` then ``loss.backward()`` on the same forward (an input-gradient
    diagnostic beside training): the update is the reference's for that batch."""
    model, x, y = _case(case)
    wrapped, clipped = _wrap(model, microbatch_size, verify_gradients)
    expected = reference_update(
        _plain_copy(case, model),
        lambda m, samples: _losses(m, x[samples], y[samples]),
        BATCH,
        microbatch_size,
        "fixed",
        0.5,
    )
    clipped.zero_grad()
    inputs = x.clone().requires_grad_()
    loss = _losses(wrapped, inputs, y).mean()
    torch.autograd.grad(loss, inputs, retain_graph=True)
    loss.backward()
    assert clipped.pre_step()
    assert_close_update([p.grad for p in model.parameters()], expected.update)


@pytest.mark.parametrize("case", ["mlp", "attention", "lstm"])
def test_named_backward_alone_gives_a_step_without_samples(case):
    """A step after only an input-gradient backward has no micro-batch gradients, as if no batch had come: the
    parameters stay as they were."""
    model, x, y = _case(case)
    before = [p.detach().clone() for p in model.parameters()]
    wrapped, clipped = _wrap(model)
    clipped.zero_grad()
    _input_gradient(wrapped, x, y, "backward(inputs=...)")
    assert wrapped.collect(clipped.params) is None
    with pytest.warns(NoTrainingBackwardWarning, match=r"4 samples went through.*nothing was updated.*backward\(\)"):
        clipped.step()
    assert clipped.last_step.num_microbatches == 0
    for p, old in zip(model.parameters(), before):
        assert torch.equal(p, old)


@pytest.mark.parametrize("named_by", ["autograd.grad", "backward(inputs=...)"])
def test_backward_naming_the_parameters_after_the_checked_step_warns_at_the_step(named_by):
    """After the checked first step the sampled parameters are not in autograd's graph, so a backward that names
    them computes nothing that mbclip (or torch) can see; the step says so instead of silently doing nothing (a
    layer on the autograd fallback keeps its parameters in the graph and refuses such a backward by name)."""
    model, x, y = _case("lstm")
    wrapped, clipped = _wrap(model)
    clipped.zero_grad()
    _losses(wrapped, x, y).mean().backward()
    clipped.step()  # the checked first step
    before = [p.detach().clone() for p in model.parameters()]
    clipped.zero_grad()
    loss = _losses(wrapped, x, y).mean()
    params = [p for p in model.parameters() if p.requires_grad]
    if named_by == "autograd.grad":
        torch.autograd.grad(loss, params, allow_unused=True)
    else:
        loss.backward(inputs=params)
    with pytest.warns(NoTrainingBackwardWarning, match="even when it names the parameters"):
        clipped.step()
    for p, old in zip(model.parameters(), before):
        assert torch.equal(p, old)


@pytest.mark.parametrize("named_by", ["autograd.grad", "backward(inputs=...)"])
def test_backward_naming_a_parameter_is_refused(named_by):
    """On the checked step, where the parameters are in the graph, a backward that names one is refused by name
    (mbclip would have no micro-batch gradients for what autograd computed)."""
    model, x, y = _case("mlp")
    wrapped, clipped = _wrap(model)
    clipped.zero_grad()
    loss = _losses(wrapped, x, y).mean()
    weight = model[4].weight
    with pytest.raises(BatchError, match=r"names tensors to differentiate.*'4\.weight'.*plain loss\.backward\(\)"):
        if named_by == "autograd.grad":
            torch.autograd.grad(loss, [weight])
        else:
            loss.backward(inputs=[weight])


@pytest.mark.parametrize("verify_gradients", ["always", "never"])
def test_gradient_penalty_is_refused_with_its_cause(verify_gradients):
    """A loss built from an input gradient (``create_graph=True``) reaches the weights through autograd's
    double backward, which mbclip does not split: refused at the step, on both paths, naming that cause."""
    model, x, y = _case("mlp")
    wrapped, clipped = _wrap(model, verify_gradients=verify_gradients)
    before = [p.detach().clone() for p in model.parameters()]
    clipped.zero_grad()
    inputs = x.clone().requires_grad_()
    loss = _losses(wrapped, inputs, y).mean()
    (gradient,) = torch.autograd.grad(loss, inputs, create_graph=True)
    (loss + gradient.pow(2).sum()).backward()
    with pytest.raises(BatchError, match=r"a gradient penalty through torch\.autograd\.grad\(.*create_graph=True\)"):
        clipped.step()
    for p, old in zip(model.parameters(), before):
        assert torch.equal(p, old)
