"""nn.MultiheadAttention and nn.TransformerEncoder(Layer) as users write them, against the reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import check_update
from mbclip.grad_module import MicroBatchGradSampleModule

B, T, S, E = 5, 4, 6, 8
MICROBATCH_SIZES = [1, 2, 3, B]


class AttentionModel(nn.Module):
    """Batch-first data through one ``nn.MultiheadAttention`` (time-first inside when ``batch_first=False``)."""

    def __init__(self, batch_first: bool, need_weights: bool = True, **options):
        super().__init__()
        self.batch_first = batch_first
        self.need_weights = need_weights
        self.attention = nn.MultiheadAttention(E, 2, batch_first=batch_first, **options)

    def forward(self, query, key, value, key_padding_mask=None, attn_mask=None):
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        output, weights = self.attention(
            query, key, value, key_padding_mask=key_padding_mask, attn_mask=attn_mask, need_weights=self.need_weights
        )
        if not self.batch_first:
            output = output.transpose(0, 1)
        losses = output.tanh().pow(2).sum(dim=(1, 2))
        if weights is not None:
            losses = losses + weights.pow(3).flatten(1).sum(dim=1)
        return losses


def attention_inputs(kdim=None, vdim=None, padding=False, mask=False, length=S):
    torch.manual_seed(1)
    query = torch.randn(B, T, E)
    key = torch.randn(B, length, kdim or E)
    value = torch.randn(B, length, vdim or E)
    key_padding_mask = None
    if padding:
        key_padding_mask = torch.zeros(B, length, dtype=torch.bool)
        key_padding_mask[1, -2:] = True
        key_padding_mask[3, -1:] = True
    attn_mask = torch.randn(T, length) if mask else None
    return query, key, value, key_padding_mask, attn_mask


def check_attention(b, batch_first=True, need_weights=True, clipping="fixed", inputs=None, **options):
    torch.manual_seed(0)
    model = AttentionModel(batch_first, need_weights, **options)
    inputs = inputs or attention_inputs(options.get("kdim"), options.get("vdim"))
    check_update(model, lambda m: m(*inputs), B, b, clipping)


@pytest.mark.parametrize("b", MICROBATCH_SIZES)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_batch_first_and_need_weights(b, batch_first, need_weights):
    check_attention(b, batch_first, need_weights)


@pytest.mark.parametrize("b", MICROBATCH_SIZES)
@pytest.mark.parametrize("batch_first", [True, False])
def test_key_padding_and_attn_mask(b, batch_first):
    check_attention(b, batch_first, inputs=attention_inputs(padding=True, mask=True))


@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_mask_kinds(b, mask_kind):
    query, key, value, padding, _ = attention_inputs(padding=True)
    if mask_kind == "bool":
        attn_mask = torch.zeros(T, S, dtype=torch.bool)
        attn_mask[0, -1] = True
        padding_mask = padding
    else:
        attn_mask = torch.randn(T, S)
        padding_mask = torch.zeros(B, S).masked_fill(padding, float("-inf"))
    check_attention(b, need_weights=False, inputs=(query, key, value, padding_mask, attn_mask))


@pytest.mark.parametrize("b", MICROBATCH_SIZES)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_kdim_vdim(b, batch_first, need_weights):
    check_attention(b, batch_first, need_weights, kdim=6, vdim=5)


@pytest.mark.parametrize("b", MICROBATCH_SIZES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("add_bias_kv", [True, False])
def test_bias_options(b, bias, add_bias_kv):
    check_attention(b, bias=bias, add_bias_kv=add_bias_kv, inputs=attention_inputs(padding=True))


@pytest.mark.parametrize("b", [1, 2, B])
@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_dropout(b, batch_first):
    check_attention(b, batch_first, dropout=0.3, add_bias_kv=True, kdim=6, vdim=5)


@pytest.mark.parametrize("clipping", ["fixed", "adaptive"])
def test_adaptive_clipping(clipping):
    check_attention(2, False, inputs=attention_inputs(padding=True, mask=True), clipping=clipping)


@pytest.mark.parametrize("batch_first", [True, False])
def test_time_first_when_length_equals_batch(batch_first):
    """T == B: only the layer's own ``batch_first`` tells where the batch is."""
    check_attention(2, batch_first, inputs=attention_inputs(length=B), need_weights=True)
    check_attention(2, batch_first, inputs=attention_inputs(length=B), need_weights=False)


def test_out_proj_is_owned_by_the_attention_sampler():
    model = AttentionModel(True)
    layers = dict(MicroBatchGradSampleModule(model, microbatch_size=2).hooked_layers())
    assert layers == {"attention": "multihead_attention_sampler"}


class TransformerClassifier(nn.Module):
    """Embedding -> ``nn.TransformerEncoder`` with padding mask -> masked mean pool -> class logits."""

    def __init__(self, batch_first: bool, norm_first: bool, vocab: int = 11, classes: int = 3):
        super().__init__()
        self.batch_first = batch_first
        self.embedding = nn.Embedding(vocab, E)
        layer = nn.TransformerEncoderLayer(
            E, 2, dim_feedforward=12, dropout=0.2, batch_first=batch_first, norm_first=norm_first
        )
        self.encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(E), enable_nested_tensor=False)
        self.head = nn.Linear(E, classes)

    def forward(self, tokens, padding_mask, labels):
        x = self.embedding(tokens)
        if not self.batch_first:
            x = x.transpose(0, 1)
        x = self.encoder(x, src_key_padding_mask=padding_mask)
        if not self.batch_first:
            x = x.transpose(0, 1)
        keep = (~padding_mask).unsqueeze(-1).to(x.dtype)
        pooled = (x * keep).sum(dim=1) / keep.sum(dim=1)
        return nn.functional.cross_entropy(self.head(pooled), labels, reduction="none")


@pytest.mark.parametrize("b", MICROBATCH_SIZES)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [True, False])
def test_transformer_encoder_classifier(b, batch_first, norm_first):
    torch.manual_seed(2)
    tokens = torch.randint(0, 11, (B, 7))
    lengths = torch.tensor([7, 3, 5, 7, 2])
    padding_mask = torch.arange(7).unsqueeze(0) >= lengths.unsqueeze(1)
    labels = torch.randint(0, 3, (B,))
    torch.manual_seed(0)
    model = TransformerClassifier(batch_first, norm_first)
    check_update(model, lambda m: m(tokens, padding_mask, labels), B, b)


@pytest.mark.parametrize("clipping", ["fixed", "adaptive"])
def test_single_transformer_layer_time_first(clipping):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, 4, dim_feedforward=16, dropout=0.1)
    x = torch.randn(B, T, E)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(x.transpose(0, 1)).pow(2).sum(dim=(0, 2))

    check_update(Model(), lambda m: m(x), B, 2, clipping)


@pytest.mark.parametrize("b", [1, 2, B])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_plain_attention_takes_the_one_backward_fast_path(monkeypatch, b, batch_first, need_weights):
    """Without dropout a plain attention layer never walks its graph once per micro-batch, and stays exact."""
    import mbclip.samplers.attention as attention_sampler

    def refuse(*args, **kwargs):
        raise AssertionError("the batched autograd path was taken")

    monkeypatch.setattr(attention_sampler, "autograd_microbatch_sums", refuse)
    check_attention(b, batch_first=batch_first, need_weights=need_weights, inputs=attention_inputs(padding=True))


class SelfAttentionModel(nn.Module):
    """``attention(x, x, x)``: the call mbclip records, so its gradients come from the one backward."""

    def __init__(self, batch_first: bool, need_weights: bool, mask: str, dropout: float = 0.0):
        super().__init__()
        self.batch_first, self.need_weights, self.mask = batch_first, need_weights, mask
        self.embed = nn.Linear(E, E)
        self.attention = nn.MultiheadAttention(E, 2, batch_first=batch_first, dropout=dropout)

    def masks(self, dtype):
        padding = torch.zeros(B, T, dtype=torch.bool)
        padding[1, -2:] = True
        padding[3, -1:] = True
        causal = nn.Transformer.generate_square_subsequent_mask(T, dtype=dtype)
        generator = torch.Generator().manual_seed(3)
        return {
            "none": {},
            "padding": {"key_padding_mask": padding},
            "float": {"attn_mask": torch.randn(T, T, generator=generator, dtype=dtype)},
            "bool": {"attn_mask": torch.ones(T, T, dtype=torch.bool).triu(1), "key_padding_mask": padding},
            "causal": {"attn_mask": causal, "is_causal": True},
            "per_head": {"attn_mask": torch.randn(B * 2, T, T, generator=generator, dtype=dtype)},
        }[self.mask]

    def forward(self, x):
        x = self.embed(x)
        if not self.batch_first:
            x = x.transpose(0, 1)
        output, weights = self.attention(x, x, x, need_weights=self.need_weights, **self.masks(x.dtype))
        if not self.batch_first:
            output = output.transpose(0, 1)
        losses = output.tanh().pow(2).sum(dim=(1, 2))
        return losses if weights is None else losses + weights.pow(3).flatten(1).sum(dim=1)


def _spy_recorded(monkeypatch):
    import mbclip.samplers.attention as attention_sampler

    calls = []
    recorded = attention_sampler._recorded_sums
    monkeypatch.setattr(attention_sampler, "_recorded_sums", lambda *a: calls.append(1) or recorded(*a))

    def refuse(*args, **kwargs):
        raise AssertionError("a re-run or batched autograd path was taken")

    monkeypatch.setattr(attention_sampler, "autograd_microbatch_sums", refuse)
    monkeypatch.setattr(attention_sampler, "_projection_sums", refuse)
    return calls


@pytest.mark.parametrize("b", [1, 2, B])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("mask", ["none", "padding", "float", "bool", "causal", "per_head"])
def test_recorded_self_attention_is_exact(monkeypatch, b, batch_first, need_weights, mask):
    calls = _spy_recorded(monkeypatch)
    torch.manual_seed(0)
    model = SelfAttentionModel(batch_first, need_weights, mask)
    x = torch.randn(B, T, E)
    check_update(model, lambda m: m(x), B, b)
    assert calls


@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize("need_weights", [True, False])
def test_recorded_self_attention_with_dropout_is_exact(monkeypatch, b, need_weights):
    """The real dropout masks are in the backward that delivers the gradients: no re-run, no per-micro-batch path."""
    calls = _spy_recorded(monkeypatch)
    torch.manual_seed(0)
    model = SelfAttentionModel(True, need_weights, "padding", dropout=0.3)
    x = torch.randn(B, T, E)
    check_update(model, lambda m: m(x), B, b)
    assert calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("mask", ["none", "padding", "bool", "causal", "per_head"])
def test_recording_forward_has_the_class_numerics(dtype, batch_first, need_weights, mask):
    from mbclip import MicroBatchClipping

    torch.manual_seed(0)
    model = SelfAttentionModel(batch_first, need_weights, mask, dropout=0.2).to(dtype)
    x = torch.randn(B, T, E, dtype=dtype)
    torch.manual_seed(7)
    expected = model(x)
    wrapped, _, _ = MicroBatchClipping().make_clipped(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), microbatch_size=2, max_grad_norm=1.0
    )
    torch.manual_seed(7)
    assert torch.equal(wrapped(x), expected)
