"""Step time of a 2x256 LSTM (B=32, T=64) with mbclip at several micro-batch sizes, against a plain step."""

from __future__ import annotations

import statistics
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


def seconds(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def main(repeats: int = 5) -> None:
    """Plain and clipped steps alternate, so a machine whose load changes affects both alike; medians reported."""
    torch.manual_seed(0)
    x = torch.randn(B, T, FEATURES)
    plain_model = Model()
    plain_optimizer = torch.optim.SGD(plain_model.parameters(), lr=1e-3)

    def plain_step():
        plain_optimizer.zero_grad()
        plain_model(x).mean().backward()
        plain_optimizer.step()

    print(f"2x{HIDDEN} LSTM, B={B}, T={T}, threads={torch.get_num_threads()}")
    for microbatch_size in (1, 2, 4, 8, 32):
        model = Model()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        wrapped, clipped, _ = MicroBatchClipping().make_clipped(
            module=model, optimizer=optimizer, microbatch_size=microbatch_size, max_grad_norm=1.0
        )

        def clipped_step(wrapped=wrapped, clipped=clipped):
            clipped.zero_grad()
            wrapped(x).mean().backward()
            clipped.step()

        plain_step(), clipped_step()  # warm-up
        plain_times, clipped_times = [], []
        for _ in range(repeats):
            plain_times.append(seconds(plain_step))
            clipped_times.append(seconds(clipped_step))
        plain, mine = statistics.median(plain_times), statistics.median(clipped_times)
        ratio = mine / plain
        print(f"b={microbatch_size:>2}: plain {plain * 1e3:.1f} ms, mbclip {mine * 1e3:.1f} ms, ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
