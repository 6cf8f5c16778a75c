"""Formed and factored (ghost-norm) micro-batch sums agree, and every model is exact with either."""

from __future__ import annotations

import pytest
import test_attention as attention_cases
import test_fast_paths as fast_cases
import test_layers as layer_cases
import test_models as model_cases
import test_recurrent as recurrent_cases
import test_reliability as reliability_cases
import test_steps as step_cases
import torch
from torch import nn

from mbclip import MicroBatchClipping, microbatch_sums
from mbclip.microbatch_sums import (
    FactoredSums,
    FormedSums,
    IndexedSums,
    StackedSums,
    add_sums,
    norms_of,
    outer_product_sums,
    stack_passes,
    weighted_sums_of,
)
from reference import assert_close_update, reference_update


def _factors(num_microbatches=4, rows=3, out_features=5, in_features=6):
    return torch.randn(num_microbatches, rows, out_features), torch.randn(num_microbatches, rows, in_features)


def test_factored_norms_and_weighted_sums_equal_the_formed_ones():
    backprops, activations = _factors()
    factored = FactoredSums(backprops, activations, (5, 6))
    formed = FormedSums(torch.bmm(backprops.transpose(1, 2), activations))
    torch.testing.assert_close(factored.formed(), formed.sums, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(factored.norms(), formed.norms(), rtol=1e-12, atol=1e-12)
    weights = torch.randn(2, 4)
    torch.testing.assert_close(factored.weighted_sum(weights), formed.weighted_sum(weights), rtol=1e-12, atol=1e-12)


def test_norms_and_weighted_sums_of_many_parameters_equal_one_by_one():
    """The batched forms (one foreach call for single formed micro-batches) give each parameter's own answer."""
    torch.manual_seed(0)
    g, a = _factors(num_microbatches=1)
    sums = [
        FormedSums(torch.randn(1, 3, 4, dtype=torch.float64)),
        FormedSums(torch.randn(1, 5)),  # another dtype than the weights: scaled on its own
        FormedSums(torch.randn(3, 2, 2, dtype=torch.float64)),
        FactoredSums(g.double(), a.double(), (5, 6)),
        FormedSums(torch.randn(1, 7, dtype=torch.float64)),
    ]
    for norm, part in zip(norms_of(sums), sums):
        torch.testing.assert_close(norm, part.norms(), rtol=1e-12, atol=0)
    single = torch.tensor([[0.3]], dtype=torch.float64)
    triple = torch.tensor([[0.3, -1.0, 2.0]], dtype=torch.float64)
    one_microbatch = [part for part in sums if part.num_microbatches == 1]
    for part, summed in zip(one_microbatch, weighted_sums_of(one_microbatch, single)):
        torch.testing.assert_close(summed, part.weighted_sum(single)[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(weighted_sums_of(sums[2:3], triple)[0], sums[2].weighted_sum(triple)[0])


def test_dropped_microbatches_do_not_reach_the_sum_even_as_nan():
    backprops, activations = _factors()
    backprops[1, 0, 0] = float("nan")
    activations[1, 2, 3] = float("inf")
    kept = torch.tensor([True, False, True, True])
    weights = torch.randn(1, 4)
    expected = FormedSums(torch.bmm(backprops[kept].transpose(1, 2), activations[kept])).weighted_sum(weights[:, kept])
    for sums in (
        FactoredSums(backprops, activations, (5, 6)),
        FormedSums(FactoredSums(backprops, activations, (5, 6)).formed()),
    ):
        actual = sums.weighted_sum(weights, kept)
        assert torch.isfinite(actual).all()
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def test_two_calls_in_one_pass_stay_factored_and_add_up():
    first, second = FactoredSums(*_factors(), (5, 6)), FactoredSums(*_factors(rows=2), (5, 6))
    total = add_sums(first, second)
    assert isinstance(total, FactoredSums)
    torch.testing.assert_close(total.formed(), first.formed() + second.formed(), rtol=1e-12, atol=1e-12)
    mixed = add_sums(first, FormedSums(second.formed()))
    torch.testing.assert_close(mixed.formed(), total.formed(), rtol=1e-12, atol=1e-12)


def test_passes_stack_in_order():
    parts = [FactoredSums(*_factors(num_microbatches=2), (5, 6)), FormedSums(torch.randn(3, 5, 6))]
    stacked = stack_passes(parts)
    assert isinstance(stacked, StackedSums) and stacked.num_microbatches == 5
    formed = FormedSums(stacked.formed())
    torch.testing.assert_close(stacked.norms(), formed.norms(), rtol=1e-12, atol=1e-12)
    weights, kept = torch.randn(2, 5), torch.tensor([True, True, False, True, True])
    torch.testing.assert_close(stacked.weighted_sum(weights, kept), formed.weighted_sum(weights, kept))


def test_every_kind_of_sums_gives_the_steps_weighted_total_as_its_weighted_sum():
    """``weighted_total`` (the step's one row, shaped like the parameter) is ``weighted_sum`` of that row."""
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        kinds = [
            FormedSums(torch.randn(4, 5, 6)),
            FactoredSums(*_factors(), (5, 6)),
            FactoredSums(*_factors(out_features=7, in_features=2), (7, 2)),  # scales the narrower activations
            _indexed(),
            stack_passes([FactoredSums(*_factors(num_microbatches=2), (5, 6)), FormedSums(torch.randn(2, 5, 6))]),
        ]
        weights = torch.tensor([[0.5, -1.0, 2.0, 0.25]])
    finally:
        torch.set_default_dtype(default_dtype)
    for sums, total in zip(kinds, weighted_sums_of(kinds, weights)):
        expected = sums.weighted_sum(weights)[0]
        assert total.shape == expected.shape == sums.formed().shape[1:]
        torch.testing.assert_close(total, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sums.weighted_total(weights[0]), expected, rtol=1e-12, atol=1e-12)


def test_cost_model_keeps_the_smaller_form():
    assert isinstance(outer_product_sums(*_factors(rows=1, out_features=64, in_features=64)), FactoredSums)
    assert isinstance(outer_product_sums(*_factors(rows=64, out_features=8, in_features=8)), torch.Tensor)


def test_cost_model_forms_small_sums_about_as_large_as_their_factors():
    # the rel-pos conformer's 144 x 144 weights at b = 4: 8 micro-batches of 60 rows, factors 0.83x the formed sums
    assert not microbatch_sums.prefers_factors(60, 144, 144, num_microbatches=8)
    factors = _factors(num_microbatches=8, rows=60, out_features=144, in_features=144)
    assert isinstance(outer_product_sums(*factors), torch.Tensor)
    # the same shapes in 32 micro-batches (a batch of 128): the formed sums outgrow the caches, factors stay
    assert microbatch_sums.prefers_factors(15 * 4, 144, 144, num_microbatches=32)
    # factors much smaller than the formed sums (about a fifth of them here) stay factors however small
    assert microbatch_sums.prefers_factors(16, 144, 144, num_microbatches=2)


def _indexed(num_microbatches=4, rows=5, width=3, table=7):
    return IndexedSums(
        torch.randn(num_microbatches, rows, width), torch.randint(0, table, (num_microbatches, rows)), table
    )


def test_indexed_rows_equal_the_formed_tables():
    indexed = _indexed()
    formed = torch.zeros(4, 7, 3)
    for j in range(4):
        formed[j].index_add_(0, indexed.indices[j], indexed.rows[j])
    torch.testing.assert_close(indexed.formed(), formed, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(indexed.norms(), FormedSums(formed).norms(), rtol=1e-12, atol=1e-12)
    weights, kept = torch.randn(2, 4), torch.tensor([True, False, True, True])
    indexed.rows[1, 0, 0] = float("nan")
    expected = FormedSums(formed).weighted_sum(weights, kept)
    torch.testing.assert_close(indexed.weighted_sum(weights, kept), expected, rtol=1e-12, atol=1e-12)
    twice = add_sums(indexed, _indexed())
    assert isinstance(twice, IndexedSums) and twice.rows.shape[1] == 10


def test_half_precision_factors_give_float32_norms():
    backprops, activations = _factors()
    factored = FactoredSums(backprops.bfloat16(), activations.bfloat16(), (5, 6))
    assert factored.norms().dtype == torch.float32


# -- whole models with every layer forced to one form ----------------------------------------------------


@pytest.fixture(params=["formed", "factored"])
def forced_form(request, monkeypatch):
    monkeypatch.setattr(microbatch_sums, "prefers_indexed", lambda rows, num_rows: request.param == "factored")
    monkeypatch.setattr(
        microbatch_sums, "prefers_factors", lambda rows, out_features, in_features, *_: request.param == "factored"
    )
    return request.param


@pytest.mark.parametrize("b", [1, 3])
def test_conformer(forced_form, b):
    model_cases.test_conformer_ctc(b, "fixed")


@pytest.mark.parametrize("b", [1, 2])
def test_lstm_ctc(forced_form, b):
    model_cases.test_lstm_ctc_padded(b, "adaptive")
    model_cases.test_lstm_ctc_packed_bidirectional(b)


@pytest.mark.parametrize("kind", sorted(recurrent_cases.RNN_FACTORIES))
def test_recurrent_layers(forced_form, kind):
    recurrent_cases.test_every_cell_every_microbatch_size(kind, 2)


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer(forced_form, batch_first):
    attention_cases.test_transformer_encoder_classifier(2, batch_first, False)
    attention_cases.test_kdim_vdim(2, batch_first, True)


@pytest.mark.parametrize("clipping,max_grad_norm", [("fixed", 0.05), ("per_layer", 0.03)])
def test_passes_and_dropped_microbatches(forced_form, clipping, max_grad_norm):
    step_cases.test_several_backward_passes_give_the_mean_over_every_microbatch(clipping, max_grad_norm, 2)
    reliability_cases.test_nan_microbatch_is_dropped_and_the_rest_averaged(clipping, max_grad_norm)
    reliability_cases.test_nan_in_one_of_several_passes_drops_only_that_microbatch()


@pytest.mark.parametrize("microbatch_size", [1, 3])
def test_embeddings(forced_form, microbatch_size):
    fast_cases.test_model_matches_reference(fast_cases._lm_case, microbatch_size, "mean", "mean")
    layer_cases.test_layer_matches_reference_fixed("embedding", microbatch_size)
    layer_cases.test_layer_matches_reference_fixed("pointwise_conv", microbatch_size)


def test_tied_weights_twice_in_one_pass(forced_form):
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            return self.linear(torch.tanh(self.linear(x)))  # one layer called twice per pass

    torch.manual_seed(3)
    model = Shared()
    x = torch.randn(6, 4)
    losses = lambda m, samples: m(x[samples]).pow(2).sum(dim=1)  # noqa: E731
    expected = reference_update(model, losses, 6, 2, "fixed", 0.5)
    wrapped, clipped, _ = MicroBatchClipping().make_clipped(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        microbatch_size=2,
        max_grad_norm=0.5,
        verify_gradients="always",
    )
    losses(wrapped, slice(None)).mean().backward()
    assert clipped.pre_step()
    assert_close_update([p.grad for p in model.parameters()], expected.update)


@pytest.mark.parametrize("rows", [15, 23, 31, 16, 14, 7])
def test_gram_matrices_padded_by_a_zero_row_are_exact(rows):
    """On CPU, rows one short of a multiple of 8 get a zero row for a faster matmul: the same Gram matrices."""
    backprops, activations = _factors(num_microbatches=3, rows=rows, out_features=130, in_features=128)
    padded = rows % 8 == 7 and rows >= microbatch_sums.GRAM_PADDING_MIN_ROWS
    assert microbatch_sums.pads_gram_rows(activations) == padded
    assert not microbatch_sums.pads_gram_rows(activations[..., :127])  # too few features to pay for the copy
    gram = microbatch_sums._compute_gram(activations)
    assert gram.shape == (3, rows, rows)
    torch.testing.assert_close(gram, torch.bmm(activations, activations.transpose(1, 2)), rtol=1e-12, atol=1e-12)
    factored = FactoredSums(backprops, activations, (130, 128))
    formed = FormedSums(torch.bmm(backprops.transpose(1, 2), activations))
    torch.testing.assert_close(factored.norms(), formed.norms(), rtol=1e-12, atol=1e-12)


def test_shared_factors_gram_matrices_are_computed_once_and_change_no_norm(monkeypatch):
    """An LSTM's two weights share their gate gradients (q, k, v projections their input): one Gram matrix each."""
    gates, inputs, hidden = torch.randn(4, 3, 8), torch.randn(4, 3, 5), torch.randn(4, 3, 2)
    first = FactoredSums(gates, inputs, (8, 5))
    second = FactoredSums(gates.view(4, 3, 8), hidden, (8, 2))  # another view of the same numbers
    stacked = StackedSums([FactoredSums(*_factors(), (5, 6)), FormedSums(torch.randn(4, 5, 6))])
    expected = [sums.norms() for sums in (first, second, stacked)]
    computed = []
    original = microbatch_sums._compute_gram
    monkeypatch.setattr(microbatch_sums, "_compute_gram", lambda t: computed.append(t.shape) or original(t))
    grams = microbatch_sums.GramCache.of_shared_factors([first, second, stacked, None])
    actual = [sums.norms(grams) for sums in (first, second, stacked)]
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    assert computed.count(torch.Size([4, 3, 8])) == 1  # the shared gate gradients
    assert len(computed) == 5  # gates once, inputs, hidden, and the stacked part's two factors
    assert len(grams._grams) == 1  # only the shared factor's Gram matrices are kept
