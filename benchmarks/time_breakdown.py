"""Where mbclip's step time goes: forward, backward and step against plain, each sampled layer, each step phase.

Runs plain and mbclip steps of a ``step_time.py`` model interleaved, timing forward, backward and ``step()`` of
each, and times mbclip's own functions inside the mbclip steps by wrapping them, in this process only: each sampled
layer's work in backward (its sampler and the storing of its micro-batch sums) and, in the step, collecting the
sums, their norms, the weighted sums and the rest of the clipping. Every figure is the median over rounds of its
per-step total. Use it to see which layer or phase a model's cost over plain comes from; ``step_time.py`` is the
benchmark to quote.

    python benchmarks/time_breakdown.py --models conformer --microbatch-sizes 1,4 [--rounds 30] [--device cpu]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import pathlib
import statistics
import sys
import time
from collections import defaultdict
from typing import Callable, Dict, Iterator, List, Tuple

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import step_time  # noqa: E402  (the models, batches and losses of the step-time benchmark)

import mbclip.optimizer as mbclip_optimizer  # noqa: E402
from mbclip import MicroBatchClipping  # noqa: E402
from mbclip.grad_module import MicroBatchGradSampleModule  # noqa: E402

PHASES = ("forward", "backward", "step")
LAYER = "layer "
COLLECT = "step: collect the sums"
CLIPPING = "step: clip and average"
NORMS = "step: norms"
WEIGHTED_SUMS = "step: weighted sums"


class Timers:
    """Per-step totals and call counts of wrapped functions, keyed by name."""

    def __init__(self, device: torch.device):
        self.device = device
        self.enabled = False
        self.totals: Dict[str, float] = defaultdict(float)
        self.calls: Dict[str, int] = defaultdict(int)

    def timed(self, fn: Callable, name: Callable[..., str]) -> Callable:
        """``fn`` timed under ``name(*args)`` while enabled (synchronized on CUDA, so a phase holds its kernels)."""

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if not self.enabled:
                return fn(*args, **kwargs)
            step_time.synchronize(self.device)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                step_time.synchronize(self.device)
                key = name(*args)
                self.totals[key] += time.perf_counter() - start
                self.calls[key] += 1

        return wrapper

    def take(self) -> Tuple[Dict[str, float], Dict[str, int]]:
        """This step's totals and counts, reset for the next step."""
        totals, calls = dict(self.totals), dict(self.calls)
        self.totals.clear()
        self.calls.clear()
        return totals, calls


def _layer_key(_self, module, layer, *_args) -> str:
    return f"{layer.name or '(model)'} ({type(module).__name__})"


@contextlib.contextmanager
def wrapped(timers: Timers) -> Iterator[None]:
    """mbclip's sampling and step functions wrapped with ``timers``; restored on exit."""
    patches = [
        (MicroBatchGradSampleModule, "_on_output_grads", lambda *a: LAYER + _layer_key(*a)),
        (MicroBatchGradSampleModule, "collect", lambda *a: COLLECT),
        (mbclip_optimizer.MicroBatchOptimizer, "_apply", lambda *a: CLIPPING),
        (mbclip_optimizer, "norms_of", lambda *a: NORMS),
        (mbclip_optimizer, "weighted_sums_of", lambda *a: WEIGHTED_SUMS),
    ]
    originals = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in patches]
    try:
        for owner, attr, name in patches:
            setattr(owner, attr, timers.timed(getattr(owner, attr), name))
        yield
    finally:
        for owner, attr, original in originals:
            setattr(owner, attr, original)


def phased_step(model, optimizer, spec, batch, device) -> Callable[[], Tuple[float, float, float]]:
    """One training step that returns its forward, backward and step times."""

    def step() -> Tuple[float, float, float]:
        optimizer.zero_grad(set_to_none=True)
        step_time.synchronize(device)
        start = time.perf_counter()
        loss = spec.per_sample_losses(model, *batch).mean()
        step_time.synchronize(device)
        forward = time.perf_counter()
        loss.backward()
        step_time.synchronize(device)
        backward = time.perf_counter()
        optimizer.step()
        step_time.synchronize(device)
        return forward - start, backward - forward, time.perf_counter() - backward

    return step


def breakdown(name: str, microbatch_size: int, args, device) -> None:
    spec = step_time.MODELS[name]
    torch.manual_seed(1)
    batch = spec.make_batch(args.batch_size, args.seq_len, device)
    plain_model = spec.build().to(device)
    plain = phased_step(plain_model, torch.optim.SGD(plain_model.parameters(), lr=step_time.LR), spec, batch, device)
    model = spec.build().to(device)
    wrapped_model, optimizer, _ = MicroBatchClipping().make_clipped(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=step_time.LR),
        microbatch_size=microbatch_size,
        max_grad_norm=step_time.MAX_GRAD_NORM,
    )
    clipped = phased_step(wrapped_model, optimizer, spec, batch, device)
    timers = Timers(device)
    plain_phases: List[Tuple[float, float, float]] = []
    clipped_phases: List[Tuple[float, float, float]] = []
    parts: List[Dict[str, float]] = []
    counts: Dict[str, int] = {}
    with wrapped(timers):
        for _ in range(2):  # warm-up: the checked first step, then one on the sampler-only path
            plain()
            clipped()
        for _ in range(args.rounds):
            plain_phases.append(plain())
            timers.enabled = True
            clipped_phases.append(clipped())
            timers.enabled = False
            totals, calls = timers.take()
            parts.append(totals)
            counts.update(calls)
    print_breakdown(name, microbatch_size, plain_phases, clipped_phases, parts, counts, args.rounds)


def _median_ms(values: List[float]) -> float:
    return statistics.median(values) * 1e3


def print_breakdown(name, microbatch_size, plain_phases, clipped_phases, parts, counts, rounds) -> None:
    plain_total = _median_ms([sum(p) for p in plain_phases])
    clipped_total = _median_ms([sum(p) for p in clipped_phases])
    print(
        f"\n## {name}, b = {microbatch_size}: plain {plain_total:.1f} ms, mbclip {clipped_total:.1f} ms "
        f"({clipped_total / plain_total:.2f}x; medians of {rounds} rounds)"
    )
    print("| phase    | plain ms | mbclip ms | more ms |")
    print("|----------|---------:|----------:|--------:|")
    for index, phase in enumerate(PHASES):
        plain_ms = _median_ms([p[index] for p in plain_phases])
        clipped_ms = _median_ms([p[index] for p in clipped_phases])
        print(f"| {phase:<8} | {plain_ms:>8.2f} | {clipped_ms:>9.2f} | {clipped_ms - plain_ms:>7.2f} |")
    medians = {key: _median_ms([part.get(key, 0.0) for part in parts]) for key in counts}
    step_ms = _median_ms([p[2] for p in clipped_phases])
    clipping = medians.get(CLIPPING, 0.0)
    norms, weighted = medians.get(NORMS, 0.0), medians.get(WEIGHTED_SUMS, 0.0)
    rows = [
        (COLLECT, medians.get(COLLECT, 0.0), counts.get(COLLECT, 0)),
        (NORMS, norms, counts.get(NORMS, 0)),
        (WEIGHTED_SUMS, weighted, counts.get(WEIGHTED_SUMS, 0)),
        ("step: the rest of the clipping", clipping - norms - weighted, None),
        ("step: the rest (the user's optimizer, bookkeeping)", step_ms - clipping - medians.get(COLLECT, 0.0), None),
    ]
    layer_keys = sorted((key for key in medians if key.startswith(LAYER)), key=lambda key: -medians[key])
    rows += [(key.removeprefix(LAYER), medians[key], counts[key]) for key in layer_keys]
    rows.append(("every sampled layer in backward", sum(medians[key] for key in layer_keys), None))
    print("\n| mbclip's work, per step (median ms)                  |     ms | calls |")
    print("|------------------------------------------------------|-------:|------:|")
    for label, ms, calls in rows:
        print(f"| {label[:52]:<52} | {ms:>6.2f} | {'' if calls is None else calls:>5} |")
    sys.stdout.flush()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--models", default="cnn", help=f"comma-separated, from {','.join(step_time.MODELS)}")
    parser.add_argument("--microbatch-sizes", default="1,4")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64, help="frames or tokens per sample (not used by cnn)")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds (after two warm-up steps)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument(
        "--keep-freed-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="make glibc's malloc keep freed memory for the next step, as step_time.py does (default: on)",
    )
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in step_time.MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {list(step_time.MODELS)}")
    args.microbatch_sizes = [int(b) for b in args.microbatch_sizes.split(",") if b.strip()]
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    try:
        torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device {args.device!r}: {error}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device; run on cpu")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.keep_freed_memory:
        step_time.keep_freed_memory()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {step_time.cpu_description()}"
    print(f"# time breakdown: torch {torch.__version__}, {where}, {args.threads} threads")
    for name in args.models:
        for microbatch_size in args.microbatch_sizes:
            breakdown(name, microbatch_size, args, device)


if __name__ == "__main__":
    main()
