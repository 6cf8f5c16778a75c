"""Small CTC speech models: a Conformer and an LSTM, both ``forward(features, lengths) -> (log_probs, lengths)``.

``log_probs`` is ``[B, T', vocab]`` batch-first; for ``F.ctc_loss`` pass ``log_probs.transpose(0, 1)``.
Index 0 of the vocabulary is the CTC blank.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from mbclip.models.conformer import ConformerEncoder, padding_mask


class ConformerCTC(nn.Module):
    """:class:`ConformerEncoder` and a linear head to the vocabulary (log-softmax)."""

    def __init__(
        self,
        num_features: int = 40,
        vocab_size: int = 32,
        d_model: int = 64,
        num_heads: int = 4,
        num_blocks: int = 2,
        kernel_size: int = 15,
        norm: str = "layer_norm",
        dropout: float = 0.0,
    ):
        super().__init__()
        self.encoder = ConformerEncoder(num_features, d_model, num_heads, num_blocks, kernel_size, norm, dropout)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        encoded, out_lengths = self.encoder(features, lengths)
        return self.head(encoded).log_softmax(dim=-1), out_lengths


class LSTMCTC(nn.Module):
    """``nn.LSTM`` over the features and a linear head to the vocabulary (log-softmax).

    ``packed=False`` (default) runs the LSTM on the padded batch: a unidirectional LSTM's valid outputs
    never see the padding after them, and the output's padded frames are zeroed. A bidirectional LSTM
    would read padding in its backward direction, so ``bidirectional=True`` needs ``packed=True``
    (``PackedSequence``, exact for both directions).
    """

    def __init__(
        self,
        num_features: int = 40,
        vocab_size: int = 32,
        hidden_size: int = 64,
        num_layers: int = 2,
        bidirectional: bool = False,
        packed: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        if bidirectional and not packed:
            raise ValueError("a bidirectional LSTM reads padding in reverse: use packed=True with bidirectional=True")
        self.packed = packed
        self.lstm = nn.LSTM(
            num_features, hidden_size, num_layers, batch_first=True, dropout=dropout, bidirectional=bidirectional
        )
        self.head = nn.Linear(hidden_size * (2 if bidirectional else 1), vocab_size)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.packed:
            packed = pack_padded_sequence(features, lengths.cpu(), batch_first=True, enforce_sorted=False)
            hidden, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=features.shape[1])
        else:
            hidden, _ = self.lstm(features)
            hidden = hidden.masked_fill(padding_mask(lengths, features.shape[1]).unsqueeze(-1), 0.0)
        return self.head(hidden).log_softmax(dim=-1), lengths
