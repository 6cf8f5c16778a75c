"""Micro-batch sampler for :class:`RelPositionMultiHeadAttention`: no re-run, gradients from the one backward.

While the model is wrapped the layer runs :func:`recording_forward`: the class's own operations, in the same
order, with its intermediate tensors watched (``q + pos_bias_u``, ``q + pos_bias_v``, ``k``, ``v`` and the
position scores before the relative shift). The backward that computes the model's gradients delivers every
sample's gradient at each of them, through the real dropout masks, and every parameter's micro-batch gradient
is a grouped contraction (for ``linear_pos``: the micro-batch's summed gradient at the projected encodings,
times the encodings shared by all samples).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch
from torch import nn

from mbclip.models.conformer import RelPositionMultiHeadAttention, rel_shift
from mbclip.samplers.linear import grouped_rows, linear_layer_sums
from mbclip.samplers.registry import LayerCall, register_microbatch_sampler, takes_class_forward, watch, watchable

RECORD_ATTRIBUTE = "_mbclip_relpos_record"


@dataclass
class RelPositionRecord:
    """What the sampler needs from one training forward, detached: ``q + pos_bias_v`` and the attention context."""

    shifted_query: torch.Tensor  # [B, T, H, d_head]
    context: torch.Tensor  # [B, T, d]: the input of linear_out


def recording_forward(
    module: RelPositionMultiHeadAttention, x: torch.Tensor, pos_emb: torch.Tensor, pad: torch.Tensor
) -> torch.Tensor:
    """The class's forward, operation for operation, recording what the sampler reads (training with grad only)."""
    if takes_class_forward(module) or not (module.training and torch.is_grad_enabled()):
        return type(module).forward(module, x, pos_emb, pad)
    q = module._heads(module.linear_q(x))
    k = watchable(module._heads(module.linear_k(x)).transpose(1, 2))  # [B, H, T, dh]
    v = watchable(module._heads(module.linear_v(x)).transpose(1, 2))
    p = module._heads(module.linear_pos(pos_emb.unsqueeze(0))[0]).transpose(1, 2)  # [1, H, 2T-1, dh]
    q_u = watchable(q + module.pos_bias_u)
    q_v = watchable(q + module.pos_bias_v)
    content = q_u.transpose(1, 2) @ k.transpose(-2, -1)  # [B, H, T, T]
    raw_position = q_v.transpose(1, 2) @ p.transpose(-2, -1)  # [B, H, T, 2T-1]
    scores = (content + rel_shift(raw_position)) / math.sqrt(module.d_head)
    key_pad = pad[:, None, None, :]
    weights = torch.softmax(scores.masked_fill(key_pad, float("-inf")), dim=-1).masked_fill(key_pad, 0.0)
    context = (module.dropout(weights) @ v).transpose(1, 2).reshape(x.shape)
    out = module.linear_out(context)
    setattr(out, RECORD_ATTRIBUTE, RelPositionRecord(q_v.detach(), context.detach()))
    watch(out, [q_u, q_v, k, v, raw_position])
    return out


@register_microbatch_sampler(RelPositionMultiHeadAttention, batch_dim=0, keep_outputs=True, forward=recording_forward)
def relpos_attention_sampler(
    module: RelPositionMultiHeadAttention, call: LayerCall, grad_outputs: Sequence[Optional[torch.Tensor]]
) -> Dict[nn.Parameter, torch.Tensor]:
    record: RelPositionRecord = getattr(call.outputs[0], RECORD_ATTRIBUTE)
    names = ("x", "pos_emb", "pad")
    x, pos_emb, _ = list(call.args[:3]) + [call.kwargs[name] for name in names[len(call.args) :]]
    grad_output = grad_outputs[0]
    dtype = grad_output.dtype
    x = x.to(dtype)
    batch, time, d_model = x.shape
    d_q_u, d_q_v, d_k, d_v, d_raw_position = (g.to(dtype) if g is not None else None for g in call.watched_grads)
    layout = call.layout
    d_q = (d_q_u + d_q_v).reshape(batch, time, d_model)
    d_k = d_k.transpose(1, 2).reshape(batch, time, d_model)
    d_v = d_v.transpose(1, 2).reshape(batch, time, d_model)
    result: Dict[nn.Parameter, torch.Tensor] = {}

    def linear(layer: nn.Linear, d_out: torch.Tensor, inputs: torch.Tensor) -> None:
        result.update(
            linear_layer_sums(layer.weight, layer.bias, grouped_rows(d_out, call), grouped_rows(inputs, call))
        )

    linear(module.linear_q, d_q, x)
    linear(module.linear_k, d_k, x)
    linear(module.linear_v, d_v, x)
    linear(module.linear_out, grad_output, record.context.to(dtype))
    for bias, d_shifted in ((module.pos_bias_u, d_q_u), (module.pos_bias_v, d_q_v)):
        if bias.requires_grad:
            result[bias] = layout.sum_per_microbatch(d_shifted.sum(dim=1))  # [M, heads, d_head]
    if module.linear_pos.weight.requires_grad:
        # every sample's gradient at the projected encodings: d(raw scores)^T @ (q + pos_bias_v), [B, H, 2T-1, dh]
        d_positions = d_raw_position.transpose(-2, -1) @ record.shifted_query.to(dtype).transpose(1, 2)
        d_projected = d_positions.transpose(1, 2).reshape(batch, -1, d_model)  # [B, 2T-1, d]
        per_microbatch = layout.sum_per_microbatch(d_projected)  # [M, 2T-1, d]
        encodings = pos_emb.reshape(-1, d_model).to(dtype)  # [2T-1, d]
        result[module.linear_pos.weight] = per_microbatch.transpose(1, 2) @ encodings
    return result
