"""mbclip's fixed cost per layer call and per parameter, on a deep model of tiny layers where nothing else counts.

The model is ``depth`` blocks of ``Linear(width, width)`` + ``LayerNorm(width)`` on a batch of ``batch_size``
rows, so its math is negligible and a step's time is hooks, samplers and the step's small operations. It prints
plain and mbclip forward / backward / step times (minimum and median over interleaved rounds) and the difference
per layer call (forward, backward) and per parameter (step). Single-threaded by default: the minima are then
steady enough to compare two versions of mbclip on a busy machine.

    python benchmarks/per_call_overhead.py [--depth 25] [--microbatch-size 1] [--rounds 300] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Callable, List, Tuple

import torch
from torch import nn

from mbclip import MicroBatchClipping

Phases = Tuple[float, float, float]


def tiny_model(depth: int, width: int) -> nn.Module:
    blocks = [nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width)) for _ in range(depth)]
    return nn.Sequential(*blocks, nn.Linear(width, 1))


def timed_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> Callable[[], Phases]:
    def sync() -> None:
        if batch.device.type == "cuda":
            torch.cuda.synchronize(batch.device)

    def step() -> Phases:
        optimizer.zero_grad(set_to_none=True)
        sync()
        start = time.perf_counter()
        loss = model(batch).pow(2).mean()
        sync()
        forward = time.perf_counter()
        loss.backward()
        sync()
        backward = time.perf_counter()
        optimizer.step()
        sync()
        return forward - start, backward - forward, time.perf_counter() - backward

    return step


def summary(rounds: List[Phases], phase: int) -> Tuple[float, float]:
    values = [r[phase] for r in rounds]
    return min(values), statistics.median(values)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=25, help="Linear + LayerNorm blocks")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--microbatch-size", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device; run on cpu")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    base = tiny_model(args.depth, args.width).to(device)
    batch = torch.randn(args.batch_size, args.width, device=device)
    plain = copy.deepcopy(base)
    plain_step = timed_step(plain, torch.optim.SGD(plain.parameters(), lr=1e-3), batch)
    clipped = copy.deepcopy(base)
    wrapped, optimizer, _ = MicroBatchClipping().make_clipped(
        module=clipped,
        optimizer=torch.optim.SGD(clipped.parameters(), lr=1e-3),
        microbatch_size=args.microbatch_size,
        max_grad_norm=1.0,
    )
    mbclip_step = timed_step(wrapped, optimizer, batch)
    for _ in range(5):  # the first mbclip step is the checked one
        plain_step()
        mbclip_step()
    plain_rounds, mbclip_rounds = [], []
    for _ in range(args.rounds):
        plain_rounds.append(plain_step())
        mbclip_rounds.append(mbclip_step())
    calls = 2 * args.depth + 1
    params = sum(1 for _ in base.parameters())
    print(
        f"# {calls} layer calls, {params} parameters, B={args.batch_size}, b={args.microbatch_size}, "
        f"{args.device}, {args.threads} thread(s), {args.rounds} rounds; ms as min / median"
    )
    print("| phase    | plain         | mbclip        | mbclip - plain (min)  |")
    print("|----------|---------------|---------------|-----------------------|")
    for phase, (name, count, unit) in enumerate(
        [("forward", calls, "call"), ("backward", calls, "call"), ("step", params, "parameter")]
    ):
        plain_min, plain_median = summary(plain_rounds, phase)
        mbclip_min, mbclip_median = summary(mbclip_rounds, phase)
        extra = (mbclip_min - plain_min) / count * 1e6
        print(
            f"| {name:<8} | {plain_min * 1e3:5.2f} / {plain_median * 1e3:5.2f} | "
            f"{mbclip_min * 1e3:5.2f} / {mbclip_median * 1e3:5.2f} | {extra:6.0f} us per {unit:<9} |"
        )


if __name__ == "__main__":
    main()
