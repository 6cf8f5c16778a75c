"""LayerNorm, RMSNorm, GroupNorm and InstanceNorm: affine gradients are sums of ``grad * x_hat``.

Each sample is normalised with its own statistics, so ``x_hat`` is recomputed from the stored
input and the micro-batch gradient is a sum over the micro-batch's samples and positions.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mbclip.samplers.registry import LayerCall, batch_to_front, register_microbatch_sampler


def _affine_sums(
    module: nn.Module, call: LayerCall, normalized: torch.Tensor, grad_output: torch.Tensor, feature_shape
) -> Dict:
    """Micro-batch sums of ``grad * x_hat`` (weight) and ``grad`` (bias), over all but the feature dims."""
    batch_size = normalized.shape[0]
    result = {}
    for param, per_element in ((module.weight, grad_output * normalized), (getattr(module, "bias", None), grad_output)):
        if param is None or not param.requires_grad:
            continue
        grouped = call.layout.group(per_element.reshape((batch_size, -1) + tuple(feature_shape)))
        result[param] = grouped.sum(dim=(1, 2)).reshape((grouped.shape[0],) + tuple(param.shape))
    return result


@register_microbatch_sampler(nn.LayerNorm)
def layer_norm_sampler(module: nn.LayerNorm, call: LayerCall, grad_outputs: Sequence[Optional[torch.Tensor]]) -> Dict:
    if module.weight is None:
        return {}
    grad_output = batch_to_front(grad_outputs[0], call.batch_dim)
    activations = batch_to_front(call.input, call.batch_dim).to(grad_output.dtype)
    normalized = F.layer_norm(activations, module.normalized_shape, eps=module.eps)
    return _affine_sums(module, call, normalized, grad_output, module.normalized_shape)


@register_microbatch_sampler(nn.RMSNorm)
def rms_norm_sampler(module: nn.RMSNorm, call: LayerCall, grad_outputs: Sequence[Optional[torch.Tensor]]) -> Dict:
    if module.weight is None:
        return {}
    grad_output = batch_to_front(grad_outputs[0], call.batch_dim)
    activations = batch_to_front(call.input, call.batch_dim).to(grad_output.dtype)
    normalized = F.rms_norm(activations, module.normalized_shape, eps=module.eps)
    return _affine_sums(module, call, normalized, grad_output, module.normalized_shape)


def _channel_sums(module: nn.Module, call: LayerCall, normalized: torch.Tensor, grad_output: torch.Tensor) -> Dict:
    """Channel-wise affine gradients for ``[B, C, *spatial]`` layouts: per-sample sums over the positions (no
    channels-last copy), then per micro-batch."""
    positions = tuple(range(2, grad_output.dim()))
    result = {}
    for param, per_element in ((module.weight, lambda: grad_output * normalized), (module.bias, lambda: grad_output)):
        if param is not None and param.requires_grad:
            values = per_element()
            result[param] = call.layout.sum_per_microbatch(values.sum(dim=positions) if positions else values)
    return result


@register_microbatch_sampler(nn.GroupNorm, batch_dim=0)
def group_norm_sampler(module: nn.GroupNorm, call: LayerCall, grad_outputs: Sequence[Optional[torch.Tensor]]) -> Dict:
    if not module.affine:
        return {}
    grad_output = grad_outputs[0]
    normalized = F.group_norm(call.input.to(grad_output.dtype), module.num_groups, eps=module.eps)
    return _channel_sums(module, call, normalized, grad_output)


@register_microbatch_sampler(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, batch_dim=0)
def instance_norm_sampler(module: nn.Module, call: LayerCall, grad_outputs: Sequence[Optional[torch.Tensor]]) -> Dict:
    if not module.affine:
        return {}
    grad_output = grad_outputs[0]
    normalized = F.instance_norm(call.input.to(grad_output.dtype), eps=module.eps)
    return _channel_sums(module, call, normalized, grad_output)
