"""Embedding: each micro-batch's gradient rows scattered into the table, formed or kept as rows (ghost norms)."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from torch import nn

from mbclip.microbatch_sums import scattered_row_sums
from mbclip.samplers.registry import LayerCall, batch_to_front, mark_unsupported, register_microbatch_sampler


def embedding_sampler(module: nn.Embedding, call: LayerCall, grad_outputs: Sequence[Optional[torch.Tensor]]) -> Dict:
    if not module.weight.requires_grad:
        return {}
    grad_output = batch_to_front(grad_outputs[0], call.batch_dim)
    indices = batch_to_front(call.input, call.batch_dim)
    batch_size = indices.shape[0]
    indices = indices.reshape(batch_size, -1)
    grad_rows = grad_output.reshape(batch_size, -1, module.embedding_dim)
    if module.padding_idx is not None:  # torch gives the padding row no gradient
        grad_rows = grad_rows * (indices != module.padding_idx).unsqueeze(-1).to(grad_rows.dtype)
    layout = call.layout
    rows = layout.group(grad_rows).reshape(layout.num_microbatches, -1, module.embedding_dim)  # [M, b * L, d]
    grouped_indices = layout.group(indices).reshape(layout.num_microbatches, -1)
    return {module.weight: scattered_row_sums(rows, grouped_indices, module.num_embeddings)}


def check_embedding(module: nn.Embedding) -> Optional[str]:
    """Why this embedding cannot be sampled exactly, or ``None``."""
    if module.sparse:
        return "it has sparse=True; clipped micro-batch gradients are dense. Use sparse=False."
    if module.scale_grad_by_freq:
        return (
            "it has scale_grad_by_freq=True, which scales gradients by word counts over the whole batch "
            "and so couples samples of different micro-batches. Use scale_grad_by_freq=False."
        )
    return None


register_microbatch_sampler(nn.Embedding, check=check_embedding)(embedding_sampler)
mark_unsupported(nn.EmbeddingBag, "EmbeddingBag has no micro-batch sampler yet; use nn.Embedding and a reduction.")
