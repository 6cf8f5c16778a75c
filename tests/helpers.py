"""Run one mbclip step on a model and return the update it wrote into ``p.grad``."""

from __future__ import annotations

import copy
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from mbclip import MicroBatchClipping
from mbclip.optimizer import MicroBatchOptimizer
from reference import PerSampleLosses

Update = List[Optional[torch.Tensor]]


def on_both_paths(
    model: nn.Module, run: Callable[[str], Tuple[Update, MicroBatchOptimizer]]
) -> Tuple[Update, MicroBatchOptimizer]:
    """``run(verify_gradients)`` on the checked path and on the sampler-only path, from the same model and RNG state.

    The checked path lets autograd compute every ``p.grad`` beside the samplers and checks them; the
    sampler-only path (every step after the first) switches autograd's weight gradients off. Both must
    give the same update; the sampler-only one is returned.
    """
    state = copy.deepcopy(model.state_dict())
    rng = torch.random.get_rng_state()
    checked, checked_optimizer = run("always")
    MicroBatchClipping.unwrap(checked_optimizer.grad_module, checked_optimizer)
    model.load_state_dict(state)
    torch.random.set_rng_state(rng)
    fast, fast_optimizer = run("never")
    assert len(fast) == len(checked)
    for fast_grad, checked_grad in zip(fast, checked):
        torch.testing.assert_close(fast_grad, checked_grad, rtol=1e-12, atol=1e-15)
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
