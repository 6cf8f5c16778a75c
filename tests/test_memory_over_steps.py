"""Nothing a step records outlives it: layer calls, hooks and autograd graphs are freed by reference counting.

Recorded attention hooks an output together with an intermediate upstream of it; torch's multi-tensor hook holds
both graph nodes, a reference cycle through the autograd graph that Python's garbage collector cannot see. Before
the fix every step leaked its whole graph (activations included) on models with attention.
"""

from __future__ import annotations

import copy
import gc
import io
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mbclip import MicroBatchClipping
from mbclip.samplers import LayerCall
from toy_models import ConformerClassifier


class AttentionClassifier(nn.Module):
    def __init__(self, dim: int = 8):
        super().__init__()
        self.inp = nn.Linear(8, dim)
        self.layer = nn.TransformerEncoderLayer(dim, 2, 16, dropout=0.0, batch_first=True)
        self.out = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.layer(self.inp(x)).mean(dim=1))


def _wrap(model: nn.Module, verify_gradients: str):
    wrapped, optimizer, _ = MicroBatchClipping().make_clipped(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        microbatch_size=2,
        max_grad_norm=1.0,
        verify_gradients=verify_gradients,
    )
    return wrapped, optimizer


def _live(kind) -> int:
    gc.collect()
    return sum(isinstance(obj, kind) for obj in gc.get_objects())


@pytest.mark.parametrize("make_model", [AttentionClassifier, ConformerClassifier], ids=["mha", "relpos_conformer"])
@pytest.mark.parametrize("verify_gradients", ["always", "never"])
def test_steps_leave_nothing_behind(make_model, verify_gradients):
    torch.manual_seed(0)
    model = make_model()
    x, y = torch.randn(6, 16, 8), torch.randint(0, 3, (6,))
    wrapped, optimizer = _wrap(model, verify_gradients)

    def step():
        optimizer.zero_grad()
        F.cross_entropy(wrapped(x), y).backward()
        optimizer.step()

    for _ in range(2):
        step()
    calls, tensors = _live(LayerCall), _live(torch.Tensor)
    for _ in range(4):
        step()
    assert _live(LayerCall) <= calls
    assert _live(torch.Tensor) <= tensors


class CrossAttention(nn.Module):
    """Attention whose query differs from its keys: the sampler runs the layer's code again in backward."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.inp = nn.Linear(8, dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.out = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.out(self.attn(h[:, :4], h, h, need_weights=False)[0].mean(dim=1))


@pytest.mark.parametrize("verify_gradients", ["always", "never"])
def test_a_sampler_running_its_layer_again_records_no_call(verify_gradients):
    torch.manual_seed(0)
    model = CrossAttention()
    x, y = torch.randn(6, 16, 8), torch.randint(0, 3, (6,))
    wrapped, optimizer = _wrap(model, verify_gradients)
    loss = F.cross_entropy(wrapped(x), y)
    recorded = len(wrapped._open_calls)
    loss.backward()
    assert len(wrapped._open_calls) == recorded
    assert all(p.requires_grad for p in model.parameters())
    optimizer.step()


def test_a_wrapped_model_can_be_saved_and_copied_mid_step():
    """torch.save / deepcopy between backward and step (a checkpoint callback, an EMA copy) see no autograd state."""
    torch.manual_seed(0)
    model = AttentionClassifier()
    wrapped, optimizer = _wrap(model, "never")
    x, y = torch.randn(6, 16, 8), torch.randint(0, 3, (6,))
    F.cross_entropy(wrapped(x), y).backward()
    torch.save(wrapped, io.BytesIO())
    copy.deepcopy(wrapped)
    optimizer.step()


@pytest.mark.parametrize("make_model", [AttentionClassifier, ConformerClassifier], ids=["mha", "relpos_conformer"])
@pytest.mark.parametrize("verify_gradients", ["always", "never"])
def test_watched_tensors_are_not_kept_alive_by_mbclip(make_model, verify_gradients, monkeypatch):
    """What a recording forward watches is read once: after the forward only autograd (if anything) holds it, so
    the attention's in-projection output, which backward does not need, is freed before backward."""
    from mbclip.models import relpos_sampler
    from mbclip.samplers import attention_recording

    watched = []
    for module in (attention_recording, relpos_sampler):
        original = module.watch

        def spy(output, tensors, original=original):
            watched.append([weakref.ref(t) for t in tensors])
            original(output, tensors)

        monkeypatch.setattr(module, "watch", spy)
    torch.manual_seed(0)
    model = make_model()
    x, y = torch.randn(6, 16, 8), torch.randint(0, 3, (6,))
    wrapped, optimizer = _wrap(model, verify_gradients)
    for _ in range(2):
        optimizer.zero_grad()
        loss = F.cross_entropy(wrapped(x), y)
        assert watched and not any(hasattr(t, "_mbclip_watched") for t in gc.get_objects() if torch.is_tensor(t))
        if make_model is AttentionClassifier:  # the [T, B, 3E] projection: nothing in the graph saves it
            assert all(ref() is None for ref in watched[-1])
        loss.backward()
        optimizer.step()
        assert optimizer.last_step.applied
        watched.clear()
