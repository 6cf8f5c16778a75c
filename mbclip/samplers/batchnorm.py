"""BatchNorm affine gradients under micro-batch normalisation: sums of ``grad * x_hat`` per micro-batch.

Inside a recorded pass mbclip's BatchNorm (``mbclip.layers.batchnorm``) normalises each micro-batch
with its own statistics, so ``x_hat`` is recomputed the same way from the stored input; the
gradients of the layers before it flow through that per-micro-batch forward in autograd.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mbclip.layers.batchnorm import MICROBATCH_BATCHNORMS, normalize_per_microbatch, uses_batch_statistics
from mbclip.samplers.norm import channel_affine_sums
from mbclip.samplers.registry import LayerCall, register_microbatch_sampler


@register_microbatch_sampler(*MICROBATCH_BATCHNORMS, *MICROBATCH_BATCHNORMS.values(), batch_dim=0)
def batch_norm_sampler(module: nn.Module, call: LayerCall, grad_outputs: Sequence[Optional[torch.Tensor]]) -> Dict:
    if not module.affine or grad_outputs[0] is None:
        return {}
    grad_output = grad_outputs[0]
    activations = call.input.to(grad_output.dtype)
    with torch.no_grad():
        if uses_batch_statistics(module):
            normalized = normalize_per_microbatch(activations, call.layout, None, None, module.eps)
        else:
            normalized = F.batch_norm(
                activations, module.running_mean, module.running_var, None, None, False, 0.0, module.eps
            )
    return channel_affine_sums(module, call, normalized, grad_output)
