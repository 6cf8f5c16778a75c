"""Convolutions (any groups, so depthwise too), with micro-batches folded into conv groups.

The weight gradient of a convolution over a batch is a native kernel call. Reshaping the input
``[B, C, ...]`` to ``[b, M*C, ...]`` and the output gradient to ``[b, M*O, ...]`` and asking for
the weight gradient with ``M * groups`` groups gives every micro-batch's weight gradient at once:
memory M x params, no unfolded patches. A pointwise (1x1) convolution is a Linear over positions and is
sampled as one (formed or factored, see ``mbclip.microbatch_sums``). Faster on CPU for their shapes: depthwise
convolutions take every sample's weight gradient from one grouped convolution of inputs by output gradients (summed
per micro-batch; when those would outgrow the input, they contract input windows), dense ones with few taps per
filter (or, at b = 1, few output positions) take per-sample products of the input's windows, and few micro-batches
run the plain kernel once each.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mbclip.samplers.linear import linear_layer_sums
from mbclip.samplers.registry import LayerCall, register_microbatch_sampler

_WEIGHT_GRAD = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}


def fold_microbatches_into_channels(tensor: torch.Tensor, call: LayerCall) -> torch.Tensor:
    """``[B, C, *S]`` -> ``[b, M * C, *S]`` (zero-padded ragged micro-batch)."""
    grouped = call.layout.group(tensor)  # [M, b, C, *S]
    grouped = grouped.transpose(0, 1)
    return grouped.reshape((grouped.shape[0], -1) + tuple(grouped.shape[3:]))


def is_pointwise(module: nn.Module) -> bool:
    """A 1x1 convolution without stride, dilation, groups or padding: a Linear over every position."""
    no_padding = module.padding in ("valid", "same") or all(p == 0 for p in module.padding)
    return (
        module.groups == 1
        and no_padding
        and all(k == 1 for k in module.kernel_size)
        and all(s == 1 for s in module.stride)
        and all(d == 1 for d in module.dilation)
    )


def is_depthwise(module: nn.Module) -> bool:
    """One input channel per group (a depthwise convolution, with any channel multiplier)."""
    return module.groups > 1 and module.in_channels == module.groups


def _zero_padded(activations: torch.Tensor, module: nn.Module, padding, first_dim: int = 2) -> torch.Tensor:
    """The input with the module's own numeric zero padding applied (the sampler padded any other kind already);
    ``first_dim``: where the spatial dims start (1 for a channels-last ``[B, *S, C]``, padded into a new tensor)."""
    if padding and any(padding):
        trailing = (0, 0) * (activations.dim() - first_dim - (module.weight.dim() - 2))
        return F.pad(activations, trailing + tuple(module._reversed_padding_repeated_twice))
    return activations if first_dim == 2 else activations.contiguous()


def _windows(activations: torch.Tensor, module: nn.Module, padding, first_dim: int = 2) -> torch.Tensor:
    """``[B, C, *S]`` -> ``[B, C, *O, *K]`` (or ``[B, *S, C]`` -> ``[B, *O, C, *K]`` with ``first_dim=1``): the
    input under each kernel tap at each output position (a view of the padded input)."""
    windows = _zero_padded(activations, module, padding, first_dim)
    for dim, (kernel, stride, dilation) in enumerate(zip(module.kernel_size, module.stride, module.dilation)):
        windows = windows.unfold(first_dim + dim, dilation * (kernel - 1) + 1, stride)  # window appended as last dim
        if dilation > 1:
            windows = windows[..., ::dilation]
    return windows


def depthwise_weight_sums(
    module: nn.Module, activations: torch.Tensor, grad_output: torch.Tensor, padding, call: LayerCall
) -> torch.Tensor:
    """``[M, *weight.shape]`` of a depthwise convolution as one contraction over samples and positions.

    ``dW[m, c*k + j, 0, taps] = sum_{samples of m, positions} g[c*k + j, pos] * x[c, pos + taps]``. It is
    several times faster than the grouped weight-gradient kernel on CPU; the windows are materialized in
    channel chunks bounded by twice the input, so memory stays near what the grouped kernel copies.
    """
    channels, spatial = module.in_channels, activations.dim() - 2
    multiplier = module.out_channels // channels
    grouped = call.layout.group(activations)  # [M, b, C, *S], zero samples pad a ragged micro-batch
    windows = _windows(grouped.flatten(0, 1), module, padding)
    windows = windows.view(grouped.shape[:2] + tuple(windows.shape[1:]))  # [M, b, C, *O, *K], a view
    grads = call.layout.group(grad_output)  # [M, b, C * k, *O]
    grads = grads.reshape(grads.shape[:2] + (channels, multiplier) + tuple(grads.shape[3:]))
    letters = "uvwxyz"
    positions, taps = letters[:spatial], letters[3 : 3 + spatial]
    equation = f"mbcj{positions},mbc{positions}{taps}->mcj{taps}"
    window_numel = windows[0, 0, 0].numel() * grads.shape[0] * grads.shape[1]  # per channel
    chunk = max(1, (2 * activations.numel()) // max(window_numel, 1))
    parts = [
        torch.einsum(equation, grads[:, :, first : first + chunk], windows[:, :, first : first + chunk])
        for first in range(0, channels, chunk)
    ]
    summed = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # [M, C, k, *K]
    return summed.reshape((summed.shape[0],) + tuple(module.weight.shape))


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def depthwise_per_sample_weight_sums(module: nn.Module, activations: torch.Tensor, grad_output: torch.Tensor, padding):
    """``[B, *weight.shape]``: every sample's depthwise weight gradient as one grouped convolution.

    Samples times channels are the groups; each group's input is the sample's (padded) channel and its kernel the
    output gradient, with the layer's stride as dilation and its dilation as stride:
    ``dW[c*k + j, 0, taps] = sum_pos g[c*k + j, pos] * x[c, pos * stride + taps * dilation]``. On CPU this is 3-6x
    faster than the windows' contraction (see :func:`per_sample_depthwise_fits` for where it is used).
    """
    activations = _zero_padded(activations, module, padding)
    batch, channels = activations.shape[:2]
    spatial = activations.dim() - 2
    inputs = activations.reshape((1, batch * channels) + tuple(activations.shape[2:]))
    kernels = grad_output.reshape((batch * module.out_channels, 1) + tuple(grad_output.shape[2:]))
    taps = _CONV[spatial](inputs, kernels, stride=module.dilation, dilation=module.stride, groups=batch * channels)
    taps = taps[(0, slice(None)) + tuple(slice(0, k) for k in module.kernel_size)]  # the first K positions are the taps
    return taps.reshape((batch,) + tuple(module.weight.shape))


def per_sample_depthwise_fits(module: nn.Module, activations: torch.Tensor, call: LayerCall) -> bool:
    """Per-sample depthwise weight gradients (then summed per micro-batch) when they are the answer (b = 1) or, on CPU
    (3-6x faster than the windows there; unmeasured elsewhere), take no more memory than the layer's input (a filter
    no longer than the sequence)."""
    if call.layout.microbatch_size == 1:
        return True
    fits = activations.shape[0] * module.weight.numel() <= activations.numel()
    return fits and activations.device.type == "cpu"


# Per-sample weight gradients (then summed per micro-batch) where a filter has at most this many taps over
# input channels: one batched matmul over the input's windows beats the grouped weight-gradient kernel there (on
# CPU: 3x on a speech front end's one-channel Conv2d, 1.4-1.9x on an image model's three-channel 3x3 first layer).
MAX_PER_SAMPLE_TAPS = 32


def has_few_taps(module: nn.Module, grad_output: torch.Tensor) -> bool:
    """A dense convolution whose filters see at most :data:`MAX_PER_SAMPLE_TAPS` inputs, no more than it has output
    channels and output positions: its per-sample weight gradients and its unfolded input then take no more memory
    than its output gradient."""
    taps = module.in_channels // module.groups * math.prod(module.kernel_size)
    positions = math.prod(grad_output.shape[2:])
    return module.groups == 1 and taps <= min(MAX_PER_SAMPLE_TAPS, positions, module.out_channels)


def per_sample_products_fit(module: nn.Module, grad_output: torch.Tensor, call: LayerCall) -> bool:
    """Per-sample weight gradients from the input's windows, for a dense convolution with few taps, or at b = 1
    (they are then the answer) with no more output positions than output channels (the unfolded input is then no
    bigger than they are). Measured on CPU at b = 1 against the grouped kernel: 1.2-1.9x faster on 3x3 convolutions
    of 64-256 channels with 4x4 to 8x8 outputs."""
    if has_few_taps(module, grad_output):
        return True
    one_each = call.layout.microbatch_size == 1
    return module.groups == 1 and one_each and math.prod(grad_output.shape[2:]) <= module.out_channels


# Input channels from which the windows are copied channels-last (``[B, positions, taps, C]``): runs of C contiguous
# numbers copy faster than runs along a (strided) output row. On CPU 1.3-2x faster for 16-128 channels (3x3 kernels,
# 8x8 to 32x32 inputs, stride 1 or 2), slower for 3 channels.
MIN_CHANNELS_LAST = 16


def per_sample_weight_sums(module: nn.Module, activations: torch.Tensor, grad_output: torch.Tensor, padding, call):
    """``[M, *weight.shape]``: per-sample ``g @ windows(x)^T`` in one batched matmul, summed per micro-batch.

    The windows are copied once into ``[B, C * K, positions]`` (or, for :data:`MIN_CHANNELS_LAST` channels or more,
    ``[B, positions, K * C]``) from strided views of the padded input, which on CPU is 1.5-3x faster than
    ``F.unfold`` (and covers 1-d, 2-d and 3-d convolutions alike). Channels-last sums come back as a permuted view
    (``mbclip.microbatch_sums.FormedSums`` multiplies them in memory order)."""
    spatial = activations.dim() - 2
    rows = grad_output.reshape(grad_output.shape[0], grad_output.shape[1], -1)  # [B, O, L]
    if module.in_channels >= MIN_CHANNELS_LAST:
        windows = _windows(activations.movedim(1, -1), module, padding, first_dim=1)  # [B, *O, C, *K], a view
        taps_last = (0,) + tuple(range(1, 1 + spatial)) + tuple(range(2 + spatial, 2 + 2 * spatial)) + (1 + spatial,)
        columns = windows.permute(taps_last).reshape(windows.shape[0], rows.shape[2], -1)  # [B, L, K*C]
        per_sample = torch.bmm(rows, columns)  # [B, O, K*C]
        per_sample = per_sample.view(per_sample.shape[:2] + tuple(module.kernel_size) + (module.in_channels,))
        return call.layout.sum_per_microbatch(per_sample).movedim(-1, 2)  # [M, O, C, *K], a view
    windows = _windows(activations, module, padding)  # [B, C, *O, *K], a view
    taps_first = (0, 1) + tuple(range(2 + spatial, 2 + 2 * spatial)) + tuple(range(2, 2 + spatial))
    columns = windows.permute(taps_first).reshape(windows.shape[0], -1, rows.shape[2])  # [B, C*K, L]
    per_sample = torch.bmm(rows, columns.transpose(1, 2))  # [B, O, C*K]
    summed = call.layout.sum_per_microbatch(per_sample)
    return summed.reshape((summed.shape[0],) + tuple(module.weight.shape))


# Micro-batches as a loop of plain weight-gradient kernels on contiguous slices of the batch (no folding copies)
# where there are few of them: on CPU the grouped kernel runs well below the plain kernel's speed with few input
# channels per group (2x slower on a 3-channel 3x3 Conv2d), and for two micro-batches the loop never lost.
MAX_LOOPED_MICROBATCHES = 4
MAX_LOOPED_CHANNELS = 32


def loops_over_microbatches(module: nn.Module, num_microbatches: int) -> bool:
    """Two micro-batches at most, or :data:`MAX_LOOPED_MICROBATCHES` with at most :data:`MAX_LOOPED_CHANNELS`
    input channels per group."""
    channels = module.in_channels // module.groups
    return num_microbatches <= 2 or (num_microbatches <= MAX_LOOPED_MICROBATCHES and channels <= MAX_LOOPED_CHANNELS)


def looped_weight_sums(module: nn.Module, activations: torch.Tensor, grad_output: torch.Tensor, padding, call):
    """``[M, *weight.shape]``: the plain weight-gradient kernel once per micro-batch (a ragged one needs no padding)."""
    weight_grad = _WEIGHT_GRAD[module.weight.dim() - 2]
    options = dict(stride=module.stride, padding=padding, dilation=module.dilation, groups=module.groups)
    sums = [
        weight_grad(activations[samples], module.weight.shape, grad_output[samples], **options)
        for samples in call.layout.microbatch_slices()
    ]
    return torch.stack(sums)


def _positions_as_rows(tensor: torch.Tensor, call: LayerCall) -> torch.Tensor:
    """``[B, C, *S]`` -> ``[M, b * prod(S), C]``."""
    rows = tensor.flatten(2).transpose(1, 2)  # [B, prod(S), C]
    grouped = call.layout.group(rows)
    return grouped.reshape(grouped.shape[0], -1, grouped.shape[-1])


@register_microbatch_sampler(nn.Conv1d, nn.Conv2d, nn.Conv3d, batch_dim=0)
def conv_sampler(module: nn.Module, call: LayerCall, grad_outputs: Sequence[Optional[torch.Tensor]]) -> Dict:
    grad_output = grad_outputs[0]
    activations = call.input.to(grad_output.dtype)
    if activations.dim() == module.weight.dim() - 1:  # unbatched input is a batch of one
        activations, grad_output = activations.unsqueeze(0), grad_output.unsqueeze(0)
    result = {}
    if is_pointwise(module):  # as a Linear: one contraction, or factors for ghost norms (mbclip.microbatch_sums)
        rows = (_positions_as_rows(grad_output, call), _positions_as_rows(activations, call))
        return linear_layer_sums(module.weight, module.bias, *rows, module.weight.shape)
    padding = module.padding
    if isinstance(padding, str) or module.padding_mode != "zeros":
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        activations = F.pad(activations, module._reversed_padding_repeated_twice, mode=mode)
        padding = 0
    num_microbatches = call.layout.num_microbatches
    if module.weight.requires_grad and is_depthwise(module) and per_sample_depthwise_fits(module, activations, call):
        per_sample = depthwise_per_sample_weight_sums(module, activations, grad_output, padding)
        result[module.weight] = call.layout.sum_per_microbatch(per_sample)
    elif module.weight.requires_grad and is_depthwise(module):
        result[module.weight] = depthwise_weight_sums(module, activations, grad_output, padding, call)
    elif module.weight.requires_grad and per_sample_products_fit(module, grad_output, call):
        result[module.weight] = per_sample_weight_sums(module, activations, grad_output, padding, call)
    elif module.weight.requires_grad and loops_over_microbatches(module, num_microbatches):
        result[module.weight] = looped_weight_sums(module, activations, grad_output, padding, call)
    elif module.weight.requires_grad:
        weight_grad = _WEIGHT_GRAD[module.weight.dim() - 2](
            fold_microbatches_into_channels(activations, call),
            (num_microbatches * module.weight.shape[0],) + tuple(module.weight.shape[1:]),
            fold_microbatches_into_channels(grad_output, call),
            stride=module.stride,
            padding=padding,
            dilation=module.dilation,
            groups=num_microbatches * module.groups,
        )
        result[module.weight] = weight_grad.reshape((num_microbatches,) + tuple(module.weight.shape))
    if module.bias is not None and module.bias.requires_grad:
        result[module.bias] = call.layout.channel_sums(grad_output)
    return result
