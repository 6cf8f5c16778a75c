"""Clipping rules as pure functions of micro-batch gradient norms (no model tensors inside)."""

from __future__ import annotations

import torch

CLIPPING_MODES = ("fixed", "adaptive", "per_layer")
STABILITY = 1e-6  # added to every norm before dividing, as Opacus does


def total_norms(per_param_norms: torch.Tensor) -> torch.Tensor:
    """``[M]``: the norm of each micro-batch gradient over all parameters."""
    return per_param_norms.norm(2, dim=1)


def fixed_clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """``min(1, C / (||g_j|| + 1e-6))``."""
    return (max_grad_norm / (norms + STABILITY)).clamp(max=1.0)


def adaptive_clip_factors(norms: torch.Tensor) -> torch.Tensor:
    """Every micro-batch rescaled to the smallest norm in the step: ``rho / (||g_j|| + 1e-6)``."""
    return norms.min() / (norms + STABILITY)


def per_layer_clip_factors(per_param_norms: torch.Tensor, max_grad_norms: torch.Tensor) -> torch.Tensor:
    """``[M, P]``: ``min(1, C_p / (||g_jp|| + 1e-6))``, one bound per parameter."""
    return (max_grad_norms.unsqueeze(0) / (per_param_norms + STABILITY)).clamp(max=1.0)
