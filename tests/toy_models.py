"""Small models and data shared by several test files."""

from __future__ import annotations

import torch
from torch import nn

from mbclip.models import ConformerEncoder


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


class TinyConformerBlock(nn.Module):
    """Linear, LayerNorm, nn.MultiheadAttention, depthwise Conv1d: the layers of the benchmark's conformer."""

    def __init__(self, features: int = 6, dim: int = 8, classes: int = 5):
        super().__init__()
        self.proj = nn.Linear(features, dim)
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.depthwise = nn.Conv1d(dim, dim, 3, padding=1, groups=dim)
        self.ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 16), nn.SiLU(), nn.Linear(16, dim))
        self.out = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        y = self.norm(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        x = x + self.depthwise(x.transpose(1, 2)).transpose(1, 2)
        x = x + self.ff(x)
        return self.out(x)


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 11, dim: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1], dtype=torch.float64)
        return self.head(self.encoder(self.embed(tokens), mask=mask, is_causal=True))


class ConformerClassifier(nn.Module):
    """mbclip's conformer (rel-pos attention, recorded) on [B, T, 8] features, with a classifier on the mean frame."""

    def __init__(self):
        super().__init__()
        self.encoder = ConformerEncoder(num_features=8, d_model=8, num_heads=2, num_blocks=1, kernel_size=3,
                                        subsampling_channels=4)  # fmt: skip
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.long)
        return self.out(self.encoder(x, lengths)[0].mean(dim=1))
