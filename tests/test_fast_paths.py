"""Every fast path against the brute-force reference (float64, rtol 1e-10), on small models that use them all.

Covers: gradient scaling folded into collect (mean and sum losses and reductions), the cheap
gradient verification, ragged last micro-batches, and attention through the autograd fallback
(whose output is a view, so the view/base hook pair is exercised under nested autograd).
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import on_both_paths
from mbclip import MicroBatchClipping, grad_module
from reference import assert_close_update, reference_update
from toy_models import TinyConformerBlock, TinyLM


def _frame_losses(inputs, targets):
    def per_sample_losses(model, samples):
        logits = model(inputs[samples])
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[samples].reshape(-1), reduction="none")
        return losses.reshape(targets[samples].shape).mean(dim=1)

    return per_sample_losses


def _conformer_case(batch_size):
    torch.manual_seed(0)
    model = TinyConformerBlock().double()
    inputs = torch.randn(batch_size, 5, 6, dtype=torch.float64)
    return model, _frame_losses(inputs, torch.randint(0, 5, (batch_size, 5)))


def _lm_case(batch_size):
    torch.manual_seed(1)
    model = TinyLM().double()
    tokens = torch.randint(0, 11, (batch_size, 6))
    return model, _frame_losses(tokens, torch.randint(0, 11, (batch_size, 6)))


@pytest.mark.parametrize("case", [_conformer_case, _lm_case], ids=["conformer", "lm"])
@pytest.mark.parametrize("microbatch_size", [1, 3, 8])
@pytest.mark.parametrize("loss_reduction,microbatch_reduction", [("mean", "mean"), ("sum", "sum"), ("mean", "sum")])
def test_model_matches_reference(case, microbatch_size, loss_reduction, microbatch_reduction):
    batch_size = 8
    model, per_sample_losses = case(batch_size)
    reference = reference_update(
        model, per_sample_losses, batch_size, microbatch_size, "fixed", 0.05, microbatch_reduction
    )

    def run(verify_gradients: str):
        wrapped, optimizer, _ = MicroBatchClipping().make_clipped(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            microbatch_size=microbatch_size,
            max_grad_norm=0.05,
            loss_reduction=loss_reduction,
            microbatch_reduction=microbatch_reduction,
            verify_gradients=verify_gradients,
        )
        optimizer.zero_grad()
        losses = per_sample_losses(wrapped, slice(None))
        (losses.mean() if loss_reduction == "mean" else losses.sum()).backward()
        assert optimizer.pre_step()
        return [p.grad.clone() for p in model.parameters()], optimizer

    update, optimizer = on_both_paths(model, run)
    assert_close_update(update, reference.update)
    torch.testing.assert_close(optimizer.last_step.microbatch_norms, reference.norms, rtol=1e-10, atol=0)


@pytest.mark.parametrize("functorch_check", ["present", "absent"])
def test_keeper_node_apply_paths_match_reference(functorch_check):
    """The keeper node is created through autograd.Function's C apply where torch can tell that no functorch
    transform runs, and through the public ``apply`` otherwise: both give the reference update."""
    model, per_sample_losses = _conformer_case(6)
    reference = reference_update(model, per_sample_losses, 6, 2, "fixed", 0.05)
    check = grad_module._functorch_active if functorch_check == "present" else None
    applied = []
    public_apply = grad_module._Keep.apply

    def spy(*args):
        applied.append(args[0].shape)
        return public_apply(*args)

    wrapped, optimizer, _ = MicroBatchClipping().make_clipped(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), microbatch_size=2, max_grad_norm=0.05
    )
    with (
        mock.patch.object(grad_module, "_functorch_active", check),
        mock.patch.object(grad_module._Keep, "apply", side_effect=spy),
    ):
        per_sample_losses(wrapped, slice(None)).mean().backward()
    assert optimizer.pre_step()
    assert_close_update([p.grad for p in model.parameters()], reference.update)
    assert bool(applied) == (check is None)  # the public apply ran exactly when the check is absent


def test_two_passes_before_one_step_match_reference():
    """Gradient accumulation over two batches of different sizes: the scale of each pass is its own."""
    model, per_sample_losses = _conformer_case(7)
    reference = reference_update(model, per_sample_losses, 7, 2, "fixed", 0.05)
    wrapped, optimizer, _ = MicroBatchClipping().make_clipped(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), microbatch_size=2, max_grad_norm=0.05
    )
    optimizer.zero_grad()
    per_sample_losses(wrapped, slice(0, 4)).mean().backward()
    per_sample_losses(wrapped, slice(4, 7)).mean().backward()
    assert optimizer.pre_step()
    assert_close_update([p.grad for p in model.parameters()], reference.update)


def test_nonfinite_microbatch_is_dropped_and_rest_matches_reference():
    """With a non-finite micro-batch the update takes the unfused path: the others still match exactly."""
    # No attention here: the autograd fallback's masking (0 * NaN) spreads a NaN to every micro-batch.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 5)).double()
    inputs, targets = torch.randn(6, 5, 6, dtype=torch.float64), torch.randint(0, 5, (6, 5))
    reference = reference_update(model, _frame_losses(inputs, targets), 4, 2, "fixed", 0.05)
    inputs[5, 2, 1] = float("nan")
    wrapped, optimizer, _ = MicroBatchClipping().make_clipped(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), microbatch_size=2, max_grad_norm=0.05
    )
    optimizer.zero_grad()
    _frame_losses(inputs, targets)(wrapped, slice(None)).mean().backward()
    assert optimizer.pre_step()
    assert optimizer.last_step.dropped_microbatches == 1
    assert_close_update([p.grad for p in model.parameters()], reference.update)


class WeightAlsoUsedOutside(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x) + x @ self.lin.weight.T  # the second use is invisible to the Linear's hooks


def test_fused_verification_catches_a_missed_contribution():
    from mbclip.errors import BatchError

    torch.manual_seed(0)
    model = WeightAlsoUsedOutside().double()
    wrapped, optimizer, _ = MicroBatchClipping().make_clipped(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), microbatch_size=2, max_grad_norm=1.0
    )
    optimizer.zero_grad()
    wrapped(torch.randn(6, 3, 4, dtype=torch.float64)).square().mean().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(BatchError, match="lin.weight"):
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
