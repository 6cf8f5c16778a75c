"""LayerNorm, RMSNorm, GroupNorm and InstanceNorm: affine gradients are sums of ``grad * x_hat``.

Each sample is normalised with its own statistics, so ``x_hat`` is recomputed from the stored
input and the micro-batch gradient is a sum over the micro-batch's samples and positions.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mbclip.layout import MicroBatchLayout
from mbclip.samplers.registry import LayerCall, batch_to_front, register_microbatch_sampler


def _affine_sums(module: nn.Module, call: LayerCall, normalized: torch.Tensor, grad_output: torch.Tensor, sums):
    """Micro-batch sums of ``grad * x_hat`` (weight) and ``grad`` (bias): ``sums(tensor, layout)`` takes a
    ``[B, ...]`` tensor to ``[M, *param.shape]``. ``normalized`` is a temporary of the caller's, of ``grad_output``'s
    shape and dtype; it is overwritten (no second temporary)."""
    weight, bias = module.weight, getattr(module, "bias", None)
    result = {}
    if bias is not None and bias.requires_grad:
        result[bias] = sums(grad_output, call.layout)
    if weight is not None and weight.requires_grad:  # ``normalized`` is the sampler's own: multiplied in place
        result[weight] = sums(normalized.mul_(grad_output), call.layout)
    return result


def _feature_sums(feature_shape):
    """``sums`` for a norm over trailing feature dims: ``[B, ..., *features]`` -> ``[M, *features]``, summed over
    each micro-batch's samples and positions in one reduction."""

    def sums(tensor: torch.Tensor, layout: MicroBatchLayout) -> torch.Tensor:
        grouped = layout.group(tensor)  # [M, b, ...], a view unless the last micro-batch is padded
        return grouped.reshape((grouped.shape[0], -1) + tuple(feature_shape)).sum(dim=1)

    return sums


def _per_channel(tensor: torch.Tensor, layout: MicroBatchLayout) -> torch.Tensor:
    """``sums`` for a channel-wise norm: ``[B, C, *positions]`` -> ``[M, C]``, no channels-last copy."""
    return layout.channel_sums(tensor)


def channel_affine_sums(
    module: nn.Module, call: LayerCall, normalized: torch.Tensor, grad_output: torch.Tensor
) -> Dict:
    """Affine sums of a channel-wise norm on ``[B, C, *positions]`` from its normalized input (BatchNorm, and
    InstanceNorm with running statistics; ``normalized`` is overwritten)."""
    return _affine_sums(module, call, normalized, grad_output, _per_channel)


def _saved_statistics(
    call: LayerCall, node_name: str = "NativeLayerNormBackward0"
) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """The mean and 1/std that the layer's forward computed, as its backward node (``node_name``) saved them
    (``None`` where there is no such node: an input without grad and the affine parameters off)."""
    node = call.output_nodes[0] if call.output_nodes else None
    if type(node).__name__ != node_name:
        return None
    try:
        return node._saved_result1.detach(), node._saved_result2.detach()
    except (AttributeError, RuntimeError):  # another torch's naming, or already freed: recompute instead
        return None


@register_microbatch_sampler(nn.LayerNorm, keep_output_nodes=True)
def layer_norm_sampler(module: nn.LayerNorm, call: LayerCall, grad_outputs: Sequence[Optional[torch.Tensor]]) -> Dict:
    if module.weight is None:
        return {}
    dtype = grad_outputs[0].dtype
    statistics = _saved_statistics(call)
    if statistics is not None:  # x_hat as the forward had it: the same numbers, 4x cheaper than a second layer_norm
        mean, rstd = (t.to(dtype) for t in statistics)
        normalized = (call.input.to(dtype) - mean).mul_(rstd)
    else:
        normalized = F.layer_norm(call.input.to(dtype), module.normalized_shape, eps=module.eps)
    grad_output = batch_to_front(grad_outputs[0], call.batch_dim)
    normalized = batch_to_front(normalized, call.batch_dim)
    return _affine_sums(module, call, normalized, grad_output, _feature_sums(module.normalized_shape))


@register_microbatch_sampler(nn.RMSNorm)
def rms_norm_sampler(module: nn.RMSNorm, call: LayerCall, grad_outputs: Sequence[Optional[torch.Tensor]]) -> Dict:
    if module.weight is None:
        return {}
    grad_output = batch_to_front(grad_outputs[0], call.batch_dim)
    activations = batch_to_front(call.input, call.batch_dim).to(grad_output.dtype)
    normalized = F.rms_norm(activations, module.normalized_shape, eps=module.eps)
    return _affine_sums(module, call, normalized, grad_output, _feature_sums(module.normalized_shape))


def grouped_affine_sums(
    module: nn.Module,
    call: LayerCall,
    grad_output: torch.Tensor,
    num_groups: int,
    statistics: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> Dict:
    """Affine sums of a norm over groups of channels within each sample (GroupNorm; InstanceNorm is a group per
    channel), from one call of the native GroupNorm backward kernel: the batch as one sample of ``B * C`` channels
    in ``B * num_groups`` groups has every sample's affine gradients as its own (one fused pass over the output
    gradient and input, no normalized temporary; about 1.3x faster on CPU). ``statistics``: the forward's mean and
    1/std, ``[B, num_groups]`` (the same numbers, in this order); computed here when not given."""
    weight, bias = module.weight, module.bias
    wanted = [False, weight.requires_grad, bias is not None and bias.requires_grad]
    activations = call.input.to(grad_output.dtype)
    batch, channels = activations.shape[:2]
    rows = activations.reshape(1, batch * channels, -1)
    positions, groups = rows.shape[2], batch * num_groups
    if statistics is not None:
        mean, rstd = (t.to(rows.dtype).reshape(1, groups) for t in statistics)
    else:
        _, mean, rstd = torch.native_group_norm(rows, None, None, 1, batch * channels, positions, groups, module.eps)
    ones = rows.new_ones(batch * channels)  # the kernel reads a weight only for the input gradient, not computed
    _, d_weight, d_bias = torch.ops.aten.native_group_norm_backward(
        grad_output.reshape(rows.shape), rows, mean, rstd, ones, 1, batch * channels, positions, groups, wanted
    )
    result = {}
    if wanted[2]:
        result[bias] = call.layout.sum_per_microbatch(d_bias.view(batch, channels))
    if wanted[1]:
        result[weight] = call.layout.sum_per_microbatch(d_weight.view(batch, channels))
    return result


@register_microbatch_sampler(nn.GroupNorm, batch_dim=0, keep_output_nodes=True)
def group_norm_sampler(module: nn.GroupNorm, call: LayerCall, grad_outputs: Sequence[Optional[torch.Tensor]]) -> Dict:
    if not module.affine:
        return {}
    # the mean and 1/std from the layer's own autograd node where there is one: no second normalization pass
    statistics = _saved_statistics(call, "NativeGroupNormBackward0")
    return grouped_affine_sums(module, call, grad_outputs[0], module.num_groups, statistics)


@register_microbatch_sampler(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, batch_dim=0)
def instance_norm_sampler(module: nn.Module, call: LayerCall, grad_outputs: Sequence[Optional[torch.Tensor]]) -> Dict:
    if not module.affine:
        return {}
    grad_output = grad_outputs[0]
    if module.training or not module.track_running_stats:  # each sample's own statistics, as the forward used
        return grouped_affine_sums(module, call, grad_output, module.num_features)
    activations, mean, var = call.input.to(grad_output.dtype), module.running_mean, module.running_var
    with torch.no_grad():  # evaluation with running statistics: x_hat from them, as the forward used
        normalized = F.batch_norm(activations, mean, var, None, None, False, 0.0, module.eps)
    return channel_affine_sums(module, call, normalized, grad_output)
