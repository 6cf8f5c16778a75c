"""Run one mbclip step on a model, on both the checked and the sampler-only path, and compare with the reference."""

from __future__ import annotations

import copy
from typing import Callable, List, Optional, Sequence, Tuple, Union
from unittest import mock

import torch
from torch import nn

from mbclip import MicroBatchClipping
from mbclip.grad_module import MicroBatchGradSampleModule
from mbclip.optimizer import MicroBatchOptimizer
from reference import PerSampleLosses, assert_close_update, reference_update

Update = List[Optional[torch.Tensor]]


def on_both_paths(
    model: nn.Module, run: Callable[[str], Tuple[Update, MicroBatchOptimizer]]
) -> Tuple[Update, MicroBatchOptimizer]:
    """``run(verify_gradients)`` on the checked path and on the sampler-only path, from the same model and RNG state.

    The checked path lets autograd compute every ``p.grad`` beside the samplers and checks them; the
    sampler-only path (every step after the first) switches autograd's weight gradients off, and takes a batch
    that is one micro-batch from autograd whole. Both must give the same update, element by element (to rounding
    of the update's scale where the sampler-only path took a whole batch: its gradient is autograd's sum, not the
    samplers', so a gradient that cancels to ~0 differs by rounding, not by 1e-15 absolute); the sampler-only one
    is returned.
    """
    state = copy.deepcopy(model.state_dict())
    rng = torch.random.get_rng_state()
    checked, checked_optimizer = run("always")
    MicroBatchClipping.unwrap(checked_optimizer.grad_module, checked_optimizer)
    model.load_state_dict(state)
    torch.random.set_rng_state(rng)
    whole_pass = MicroBatchGradSampleModule._open_whole_pass  # spied on: did the sampler-only run take one?
    spy = mock.patch.object(MicroBatchGradSampleModule, "_open_whole_pass", autospec=True, side_effect=whole_pass)
    with spy as opened:
        fast, fast_optimizer = run("never")
    assert len(fast) == len(checked)
    atol = 1e-15
    if opened.called:
        atol = max(atol, 1e-13 * max((float(g.abs().max()) for g in checked if g.numel()), default=0.0))
    for fast_grad, checked_grad in zip(fast, checked):
        torch.testing.assert_close(fast_grad, checked_grad, rtol=1e-12, atol=atol)
    return fast, fast_optimizer


def mbclip_update(
    model: nn.Module,
    per_sample_losses: PerSampleLosses,
    microbatch_size: int,
    clipping: str = "fixed",
    max_grad_norm: Union[None, float, Sequence[float]] = None,
    loss_reduction: str = "mean",
    microbatch_reduction: str = "mean",
    batch_first: bool = True,
    passes: Optional[List[slice]] = None,
):
    """Wrap ``model``, run backward on the batch (or on each slice of ``passes``), clip; return (update, optimizer).

    Runs on both the checked and the sampler-only path (:func:`on_both_paths`).
    """

    def run(verify_gradients: str) -> Tuple[Update, MicroBatchOptimizer]:
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        wrapped, clipped, _ = MicroBatchClipping().make_clipped(
            module=model,
            optimizer=optimizer,
            microbatch_size=microbatch_size,
            max_grad_norm=max_grad_norm,
            clipping=clipping,
            loss_reduction=loss_reduction,
            microbatch_reduction=microbatch_reduction,
            batch_first=batch_first,
            verify_gradients=verify_gradients,
        )
        clipped.zero_grad()
        for samples in passes or [slice(None)]:
            losses = per_sample_losses(wrapped, samples)
            (losses.mean() if loss_reduction == "mean" else losses.sum()).backward()
        assert clipped.pre_step()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad], clipped

    return on_both_paths(model, run)


# batch_losses(model) -> per-sample losses [B] of the whole batch
BatchLosses = Callable[[nn.Module], torch.Tensor]


def check_update(
    model: nn.Module,
    batch_losses: BatchLosses,
    batch_size: int,
    microbatch_size: int,
    clipping: str = "fixed",
    seed: int = 123,
    per_sample_losses: Optional[PerSampleLosses] = None,
    training_loss: Optional[Callable[[nn.Module], torch.Tensor]] = None,
    loss_reduction: str = "mean",
) -> None:
    """Assert mbclip's clipped update equals the reference at rtol 1e-10.

    By default the reference takes each micro-batch's rows of the whole batch's losses, computed under the
    same seed (same as running it alone when the model never mixes samples, and it keeps dropout masks
    identical). ``per_sample_losses`` replaces that with a truly separate run (e.g. trimmed padding);
    ``training_loss`` is what the user backpropagates (default: mean of ``batch_losses``).
    """

    def rows_of_batch(m: nn.Module, samples) -> torch.Tensor:
        torch.manual_seed(seed)
        return batch_losses(m)[samples]

    bound = {"max_grad_norm": 0.5} if clipping == "fixed" else {}
    ref = reference_update(
        model, per_sample_losses or rows_of_batch, batch_size, microbatch_size, clipping=clipping, **bound
    )

    def run(verify_gradients: str):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        wrapped, clipped, _ = MicroBatchClipping().make_clipped(
            module=model,
            optimizer=optimizer,
            microbatch_size=microbatch_size,
            clipping=clipping,
            loss_reduction=loss_reduction,
            verify_gradients=verify_gradients,
            **bound,
        )
        clipped.zero_grad()
        torch.manual_seed(seed)
        loss = training_loss(wrapped) if training_loss is not None else batch_losses(wrapped).mean()
        loss.backward()
        clipped.pre_step()
        return [None if p.grad is None else p.grad.clone() for p in model.parameters()], clipped

    update, _ = on_both_paths(model, run)
    assert_close_update(update, ref.update)
