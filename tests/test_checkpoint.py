"""Save, load with ``weights_only=True``, continue: bit-exactly the run that never stopped."""

from __future__ import annotations

import io

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from mbclip import ConfigurationError, MicroBatchClipping
from toy_models import small_data, small_model

SETTINGS = {
    "clipped": dict(microbatch_size=3, max_grad_norm=0.5),
    "per_layer": dict(microbatch_size=2, clipping="per_layer", max_grad_norm=0.3),
    "dp": dict(microbatch_size=1, max_grad_norm=0.5, noise_multiplier=0.8),
}


def build(name: str, init_seed: int = 0):
    """Model, Adam, engine and loader for one setting; the noise generator is seeded the same every time."""
    model = small_model(seed=init_seed)
    x, y = small_data(24)
    loader = DataLoader(TensorDataset(x, y), batch_size=6)
    engine = MicroBatchClipping(accountant="rdp")
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    settings = dict(SETTINGS[name])
    if "noise_multiplier" in settings:
        settings["noise_generator"] = torch.Generator().manual_seed(7)
    wrapped, clipped, loader = engine.make_clipped(module=model, optimizer=optimizer, data_loader=loader, **settings)
    return engine, wrapped, clipped, loader


def train_epoch(wrapped, clipped, loader) -> None:
    for x, y in loader:
        clipped.zero_grad()
        ((wrapped(x) - y) ** 2).sum(dim=1).mean().backward()
        clipped.step()


def save(engine, wrapped, clipped) -> bytes:
    buffer = io.BytesIO()
    torch.save(
        {
            "model": wrapped.state_dict(),
            "optimizer": clipped.state_dict(),
            "engine": engine.state_dict(),
            "rng": torch.get_rng_state(),  # Poisson sampling draws from torch's global generator
        },
        buffer,
    )
    return buffer.getvalue()


@pytest.mark.parametrize("name", list(SETTINGS))
def test_resume_is_bit_exact(name):
    torch.manual_seed(11)
    engine, wrapped, clipped, loader = build(name)
    for _ in range(3):
        train_epoch(wrapped, clipped, loader)
    uninterrupted = [p.detach().clone() for p in wrapped.parameters()]

    torch.manual_seed(11)
    engine, wrapped, clipped, loader = build(name)
    train_epoch(wrapped, clipped, loader)
    checkpoint = save(engine, wrapped, clipped)
    epsilon = engine.get_epsilon(1e-5) if name == "dp" else None

    engine, wrapped, clipped, loader = build(name, init_seed=99)  # a new process: other weights, fresh state
    state = torch.load(io.BytesIO(checkpoint), weights_only=True)
    wrapped.load_state_dict(state["model"])
    clipped.load_state_dict(state["optimizer"])
    engine.load_state_dict(state["engine"])
    torch.set_rng_state(state["rng"])
    if name == "dp":
        assert engine.get_epsilon(1e-5) == epsilon
    for _ in range(2):
        train_epoch(wrapped, clipped, loader)
    resumed = [p.detach() for p in wrapped.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, resumed))


def test_resumed_run_goes_on_unchecked_after_the_first_step_was_checked():
    """The resumed run takes the same path as the run that never stopped (verify_gradients="first")."""
    engine, wrapped, clipped, loader = build("clipped")
    assert wrapped.check_gradients
    checkpoint_before_any_step = clipped.state_dict()
    train_epoch(wrapped, clipped, loader)
    assert not wrapped.check_gradients
    checkpoint = clipped.state_dict()

    engine, wrapped, clipped, loader = build("clipped")
    clipped.load_state_dict(checkpoint_before_any_step)
    assert wrapped.check_gradients  # nothing was checked yet: the first step after loading is checked
    clipped.load_state_dict(checkpoint)
    assert not wrapped.check_gradients


def test_dp_epsilon_continues_from_the_checkpoint():
    torch.manual_seed(0)
    engine, wrapped, clipped, loader = build("dp")
    train_epoch(wrapped, clipped, loader)
    train_epoch(wrapped, clipped, loader)
    two_epochs = engine.get_epsilon(1e-5)
    torch.manual_seed(0)
    engine, wrapped, clipped, loader = build("dp")
    train_epoch(wrapped, clipped, loader)
    state = torch.load(io.BytesIO(save(engine, wrapped, clipped)), weights_only=True)
    engine, wrapped, clipped, loader = build("dp")
    engine.load_state_dict(state["engine"])
    train_epoch(wrapped, clipped, loader)
    assert engine.get_epsilon(1e-5) == pytest.approx(two_epochs, rel=1e-12)


def test_optimizer_state_refuses_other_clipping_settings():
    _, _, clipped, _ = build("clipped")
    state = clipped.state_dict()
    _, _, other, _ = build("per_layer")
    with pytest.raises(ConfigurationError, match="other micro-batch clipping settings.*microbatch_size"):
        other.load_state_dict(state)
    with pytest.raises(ConfigurationError, match="state_dict"):
        other.load_state_dict([1, 2])


def test_engine_state_refuses_a_different_path():
    engine, *_ = build("dp")
    other, *_ = build("clipped")
    with pytest.raises(ConfigurationError, match="privacy accounting"):
        other.load_state_dict(engine.state_dict())
    with pytest.raises(ConfigurationError, match="engine.state_dict"):
        other.load_state_dict({"history": []})


def test_plain_optimizer_loads_the_mbclip_optimizer_state():
    _, wrapped, clipped, loader = build("clipped")
    train_epoch(wrapped, clipped, loader)
    plain = torch.optim.Adam(wrapped.parameters(), lr=0.01)
    plain.load_state_dict(torch.load(io.BytesIO(save_state(clipped.state_dict())), weights_only=True))
    assert plain.state_dict()["state"][0]["step"] == 4


def save_state(state) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()
