"""Shared test step: one mbclip update against the brute-force reference, for any model."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from helpers import on_both_paths
from mbclip.engine import MicroBatchClipping
from reference import PerSampleLosses, assert_close_update, reference_update

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
