"""Minimal end-to-end example: train a small classifier with micro-batch clipping, offline.

Run: python tutorials/quickstart.py
The data is synthetic, made here (no download). The script trains the same model
plainly and with micro-batch clipping and prints both losses and what clipping did in the last step.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mbclip import MicroBatchClipping


def make_data(num_samples: int = 512, seed: int = 0) -> TensorDataset:
    """Two interleaved classes with 5% flipped labels: the 'draggers' clipping should down-weight."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(num_samples, 8, generator=generator)
    labels = (features[:, 0] * features[:, 1] > 0).long()
    flipped = torch.rand(num_samples, generator=generator) < 0.05
    labels[flipped] = 1 - labels[flipped]
    return TensorDataset(features, labels)


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 2))


def train(microbatch_size: int | None, epochs: int, seed: int = 0) -> float:
    torch.manual_seed(seed)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    loader = DataLoader(make_data(), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed))
    if microbatch_size is not None:
        model, optimizer, loader = MicroBatchClipping().make_clipped(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            microbatch_size=microbatch_size,
            max_grad_norm=1.0,
            clipping="fixed",
        )
    for _ in range(epochs):
        for features, labels in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(features), labels).backward()
            optimizer.step()
    if microbatch_size is not None:
        step = optimizer.last_step
        print(
            f"  last step: {step.num_microbatches} micro-batches, {step.fraction_clipped:.0%} clipped, "
            f"norms {step.microbatch_norms.min():.3f}..{step.microbatch_norms.max():.3f}"
        )
    model.eval()
    features, labels = make_data(seed=1).tensors
    with torch.no_grad():
        return float(F.cross_entropy(model(features), labels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--microbatch-size", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"plain training:           held-out loss {train(None, args.epochs):.4f}")
    clipped = train(args.microbatch_size, args.epochs)
    print(f"micro-batch clipping b={args.microbatch_size}: held-out loss {clipped:.4f}")


if __name__ == "__main__":
    main()
