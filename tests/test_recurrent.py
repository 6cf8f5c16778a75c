"""nn.LSTM / nn.GRU / nn.RNN as users write them: exact micro-batch gradients against the brute-force reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from mbclip.engine import MicroBatchClipping
from tests.reference import assert_close_update, reference_update

B, T, FEATURES, HIDDEN = 5, 4, 3, 4
LENGTHS = [3, 4, 1, 2, 4]  # unsorted on purpose


class SequenceModel(nn.Module):
    """A recurrent layer and a loss per sample; ``packed`` feeds it a PackedSequence of unequal lengths."""

    def __init__(self, rnn: nn.RNNBase, packed: str = "", with_state: bool = False):
        super().__init__()
        self.rnn = rnn
        self.packed = packed
        self.with_state = with_state

    def forward(self, x: torch.Tensor, h0=None, c0=None, lengths=None) -> torch.Tensor:
        batch_first = self.rnn.batch_first
        inputs = x
        if self.packed:
            inputs = pack_padded_sequence(
                x, lengths, batch_first=batch_first, enforce_sorted=(self.packed == "sorted")
            )
        state = None
        if self.with_state:
            state = (h0, c0) if isinstance(self.rnn, nn.LSTM) else h0
        output, hidden = self.rnn(inputs, state)
        if self.packed:
            output, _ = pad_packed_sequence(output, batch_first=batch_first, total_length=T)
        if not batch_first:
            output = output.transpose(0, 1)
        h_n = hidden[0] if isinstance(hidden, tuple) else hidden
        weights = torch.linspace(-1, 1, output.shape[-1], dtype=output.dtype)
        per_sample = (output.tanh() * weights).pow(2).sum(dim=(1, 2)) + h_n.sin().sum(dim=(0, 2))
        if isinstance(hidden, tuple):
            per_sample = per_sample + hidden[1].pow(2).sum(dim=(0, 2))
        return per_sample


def make_data(rnn: nn.RNNBase, packed: str):
    torch.manual_seed(1)
    x = torch.randn(B, T, FEATURES, dtype=torch.float64)
    if packed:
        for i, length in enumerate(LENGTHS):
            x[i, length:] = 0.0
    directions = 2 if rnn.bidirectional else 1
    real_hidden = rnn.proj_size if getattr(rnn, "proj_size", 0) else rnn.hidden_size
    h0 = torch.randn(rnn.num_layers * directions, B, real_hidden, dtype=torch.float64)
    c0 = torch.randn(rnn.num_layers * directions, B, rnn.hidden_size, dtype=torch.float64)
    return x, h0, c0


def check_exact(rnn: nn.RNNBase, microbatch_size: int, packed: str = "", with_state: bool = False,
                clipping: str = "fixed") -> None:
    model = SequenceModel(rnn.double(), packed, with_state)
    x, h0, c0 = make_data(rnn, packed)
    time_major = not rnn.batch_first

    def run(net, samples):
        xs = x[samples]
        lengths = torch.tensor(LENGTHS)[samples]
        return net(xs.transpose(0, 1) if time_major else xs, h0[:, samples], c0[:, samples], lengths)

    seed = 7
    torch.manual_seed(seed)
    max_grad_norm = None if clipping == "adaptive" else 0.5
    ref = reference_update(model, lambda net, s: _seeded(seed, run, net, s, microbatch_size), B, microbatch_size,
                           clipping=clipping, max_grad_norm=max_grad_norm)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    wrapped, clipped, _ = MicroBatchClipping().make_clipped(
        module=model, optimizer=optimizer, microbatch_size=microbatch_size, max_grad_norm=max_grad_norm,
        clipping=clipping, batch_first=not time_major,
    )
    clipped.zero_grad()
    torch.manual_seed(seed)
    run(wrapped, slice(None)).mean().backward()
    clipped.pre_step()
    assert_close_update([p.grad for p in model.parameters() if p.requires_grad], ref.update)


def _seeded(seed, run, net, samples, microbatch_size):
    """Without dropout the reference needs no seed; with dropout, see ``test_dropout_between_layers``."""
    return run(net, samples)


RNN_FACTORIES = {
    "lstm": lambda **kw: nn.LSTM(FEATURES, HIDDEN, **kw),
    "gru": lambda **kw: nn.GRU(FEATURES, HIDDEN, **kw),
    "rnn_tanh": lambda **kw: nn.RNN(FEATURES, HIDDEN, **kw),
    "rnn_relu": lambda **kw: nn.RNN(FEATURES, HIDDEN, nonlinearity="relu", **kw),
}


@pytest.mark.parametrize("kind", sorted(RNN_FACTORIES))
@pytest.mark.parametrize("microbatch_size", [1, 2, 3, B])
def test_every_cell_every_microbatch_size(kind, microbatch_size):
    torch.manual_seed(0)
    check_exact(RNN_FACTORIES[kind](batch_first=True, num_layers=2, bidirectional=True), microbatch_size)


@pytest.mark.parametrize("kind", sorted(RNN_FACTORIES))
@pytest.mark.parametrize("packed", ["sorted", "unsorted"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_packed_sequences_in_batch_order(kind, packed, batch_first):
    torch.manual_seed(0)
    rnn = RNN_FACTORIES[kind](batch_first=batch_first, num_layers=2, bidirectional=True)
    if packed == "sorted":
        global LENGTHS
        saved = LENGTHS
        LENGTHS = sorted(LENGTHS, reverse=True)
        try:
            check_exact(rnn, 2, packed=packed, with_state=True)
        finally:
            LENGTHS = saved
    else:
        check_exact(rnn, 2, packed=packed, with_state=True)


@pytest.mark.parametrize("kind", sorted(RNN_FACTORIES))
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("clipping", ["fixed", "adaptive"])
def test_initial_states_time_major_and_clipping(kind, batch_first, clipping):
    torch.manual_seed(0)
    check_exact(RNN_FACTORIES[kind](batch_first=batch_first), 3, with_state=True, clipping=clipping)


@pytest.mark.parametrize("microbatch_size", [1, 3])
@pytest.mark.parametrize("packed", ["", "unsorted"])
def test_lstm_projection(microbatch_size, packed):
    torch.manual_seed(0)
    rnn = nn.LSTM(FEATURES, HIDDEN, num_layers=2, proj_size=2, bidirectional=True, batch_first=True)
    check_exact(rnn, microbatch_size, packed=packed, with_state=True)


@pytest.mark.parametrize("kind", sorted(RNN_FACTORIES))
def test_without_bias(kind):
    torch.manual_seed(0)
    check_exact(RNN_FACTORIES[kind](batch_first=True, bias=False, num_layers=2), 2, packed="unsorted")


def test_frozen_weights_are_left_alone():
    torch.manual_seed(0)
    rnn = nn.GRU(FEATURES, HIDDEN, batch_first=True)
    rnn.weight_hh_l0.requires_grad_(False)
    check_exact(rnn, 2)
