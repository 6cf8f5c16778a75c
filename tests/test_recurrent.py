"""nn.LSTM / nn.GRU / nn.RNN as users write them: exact micro-batch gradients against the brute-force reference."""

from __future__ import annotations

import copy
import io
from unittest import mock

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from helpers import check_update, mbclip_update, on_both_paths
from mbclip.engine import MicroBatchClipping
from mbclip.errors import BatchError
from mbclip.samplers import recurrent
from mbclip.samplers.recurrent import RECORD_ATTRIBUTE, LoopedRecord
from reference import assert_close_update, reference_update

B, T, FEATURES, HIDDEN = 5, 4, 3, 4
LENGTHS = [3, 4, 1, 2, 4]  # unsorted on purpose


@pytest.fixture(autouse=True, params=["looped", "recorded"])
def recurrent_path(request, monkeypatch):
    """Every test on both paths of the recurrent sampler: the native kernel once per micro-batch (few of them, as
    here) and the recorded one with mbclip's own backward through time."""
    if request.param == "recorded":
        monkeypatch.setattr(recurrent, "MAX_LOOPED_MICROBATCHES", 0)
    return request.param


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
            inputs = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=(self.packed == "sorted"))
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


def check_exact(
    rnn: nn.RNNBase, microbatch_size: int, packed: str = "", with_state: bool = False, clipping: str = "fixed"
) -> None:
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
    ref = reference_update(
        model,
        lambda net, s: _seeded(seed, run, net, s, microbatch_size),
        B,
        microbatch_size,
        clipping=clipping,
        max_grad_norm=max_grad_norm,
    )

    def clipped_update(verify_gradients: str):
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        wrapped, clipped, _ = MicroBatchClipping().make_clipped(
            module=model,
            optimizer=optimizer,
            microbatch_size=microbatch_size,
            max_grad_norm=max_grad_norm,
            clipping=clipping,
            batch_first=not time_major,
            verify_gradients=verify_gradients,
        )
        clipped.zero_grad()
        torch.manual_seed(seed)
        run(wrapped, slice(None)).mean().backward()
        clipped.pre_step()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad], clipped

    update, _ = on_both_paths(model, clipped_update)
    assert_close_update(update, ref.update)


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


# -- inter-layer dropout: the reference replays the masks the wrapped forward drew ---------------------


class StackedReference(nn.Module):
    """The same network as a multi-layer RNN, one single-layer RNN per layer, with given dropout factors.

    Its parameters come in the multi-layer module's order, so gradients line up one to one.
    """

    def __init__(self, rnn: nn.RNNBase, scales):
        super().__init__()
        self.layers = nn.ModuleList()
        directions = 2 if rnn.bidirectional else 1
        for layer in range(rnn.num_layers):
            single = type(rnn)(
                rnn.input_size if layer == 0 else rnn.hidden_size * directions,
                rnn.hidden_size,
                num_layers=1,
                bias=rnn.bias,
                batch_first=False,
                bidirectional=rnn.bidirectional,
                **({"nonlinearity": rnn.nonlinearity} if isinstance(rnn, nn.RNN) else {}),
            ).double()
            for name, _ in single.named_parameters():
                source = name.replace("_l0", f"_l{layer}")
                getattr(single, name).data.copy_(getattr(rnn, source).data)
            self.layers.append(single)
        self.scales = scales  # per layer boundary, [T, B, H] batch order

    def forward(self, x, lengths, samples):
        inputs = x
        for layer, module in enumerate(self.layers):
            packed = pack_padded_sequence(inputs, lengths, enforce_sorted=False)
            output, _ = module(packed)
            output, _ = pad_packed_sequence(output, total_length=T)
            if layer < len(self.layers) - 1:
                output = output * self.scales[layer][:, samples]
            inputs = output
        return output


@pytest.mark.parametrize("kind", sorted(RNN_FACTORIES))
@pytest.mark.parametrize("microbatch_size", [1, 2, B])
def test_dropout_between_layers_uses_the_real_masks(kind, microbatch_size):
    torch.manual_seed(0)
    rnn = RNN_FACTORIES[kind](num_layers=3, dropout=0.4, bidirectional=True).double()
    x, _, _ = make_data(rnn, "unsorted")
    x = x.transpose(0, 1)
    lengths = torch.tensor(LENGTHS)

    def loss_of(output):
        return output.tanh().pow(2).sum(dim=(0, 2)) + output.sum(dim=(0, 2))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = rnn

        def forward(self, inputs):
            output, _ = self.rnn(pack_padded_sequence(inputs, lengths, enforce_sorted=False))
            return loss_of(pad_packed_sequence(output, total_length=T)[0])

    model = Model()
    seen = []
    model.rnn.register_forward_hook(lambda m, a, out: seen.append(out[0].data))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped, clipped, _ = MicroBatchClipping().make_clipped(
        module=model, optimizer=optimizer, microbatch_size=microbatch_size, max_grad_norm=0.5, batch_first=False
    )
    clipped.zero_grad()
    wrapped(x).mean().backward()
    clipped.pre_step()
    record = getattr(seen[0], RECORD_ATTRIBUTE)
    scales = [record.padded(s) for s in record.dropout_scales[:-1]]
    assert all(bool((s == 0).any()) for s in scales)  # dropout really dropped something
    reference = StackedReference(rnn, scales)
    ref = reference_update(
        reference, lambda net, s: loss_of(net(x[:, s], lengths[s], s)), B, microbatch_size, max_grad_norm=0.5
    )
    assert_close_update([p.grad for p in model.parameters()], ref.update)


# -- a tiny LSTM CTC model on padded batches of unequal lengths ----------------------------------------


class TinyLstmCtc(nn.Module):
    """Features -> packed bidirectional LSTM -> Linear -> log-probabilities ``[T, B, classes]``."""

    def __init__(self, features: int = FEATURES, hidden: int = HIDDEN, classes: int = 5):
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        output, _ = self.lstm(packed)
        output, _ = pad_packed_sequence(output, batch_first=True, total_length=x.shape[1])
        return self.head(output).log_softmax(dim=-1).transpose(0, 1)


@pytest.mark.parametrize("microbatch_size", [1, 2, 3, B])
@pytest.mark.parametrize("clipping", ["fixed", "adaptive"])
def test_lstm_ctc_model_on_padded_batches(microbatch_size, clipping):
    torch.manual_seed(0)
    model = TinyLstmCtc().double()
    x, _, _ = make_data(model.lstm, "unsorted")
    lengths = torch.tensor(LENGTHS)
    targets = torch.tensor([[1, 2, 0], [3, 0, 0], [1, 0, 0], [4, 4, 0], [2, 1, 3]])
    target_lengths = torch.tensor([2, 1, 1, 1, 3])
    target_lengths = torch.minimum(target_lengths, (lengths + 1) // 2)

    def per_sample(net, s):
        log_probs = net(x[s], lengths[s])
        return nn.functional.ctc_loss(
            log_probs, targets[s], lengths[s], target_lengths[s], blank=0, reduction="none", zero_infinity=True
        )

    max_grad_norm = None if clipping == "adaptive" else 0.3
    ref = reference_update(model, per_sample, B, microbatch_size, clipping=clipping, max_grad_norm=max_grad_norm)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped, clipped, _ = MicroBatchClipping().make_clipped(
        module=model,
        optimizer=optimizer,
        microbatch_size=microbatch_size,
        max_grad_norm=max_grad_norm,
        clipping=clipping,
    )
    clipped.zero_grad()
    per_sample(wrapped, slice(None)).mean().backward()
    clipped.pre_step()
    assert_close_update([p.grad for p in model.parameters()], ref.update)


# -- the user's state_dict and numerics do not change ------------------------------------------------


def test_state_dict_round_trip_and_unchanged_outputs():
    torch.manual_seed(0)
    model = TinyLstmCtc().double()
    x, _, _ = make_data(model.lstm, "unsorted")
    lengths = torch.tensor(LENGTHS)
    before = model(x, lengths).detach()
    saved = io.BytesIO()
    torch.save(model.state_dict(), saved)
    keys_before = list(model.state_dict())

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped, clipped, _ = MicroBatchClipping().make_clipped(
        module=model, optimizer=optimizer, microbatch_size=2, max_grad_norm=1.0
    )
    assert list(model.state_dict()) == keys_before
    assert type(model.lstm) is nn.LSTM
    assert torch.equal(wrapped(x, lengths).detach(), before)  # same numerics while wrapped
    saved.seek(0)
    model.load_state_dict(torch.load(saved))  # a model saved before wrapping loads after

    clipped.zero_grad()
    wrapped(x, lengths).sum().backward()
    clipped.step()
    after = io.BytesIO()
    torch.save(model.state_dict(), after)
    after.seek(0)
    fresh = TinyLstmCtc().double()
    fresh.load_state_dict(torch.load(after))  # and a model trained wrapped loads into a plain one
    assert torch.equal(fresh(x, lengths), model(x, lengths))

    copy_before = copy.deepcopy(model)
    wrapped.remove_hooks()
    assert "forward" not in model.lstm.__dict__  # the recording forward is gone with the hooks
    assert torch.equal(model(x, lengths), copy_before(x, lengths))


def test_unbatched_input_is_refused_with_a_clear_error():
    torch.manual_seed(0)
    rnn = nn.GRU(FEATURES, HIDDEN).double()

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = rnn

        def forward(self, x):
            return self.rnn(x[0])[0].sum(dim=-1)  # one unbatched sequence [T, F]

    optimizer = torch.optim.SGD(rnn.parameters(), lr=0.1)
    wrapped, clipped, _ = MicroBatchClipping().make_clipped(
        module=Model(), optimizer=optimizer, microbatch_size=1, max_grad_norm=1.0
    )

    with pytest.raises(BatchError, match="unbatched"):
        wrapped(torch.randn(T, T, FEATURES, dtype=torch.float64)).mean().backward()


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_output_only_with_a_plain_sum_loss(kind):
    """A batch_first output is a view, and ``.sum()`` sends back an expanded gradient: it must still arrive."""
    torch.manual_seed(0)
    rnn = RNN_FACTORIES[kind](batch_first=True).double()
    x, _, _ = make_data(rnn, "")

    def per_sample(net, s):
        return net(x[s])[0].sum(dim=(1, 2))

    ref = reference_update(rnn, per_sample, B, 2, max_grad_norm=0.5)
    optimizer = torch.optim.SGD(rnn.parameters(), lr=0.1)
    wrapped, clipped, _ = MicroBatchClipping().make_clipped(
        module=rnn, optimizer=optimizer, microbatch_size=2, max_grad_norm=0.5
    )
    clipped.zero_grad()
    wrapped(x)[0].sum().div(B).backward()
    clipped.pre_step()
    assert_close_update([p.grad for p in rnn.parameters()], ref.update)


@pytest.mark.parametrize("hidden,microbatch_size", [(HIDDEN, 1), (HIDDEN, 2), (HIDDEN, B), (64, 1)])
def test_few_microbatches_run_the_native_kernel_once_each(recurrent_path, hidden, microbatch_size):
    """Up to eight micro-batches whose formed sums fit beside the gate activations: one native call per micro-batch
    on tapped weights (exact: every test here runs on both paths); else the recorded path."""
    torch.manual_seed(0)
    model = SequenceModel(nn.LSTM(FEATURES, hidden, num_layers=2, batch_first=True).double())
    x, _, _ = make_data(model.rnn, "")
    records = []
    model.rnn.register_forward_hook(lambda m, args, out: records.append(getattr(out[0], RECORD_ATTRIBUTE, None)))
    wrapped, optimizer, _ = MicroBatchClipping().make_clipped(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        microbatch_size=microbatch_size,
        max_grad_norm=0.5,
    )
    wrapped(x).mean().backward()  # the checked first step: a batch of one micro-batch is recorded too
    expected = recurrent_path == "looped" and hidden == HIDDEN  # 64 hidden: 5 x its weights outweigh its gates
    assert isinstance(records[0], LoopedRecord) == expected
    assert optimizer.pre_step()


# -- the sampler-only path: the layer is one node whose backward is mbclip's backward through time -----


class FedRecurrent(nn.Module):
    """A recurrent layer whose input and initial states come from trained layers, so that their gradients (which
    the sampler-only path computes in mbclip's own backward through time, not the native kernel) reach weights."""

    def __init__(self, rnn: nn.RNNBase, packed: bool):
        super().__init__()
        directions = 2 if rnn.bidirectional else 1
        real_hidden = rnn.proj_size if getattr(rnn, "proj_size", 0) else rnn.hidden_size
        self.states = rnn.num_layers * directions
        self.front = nn.Linear(FEATURES, FEATURES)
        self.initial_h = nn.Linear(FEATURES, self.states * real_hidden)
        self.initial_c = nn.Linear(FEATURES, self.states * rnn.hidden_size) if isinstance(rnn, nn.LSTM) else None
        self.rnn = rnn
        self.packed = packed

    def _state(self, layer: nn.Linear, summary: torch.Tensor) -> torch.Tensor:
        return layer(summary).tanh().view(summary.shape[0], self.states, -1).transpose(0, 1).contiguous()

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        summary = x.mean(dim=1)
        h0 = self._state(self.initial_h, summary)
        state = (h0, self._state(self.initial_c, summary)) if self.initial_c is not None else h0
        inputs = torch.tanh(self.front(x))
        if self.packed:
            inputs = pack_padded_sequence(inputs, lengths, batch_first=True, enforce_sorted=False)
        output, hidden = self.rnn(inputs, state)
        if self.packed:
            output, _ = pad_packed_sequence(output, batch_first=True, total_length=T)
        h_n = hidden[0] if isinstance(hidden, tuple) else hidden
        per_sample = output.sin().pow(2).sum(dim=(1, 2)) + h_n.sin().sum(dim=(0, 2))
        if isinstance(hidden, tuple):
            per_sample = per_sample + hidden[1].pow(2).sum(dim=(0, 2))
        return per_sample


def _count_node_backwards(counts):
    """Wrap :func:`recurrent.backward_through_layers`, counting its calls by the sampler and by the node itself."""
    original = recurrent.backward_through_layers

    def counted(module, record, grad_out, grad_hn, grad_cn, layout):
        counts["sampler" if layout is not None else "node"] += 1
        return original(module, record, grad_out, grad_hn, grad_cn, layout)

    return mock.patch.object(recurrent, "backward_through_layers", counted)


@pytest.mark.parametrize("kind", sorted(RNN_FACTORIES))
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("microbatch_size", [1, 2])
def test_input_and_state_gradients_on_the_sampler_only_path(
    recurrent_path, kind, packed, bidirectional, microbatch_size
):
    """The layers before a recurrent layer (its input, h0 and c0) get exact gradients on the sampler-only path,
    where the layer's backward is mbclip's backward through time: the sampler's, handed on without a second one."""
    torch.manual_seed(0)
    rnn = RNN_FACTORIES[kind](num_layers=2, bidirectional=bidirectional, batch_first=True)
    model = FedRecurrent(rnn, packed).double()
    x, _, _ = make_data(rnn, "unsorted" if packed else "")
    lengths = torch.tensor(LENGTHS)
    counts = {"sampler": 0, "node": 0}
    with (
        _count_node_backwards(counts),
        mock.patch.object(recurrent._SampledRecurrence, "apply", wraps=recurrent._SampledRecurrence.apply) as applied,
    ):
        check_update(model, lambda m: m(x, lengths), B, microbatch_size)
    assert counts["node"] == 0  # the node took the sampler's input gradients
    if recurrent_path == "recorded":
        assert applied.called  # by the sampler-only run (the checked one differentiates the native kernels)


@pytest.mark.parametrize("kind", sorted(RNN_FACTORIES))
def test_sampler_only_path_with_dropout_and_projection_matches_the_checked_path(recurrent_path, kind):
    """Dropout between layers (the masks drawn in the node's forward) and an LSTM projection: the sampler-only
    path's update equals the checked path's, whose input gradients come from the native kernels."""
    torch.manual_seed(0)
    projection = {"proj_size": 2} if kind == "lstm" else {}
    rnn = RNN_FACTORIES[kind](num_layers=3, dropout=0.4, bidirectional=True, batch_first=True, **projection)
    model = FedRecurrent(rnn, packed=True).double()
    x, _, _ = make_data(rnn, "unsorted")
    lengths = torch.tensor(LENGTHS)
    mbclip_update(model, lambda m, samples: m(x, lengths)[samples], 2, max_grad_norm=0.5)


def _after_checked_step(model, x, lengths):
    """``model`` wrapped (lr 0: its weights stay), with the checked first step taken: what follows runs on the
    sampler-only path."""
    wrapped, optimizer, _ = MicroBatchClipping().make_clipped(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), microbatch_size=1, max_grad_norm=0.5
    )
    wrapped(x, lengths).mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    return wrapped, optimizer


def test_input_gradient_without_the_sampler_is_the_native_one(recurrent_path):
    """A backward that does not sample (``torch.autograd.grad`` on the input) gets the node's own backward through
    time: the native kernel's input and state gradients."""
    torch.manual_seed(0)
    model = FedRecurrent(nn.LSTM(FEATURES, HIDDEN, num_layers=2, bidirectional=True, batch_first=True), True)
    model = model.double()
    x, _, _ = make_data(model.rnn, "unsorted")
    x.requires_grad_()
    lengths = torch.tensor(LENGTHS)
    expected = torch.autograd.grad(model(x, lengths).sum(), x)[0]
    wrapped, _ = _after_checked_step(model, x, lengths)  # lr 0: the weights stay those of ``expected``
    counts = {"sampler": 0, "node": 0}
    with _count_node_backwards(counts):
        actual = torch.autograd.grad(wrapped(x, lengths).sum(), x)[0]
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-14)
    assert counts["sampler"] == 0 and (counts["node"] == 1 or recurrent_path == "looped")


# Relative over all parameters, as for the other layers (tests/test_reliability.py).
AUTOCAST_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3}


@pytest.mark.parametrize("dtype", list(AUTOCAST_TOLERANCE))
@pytest.mark.parametrize("verify_gradients", ["always", "never"])
def test_autocast_runs_backward_through_time_in_float32(recurrent_path, dtype, verify_gradients):
    """Under CPU autocast the native kernels run in low precision; the sampler's backward through time (and the
    input gradients it hands on) run in float32, and the update stays close to the float32 one."""

    def update(autocast_dtype):
        torch.manual_seed(0)
        model = FedRecurrent(nn.LSTM(FEATURES, HIDDEN, num_layers=2, batch_first=True), packed=False).float()
        x, _, _ = make_data(model.rnn, "")
        x = x.float()
        wrapped, optimizer, _ = MicroBatchClipping().make_clipped(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            microbatch_size=1,
            max_grad_norm=0.5,
            verify_gradients=verify_gradients,
        )
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            loss = wrapped(x, torch.tensor(LENGTHS)).float().mean()
        loss.backward()
        optimizer.pre_step()
        return [p.grad for p in model.parameters()]

    expected = update(None)
    actual = update(dtype)
    assert all(g.dtype == torch.float32 for g in actual)
    assert_close_update(actual, expected, rtol=AUTOCAST_TOLERANCE[dtype])


class EncoderDecoder(nn.Module):
    """A sequence-to-sequence pair: the decoder starts from the encoder's final states, so the decoder's h0 and c0
    gradients (from its node's backward) are the encoder's h_n and c_n gradients."""

    def __init__(self, kind: str):
        super().__init__()
        self.encoder = RNN_FACTORIES[kind](num_layers=2, batch_first=True)
        self.decoder = RNN_FACTORIES[kind](num_layers=2, batch_first=True)
        self.head = nn.Linear(HIDDEN, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, state = self.encoder(x)
        output, _ = self.decoder(x.flip(1), state)
        return self.head(output).pow(2).sum(dim=(1, 2))


@pytest.mark.parametrize("kind", sorted(RNN_FACTORIES))
@pytest.mark.parametrize("microbatch_size", [1, 2])
def test_encoder_decoder_states_carry_exact_gradients(kind, microbatch_size):
    torch.manual_seed(0)
    model = EncoderDecoder(kind).double()
    x, _, _ = make_data(model.encoder, "")
    check_update(model, lambda m: m(x), B, microbatch_size)


@pytest.mark.parametrize("kind", sorted(RNN_FACTORIES))
def test_second_order_input_gradients_match_the_plain_model(recurrent_path, kind):
    """``create_graph=True`` through a recurrent layer on the sampler-only path (its node's backward re-runs the
    native kernels differentiably): the input gradient and its own gradient are the plain model's."""
    torch.manual_seed(0)
    model = FedRecurrent(RNN_FACTORIES[kind](num_layers=2, bidirectional=True, batch_first=True), True).double()
    x, _, _ = make_data(model.rnn, "unsorted")
    lengths = torch.tensor(LENGTHS)

    def input_gradients(net):
        inputs = x.clone().requires_grad_()
        (first,) = torch.autograd.grad(net(inputs, lengths).sum(), inputs, create_graph=True)
        (second,) = torch.autograd.grad(first.pow(2).sum(), inputs)
        return first.detach(), second

    expected = input_gradients(copy.deepcopy(model))
    wrapped, _ = _after_checked_step(model, x, lengths)
    for actual, wanted in zip(input_gradients(wrapped), expected):
        torch.testing.assert_close(actual, wanted, rtol=1e-10, atol=1e-12)


def test_gradient_penalty_through_a_recurrent_layer_is_refused_at_the_step(recurrent_path):
    """A loss built from the input gradient reaches the weights through the double backward, which no sampler
    splits: on the sampler-only path too the step refuses it by name, and nothing changes."""
    torch.manual_seed(0)
    model = FedRecurrent(nn.LSTM(FEATURES, HIDDEN, num_layers=3, dropout=0.3, batch_first=True), False).double()
    x, _, _ = make_data(model.rnn, "")
    lengths = torch.tensor(LENGTHS)
    wrapped, optimizer = _after_checked_step(model, x, lengths)
    before = [p.detach().clone() for p in model.parameters()]
    inputs = x.clone().requires_grad_()
    loss = wrapped(inputs, lengths).mean()
    (gradient,) = torch.autograd.grad(loss, inputs, create_graph=True)
    (loss + gradient.pow(2).sum()).backward()
    with pytest.raises(BatchError, match=r"a gradient penalty through torch\.autograd\.grad"):
        optimizer.step()
    for p, old in zip(model.parameters(), before):
        assert torch.equal(p, old)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_several_backward_passes_before_one_step(kind):
    """Two sampled passes (three and two samples at b = 1) before one step, twice, checked every step: the update is
    the mean over all five micro-batches. On the looped path a pass's sums are the gradients of per-micro-batch
    identities on the weights, which autograd also accumulates into the weights' own gradients on checked steps."""
    model = SequenceModel(RNN_FACTORIES[kind](batch_first=True).double())
    x, _, _ = make_data(model.rnn, "")
    plain = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped, clipped, _ = MicroBatchClipping().make_clipped(
        module=model, optimizer=optimizer, microbatch_size=1, max_grad_norm=0.5, verify_gradients="always"
    )
    for _ in range(2):
        expected = reference_update(plain, lambda net, samples: net(x[samples]), B, 1, max_grad_norm=0.5)
        clipped.zero_grad()
        wrapped(x[:3]).mean().backward()
        wrapped(x[3:]).mean().backward()
        assert clipped.pre_step()
        assert_close_update([p.grad for p in model.parameters()], expected.update)
        optimizer.step()
        plain.load_state_dict(model.state_dict())
