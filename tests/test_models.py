"""mbclip.models (Conformer CTC, LSTM CTC) on padded batches of unequal lengths, against the reference.

The reference runs every micro-batch alone, trimmed to its own longest sample: if padded frames leaked into
any gradient, the padded whole-batch run and the trimmed reference would differ.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import check_update
from mbclip.grad_module import MicroBatchGradSampleModule
from mbclip.models import LSTMCTC, ConformerCTC, RelPositionMultiHeadAttention, rel_shift
from mbclip.models.conformer import padding_mask, relative_positional_encoding

FEATURES, VOCAB = 12, 7
LENGTHS = torch.tensor([24, 17, 21, 13])  # conformer frames after subsampling: 5, 3, 4, 2
TARGET_LENGTHS = torch.tensor([3, 2, 3, 1])
B = len(LENGTHS)
MICROBATCH_SIZES = [1, 2, 3, B]


def speech_batch(lengths=LENGTHS, target_lengths=TARGET_LENGTHS):
    generator = torch.Generator().manual_seed(5)
    features = torch.randn(len(lengths), int(lengths.max()), FEATURES, generator=generator)
    padded = torch.arange(features.shape[1]).unsqueeze(0) >= lengths.unsqueeze(1)
    features = features.masked_fill(padded.unsqueeze(-1), 7.0)  # loud padding: any leak shows
    targets = torch.randint(1, VOCAB, (len(lengths), int(target_lengths.max())), generator=generator)
    return features, targets


def ctc_per_sample(model, features, lengths, targets, target_lengths):
    log_probs, out_lengths = model(features, lengths)
    return F.ctc_loss(log_probs.transpose(0, 1), targets, out_lengths, target_lengths, reduction="none")


def check_ctc_model(model, b, clipping="fixed", criterion="sum", lengths=LENGTHS, target_lengths=TARGET_LENGTHS):
    """``criterion``: the user's ``F.ctc_loss`` reduction, ``"sum"`` (loss_reduction="sum") or ``"mean"``."""
    features, targets = speech_batch(lengths, target_lengths)

    def trimmed(m, samples):
        kept = lengths[samples]
        losses = ctc_per_sample(
            m, features[samples, : int(kept.max())], kept, targets[samples], target_lengths[samples]
        )
        return losses if criterion == "sum" else losses / target_lengths[samples]

    def user_loss(m):
        log_probs, out_lengths = m(features, lengths)
        return F.ctc_loss(log_probs.transpose(0, 1), targets, out_lengths, target_lengths, reduction=criterion)

    check_update(
        model,
        None,
        len(lengths),
        b,
        clipping,
        per_sample_losses=trimmed,
        training_loss=user_loss,
        loss_reduction=criterion,
    )


def small_conformer(**options):
    torch.manual_seed(0)
    return ConformerCTC(FEATURES, VOCAB, d_model=16, num_heads=2, num_blocks=2, kernel_size=3, **options)


def test_rel_shift_pairs_queries_with_relative_positions():
    time = 5
    scores = torch.randn(2, 3, time, 2 * time - 1)
    shifted = rel_shift(scores)
    for i in range(time):
        for j in range(time):
            torch.testing.assert_close(shifted[..., i, j], scores[..., i, time - 1 - i + j], rtol=0, atol=0)


def test_positional_encoding_shape():
    assert relative_positional_encoding(4, 8).shape == (1, 7, 8)


def test_conformer_output_shapes_and_padding_invariance():
    model = small_conformer().eval()
    features, _ = speech_batch()
    log_probs, out_lengths = model(features, LENGTHS)
    assert log_probs.shape == (B, 5, VOCAB)
    assert out_lengths.tolist() == [5, 3, 4, 2]
    alone, _ = model(features[1:2, :17], LENGTHS[1:2])
    torch.testing.assert_close(log_probs[1, :3], alone[0, :3], rtol=1e-12, atol=1e-12)


def test_attention_has_its_own_sampler_for_raw_biases_and_linear_pos():
    wrapped = MicroBatchGradSampleModule(small_conformer(), microbatch_size=2)
    layers = dict(wrapped.hooked_layers())
    assert layers["encoder.blocks.0.attention"] == "relpos_attention_sampler"
    assert "encoder.blocks.0.attention.linear_pos" not in layers  # the sampler owns the subtree


@pytest.mark.parametrize("b", MICROBATCH_SIZES)
@pytest.mark.parametrize("clipping", ["fixed", "adaptive"])
def test_conformer_ctc(b, clipping):
    check_ctc_model(small_conformer(), b, clipping)


@pytest.mark.parametrize("b", [1, 3])
def test_conformer_ctc_mean_criterion(b):
    check_ctc_model(small_conformer(), b, criterion="mean")


@pytest.mark.parametrize("lengths", [[17, 15, 16, 13, 17], [9] * 16])
def test_conformer_batch_size_equal_to_positional_shapes(lengths):
    """B == 2T'-1 (relative positions) or B == d_model (16): the positional projection must not look batched."""
    lengths = torch.tensor(lengths)
    check_ctc_model(small_conformer(), 2, lengths=lengths, target_lengths=torch.ones_like(lengths))


@pytest.mark.slow
@pytest.mark.parametrize("b", [2, B])
def test_conformer_ctc_default_size(b):
    torch.manual_seed(0)
    check_ctc_model(ConformerCTC(FEATURES, VOCAB), b, "adaptive")


@pytest.mark.parametrize("b", MICROBATCH_SIZES)
@pytest.mark.parametrize("clipping", ["fixed", "adaptive"])
def test_lstm_ctc_padded(b, clipping):
    torch.manual_seed(0)
    check_ctc_model(LSTMCTC(FEATURES, VOCAB, hidden_size=8, num_layers=2), b, clipping)


@pytest.mark.parametrize("b", [1, 3])
def test_lstm_ctc_packed_bidirectional(b):
    torch.manual_seed(0)
    check_ctc_model(LSTMCTC(FEATURES, VOCAB, hidden_size=8, num_layers=2, bidirectional=True, packed=True), b)


def test_bidirectional_lstm_needs_packing():
    with pytest.raises(ValueError, match="packed=True"):
        LSTMCTC(bidirectional=True)


class RelPosAttentionModel(nn.Module):
    """The conformer's attention alone, called with ``pad`` as a keyword, on padded inputs."""

    def __init__(self, dropout: float):
        super().__init__()
        self.attention = RelPositionMultiHeadAttention(8, 2, dropout=dropout)

    def forward(self, x, pad):
        pos_emb = relative_positional_encoding(x.shape[1], 8, dtype=x.dtype)
        return self.attention(x, pos_emb, pad=pad)


@pytest.mark.parametrize("b", [1, 2, 5])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_relpos_attention_sampler(b, dropout):
    """Exact with and without attention dropout (the gradients come from the real backward, masks included)."""
    torch.manual_seed(4)
    x = torch.randn(5, 6, 8)
    pad = padding_mask(torch.tensor([6, 4, 5, 6, 2]), 6)
    weights = torch.randn(5, 6, 8)
    check_update(RelPosAttentionModel(dropout), lambda m: (m(x, pad) * weights).sum(dim=(1, 2)), 5, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_relpos_recording_forward_has_the_class_numerics(dtype):
    from mbclip import MicroBatchClipping

    torch.manual_seed(4)
    model = RelPosAttentionModel(0.0).to(dtype)
    x = torch.randn(5, 6, 8, dtype=dtype)
    pad = padding_mask(torch.tensor([6, 4, 5, 6, 2]), 6)
    expected = model(x, pad)
    wrapped, _, _ = MicroBatchClipping().make_clipped(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), microbatch_size=2, max_grad_norm=1.0
    )
    assert torch.equal(wrapped(x, pad), expected)
