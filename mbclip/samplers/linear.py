"""Linear: a micro-batch's weight gradient is one contraction over its samples and positions.

It is formed, or kept as its factors for ghost norms when those are smaller (see ``mbclip.microbatch_sums``).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from torch import nn

from mbclip.microbatch_sums import outer_product_sums
from mbclip.samplers.registry import LayerCall, batch_to_front, register_microbatch_sampler


def grouped_rows(tensor: torch.Tensor, call: LayerCall) -> torch.Tensor:
    """``[..B.., ..., d]`` -> ``[M, b * positions, d]``: every row of a micro-batch in one matrix."""
    tensor = batch_to_front(tensor, call.batch_dim)
    grouped = call.layout.group(tensor.reshape(tensor.shape[0], -1, tensor.shape[-1]))
    return grouped.reshape(grouped.shape[0], -1, grouped.shape[-1])


def linear_layer_sums(
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    backprops: torch.Tensor,
    activations: torch.Tensor,
    shape: Optional[Sequence[int]] = None,
) -> Dict[nn.Parameter, object]:
    """Sums of a layer computing ``x @ W.T + b`` from grouped rows ``[M, n, out]`` and ``[M, n, in]``.

    Every Linear-like use shares it: nn.Linear, pointwise convolutions and the projections inside attention.
    """
    result = {}
    if weight.requires_grad:
        result[weight] = outer_product_sums(backprops, activations, shape)
    if bias is not None and bias.requires_grad:
        result[bias] = backprops.sum(dim=1)
    return result


@register_microbatch_sampler(nn.Linear)
def linear_sampler(
    module: nn.Linear, call: LayerCall, grad_outputs: Sequence[Optional[torch.Tensor]]
) -> Dict[nn.Parameter, torch.Tensor]:
    grad_output = grad_outputs[0]
    activations = grouped_rows(call.input.to(grad_output.dtype), call)
    return linear_layer_sums(module.weight, module.bias, grouped_rows(grad_output, call), activations)
