"""Activation checkpointing (torch.utils.checkpoint) inside a wrapped model: exact, or refused by name."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from helpers import check_update, mbclip_update
from mbclip import MicroBatchClipping
from mbclip.errors import BatchError
from reference import assert_close_update, reference_update

B = 6


class Gain(nn.Module):
    """A raw parameter: the autograd fallback's case."""

    def __init__(self, dim: int):
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


class CheckpointedBlocks(nn.Module):
    """Two residual blocks (Linear, LayerNorm, depthwise Conv1d, MultiheadAttention, a raw parameter), each under
    checkpoint()."""

    def __init__(self, use_reentrant: bool, dim: int = 8):
        super().__init__()
        self.use_reentrant = use_reentrant
        self.checkpointing = True
        self.inp = nn.Linear(5, dim)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "norm": nn.LayerNorm(dim),
                    "ff": nn.Linear(dim, dim),
                    "conv": nn.Conv1d(dim, dim, 3, padding=1, groups=dim),
                    "attn": nn.MultiheadAttention(dim, 2, batch_first=True),
                    "gain": Gain(dim),
                }
            )
            for _ in range(2)
        )
        self.out = nn.Linear(dim, 3)

    @staticmethod
    def _block(block: nn.ModuleDict, x: torch.Tensor) -> torch.Tensor:
        x = x + torch.tanh(block["gain"](block["ff"](block["norm"](x))))
        x = x + block["conv"](x.transpose(1, 2)).transpose(1, 2)
        return x + block["attn"](x, x, x, need_weights=False)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            if self.checkpointing:
                x = checkpoint(self._block, block, x, use_reentrant=self.use_reentrant)
            else:
                x = self._block(block, x)
        return self.out(x.mean(dim=1))


class CheckpointReturnsLayerOutputs(nn.Module):
    """Checkpointed functions that return a multi-output layer's output itself: in a reentrant checkpoint's re-run
    that output is a root of the nested backward (torch's multi-tensor hooks never fire for a root)."""

    def __init__(self, use_reentrant: bool):
        super().__init__()
        self.use_reentrant = use_reentrant
        self.checkpointing = True
        self.inp = nn.Linear(5, 6)
        self.lstm = nn.LSTM(6, 6, batch_first=True)
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        lstm = lambda t: self.lstm(t)[0]  # noqa: E731
        attention = lambda t: self.attn(t, t, t)[0]  # noqa: E731
        for layer in (lstm, attention):
            x = checkpoint(layer, x, use_reentrant=self.use_reentrant) if self.checkpointing else layer(x)
        return self.out(x.mean(dim=1))


def _without_checkpointing(losses):
    """The reference's per-micro-batch runs, without checkpointing (reentrant checkpoint refuses autograd.grad)."""

    def per_sample_losses(model, samples):
        model.checkpointing = False
        try:
            return losses(model)[samples]
        finally:
            model.checkpointing = True

    return per_sample_losses


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("microbatch_size", [1, 2, 4, B])
@pytest.mark.parametrize("model_class", [CheckpointedBlocks, CheckpointReturnsLayerOutputs], ids=["blocks", "outputs"])
def test_checkpointed_blocks_match_reference(use_reentrant, microbatch_size, model_class):
    torch.manual_seed(0)
    model = model_class(use_reentrant).double()
    x, y = torch.randn(B, 4, 5, dtype=torch.float64), torch.randint(0, 3, (B,))

    def losses(m):
        return F.cross_entropy(m(x), y, reduction="none")

    check_update(model, losses, B, microbatch_size, per_sample_losses=_without_checkpointing(losses))


class CheckpointedStem(nn.Module):
    """A checkpointed region that starts at the raw input (Linear, BatchNorm1d over time), then a classifier."""

    def __init__(self, use_reentrant: bool):
        super().__init__()
        self.use_reentrant = use_reentrant
        self.checkpointing = True
        self.proj = nn.Conv1d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm1d(4)
        self.out = nn.Linear(4, 2)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.proj(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = checkpoint(self._stem, x, use_reentrant=self.use_reentrant) if self.checkpointing else self._stem(x)
        return self.out(h.mean(dim=2))


@pytest.mark.parametrize("use_reentrant", [False])  # reentrant: no input requires grad, so torch gives no gradients
@pytest.mark.parametrize("microbatch_size", [2, 3])
def test_checkpointed_stem_with_batchnorm_matches_reference(use_reentrant, microbatch_size):
    """BatchNorm re-run by checkpointing normalises per micro-batch, as in its pass; nothing stays switched off."""
    torch.manual_seed(1)
    model = CheckpointedStem(use_reentrant).double()
    x, y = torch.randn(B, 3, 7, dtype=torch.float64), torch.randint(0, 2, (B,))

    def alone(m, samples):  # each micro-batch run alone: BatchNorm on its own statistics
        m.checkpointing = False
        try:
            return F.cross_entropy(m(x[samples]), y[samples], reduction="none")
        finally:
            m.checkpointing = True

    expected = reference_update(model, alone, B, microbatch_size, max_grad_norm=0.5)
    actual, optimizer = mbclip_update(
        model, lambda m, s: F.cross_entropy(m(x[s]), y[s], reduction="none"), microbatch_size, max_grad_norm=0.5
    )
    assert_close_update(actual, expected.update)
    assert all(p.requires_grad for p in model.parameters())
    assert optimizer.grad_module._recomputing == 0


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_accumulated_passes_with_checkpointing(use_reentrant):
    """Forward/backward pairs before one step: each re-run belongs to the pass of its backward."""
    torch.manual_seed(2)
    model = CheckpointedBlocks(use_reentrant).double()
    x, y = torch.randn(B, 4, 5, dtype=torch.float64), torch.randint(0, 3, (B,))

    def losses(m, samples):
        return F.cross_entropy(m(x[samples]), y[samples], reduction="none")

    passes = [slice(0, 2), slice(2, B)]
    with_checkpointing, optimizer = mbclip_update(model, losses, 2, max_grad_norm=0.5, passes=passes)
    MicroBatchClipping.unwrap(optimizer.grad_module, optimizer)
    model.checkpointing = False
    without, _ = mbclip_update(model, losses, 2, max_grad_norm=0.5, passes=passes)
    assert_close_update(with_checkpointing, without, rtol=1e-12)


def test_two_forwards_then_one_backward_is_refused_with_checkpointing():
    """Which pass a re-run belongs to is ambiguous then: an error that says what to do, not a wrong gradient."""
    torch.manual_seed(3)
    model = CheckpointedBlocks(use_reentrant=False).double()
    x, y = torch.randn(B, 4, 5, dtype=torch.float64), torch.randint(0, 3, (B,))
    wrapped, optimizer, _ = MicroBatchClipping().make_clipped(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), microbatch_size=2, max_grad_norm=1.0
    )
    first = F.cross_entropy(wrapped(x[:3]), y[:3])
    second = F.cross_entropy(wrapped(x[3:]), y[3:])
    with pytest.raises(BatchError, match="call backward\\(\\) after each forward pass"):
        (first + second).backward()
    assert all(p.requires_grad for p in model.parameters())  # nothing left half-changed
