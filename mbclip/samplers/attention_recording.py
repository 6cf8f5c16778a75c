"""``nn.MultiheadAttention`` self-attention, recorded: the projection gradients come from the one backward.

While a model is wrapped, a plain self-attention call (``query is key is value``, a batched 3-D input, one packed
in-projection, no ``bias_k``/``bias_v``, no zero attention) runs :func:`recording_forward`: the operations of
``nn.MultiheadAttention.forward`` and ``F.multi_head_attention_forward`` for that case, in the same order (so the
same numbers, dropout included), with the in-projection's output ``[T, B, 3E]`` watched and the out-projection's input
kept. The backward that computes the model's gradients then delivers every sample's ``dQ, dK, dV`` and the
sampler needs no re-run of the attention. Every other call runs the class's own forward.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mbclip.samplers.registry import takes_class_forward, watch, watchable

RECORD_ATTRIBUTE = "_mbclip_attention_context"


def records(module: nn.MultiheadAttention, query, key, value, attn_mask, is_causal) -> bool:
    """Whether :func:`recording_forward` records this call (else it is the class's forward)."""
    return (
        module.training
        and torch.is_grad_enabled()
        and isinstance(query, torch.Tensor)
        and query is key
        and key is value
        and query.dim() == 3
        and module._qkv_same_embed_dim
        and module.in_proj_weight is not None
        and module.bias_k is None
        and not module.add_zero_attn
        and not (is_causal and attn_mask is None)  # the class raises for this one
        and (attn_mask is None or attn_mask.dim() in (2, 3))
    )


def _canonical_attn_mask(attn_mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return F._canonical_mask(
        mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="", target_type=dtype, check_other=False
    )


def recording_forward(
    module: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor] = None,
    need_weights: bool = True,
    attn_mask: Optional[torch.Tensor] = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
):
    if takes_class_forward(module) or not records(module, query, key, value, attn_mask, is_causal):
        return type(module).forward(
            module, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
        )
    # nn.MultiheadAttention.forward (F.multi_head_attention_forward canonicalises again: a no-op on these)
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask,
        mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask",
        target_type=query.dtype,
    )
    attn_mask = _canonical_attn_mask(attn_mask, query.dtype)
    x = query.transpose(1, 0) if module.batch_first else query
    # F.multi_head_attention_forward, self-attention with a packed in-projection
    tgt_len, bsz, embed_dim = x.shape
    num_heads = module.num_heads
    head_dim = embed_dim // num_heads
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # SDPA takes the causal hint instead
    elif key_padding_mask is not None:
        is_causal = False  # the padding is merged into the mask, which is no longer causal
    # watched: its gradient [T, B, 3E] (dQ dK dV of every row) is what the in-projection's own backward needs, so
    # the sampler reads it without a copy; the hooks do not keep the tensor itself alive (see _record_call)
    projected = watchable(F.linear(x, module.in_proj_weight, module.in_proj_bias))  # [T, B, 3E]
    packed = projected.unflatten(-1, (3, embed_dim)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
    q, k, v = packed[0], packed[1], packed[2]
    if attn_mask is not None and attn_mask.dim() == 2:
        if attn_mask.shape != (tgt_len, tgt_len):
            raise RuntimeError(
                f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {(tgt_len, tgt_len)}."
            )
        attn_mask = attn_mask.unsqueeze(0)
    elif attn_mask is not None and attn_mask.shape != (bsz * num_heads, tgt_len, tgt_len):
        raise RuntimeError(
            f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be {(bsz * num_heads, tgt_len, tgt_len)}."
        )
    q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    src_len = k.size(1)
    if key_padding_mask is not None:
        F._check_key_padding_mask(key_padding_mask, src_len, bsz)
        key_padding_mask = (
            key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1).reshape(bsz * num_heads, 1, src_len)
        )
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
    dropout_p = module.dropout if module.training else 0.0
    weights = None
    if need_weights:
        q_scaled = q * math.sqrt(1.0 / float(head_dim))
        if attn_mask is not None:
            weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            weights = torch.bmm(q_scaled, k.transpose(-2, -1))
        weights = F.softmax(weights, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        attended = torch.bmm(weights, v)
        context = attended.transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
        weights = weights.view(bsz, num_heads, tgt_len, src_len)
        if average_attn_weights:
            weights = weights.mean(dim=1)
    else:
        if attn_mask is not None:
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
        q = q.view(bsz, num_heads, tgt_len, head_dim)
        k = k.view(bsz, num_heads, src_len, head_dim)
        v = v.view(bsz, num_heads, src_len, head_dim)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
        context = attended.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
    output = F.linear(context, module.out_proj.weight, module.out_proj.bias)
    output = output.view(tgt_len, bsz, output.size(1))
    if module.batch_first:
        output = output.transpose(1, 0)
    setattr(output, RECORD_ATTRIBUTE, context.detach().view(tgt_len, bsz, embed_dim))
    watch(output, [projected])
    return output, weights
