"""``nn.MultiheadAttention``: exact micro-batch gradients through the layer's recorded graph.

The layer is differentiated with the batched autograd path (one vector-Jacobian product per
micro-batch, vectorised), which covers every option exactly: ``batch_first``, ``key_padding_mask``,
``attn_mask``, ``need_weights``, ``kdim``/``vdim``, ``bias``, ``add_bias_kv``, attention dropout and
the ``out_proj`` Linear that the layer uses without calling it. What this sampler adds over the generic
fallback is the batch dimension of each output, read from the layer's own ``batch_first`` instead of
guessed from shapes: a time-first attention inside a batch-first model with ``T == B`` is otherwise
ambiguous.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from mbclip.samplers.autograd_fallback import autograd_microbatch_sums
from mbclip.samplers.registry import LayerCall, register_microbatch_sampler


def _output_batch_dims(module: nn.MultiheadAttention, call: LayerCall) -> List[Optional[int]]:
    """Batch dim of ``(attn_output, attn_weights)``: the output follows ``batch_first``, weights are ``[B, ...]``."""
    batched = isinstance(call.input, torch.Tensor) and call.input.dim() == 3
    output_dim = (0 if module.batch_first else 1) if batched else None
    dims: List[Optional[int]] = [output_dim, 0 if batched else None]
    return dims[: len(call.outputs)]


@register_microbatch_sampler(nn.MultiheadAttention, keep_outputs=True)
def multihead_attention_sampler(
    module: nn.MultiheadAttention, call: LayerCall, grad_outputs: Sequence[Optional[torch.Tensor]]
) -> Dict[nn.Parameter, torch.Tensor]:
    params = [p for p in module.parameters() if p.requires_grad]
    return autograd_microbatch_sums(module, call, grad_outputs, params, _output_batch_dims(module, call))
