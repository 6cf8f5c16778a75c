"""Variable-length speech: padded frames add nothing to any gradient; CTC loss ("mean" and "sum") as the criterion.

The reference runs each micro-batch alone, trimmed to its own longest sequence, so any influence of
padded frames (or of the batch's padding length) on a gradient would show up as a mismatch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import on_both_paths
from mbclip import MicroBatchClipping
from reference import assert_close_update, reference_update

B, T, FEATURES, HIDDEN, VOCAB = 5, 9, 3, 4, 5
DT = torch.float64
LENGTHS = torch.tensor([9, 4, 6, 5, 7])
TARGET_LENGTHS = torch.tensor([3, 1, 2, 2, 3])


class PaddedSpeechModel(nn.Module):
    """Linear front end, Conv1d over time, output projection; padded frames masked to zero before the conv."""

    def __init__(self):
        super().__init__()
        self.front = nn.Linear(FEATURES, HIDDEN)
        self.conv = nn.Conv1d(HIDDEN, HIDDEN, 3, padding=1)
        self.out = nn.Linear(HIDDEN, VOCAB)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, T, F]`` padded, ``lengths`` ``[B]`` -> log-probabilities ``[B, T, V]``."""
        mask = (torch.arange(x.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(2).to(x.dtype)
        hidden = torch.tanh(self.front(x)) * mask
        hidden = torch.relu(self.conv(hidden.transpose(1, 2))).transpose(1, 2) * mask
        return self.out(hidden).log_softmax(dim=-1)


def batch():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(B, T, FEATURES, generator=generator, dtype=DT)
    padded = torch.arange(T).unsqueeze(0) >= LENGTHS.unsqueeze(1)
    x[padded] = 1e3 * torch.randn(int(padded.sum()), FEATURES, generator=generator, dtype=DT)  # garbage in padding
    targets = torch.randint(1, VOCAB, (B, int(TARGET_LENGTHS.max())), generator=generator)
    return x, targets


def model() -> nn.Module:
    torch.manual_seed(0)
    return PaddedSpeechModel().to(DT)


def ctc_per_sample(reduction: str):
    """Per-sample CTC terms, each micro-batch trimmed to its own longest input: what the criterion averages or sums."""
    x, targets = batch()

    def per_sample_losses(m: nn.Module, samples: slice) -> torch.Tensor:
        lengths, target_lengths = LENGTHS[samples], TARGET_LENGTHS[samples]
        log_probs = m(x[samples, : int(lengths.max())], lengths).transpose(0, 1)
        losses = F.ctc_loss(log_probs, targets[samples], lengths, target_lengths, reduction="none")
        return losses / target_lengths.to(DT) if reduction == "mean" else losses

    return per_sample_losses


def clipped_ctc_update(m: nn.Module, criterion: nn.Module, reduction: str, microbatch_size: int, clipping: str):
    x, targets = batch()

    def run(verify_gradients: str):
        optimizer = torch.optim.SGD(m.parameters(), lr=1.0)
        wrapped, clipped, _ = MicroBatchClipping().make_clipped(
            module=m,
            optimizer=optimizer,
            microbatch_size=microbatch_size,
            max_grad_norm=0.5 if clipping == "fixed" else None,
            clipping=clipping,
            loss_reduction=reduction,
            verify_gradients=verify_gradients,
        )
        clipped.zero_grad()
        log_probs = wrapped(x, LENGTHS).transpose(0, 1)  # CTC wants [T, B, V]
        criterion(log_probs, targets, LENGTHS, TARGET_LENGTHS).backward()
        assert clipped.pre_step()
        return [p.grad.clone() for p in m.parameters()], clipped

    return on_both_paths(m, run)[0]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("clipping", ["fixed", "adaptive"])
@pytest.mark.parametrize("microbatch_size", [1, 2, 3, B])
def test_ctc_over_padded_batch_matches_reference(reduction, clipping, microbatch_size):
    m = model()
    expected = reference_update(
        m, ctc_per_sample(reduction), B, microbatch_size, clipping, 0.5 if clipping == "fixed" else None
    )
    actual = clipped_ctc_update(m, nn.CTCLoss(reduction=reduction), reduction, microbatch_size, clipping)
    assert_close_update(actual, expected.update)


def test_functional_ctc_loss_as_criterion():
    m = model()
    expected = reference_update(m, ctc_per_sample("mean"), B, 2, "fixed", 0.5)

    def criterion(*args):
        return F.ctc_loss(*args, reduction="mean")

    actual = clipped_ctc_update(m, criterion, "mean", 2, "fixed")
    assert_close_update(actual, expected.update)


def test_padding_contents_change_nothing():
    """Replacing the garbage in padded frames by zeros leaves the clipped update unchanged (bit for bit)."""
    x, targets = batch()
    updates = []
    for fill in (None, 0.0):
        inputs = x.clone()
        if fill is not None:
            inputs[torch.arange(T).unsqueeze(0) >= LENGTHS.unsqueeze(1)] = fill
        m = model()
        optimizer = torch.optim.SGD(m.parameters(), lr=1.0)
        wrapped, clipped, _ = MicroBatchClipping().make_clipped(
            module=m, optimizer=optimizer, microbatch_size=2, max_grad_norm=0.5
        )
        clipped.zero_grad()
        log_probs = wrapped(inputs, LENGTHS).transpose(0, 1)
        F.ctc_loss(log_probs, targets, LENGTHS, TARGET_LENGTHS).backward()
        assert clipped.pre_step()
        updates.append(torch.cat([p.grad.reshape(-1) for p in m.parameters()]))
    torch.testing.assert_close(updates[0], updates[1], rtol=0, atol=0)


class MaskedPoolingClassifier(nn.Module):
    """Utterance classifier: masked mean over valid frames only."""

    def __init__(self):
        super().__init__()
        self.frames = PaddedSpeechModel()
        self.head = nn.Linear(VOCAB, 2)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = (torch.arange(x.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(2).to(x.dtype)
        pooled = (self.frames(x, lengths) * mask).sum(dim=1) / lengths.unsqueeze(1).to(x.dtype)
        return self.head(pooled)


@pytest.mark.parametrize("microbatch_size", [1, 3])
def test_masked_pooling_classifier_matches_reference(microbatch_size):
    torch.manual_seed(0)
    m = MaskedPoolingClassifier().to(DT)
    x, _ = batch()
    labels = torch.tensor([0, 1, 1, 0, 1])

    def per_sample_losses(model_: nn.Module, samples: slice) -> torch.Tensor:
        lengths = LENGTHS[samples]
        logits = model_(x[samples, : int(lengths.max())], lengths)
        return F.cross_entropy(logits, labels[samples], reduction="none")

    expected = reference_update(m, per_sample_losses, B, microbatch_size, "fixed", 0.5)
    optimizer = torch.optim.SGD(m.parameters(), lr=1.0)
    wrapped, clipped, _ = MicroBatchClipping().make_clipped(
        module=m, optimizer=optimizer, microbatch_size=microbatch_size, max_grad_norm=0.5
    )
    clipped.zero_grad()
    F.cross_entropy(wrapped(x, LENGTHS), labels).backward()
    assert clipped.pre_step()
    assert_close_update([p.grad for p in m.parameters()], expected.update)
