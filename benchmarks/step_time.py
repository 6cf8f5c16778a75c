"""Step time and peak memory of one training step: plain, Opacus, the naive loop and mbclip at each b.

One process, interleaved repetitions (every method runs once per round, rounds repeated), so slow
drifts of the machine hit every method alike. Every timed step of a method follows a timed plain step of the same
model, and "x plain" is the median over rounds of that pair's ratio: on a shared machine whose speed drifts by
20-30% within minutes, a paired ratio is far steadier than a ratio of two medians. Prints the median step time, that
ratio, the interquartile range of the paired ratios over rounds ("q1-q3": how far one run's ratio can be trusted),
the peak memory of one step above what was live before it (and its ratio to plain's), and the median number of minor
page faults of a timed step ("faults": pages the OS had to hand out and zero). Each round starts with an untimed
``gc.collect()``.

On Linux, glibc's malloc gives large freed blocks back to the OS, so a step can take page faults again for memory the
last step freed (on a 2-core AMD EPYC, about 10,000 a step, 40 MB, for the LSTM's plain step: some 15% of its time),
and whether it does depends on what ran before in the process: glibc raises its thresholds after freeing large blocks,
such as Opacus's per-sample gradients. So that each method's time is its own, the script first makes glibc's malloc
keep freed memory for the next step (as a training job does when started with ``MALLOC_TRIM_THRESHOLD_=1073741824
MALLOC_MMAP_THRESHOLD_=33554432``), for every method alike; ``--no-keep-freed-memory`` leaves the allocator as it is.
The header says which ran. Blocks over 32 MiB (Opacus's per-sample gradients of a large layer) still get fresh pages.

    python benchmarks/step_time.py                        # CPU, 2 threads, every model
    python benchmarks/step_time.py --device cuda --threads 8
    python benchmarks/step_time.py --models conformer,cnn --microbatch-sizes 1,8,32 --repeats 9
    python benchmarks/step_time.py --models conformer --methods mbclip --repeats 25   # plain and mbclip only
    python benchmarks/step_time.py --no-keep-freed-memory  # glibc's malloc as it comes (page faults vary by run)

Methods (all with noise 0, max_grad_norm 1, SGD):
- plain:          the model with native torch layers, ``loss.mean().backward(); opt.step()``.
- opacus:         Opacus per-sample clipping (``GradSampleModule`` + ``DPOptimizer``) on the Opacus
                  counterpart of the model (``DPMultiheadAttention`` for attention, ``DPLSTM`` for the LSTM).
- opacus_ghost:   Opacus ghost clipping (``GradSampleModuleFastGradientClipping``, two backward passes).
- naive_b{b}:     a Python loop over micro-batches, each run alone through forward and backward, clipped, averaged.
- mbclip_b{b}:    ``MicroBatchClipping().make_clipped(..., microbatch_size=b)`` with its defaults: the warm-up step is
                  the checked first step, the timed steps run the sampler-only path (``verify_gradients="first"``).

Memory: on CUDA ``torch.cuda.max_memory_allocated`` during one step minus what was allocated before it;
on CPU the peak of torch's CPU allocations during one step (from ``torch.profiler`` memory events,
a separate untimed run), also above what was live before it. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

try:
    import resource  # page-fault counts; Unix only
except ImportError:
    resource = None

# ---------------------------------------------------------------------------------------------
# Models: each one a ModelSpec; add or replace entries in MODELS to benchmark other models.
# ---------------------------------------------------------------------------------------------

Batch = Tuple[torch.Tensor, torch.Tensor]


@dataclass
class ModelSpec:
    """How to build a model, its Opacus counterpart, a batch, and per-sample losses."""

    build: Callable[[], nn.Module]
    build_opacus: Optional[Callable[[], nn.Module]]  # None: Opacus has no counterpart
    make_batch: Callable[[int, int, torch.device], Batch]  # (batch_size, seq_len, device) -> (inputs, targets)
    per_sample_losses: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # -> [B]
    description: str


def frame_losses(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over frames of a frame-wise cross entropy: logits ``[B, T, C]``, targets ``[B, T]``."""
    logits = model(inputs)
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return losses.reshape(targets.shape).mean(dim=1)


def class_losses(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(inputs), targets, reduction="none")


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, hidden: int):
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, dim))


class ConvModule(nn.Module):
    """Conformer convolution module: pointwise + GLU, depthwise Conv1d, LayerNorm, SiLU, pointwise."""

    def __init__(self, dim: int, kernel_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.pointwise_in = nn.Linear(dim, 2 * dim)
        self.depthwise = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.conv_norm = nn.LayerNorm(dim)
        self.pointwise_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D]
        y = F.glu(self.pointwise_in(self.norm(x)), dim=-1)
        y = self.depthwise(y.transpose(1, 2)).transpose(1, 2)
        return self.pointwise_out(F.silu(self.conv_norm(y)))


class ConformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, kernel_size: int, attention_cls):
        super().__init__()
        self.ff1 = FeedForward(dim, 4 * dim)
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = attention_cls(dim, heads, batch_first=True)
        self.conv = ConvModule(dim, kernel_size)
        self.ff2 = FeedForward(dim, 4 * dim)
        self.out_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + 0.5 * self.ff1(x)
        y = self.attn_norm(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        x = x + self.conv(x)
        x = x + 0.5 * self.ff2(x)
        return self.out_norm(x)


class ConformerStandIn(nn.Module):
    """A compact conformer-like encoder with ``nn.MultiheadAttention``: [B, T, F] -> [B, T, C].

    Unlike :class:`ConformerFrames` it has a like-for-like Opacus counterpart (``DPMultiheadAttention``).
    """

    def __init__(self, features=80, dim=144, heads=4, blocks=2, kernel_size=15, classes=32, attention_cls=None):
        super().__init__()
        attention_cls = attention_cls or nn.MultiheadAttention
        self.input_proj = nn.Linear(features, dim)
        self.blocks = nn.ModuleList(ConformerBlock(dim, heads, kernel_size, attention_cls) for _ in range(blocks))
        self.classifier = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_proj(x)
        for block in self.blocks:
            x = block(x)
        return self.classifier(x)


def _dp_attention():
    # DPMultiheadAttention(batch_first=True) gives other outputs than nn.MultiheadAttention with >1 head
    # (Opacus #774); it is used here only as Opacus's compute-equivalent counterpart for timing.
    from opacus.layers import DPMultiheadAttention

    return DPMultiheadAttention


def speech_batch(batch_size: int, seq_len: int, device) -> Batch:
    features = torch.randn(batch_size, seq_len, 80, device=device)
    return features, torch.randint(0, 32, (batch_size, seq_len), device=device)


class ConformerFrames(nn.Module):
    """``mbclip.models.ConformerEncoder`` (rel-pos attention, time / 4) + frame classifier: [B, T, F] -> [B, T', C]."""

    def __init__(self, features=80, dim=144, heads=4, blocks=2, classes=32):
        super().__init__()
        from mbclip.models import ConformerEncoder

        self.encoder = ConformerEncoder(num_features=features, d_model=dim, num_heads=heads, num_blocks=blocks)
        self.classifier = nn.Linear(dim, classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        lengths = torch.full((features.shape[0],), features.shape[1], device=features.device)
        encoded, _ = self.encoder(features, lengths)
        return self.classifier(encoded)


def subsampled_frame_losses(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """:func:`frame_losses` with the targets cut to the model's subsampled length."""
    logits = model(inputs)
    targets = targets[:, : logits.shape[1]]
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return losses.reshape(targets.shape).mean(dim=1)


class LSTMEncoder(nn.Module):
    """``nn.LSTM`` on the features (``front_end``: after a trained Linear + ReLU, as in an encoder whose LSTM input
    needs a gradient) and a Linear classifier per frame."""

    def __init__(self, lstm_cls=nn.LSTM, features=80, hidden=256, layers=2, classes=32, front_end=False):
        super().__init__()
        self.front_end = nn.Sequential(nn.Linear(features, features), nn.ReLU()) if front_end else nn.Identity()
        self.lstm = lstm_cls(features, hidden, num_layers=layers, batch_first=True)
        self.classifier = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.lstm(self.front_end(x))[0])


def _dp_lstm_encoder(front_end: bool = False) -> nn.Module:
    from opacus.layers import DPLSTM

    return LSTMEncoder(lstm_cls=DPLSTM, front_end=front_end)


VOCAB = 1000


class TransformerLM(nn.Module):
    """Embedding + causal ``nn.TransformerEncoder`` + Linear head: tokens [B, T] -> logits [B, T, V]."""

    def __init__(self, dim=128, heads=4, layers=2, vocab=VOCAB, layer_factory=None):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(512, dim)
        if layer_factory is None:
            layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        else:
            self.encoder = nn.Sequential(*(layer_factory(dim, heads) for _ in range(layers)))
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.pos(positions.unsqueeze(0).expand_as(tokens))
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1], device=tokens.device)
        if isinstance(self.encoder, nn.TransformerEncoder):
            x = self.encoder(x, mask=mask, is_causal=True)
        else:
            for layer in self.encoder:
                x = layer(x, mask)
        return self.head(x)


class OpacusEncoderLayer(nn.Module):
    """Post-norm encoder layer like ``nn.TransformerEncoderLayer``, from layers Opacus accepts."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn = _dp_attention()(dim, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim))
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # No causal mask: DPMultiheadAttention(batch_first=True) rejects a [T, T] mask; the mask costs ~nothing.
        x = self.norm1(x + self.attn(x, x, x, need_weights=False)[0])
        return self.norm2(x + self.ff(x))


def lm_batch(batch_size: int, seq_len: int, device) -> Batch:
    tokens = torch.randint(0, VOCAB, (batch_size, seq_len + 1), device=device)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


class SmallCNN(nn.Sequential):
    def __init__(self, classes: int = 10):
        super().__init__(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.GroupNorm(8, 32),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes),
        )  # fmt: skip


def image_batch(batch_size: int, seq_len: int, device) -> Batch:
    return torch.randn(batch_size, 3, 32, 32, device=device), torch.randint(0, 10, (batch_size,), device=device)


MODELS: Dict[str, ModelSpec] = {
    "conformer": ModelSpec(
        ConformerFrames,
        ConformerFrames,
        speech_batch,
        subsampled_frame_losses,
        "mbclip.models.ConformerEncoder (Conv2d subsampling /4, rel-pos MHSA), d=144, 4 heads, 2 blocks, 80 features",
    ),
    "conformer_mha": ModelSpec(
        ConformerStandIn,
        lambda: ConformerStandIn(attention_cls=_dp_attention()),
        speech_batch,
        frame_losses,
        "conformer-like encoder with nn.MultiheadAttention, d=144, 4 heads, 2 blocks, depthwise conv k=15",
    ),
    "lstm": ModelSpec(LSTMEncoder, _dp_lstm_encoder, speech_batch, frame_losses, "nn.LSTM 2x256 + Linear"),
    "lstm_front": ModelSpec(
        lambda: LSTMEncoder(front_end=True),
        lambda: _dp_lstm_encoder(front_end=True),
        speech_batch,
        frame_losses,
        "Linear 80x80 + ReLU front end, nn.LSTM 2x256 + Linear",
    ),
    "transformer": ModelSpec(
        TransformerLM,
        lambda: TransformerLM(layer_factory=OpacusEncoderLayer),
        lm_batch,
        frame_losses,
        "causal LM: Embedding 1000x128 + 2 nn.TransformerEncoderLayer (4 heads) + Linear",
    ),
    "cnn": ModelSpec(SmallCNN, SmallCNN, image_batch, class_losses, "3 Conv2d + GroupNorm + Linear, 3x32x32 images"),
}

# ---------------------------------------------------------------------------------------------
# Methods: each one a prepared step function, or the reason it cannot run.
# ---------------------------------------------------------------------------------------------

MAX_GRAD_NORM = 1.0
# what can run beside plain; each naive and mbclip entry runs at every --microbatch-sizes value
METHOD_KINDS = ("opacus", "opacus_ghost", "naive", "mbclip")
LR = 1e-3

Step = Callable[[], None]


def plain_step(spec: ModelSpec, model: nn.Module, batch: Batch) -> Step:
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)

    def step():
        optimizer.zero_grad(set_to_none=True)
        spec.per_sample_losses(model, *batch).mean().backward()
        optimizer.step()

    return step


def opacus_step(spec: ModelSpec, model: nn.Module, batch: Batch) -> Step:
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    wrapped = GradSampleModule(model)
    optimizer = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=LR),
        noise_multiplier=0.0,
        max_grad_norm=MAX_GRAD_NORM,
        expected_batch_size=batch[0].shape[0],
    )

    def step():
        optimizer.zero_grad(set_to_none=True)
        spec.per_sample_losses(wrapped, *batch).mean().backward()
        optimizer.step()

    return step


def opacus_ghost_step(spec: ModelSpec, model: nn.Module, batch: Batch) -> Step:
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

    wrapped = GradSampleModuleFastGradientClipping(model, max_grad_norm=MAX_GRAD_NORM, use_ghost_clipping=True)
    optimizer = DPOptimizerFastGradientClipping(
        torch.optim.SGD(model.parameters(), lr=LR),
        noise_multiplier=0.0,
        max_grad_norm=MAX_GRAD_NORM,
        expected_batch_size=batch[0].shape[0],
    )

    def step():
        optimizer.zero_grad(set_to_none=True)
        losses = spec.per_sample_losses(wrapped, *batch)
        DPTensorFastGradientClipping(wrapped, optimizer, losses, "mean").backward()
        optimizer.step()

    return step


def naive_step(spec: ModelSpec, model: nn.Module, batch: Batch, microbatch_size: int) -> Step:
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    params = [p for p in model.parameters() if p.requires_grad]
    inputs, targets = batch

    def step():
        total = [torch.zeros_like(p) for p in params]
        starts = range(0, inputs.shape[0], microbatch_size)
        for start in starts:
            chunk = slice(start, start + microbatch_size)
            grads = torch.autograd.grad(spec.per_sample_losses(model, inputs[chunk], targets[chunk]).mean(), params)
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            factor = (MAX_GRAD_NORM / (norm + 1e-6)).clamp(max=1.0)
            for t, g in zip(total, grads):
                t.add_(g * factor)
        for p, t in zip(params, total):
            p.grad = t / len(starts)
        optimizer.step()

    return step


def mbclip_step(spec: ModelSpec, model: nn.Module, batch: Batch, microbatch_size: int) -> Step:
    from mbclip import MicroBatchClipping

    wrapped, optimizer, _ = MicroBatchClipping().make_clipped(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        microbatch_size=microbatch_size,
        max_grad_norm=MAX_GRAD_NORM,
    )

    def step():
        optimizer.zero_grad(set_to_none=True)
        spec.per_sample_losses(wrapped, *batch).mean().backward()
        optimizer.step()

    return step


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def minor_page_faults() -> Optional[int]:
    """Page faults this process took so far that needed no disk (fresh pages the OS had to zero), or ``None`` where
    ``resource`` is missing (Windows)."""
    return None if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(step: Step, device: torch.device) -> Tuple[float, Optional[int]]:
    """Seconds one step took, and the page faults it took."""
    synchronize(device)
    faults = minor_page_faults()
    start = time.perf_counter()
    step()
    synchronize(device)
    taken = time.perf_counter() - start
    after = minor_page_faults()
    return taken, (after - faults if faults is not None and after is not None else None)


# glibc's mallopt parameters: keep up to 1 GiB free at the top of the heap, and serve blocks up to 32 MiB (glibc's own
# largest default) from the heap, not from fresh mmap'ed pages.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
KEPT_MEMORY_SETTINGS = ((_M_TRIM_THRESHOLD, 1 << 30), (_M_MMAP_THRESHOLD, 1 << 25))


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory a step frees for the next step, instead of handing large blocks back to the
    OS and taking page faults (fresh, zeroed pages) for them again each step; for this process, from now on. The same as
    starting Python with ``MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_MMAP_THRESHOLD_=33554432``. False where the C
    library is not glibc (no ``mallopt``, or one that refuses either setting)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    accepted = [mallopt(option, value) == 1 for option, value in KEPT_MEMORY_SETTINGS]  # both tried, always
    return all(accepted)


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for a while: torch's profiler prints a start and a stop line (and allocator
    notes) from C++ each time it runs, which would bury the tables under hundreds of lines. Python warnings of that
    untimed step go too; the timed runs of the same step show them, and an exception still propagates."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(step: Step, device: torch.device) -> float:
    """Peak bytes allocated by one step above what was live before it."""
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return float(peak)


@dataclass
class Result:
    times: List[float]
    memory: Optional[float] = None
    error: Optional[str] = None
    ratios: List[float] = field(default_factory=list)  # each timing over the plain step timed right before it
    faults: List[int] = field(default_factory=list)  # minor page faults of each timed step


def prepare_methods(
    spec: ModelSpec, microbatch_sizes: List[int], batch: Batch, device, kinds: Sequence[str] = METHOD_KINDS
) -> Dict[str, object]:
    """The step function of plain and of each method of ``kinds`` (or the reason it cannot run), each on its own copy
    of one model."""
    torch.manual_seed(0)
    base = spec.build().to(device)
    methods: Dict[str, object] = {}

    def add(name: str, make: Callable[[], Step]) -> None:
        try:
            step = make()
            step()  # warm-up, and the first place an unsupported model fails
            methods[name] = step
        except Exception as error:  # noqa: BLE001  (any failure is reported as n/a with its reason)
            methods[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"

    add("plain", lambda: plain_step(spec, copy.deepcopy(base), batch))
    for name, opacus_method in (("opacus", opacus_step), ("opacus_ghost", opacus_ghost_step)):
        if name in kinds and spec.build_opacus is None:
            methods[name] = "no Opacus counterpart"
        elif name in kinds:
            add(name, lambda method=opacus_method: method(spec, spec.build_opacus().to(device), batch))
    for b in microbatch_sizes if "naive" in kinds else ():
        add(f"naive_b{b}", lambda b=b: naive_step(spec, copy.deepcopy(base), batch, b))
    for b in microbatch_sizes if "mbclip" in kinds else ():
        add(f"mbclip_b{b}", lambda b=b: mbclip_step(spec, copy.deepcopy(base), batch, b))
    return methods


def run_model(name: str, spec: ModelSpec, args, device) -> Dict[str, Result]:
    torch.manual_seed(1)
    batch = spec.make_batch(args.batch_size, args.seq_len, device)
    methods = prepare_methods(spec, args.microbatch_sizes, batch, device, args.methods)
    results = {m: Result([], error=s if isinstance(s, str) else None) for m, s in methods.items()}
    runnable = [(m, s) for m, s in methods.items() if not isinstance(s, str)]
    plain = methods["plain"] if not isinstance(methods["plain"], str) else None
    for _ in range(args.repeats):  # interleaved: one round runs every method once, each right after a plain step
        gc.collect()  # untimed: a full collection left over from setting up falls in no timed step
        for method, step in runnable:
            try:
                if plain is not None and method != "plain":
                    plain_time, plain_faults = timed(plain, device)
                    results["plain"].times.append(plain_time)
                    if plain_faults is not None:
                        results["plain"].faults.append(plain_faults)
                taken, faults = timed(step, device)
                results[method].times.append(taken)
                if faults is not None:
                    results[method].faults.append(faults)
                if plain is not None:
                    results[method].ratios.append(taken / plain_time if method != "plain" else 1.0)
            except Exception as error:  # noqa: BLE001
                results[method].error = f"{type(error).__name__}: {error}"
    if not args.no_memory:
        for method, step in runnable:
            if results[method].error is None:
                results[method].memory = peak_memory(step, device)
    return results


def ratio_spread(ratios: Sequence[float]) -> str:
    """The first and third quartiles of the paired ratios, ``"q1-q3"``; empty with fewer than two rounds."""
    if len(ratios) < 2:
        return ""
    first, _, third = statistics.quantiles(ratios, n=4, method="inclusive")
    return f"{first:.2f}-{third:.2f}"


def print_table(name: str, spec: ModelSpec, results: Dict[str, Result], args) -> None:
    print(f"\n## {name}: {spec.description} (B={args.batch_size}, T={args.seq_len})")
    plain = results["plain"]
    plain_time = statistics.median(plain.times) if plain.times and plain.error is None else None
    plain_mem = plain.memory
    header = (
        f"| {'method':<14} | {'median ms':>9} | {'x plain':>7} | {'q1-q3':>9} | {'peak MiB':>8} | {'x plain':>7} "
        f"| {'faults':>7} |"
    )
    print(header)
    print(f"|{'-' * 16}|{'-' * 11}:|{'-' * 8}:|{'-' * 10}:|{'-' * 9}:|{'-' * 8}:|{'-' * 8}:|")
    for method, result in results.items():
        if result.error is not None or not result.times:
            print(f"| {method:<14} | {'n/a':>9} | {'':>7} | {'':>9} | {'':>8} | {'':>7} | {'':>7} |  {result.error}")
            continue
        median = statistics.median(result.times)
        paired = plain_time and result.ratios and method != "plain"
        ratio = f"{statistics.median(result.ratios):.2f}" if plain_time and result.ratios else ""
        spread = ratio_spread(result.ratios) if paired else ""
        mem = f"{result.memory / 2**20:.1f}" if result.memory is not None else ""
        mem_ratio = f"{result.memory / plain_mem:.2f}" if result.memory is not None and plain_mem else ""
        faults = f"{statistics.median(result.faults):.0f}" if result.faults else ""
        print(
            f"| {method:<14} | {median * 1e3:>9.1f} | {ratio:>7} | {spread:>9} | {mem:>8} | {mem_ratio:>7} "
            f"| {faults:>7} |"
        )
    sys.stdout.flush()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {','.join(MODELS)}")
    parser.add_argument("--microbatch-sizes", default="1,2,4,8,16,32")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64, help="frames or tokens per sample (not used by cnn)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up step each)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument(
        "--methods",
        default=",".join(METHOD_KINDS),
        help=f"comma-separated, from {','.join(METHOD_KINDS)} (plain always runs: the ratios are to it)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the (untimed) peak-memory runs")
    parser.add_argument(
        "--keep-freed-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="make glibc's malloc keep freed memory for the next step, for every method alike (default: on)",
    )
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of methods that fail")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.microbatch_sizes = [int(b) for b in args.microbatch_sizes.split(",") if b.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {list(MODELS)}")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip() and m.strip() != "plain"]
    unknown = [m for m in args.methods if m not in METHOD_KINDS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHOD_KINDS)}")
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device {args.device!r}: {error}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device; run on cpu")
    return args


def cpu_description() -> str:
    """The CPU by name, core count and the vector extension torch's kernels use: the ratios to plain depend on the
    machine (a faster CPU shrinks a plain step more than mbclip's fixed costs), so a table names it."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            name = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), name)
    except OSError:  # not Linux
        pass
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()
    extension = f", {capability}" if capability else ""
    return f"{name} ({os.cpu_count()} cores{extension})"


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"CPU: {cpu_description()}, {args.threads} threads"
    allocator = "as it comes"
    if args.keep_freed_memory:
        kept = keep_freed_memory()
        allocator = "keeps freed memory" if kept else "as it comes (not glibc: nothing to keep freed memory)"
    print(
        f"# step time: torch {torch.__version__}, {where}, repeats={args.repeats}, noise 0, C={MAX_GRAD_NORM}, "
        f"malloc: {allocator}"
    )
    for name in args.models:
        try:
            results = run_model(name, MODELS[name], args, device)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            continue
        print_table(name, MODELS[name], results, args)


if __name__ == "__main__":
    main()
