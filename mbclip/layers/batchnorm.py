"""BatchNorm normalising each micro-batch with its own statistics, as per-core BatchNorm does on accelerators.

Plain BatchNorm mixes every sample of the batch into every output, so per-sample and micro-batch
gradients do not exist for it. Normalised per micro-batch it mixes samples only *within* a
micro-batch, and micro-batch gradients are exact: equal to running each micro-batch alone.

While a model is wrapped, mbclip changes the class of each ``nn.BatchNorm1d/2d/3d`` instance to the
matching ``MicroBatchBatchNorm*`` subclass (same object: same parameters, buffers, ``state_dict``
keys, optimizer references) and changes it back on unwrap. The subclass differs only inside a
recorded training pass of the wrapper; everywhere else (eval mode, ``torch.no_grad()``, hooks
disabled) it is the user's BatchNorm, bit for bit.

Running statistics, in a recorded pass: one update per forward call, with the micro-batch
statistics averaged, each micro-batch weighted by its number of samples (the mean is then the
whole batch's mean; the variance is the pooled unbiased within-micro-batch variance). With
equal micro-batches this is exactly "each core updates its own running statistics, then the
replicas are averaged". ``momentum=None`` (cumulative average) follows PyTorch: the factor is
``1 / num_batches_tracked``.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mbclip.errors import BatchError, ConfigurationError, UnsupportedModuleError
from mbclip.layout import MicroBatchLayout

LayoutSource = Callable[[], Optional[MicroBatchLayout]]


def uses_batch_statistics(module: _BatchNorm) -> bool:
    """Whether ``module``'s forward normalises with batch statistics (PyTorch's rule), not running ones."""
    return module.training or (module.running_mean is None and module.running_var is None)


def _values_per_channel(x: torch.Tensor, samples: int) -> int:
    return samples * (x[0, 0].numel() if x.dim() > 2 else 1)


def normalize_per_microbatch(
    x: torch.Tensor,
    layout: MicroBatchLayout,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
) -> torch.Tensor:
    """BatchNorm of ``x`` ``[B, C, *S]`` with each micro-batch's own statistics (differentiable).

    Whole micro-batches are folded into channels, ``[M*b, C, *S] -> [b, M*C, *S]``, so one native
    ``batch_norm`` call normalises them all; a ragged last micro-batch gets its own call.
    """
    if x.shape[0] != layout.batch_size:
        raise BatchError(
            f"a BatchNorm layer got an input with {x.shape[0]} rows on dim 0 but the batch has {layout.batch_size} "
            "samples, so mbclip cannot tell which rows belong to which micro-batch. Keep the batch on dim 0 of "
            "BatchNorm inputs (e.g. BatchNorm1d on [B, C, T] rather than on frames flattened to [B*T, C])."
        )
    b = layout.microbatch_size
    full = layout.batch_size // b
    rest = layout.batch_size - full * b
    for samples in [size for size in (b if full else 0, rest) if size]:
        if _values_per_channel(x, samples) < 2:
            raise BatchError(
                f"a micro-batch of {samples} sample(s) gives BatchNorm one value per channel, so its statistics "
                f"are undefined (batch of {layout.batch_size}, microbatch_size={b}). Use batch sizes that are "
                "multiples of microbatch_size (e.g. drop_last=True), or GroupNorm/LayerNorm instead of BatchNorm."
            )
    channels, spatial = x.shape[1], tuple(x.shape[2:])
    pieces = []
    if full:
        folded = x[: full * b].reshape((full, b, channels) + spatial).transpose(0, 1)
        folded = folded.reshape((b, full * channels) + spatial)
        out = F.batch_norm(
            folded,
            None,
            None,
            weight.repeat(full) if weight is not None else None,
            bias.repeat(full) if bias is not None else None,
            True,
            0.0,
            eps,
        )
        out = out.reshape((b, full, channels) + spatial).transpose(0, 1)
        pieces.append(out.reshape((full * b, channels) + spatial))
    if rest:
        pieces.append(F.batch_norm(x[full * b :], None, None, weight, bias, True, 0.0, eps))
    return torch.cat(pieces, dim=0) if len(pieces) > 1 else pieces[0]


def microbatch_statistics(x: torch.Tensor, layout: MicroBatchLayout) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and unbiased variance of ``x`` ``[B, C, *S]``, micro-batch statistics averaged by size."""
    means, variances, weights = [], [], []
    for start in range(0, layout.batch_size, layout.microbatch_size):
        chunk = x[start : start + layout.microbatch_size].transpose(0, 1).reshape(x.shape[1], -1)
        variance, mean = torch.var_mean(chunk, dim=1, correction=1)
        means.append(mean)
        variances.append(variance)
        weights.append(min(layout.microbatch_size, layout.batch_size - start))
    share = torch.tensor(weights, dtype=x.dtype, device=x.device).unsqueeze(1) / layout.batch_size
    return (share * torch.stack(means)).sum(dim=0), (share * torch.stack(variances)).sum(dim=0)


class MicroBatchBatchNormMixin:
    """The forward of a BatchNorm under micro-batch clipping; see the module docstring."""

    _mbclip_layout: LayoutSource

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        layout = self._mbclip_layout() if uses_batch_statistics(self) else None
        if layout is None:
            return super().forward(input)
        self._check_input_dim(input)
        output = normalize_per_microbatch(input, layout, self.weight, self.bias, self.eps)
        if self.training and self.track_running_stats:
            self._update_running_statistics(input.detach(), layout)
        return output

    @torch.no_grad()
    def _update_running_statistics(self, x: torch.Tensor, layout: MicroBatchLayout) -> None:
        factor = 0.0 if self.momentum is None else self.momentum
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        if self.running_mean is None:
            return
        mean, variance = microbatch_statistics(x, layout)
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(variance.to(self.running_var.dtype), alpha=factor)


class MicroBatchBatchNorm1d(MicroBatchBatchNormMixin, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` normalising each micro-batch on its own inside mbclip's recorded passes."""


class MicroBatchBatchNorm2d(MicroBatchBatchNormMixin, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` normalising each micro-batch on its own inside mbclip's recorded passes."""


class MicroBatchBatchNorm3d(MicroBatchBatchNormMixin, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` normalising each micro-batch on its own inside mbclip's recorded passes."""


MICROBATCH_BATCHNORMS: Dict[Type[nn.Module], Type[nn.Module]] = {
    nn.BatchNorm1d: MicroBatchBatchNorm1d,
    nn.BatchNorm2d: MicroBatchBatchNorm2d,
    nn.BatchNorm3d: MicroBatchBatchNorm3d,
}


def check_batchnorms(model: nn.Module, microbatch_size: int) -> None:
    """Raise for any BatchNorm mbclip cannot normalise per micro-batch; changes nothing.

    Every BatchNorm counts, trainable or not: a frozen BatchNorm still mixes samples in training mode.
    """
    for name, module in model.named_modules():
        if not isinstance(module, _BatchNorm):
            continue
        label = name or "the model itself"
        if type(module) not in MICROBATCH_BATCHNORMS:
            raise UnsupportedModuleError(
                f"layer '{label}' ({type(module).__name__}) is a BatchNorm mbclip cannot normalise per micro-batch "
                "(only nn.BatchNorm1d/2d/3d are supported; lazy BatchNorm must run one forward before wrapping, "
                "SyncBatchNorm should be converted back with per-device nn.BatchNorm). Or use GroupNorm/LayerNorm."
            )
        if microbatch_size == 1:
            raise ConfigurationError(
                f"layer '{label}' is a BatchNorm, and with microbatch_size=1 it would normalise every sample with "
                "its own statistics (degenerate; undefined for BatchNorm1d on [B, C]). Use microbatch_size >= 2 "
                "(each micro-batch is normalised with its own statistics), or replace BatchNorm with GroupNorm or "
                "LayerNorm, which are per-sample and work with microbatch_size=1."
            )


def swap_in_batchnorms(model: nn.Module, layout_source: LayoutSource) -> List[Tuple[nn.Module, Type[nn.Module]]]:
    """Turn every BatchNorm of ``model`` into its micro-batch class in place; return what to swap back."""
    swapped = []
    for _, module in model.named_modules():
        replacement = MICROBATCH_BATCHNORMS.get(type(module))
        if replacement is None:
            continue
        swapped.append((module, type(module)))
        module.__class__ = replacement
        module._mbclip_layout = layout_source
    return swapped


def swap_out_batchnorms(swapped: List[Tuple[nn.Module, Type[nn.Module]]]) -> None:
    """Give every swapped BatchNorm back its original class (parameters and buffers were never touched)."""
    for module, original in swapped:
        module.__class__ = original
        module.__dict__.pop("_mbclip_layout", None)
