"""The generic path for any layer without a registered sampler: batched autograd over micro-batches.

When the gradient of a layer's outputs arrives, one ``torch.autograd.grad(..., is_grads_batched=True)``
call walks the layer's own, still-recorded graph once per micro-batch (vectorised by vmap), with the
output gradient masked to that micro-batch's samples. Nothing is re-run: dropout masks, keyword
arguments and raw ``nn.Parameter``s used anywhere in the layer's forward are all covered exactly. The
walk stops at the call's inputs (``output_hooks.InputBoundary``), so a parameter also used before the call
(a layer applied twice in a row) is counted once per call.
The cost is ``M`` vector-Jacobian products through the layer, so registered samplers stay faster.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from mbclip.errors import BatchError
from mbclip.output_hooks import suspended
from mbclip.samplers.registry import LayerCall

# Bound on the elements of the stacked output gradients per autograd call (memory of the fallback).
MAX_BATCHED_ELEMENTS = 1 << 26


def infer_batch_dim(shape: Sequence[int], batch_size: int, batch_first: bool) -> Optional[int]:
    """The dimension of ``shape`` that holds the batch: 0 or 1, the model's ``batch_first`` breaking ties.

    A leading dimension of 1 in a batch of several samples marks a tensor broadcast over the batch (relative
    positional encodings ``[1, 2T-1, d]``, say): it has no batch, whatever size its dim 1 happens to have.
    """
    if batch_size > 1 and len(shape) > 1 and shape[0] == 1:
        return None
    on_first = len(shape) > 0 and shape[0] == batch_size
    on_second = len(shape) > 1 and shape[1] == batch_size
    if on_first and on_second:
        return 0 if batch_first else 1
    return 0 if on_first else 1 if on_second else None


def _masked_output_grads(grad: torch.Tensor, batch_dim: int, call: LayerCall, first: int, last: int) -> torch.Tensor:
    """``[last - first, *grad.shape]``: ``grad`` kept only on the samples of each micro-batch in range."""
    sample_microbatch = call.layout.microbatch_index(grad.device)
    chosen = torch.arange(first, last, device=grad.device)
    mask = sample_microbatch.unsqueeze(0) == chosen.unsqueeze(1)  # [K, B]
    shape = [mask.shape[0]] + [1] * grad.dim()
    shape[1 + batch_dim] = grad.shape[batch_dim]
    # where, not a product: a NaN/Inf gradient of one sample must not leak into other micro-batches (0 * NaN = NaN)
    return torch.where(mask.reshape(shape), grad.unsqueeze(0), grad.new_zeros(()))


def autograd_microbatch_sums(
    module: nn.Module,
    call: LayerCall,
    grad_outputs: Sequence[Optional[torch.Tensor]],
    params: List[nn.Parameter],
    output_batch_dims: Optional[Sequence[Optional[int]]] = None,
) -> Dict[nn.Parameter, torch.Tensor]:
    """Micro-batch sums of per-sample gradients of ``params`` through ``module``'s recorded graph.

    ``output_batch_dims`` (one per output leaf) says where each output holds the batch when the
    caller knows it (a layer's own ``batch_first``); otherwise it is inferred from the shapes.
    """
    outputs, grads, batch_dims = [], [], []
    known_dims = output_batch_dims if output_batch_dims is not None else [None] * len(call.outputs)
    for output, grad, known_dim in zip(call.outputs, grad_outputs, known_dims):
        if output is None or grad is None:
            continue
        batch_dim = known_dim
        if batch_dim is None:
            batch_dim = infer_batch_dim(grad.shape, call.layout.batch_size, call.batch_first)
        if batch_dim is None:
            raise BatchError(
                f"{type(module).__name__} returned a tensor of shape {tuple(grad.shape)} with no dimension of the "
                f"batch size {call.layout.batch_size} in its first two dims, so mbclip cannot tell its samples apart. "
                "Return per-sample outputs from the module (reduce over the batch outside it), or register a sampler "
                "for it with mbclip.register_microbatch_sampler."
            )
        outputs.append(output)
        grads.append(grad)
        batch_dims.append(batch_dim)
    num_microbatches = call.layout.num_microbatches
    if not outputs or not params:
        return {p: None for p in params}
    elements = max(sum(g.numel() for g in grads), 1)
    chunk = max(1, min(num_microbatches, MAX_BATCHED_ELEMENTS // elements))
    pieces: Dict[nn.Parameter, List[torch.Tensor]] = {p: [] for p in params}
    for first in range(0, num_microbatches, chunk):
        last = min(first + chunk, num_microbatches)
        batched = [_masked_output_grads(g, d, call, first, last) for g, d in zip(grads, batch_dims)]
        try:
            with suspended():
                param_grads = torch.autograd.grad(
                    outputs, params, batched, retain_graph=True, is_grads_batched=True, allow_unused=True
                )
        except RuntimeError as error:
            raise BatchError(
                f"mbclip could not differentiate {type(module).__name__} per micro-batch through its recorded graph "
                f"({error}). Register a sampler for this layer with mbclip.register_microbatch_sampler."
            ) from error
        for param, grad in zip(params, param_grads):
            pieces[param].append(grad if grad is not None else param.new_zeros((last - first,) + tuple(param.shape)))
    return {p: torch.cat(chunks, dim=0) for p, chunks in pieces.items()}
