"""Step time of a 2x256 LSTM (B=32, T=64) with mbclip at several micro-batch sizes, against a plain step."""

from __future__ import annotations

import time

import torch
from torch import nn

from mbclip.engine import MicroBatchClipping

B, T, FEATURES, HIDDEN = 32, 64, 80, 256


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(FEATURES, HIDDEN, num_layers=2, batch_first=True)
        self.head = nn.Linear(HIDDEN, 10)

    def forward(self, x):
        return self.head(self.lstm(x)[0]).pow(2).mean(dim=(1, 2))


def timed(step, repeats: int = 10) -> float:
    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(B, T, FEATURES)
    model = Model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def plain_step():
        optimizer.zero_grad()
        model(x).mean().backward()
        optimizer.step()

    plain = timed(plain_step)
    print(f"plain step: {plain * 1e3:.1f} ms  (threads={torch.get_num_threads()})")
    for microbatch_size in (1, 2, 4, 8, 32):
        model = Model()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        wrapped, clipped, _ = MicroBatchClipping().make_clipped(
            module=model, optimizer=optimizer, microbatch_size=microbatch_size, max_grad_norm=1.0
        )

        def clipped_step():
            clipped.zero_grad()
            wrapped(x).mean().backward()
            clipped.step()

        seconds = timed(clipped_step)
        print(f"b={microbatch_size:>2}: {seconds * 1e3:.1f} ms  ratio {seconds / plain:.2f}")


if __name__ == "__main__":
    main()
