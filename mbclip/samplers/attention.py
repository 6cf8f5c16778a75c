"""``nn.MultiheadAttention``: exact micro-batch gradients through the layer's recorded graph.

The layer is differentiated with the batched autograd path (one vector-Jacobian product per
micro-batch, vectorised), which covers every option exactly: ``batch_first``, ``key_padding_mask``,
``attn_mask``, ``need_weights``, ``kdim``/``vdim``, ``bias``, ``add_bias_kv``, attention dropout and
the ``out_proj`` Linear that the layer uses without calling it. What this sampler adds over the generic
fallback is the batch dimension of each output, read from the layer's own ``batch_first`` instead of
guessed from shapes: a time-first attention inside a batch-first model with ``T == B`` is otherwise
ambiguous.

Recorded path, for plain self-attention (the common case, attention dropout included): see
``mbclip.samplers.attention_recording``; the gradients come from the one backward, nothing is re-run.

Re-run path, for other plain calls when attention dropout is off (``kdim == vdim == embed_dim``, no
``bias_k``/``bias_v``, no zero attention): the projected q, k, v are recomputed as leaves and the layer is
re-run once with identity projections (multiplying by an identity matrix is exact), so one backward of the
whole batch gives every sample's dQ, dK, dV; the projection gradients are then grouped contractions,
as for a Linear. One attention backward instead of one per micro-batch.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mbclip.microbatch_sums import outer_product_sums
from mbclip.output_hooks import suspended, unrecorded
from mbclip.samplers.attention_recording import RECORD_ATTRIBUTE, recording_forward, records
from mbclip.samplers.autograd_fallback import autograd_microbatch_sums
from mbclip.samplers.linear import grouped_rows, linear_layer_sums
from mbclip.samplers.registry import LayerCall, register_microbatch_sampler

_FORWARD_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _output_batch_dims(module: nn.MultiheadAttention, call: LayerCall) -> List[Optional[int]]:
    """Batch dim of ``(attn_output, attn_weights)``: the output follows ``batch_first``, weights are ``[B, ...]``."""
    batched = isinstance(call.input, torch.Tensor) and call.input.dim() == 3
    output_dim = (0 if module.batch_first else 1) if batched else None
    dims: List[Optional[int]] = [output_dim, 0 if batched else None]
    return dims[: len(call.outputs)]


def _needs_autograd(module: nn.MultiheadAttention, args, kwargs) -> bool:
    """Only calls that are neither recorded nor plain take the batched autograd path through the parameters."""
    bound = _FORWARD_SIGNATURE.bind(module, *args, **kwargs).arguments
    if records(module, bound["query"], bound["key"], bound["value"], bound.get("attn_mask"), bound.get("is_causal")):
        return False
    query = bound["query"]
    return not _plain_and_deterministic(module) or not (isinstance(query, torch.Tensor) and query.dim() == 3)


@register_microbatch_sampler(
    nn.MultiheadAttention, keep_outputs=True, needs_autograd=_needs_autograd, forward=recording_forward
)
def multihead_attention_sampler(
    module: nn.MultiheadAttention, call: LayerCall, grad_outputs: Sequence[Optional[torch.Tensor]]
) -> Dict[nn.Parameter, torch.Tensor]:
    if call.outputs and hasattr(call.outputs[0], RECORD_ATTRIBUTE):
        return _recorded_sums(module, call, grad_outputs)
    if _has_fast_path(module, call):
        return _projection_sums(module, call, grad_outputs)
    params = [p for p in module.parameters() if p.requires_grad]
    return autograd_microbatch_sums(module, call, grad_outputs, params, _output_batch_dims(module, call))


def _plain_and_deterministic(module: nn.MultiheadAttention) -> bool:
    no_dropout = module.dropout == 0.0 or not module.training
    plain = module._qkv_same_embed_dim and module.bias_k is None and not module.add_zero_attn
    return no_dropout and plain


def _has_fast_path(module: nn.MultiheadAttention, call: LayerCall) -> bool:
    return _plain_and_deterministic(module) and isinstance(call.input, torch.Tensor) and call.input.dim() == 3


def _same_tensor(first: torch.Tensor, second: torch.Tensor) -> bool:
    """The same memory seen the same way (detached copies of one tensor are different objects)."""
    return (
        first.data_ptr() == second.data_ptr()
        and first.shape == second.shape
        and first.stride() == second.stride()
        and first.dtype == second.dtype
    )


def _in_projection_sums(grouped_d: List[torch.Tensor], grouped_x: List[torch.Tensor], self_attention: bool):
    """The stacked q/k/v projection's sums ``[M, 3E, E]``; one outer product when q, k, v are the same input."""
    if self_attention:  # [dQ dK dV]^T x
        return outer_product_sums(torch.cat(grouped_d, dim=2), grouped_x[0])
    blocks = [torch.bmm(d.transpose(1, 2), x) for d, x in zip(grouped_d, grouped_x)]
    return torch.cat(blocks, dim=1)


def _projection_sums(
    module: nn.MultiheadAttention, call: LayerCall, grad_outputs: Sequence[Optional[torch.Tensor]]
) -> Dict[nn.Parameter, torch.Tensor]:
    """Micro-batch sums for the in/out projections from one re-run of the attention core."""
    bound = inspect.signature(module.forward).bind(*call.args, **call.kwargs)
    arguments = dict(bound.arguments)
    grad_output = grad_outputs[0]
    dtype = grad_output.dtype if grad_output is not None else call.input.dtype
    inputs = [arguments.pop(name) for name in ("query", "key", "value")]
    self_attention = _same_tensor(inputs[0], inputs[1]) and _same_tensor(inputs[1], inputs[2])
    inputs = [x.to(dtype) for x in inputs]
    embed = module.embed_dim
    weights = module.in_proj_weight.to(dtype).split(embed)
    biases = module.in_proj_bias.to(dtype).split(embed) if module.in_proj_bias is not None else (None,) * 3
    identity = torch.eye(embed, dtype=dtype, device=call.input.device)
    overrides = {"in_proj_weight": identity.repeat(3, 1), "out_proj.weight": identity}
    if module.in_proj_bias is not None:
        overrides["in_proj_bias"] = torch.zeros(3 * embed, dtype=dtype, device=identity.device)
    if module.out_proj.bias is not None:
        overrides["out_proj.bias"] = torch.zeros(embed, dtype=dtype, device=identity.device)
    with torch.enable_grad(), suspended(), unrecorded():
        projected = [F.linear(x, w, b).detach().requires_grad_() for x, w, b in zip(inputs, weights, biases)]
        context, attention = functional_call(module, overrides, tuple(projected), arguments)
        d_output = grad_output if grad_output is not None else torch.zeros_like(context)
        d_context = d_output @ module.out_proj.weight.to(dtype)
        outputs, grads = [context], [d_context]
        if len(grad_outputs) > 1 and grad_outputs[1] is not None and attention is not None:
            outputs.append(attention)
            grads.append(grad_outputs[1])
        d_projected = torch.autograd.grad(outputs, projected, grads, allow_unused=True)
    rows = dataclasses.replace(call, batch_dim=0 if module.batch_first else 1)
    grouped_d = [grouped_rows(torch.zeros_like(p) if d is None else d, rows) for d, p in zip(d_projected, projected)]
    grouped_x = [grouped_rows(x, rows) for x in inputs]
    return _parameter_sums(
        module,
        lambda: _in_projection_sums(grouped_d, grouped_x, self_attention),
        lambda: torch.cat([d.sum(dim=1) for d in grouped_d], dim=1),
        grouped_rows(d_output, rows),
        grouped_rows(context.detach(), rows),
    )


def _recorded_sums(
    module: nn.MultiheadAttention, call: LayerCall, grad_outputs: Sequence[Optional[torch.Tensor]]
) -> Dict[nn.Parameter, torch.Tensor]:
    """Micro-batch sums from what :func:`recording_forward` kept: no re-run of the attention."""
    # [T, B, 3E]: dQ dK dV of every row, columns in the order of in_proj_weight's rows
    (d_projected,) = call.watched_grads
    context = getattr(call.outputs[0], RECORD_ATTRIBUTE)  # [T, B, E]
    grad_output = grad_outputs[0] if grad_outputs[0] is not None else torch.zeros_like(call.outputs[0])
    dtype = grad_output.dtype
    if d_projected is None:
        d_projected = context.new_zeros(context.shape[:2] + (3 * module.embed_dim,))
    time_first = dataclasses.replace(call, batch_dim=1)
    module_rows = dataclasses.replace(call, batch_dim=0 if module.batch_first else 1)
    grouped_d = grouped_rows(d_projected.to(dtype), time_first)  # [M, n, 3E]: dQ dK dV of every row
    grouped_x = grouped_rows(call.input.to(dtype), module_rows)
    return _parameter_sums(
        module,
        lambda: outer_product_sums(grouped_d, grouped_x),
        lambda: grouped_d.sum(dim=1),
        grouped_rows(grad_output, module_rows),
        grouped_rows(context.to(dtype), time_first),
    )


def _parameter_sums(module, in_weight, in_bias, grouped_out, grouped_context) -> Dict[nn.Parameter, torch.Tensor]:
    """The four parameters' sums from the in-projection's (lazily computed) and the out-projection's factors."""
    candidates = [(module.in_proj_weight, in_weight), (module.in_proj_bias, in_bias)]
    result = {param: compute() for param, compute in candidates if param is not None and param.requires_grad}
    result.update(linear_layer_sums(module.out_proj.weight, module.out_proj.bias, grouped_out, grouped_context))
    return result
