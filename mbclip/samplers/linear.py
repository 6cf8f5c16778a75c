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


@register_microbatch_sampler(nn.Linear)
def linear_sampler(
    module: nn.Linear, call: LayerCall, grad_outputs: Sequence[Optional[torch.Tensor]]
) -> Dict[nn.Parameter, torch.Tensor]:
    grad_output = grad_outputs[0]
    activations = grouped_rows(call.input.to(grad_output.dtype), call)
    backprops = grouped_rows(grad_output, call)
    result = {}
    if module.weight.requires_grad:
        result[module.weight] = outer_product_sums(backprops, activations)
    if module.bias is not None and module.bias.requires_grad:
        result[module.bias] = backprops.sum(dim=1)
    return result
