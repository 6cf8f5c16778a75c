"""Run one mbclip step on a model and return the update it wrote into ``p.grad``."""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import nn

from mbclip import MicroBatchClipping
from reference import PerSampleLosses


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
    """Wrap ``model``, run backward on the batch (or on each slice of ``passes``), clip; return (update, optimizer)."""
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
    )
    clipped.zero_grad()
    for samples in passes or [slice(None)]:
        losses = per_sample_losses(wrapped, samples)
        (losses.mean() if loss_reduction == "mean" else losses.sum()).backward()
    assert clipped.pre_step()
    return [p.grad.clone() for p in model.parameters() if p.requires_grad], clipped
