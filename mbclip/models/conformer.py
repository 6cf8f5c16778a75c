"""A small, readable Conformer encoder (Gulati et al., 2020) for batch-first speech features.

Layout of one block (macaron style)::

    x = x + 0.5 * FeedForward(x)
    x = x + RelPositionMultiHeadAttention(LayerNorm(x))      # Transformer-XL relative positions
    x = x + ConvolutionModule(LayerNorm(x))
    x = x + 0.5 * FeedForward(x)
    x = LayerNorm(x)

Padded frames never reach a valid frame: attention masks padded keys, the convolution module zeroes
padded frames before its depthwise convolution, and the subsampling front end's valid output frames
only see valid input frames. So padding contributes nothing to any gradient.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import nn

NORMS = ("layer_norm", "batch_norm")


def padding_mask(lengths: torch.Tensor, max_length: int) -> torch.Tensor:
    """``[B, T]`` boolean, ``True`` on padded frames."""
    return torch.arange(max_length, device=lengths.device).unsqueeze(0) >= lengths.unsqueeze(1)


class Conv2dSubsampling(nn.Module):
    """Two stride-2 ``Conv2d`` + ReLU over (time, frequency), then a Linear to ``d_model``: time / 4."""

    def __init__(self, num_features: int, d_model: int, channels: int = 32):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, channels, 3, stride=2), nn.ReLU(), nn.Conv2d(channels, channels, 3, stride=2), nn.ReLU()
        )
        reduced = ((num_features - 1) // 2 - 1) // 2
        self.out = nn.Linear(channels * reduced, d_model)

    @staticmethod
    def output_lengths(lengths: torch.Tensor) -> torch.Tensor:
        """Valid frames after subsampling; each depends only on valid input frames."""
        return ((lengths - 1) // 2 - 1) // 2

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.conv(features.unsqueeze(1))  # [B, C, T', F']
        batch, channels, time, freq = x.shape
        x = self.out(x.transpose(1, 2).reshape(batch, time, channels * freq))
        return x, self.output_lengths(lengths)


def relative_positional_encoding(length: int, d_model: int, dtype=None, device=None) -> torch.Tensor:
    """Sinusoidal encodings of relative positions ``length - 1, ..., -(length - 1)``: ``[1, 2 * length - 1, d]``."""
    positions = torch.arange(length - 1, -length, -1, dtype=dtype, device=device).unsqueeze(1)
    frequencies = torch.exp(torch.arange(0, d_model, 2, dtype=dtype, device=device) * (-math.log(10000.0) / d_model))
    encoding = torch.zeros(2 * length - 1, d_model, dtype=dtype, device=device)
    encoding[:, 0::2] = torch.sin(positions * frequencies)
    encoding[:, 1::2] = torch.cos(positions * frequencies)
    return encoding.unsqueeze(0)


def rel_shift(scores: torch.Tensor) -> torch.Tensor:
    """``[..., T, 2T-1]`` scores against relative positions ``T-1 .. -(T-1)`` -> ``[..., T, T]`` against keys.

    Output ``[i, j]`` is input ``[i, T - 1 - i + j]`` (relative position ``i - j``). The Transformer-XL
    trick: pad one zero column in front, view the rows as one long row, drop the first ``T`` entries.
    """
    *lead, time, width = scores.shape
    padded = torch.nn.functional.pad(scores, (1, 0))  # [..., T, 2T]
    shifted = padded.reshape(*lead, width + 1, time)[..., 1:, :].reshape(*lead, time, width)
    return shifted[..., :time]


class RelPositionMultiHeadAttention(nn.Module):
    """Multi-head self-attention with Transformer-XL relative positions (as in ESPnet and NeMo).

    Scores are ``(q + u) k^T + rel_shift((q + v) p^T)`` with ``p = linear_pos(positional encodings)``
    and ``u = pos_bias_u``, ``v = pos_bias_v`` raw learned ``[heads, d_head]`` parameters.
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} must be a multiple of num_heads={num_heads}")
        self.num_heads = num_heads
        self.d_head = d_model // num_heads
        self.linear_q = nn.Linear(d_model, d_model)
        self.linear_k = nn.Linear(d_model, d_model)
        self.linear_v = nn.Linear(d_model, d_model)
        self.linear_out = nn.Linear(d_model, d_model)
        self.linear_pos = nn.Linear(d_model, d_model, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(num_heads, self.d_head))
        self.pos_bias_v = nn.Parameter(torch.empty(num_heads, self.d_head))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)
        self.dropout = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, d] -> [B, T, heads, d_head]``."""
        return x.reshape(x.shape[0], x.shape[1], self.num_heads, self.d_head)

    def forward(self, x: torch.Tensor, pos_emb: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """``x [B, T, d]``, ``pos_emb [1, 2T-1, d]``, ``pad [B, T]`` (``True`` = padded) -> ``[B, T, d]``."""
        q = self._heads(self.linear_q(x))
        k = self._heads(self.linear_k(x)).transpose(1, 2)  # [B, H, T, dh]
        v = self._heads(self.linear_v(x)).transpose(1, 2)
        # The encodings are shared by all samples. mbclip reads a layer call's batch from dims 0-1 of its input, so
        # they go in as [1, 1, 2T-1, d]: never mistaken for a batch (with [1, 2T-1, d] a batch of B = 2T-1 would be),
        # and the enclosing attention module, which owns pos_bias_u/v, takes linear_pos's gradient per micro-batch.
        p = self._heads(self.linear_pos(pos_emb.unsqueeze(0))[0]).transpose(1, 2)  # [1, H, 2T-1, dh]
        content = (q + self.pos_bias_u).transpose(1, 2) @ k.transpose(-2, -1)  # [B, H, T, T]
        position = rel_shift((q + self.pos_bias_v).transpose(1, 2) @ p.transpose(-2, -1))
        scores = (content + position) / math.sqrt(self.d_head)
        key_pad = pad[:, None, None, :]
        weights = torch.softmax(scores.masked_fill(key_pad, float("-inf")), dim=-1).masked_fill(key_pad, 0.0)
        out = (self.dropout(weights) @ v).transpose(1, 2).reshape(x.shape)
        return self.linear_out(out)


class FeedForward(nn.Module):
    """LayerNorm -> Linear -> Swish -> Dropout -> Linear -> Dropout."""

    def __init__(self, d_model: int, expansion: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(d_model),
            nn.Linear(d_model, expansion * d_model),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Linear(expansion * d_model, d_model),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvolutionModule(nn.Module):
    """Pointwise conv -> GLU -> (zero padded frames) depthwise Conv1d -> norm -> Swish -> pointwise conv."""

    def __init__(self, d_model: int, kernel_size: int = 15, norm: str = "layer_norm", dropout: float = 0.0):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError("kernel_size must be odd so the depthwise conv keeps the length")
        if norm not in NORMS:
            raise ValueError(f"norm={norm!r}: use one of {NORMS}")
        self.pointwise_conv1 = nn.Conv1d(d_model, 2 * d_model, 1)
        self.glu = nn.GLU(dim=1)
        self.depthwise_conv = nn.Conv1d(d_model, d_model, kernel_size, padding=kernel_size // 2, groups=d_model)
        self.norm = nn.LayerNorm(d_model) if norm == "layer_norm" else nn.BatchNorm1d(d_model)
        self.activation = nn.SiLU()
        self.pointwise_conv2 = nn.Conv1d(d_model, d_model, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """``x [B, T, d]``, ``pad [B, T]`` -> ``[B, T, d]``."""
        x = self.glu(self.pointwise_conv1(x.transpose(1, 2)))  # [B, d, T]
        x = self.depthwise_conv(x.masked_fill(pad.unsqueeze(1), 0.0))
        if isinstance(self.norm, nn.LayerNorm):
            x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        else:
            x = self.norm(x)
        x = self.pointwise_conv2(self.activation(x))
        return self.dropout(x.transpose(1, 2))


class ConformerBlock(nn.Module):
    """Half-step feed-forward, rel-pos self-attention, convolution module, half-step feed-forward, LayerNorm."""

    def __init__(
        self, d_model: int, num_heads: int, kernel_size: int = 15, norm: str = "layer_norm", dropout: float = 0.0
    ):
        super().__init__()
        self.feed_forward1 = FeedForward(d_model, dropout=dropout)
        self.norm_attention = nn.LayerNorm(d_model)
        self.attention = RelPositionMultiHeadAttention(d_model, num_heads, dropout)
        self.attention_dropout = nn.Dropout(dropout)
        self.norm_conv = nn.LayerNorm(d_model)
        self.conv = ConvolutionModule(d_model, kernel_size, norm, dropout)
        self.feed_forward2 = FeedForward(d_model, dropout=dropout)
        self.norm_out = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, pos_emb: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        x = x + 0.5 * self.feed_forward1(x)
        x = x + self.attention_dropout(self.attention(self.norm_attention(x), pos_emb, pad))
        x = x + self.conv(self.norm_conv(x), pad)
        x = x + 0.5 * self.feed_forward2(x)
        return self.norm_out(x)


class ConformerEncoder(nn.Module):
    """Conv2d subsampling (time / 4) then ``num_blocks`` Conformer blocks.

    ``forward(features [B, T, F], lengths [B]) -> (encoded [B, T', d_model], out_lengths [B])``.
    Defaults are small (d_model 64, 2 blocks, 4 heads): enough for tests, tutorials and benchmarks.
    """

    def __init__(
        self,
        num_features: int = 40,
        d_model: int = 64,
        num_heads: int = 4,
        num_blocks: int = 2,
        kernel_size: int = 15,
        norm: str = "layer_norm",
        dropout: float = 0.0,
        subsampling_channels: int = 32,
    ):
        super().__init__()
        self.d_model = d_model
        self.subsampling = Conv2dSubsampling(num_features, d_model, subsampling_channels)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            ConformerBlock(d_model, num_heads, kernel_size, norm, dropout) for _ in range(num_blocks)
        )

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x, out_lengths = self.subsampling(features, lengths)
        pad = padding_mask(out_lengths, x.shape[1])
        pos_emb = relative_positional_encoding(x.shape[1], self.d_model, dtype=x.dtype, device=x.device)
        x = self.dropout(x * math.sqrt(self.d_model))
        pos_emb = self.dropout(pos_emb)
        for block in self.blocks:
            x = block(x, pos_emb, pad)
        return x, out_lengths
