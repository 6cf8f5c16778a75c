"""Micro-batch sampler for :class:`RelPositionMultiHeadAttention`: one backward of the attention core.

The generic fallback differentiates this layer once per micro-batch. Here the layer is re-run once from its
recorded inputs with its intermediate tensors as leaves: ``q + pos_bias_u``, ``q + pos_bias_v``, ``k``, ``v``
and the projected positional encodings expanded to one copy per sample. One backward of the whole batch then
gives every sample's gradient at each leaf, and every parameter's micro-batch gradient is a grouped
contraction (for ``linear_pos``: the micro-batch's summed gradient times the shared encodings). With attention
dropout on, the masks of the real forward cannot be replayed, so the exact batched-autograd path is used.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mbclip.microbatch_sums import outer_product_sums
from mbclip.models.conformer import RelPositionMultiHeadAttention, rel_shift
from mbclip.output_hooks import suspended
from mbclip.samplers.autograd_fallback import autograd_microbatch_sums
from mbclip.samplers.linear import grouped_rows
from mbclip.samplers.registry import LayerCall, register_microbatch_sampler


def _uses_dropout(module: RelPositionMultiHeadAttention, args=(), kwargs=None) -> bool:
    """With attention dropout the exact path is batched autograd through the recorded graph."""
    return module.training and module.dropout.p > 0


@register_microbatch_sampler(
    RelPositionMultiHeadAttention, batch_dim=0, keep_outputs=True, needs_autograd=_uses_dropout
)
def relpos_attention_sampler(
    module: RelPositionMultiHeadAttention, call: LayerCall, grad_outputs: Sequence[Optional[torch.Tensor]]
) -> Dict[nn.Parameter, torch.Tensor]:
    if _uses_dropout(module):
        params = [p for p in module.parameters() if p.requires_grad]
        return autograd_microbatch_sums(module, call, grad_outputs, params, [0])
    names = ("x", "pos_emb", "pad")
    x, pos_emb, pad = list(call.args[:3]) + [call.kwargs[name] for name in names[len(call.args) :]]
    grad_output = grad_outputs[0]
    x = x.to(grad_output.dtype)
    batch, time, d_model = x.shape
    d_head = module.d_head
    with torch.enable_grad(), suspended():
        q = module._heads(F.linear(x, module.linear_q.weight, module.linear_q.bias)).detach()
        q_u = (q + module.pos_bias_u).detach().requires_grad_()
        q_v = (q + module.pos_bias_v).detach().requires_grad_()
        k = module._heads(F.linear(x, module.linear_k.weight, module.linear_k.bias)).transpose(1, 2)
        v = module._heads(F.linear(x, module.linear_v.weight, module.linear_v.bias)).transpose(1, 2)
        k, v = k.detach().requires_grad_(), v.detach().requires_grad_()
        positions = module._heads(F.linear(pos_emb.unsqueeze(0), module.linear_pos.weight)[0]).transpose(1, 2)
        positions = positions.detach().expand(batch, -1, -1, -1).contiguous().requires_grad_()
        content = q_u.transpose(1, 2) @ k.transpose(-2, -1)
        position = rel_shift(q_v.transpose(1, 2) @ positions.transpose(-2, -1))
        scores = (content + position) / math.sqrt(d_head)
        key_pad = pad[:, None, None, :]
        weights = torch.softmax(scores.masked_fill(key_pad, float("-inf")), dim=-1).masked_fill(key_pad, 0.0)
        context = (weights @ v).transpose(1, 2).reshape(batch, time, d_model)
        d_context = grad_output @ module.linear_out.weight
        d_q_u, d_q_v, d_k, d_v, d_positions = torch.autograd.grad(context, [q_u, q_v, k, v, positions], d_context)
    layout = call.layout
    d_q = (d_q_u + d_q_v).reshape(batch, time, d_model)
    d_k = d_k.transpose(1, 2).reshape(batch, time, d_model)
    d_v = d_v.transpose(1, 2).reshape(batch, time, d_model)
    result: Dict[nn.Parameter, torch.Tensor] = {}

    def linear(layer: nn.Linear, d_out: torch.Tensor, inputs: torch.Tensor) -> None:
        grouped = grouped_rows(d_out, call)
        if layer.weight.requires_grad:
            result[layer.weight] = outer_product_sums(grouped, grouped_rows(inputs, call))
        if layer.bias is not None and layer.bias.requires_grad:
            result[layer.bias] = grouped.sum(dim=1)

    linear(module.linear_q, d_q, x)
    linear(module.linear_k, d_k, x)
    linear(module.linear_v, d_v, x)
    linear(module.linear_out, grad_output, context.detach())
    for bias, d_shifted in ((module.pos_bias_u, d_q_u), (module.pos_bias_v, d_q_v)):
        if bias.requires_grad:
            result[bias] = layout.sum_per_microbatch(d_shifted.sum(dim=1))  # [M, heads, d_head]
    if module.linear_pos.weight.requires_grad:
        d_projected = d_positions.transpose(1, 2).reshape(batch, -1, d_model)  # [B, 2T-1, d]
        per_microbatch = layout.sum_per_microbatch(d_projected)  # [M, 2T-1, d]
        encodings = pos_emb.reshape(-1, d_model).to(per_microbatch.dtype)  # [2T-1, d]
        result[module.linear_pos.weight] = per_microbatch.transpose(1, 2) @ encodings
    return result
