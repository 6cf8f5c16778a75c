"""Shared test step: one mbclip update against the brute-force reference, for any model."""

from __future__ import annotations

from typing import Callable

import torch
from reference import assert_close_update, reference_update
from torch import nn

from mbclip.engine import MicroBatchClipping

# batch_losses(model) -> per-sample losses [B] of the whole batch
BatchLosses = Callable[[nn.Module], torch.Tensor]


def check_update(model: nn.Module, batch_losses: BatchLosses, batch_size: int, microbatch_size: int,
                 clipping: str = "fixed", seed: int = 123) -> None:
    """Assert mbclip's clipped update equals the reference at rtol 1e-10.

    The reference runs each micro-batch alone; here it takes the micro-batch's rows of the whole batch's
    losses, computed under the same seed. The two are the same when the model never mixes samples, and
    this keeps dropout masks identical between mbclip and the reference.
    """

    def per_sample_losses(m: nn.Module, samples) -> torch.Tensor:
        torch.manual_seed(seed)
        return batch_losses(m)[samples]

    bound = {"max_grad_norm": 0.5} if clipping == "fixed" else {}
    ref = reference_update(model, per_sample_losses, batch_size, microbatch_size, clipping=clipping, **bound)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped, clipped, _ = MicroBatchClipping().make_clipped(
        module=model, optimizer=optimizer, microbatch_size=microbatch_size, clipping=clipping, **bound
    )
    clipped.zero_grad()
    per_sample_losses(wrapped, slice(None)).mean().backward()
    clipped.pre_step()
    assert_close_update([p.grad for p in model.parameters()], ref.update)
