"""Small float64 models and data shared by the reliability, checkpoint and fuzz tests."""

from __future__ import annotations

import torch
from torch import nn


class Scale(nn.Module):
    """A raw parameter used in ``forward``: exercised through the autograd fallback."""

    def __init__(self, features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def small_model(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """Linear, LayerNorm, a fallback layer and Linear: samplers and the fallback in one model."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), Scale(6), nn.Linear(6, 3)).to(dtype)


def small_data(batch_size: int, seed: int = 1, dtype: torch.dtype = torch.float64):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 4, generator=generator, dtype=dtype)
    y = torch.randn(batch_size, 3, generator=generator, dtype=dtype)
    return x, y


def squared_error_losses(x: torch.Tensor, y: torch.Tensor):
    """``per_sample_losses(model, samples)`` for the reference: squared error of each sample."""

    def per_sample_losses(model: nn.Module, samples) -> torch.Tensor:
        return ((model(x[samples]) - y[samples]) ** 2).sum(dim=1)

    return per_sample_losses
