"""mbclip's own registry of micro-batch samplers, one per layer type.

Kept apart from Opacus's ``GradSampleModule.GRAD_SAMPLERS`` on purpose: that dict is shared by
Opacus's hook classes, and writing micro-batch samplers into it would change Opacus for everyone
in the process.

A sampler answers one question for one forward call of one layer: the micro-batch SUMS of the
gradients (of the loss backward saw) of the parameters it owns, each a tensor ``[M, *param.shape]`` or,
when that is cheaper, kept as factors (``mbclip.microbatch_sums``: ``outer_product_sums`` for a weight used
as ``x @ W.T``, ``scattered_row_sums`` for a table).
The grad module rescales them into micro-batch gradients (undoing a batch mean's 1/B, dividing by
the micro-batch size) and the optimizer clips them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Type

import torch
from torch import nn

from mbclip.layout import MicroBatchLayout


@dataclass
class LayerCall:
    """What one forward call of a hooked layer saw, kept until its backward.

    ``args`` and ``kwargs`` hold the call's inputs, tensors detached. ``batch_dim`` is where the
    batch lies in the first tensor argument (``None`` when it is not a plain tensor, e.g. a
    ``PackedSequence``). ``outputs`` are the raw output tensors (flattened with
    ``torch.utils._pytree``), kept only for samplers registered with ``keep_outputs=True``.
    """

    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    layout: MicroBatchLayout
    batch_dim: Optional[int]
    batch_first: bool
    pass_index: int
    outputs: Sequence[Optional[torch.Tensor]] = field(default_factory=tuple)
    # the autograd nodes that produced the raw outputs (``None`` where one has none), for samplers registered with
    # ``keep_output_nodes=True`` on the kept path and without saved-tensor hooks: what the layer's own backward saved
    # can be read from them (LayerNorm's mean and 1/std) instead of recomputed
    output_nodes: Sequence[Optional[Any]] = field(default_factory=tuple)
    extra: Dict[str, Any] = field(default_factory=dict)
    # gradients of the tensors a recording forward marked with :func:`watch`, in the order given
    watched_grads: Sequence[Optional[torch.Tensor]] = field(default_factory=tuple)

    @property
    def input(self) -> torch.Tensor:
        """The first positional argument (the activations of most layers)."""
        return self.args[0]


# sampler(module, call, grad_outputs) -> {param: micro-batch sums, [M, *param.shape] or factored}
# grad_outputs: the gradient of the loss w.r.t. every flattened output leaf, as backward delivers it
# (``None`` where a leaf got none). For a batch-mean loss it carries the 1/B, which the grad module
# undoes on the returned sums (samplers are linear in grad_outputs, so nothing else changes).
SamplerFn = Callable[[nn.Module, LayerCall, Sequence[Optional[torch.Tensor]]], Dict[nn.Parameter, torch.Tensor]]


@dataclass(frozen=True)
class MicroBatchSampler:
    """A registered sampler and how the grad module must call it.

    ``batch_dim``: fixed batch dimension of the layer's input (``0`` for convolutions), or ``None``
    to infer it from the batch size. ``keep_outputs``: keep the raw outputs of each call (with
    their autograd graph) for the sampler. ``keep_output_nodes``: keep only the autograd nodes that produced them
    (``LayerCall.output_nodes``), to read what the layer's backward saved. A registered sampler owns every
    parameter of the layer's subtree: mbclip does not hook the layer's children. ``forward``: an instance-level
    forward (same numerics, records what the sampler needs) installed on each sampled layer while
    it is wrapped, removed by ``remove_hooks``; its class and ``state_dict`` are untouched.
    ``needs_autograd(module, args, kwargs)``: ``True`` when the sampler will differentiate this call
    through its recorded graph with respect to the layer's parameters (the batched autograd path).
    Otherwise, on unchecked steps, autograd is spared the layer's parameter gradients altogether:
    the sampler's micro-batch sums are the only ones computed.
    """

    fn: SamplerFn
    batch_dim: Optional[int] = None
    keep_outputs: bool = False
    check: Optional[Callable[[nn.Module], Optional[str]]] = None
    forward: Optional[Callable[..., Any]] = None
    needs_autograd: Optional[Callable[[nn.Module, Tuple[Any, ...], Dict[str, Any]], bool]] = None
    keep_output_nodes: bool = False


MICROBATCH_SAMPLERS: Dict[Type[nn.Module], MicroBatchSampler] = {}

# Layer types that cannot be sampled exactly, with the reason and the fix shown to the user.
UNSUPPORTED_LAYERS: Dict[Type[nn.Module], str] = {}


def register_microbatch_sampler(
    *module_types: Type[nn.Module],
    batch_dim: Optional[int] = None,
    keep_outputs: bool = False,
    check: Optional[Callable[[nn.Module], Optional[str]]] = None,
    forward: Optional[Callable[..., Any]] = None,
    needs_autograd: Optional[Callable[[nn.Module, Tuple[Any, ...], Dict[str, Any]], bool]] = None,
    keep_output_nodes: bool = False,
) -> Callable[[SamplerFn], SamplerFn]:
    """Decorator: register ``fn`` as the micro-batch sampler of ``module_types`` (exact types).

    ``check(module)`` may return why a particular instance cannot be sampled (shown at wrap time).
    ``forward(module, *args, **kwargs)`` replaces the layer's forward while it is wrapped.
    ``needs_autograd(module, args, kwargs)`` says when ``fn`` uses autograd through the layer's own
    parameters (see :class:`MicroBatchSampler`); leave it ``None`` when ``fn`` never does.
    """

    def decorator(fn: SamplerFn) -> SamplerFn:
        for module_type in module_types:
            MICROBATCH_SAMPLERS[module_type] = MicroBatchSampler(
                fn, batch_dim, keep_outputs, check, forward, needs_autograd, keep_output_nodes
            )
            UNSUPPORTED_LAYERS.pop(module_type, None)
        return fn

    return decorator


def mark_unsupported(module_type: Type[nn.Module], reason: str) -> None:
    """Refuse ``module_type`` at wrap time with ``reason`` (which should name the fix)."""
    if module_type not in MICROBATCH_SAMPLERS:
        UNSUPPORTED_LAYERS[module_type] = reason


WATCHED_ATTRIBUTE = "_mbclip_watched"


def watch(output: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """From a recording ``forward``: deliver the gradients of ``tensors`` (the layer's own intermediates) to the
    sampler as ``call.watched_grads``, from the same backward pass that computes the model's gradients.

    The sampler then runs once they are computed, and needs no re-run of the layer. ``output`` is the layer's
    first output tensor.
    """
    setattr(output, WATCHED_ATTRIBUTE, list(tensors))


FORWARD_MARK_ATTRIBUTE = "_mbclip_forward_mark"


@dataclass(frozen=True)
class ForwardMark:
    """What mbclip tells a layer's recording ``forward`` before each call (set at every call, read once)."""

    class_forward: bool = False  # run the class's own forward: a batch whose gradient autograd computes whole
    layout: Optional[MicroBatchLayout] = None  # the pass's micro-batches (None: not a recorded call)


def mark_forward(module: nn.Module, mark: ForwardMark) -> None:
    module.__dict__[FORWARD_MARK_ATTRIBUTE] = mark


def take_forward_mark(module: nn.Module) -> ForwardMark:
    """From a recording ``forward``: this call's :class:`ForwardMark`, removed from the module."""
    return module.__dict__.pop(FORWARD_MARK_ATTRIBUTE, None) or ForwardMark()


def takes_class_forward(module: nn.Module) -> bool:
    """From a recording ``forward``: run the class's own forward for this call."""
    return take_forward_mark(module).class_forward


def watchable(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, or a leaf copy of it that requires grad when nothing before it does (a layer on raw input whose
    parameters are switched off): what a recording forward watches and computes on."""
    return tensor if tensor.requires_grad else tensor.detach().requires_grad_()


def batch_to_front(tensor: torch.Tensor, batch_dim: Optional[int]) -> torch.Tensor:
    """Move the batch dimension of ``tensor`` to dim 0."""
    if batch_dim in (None, 0):
        return tensor
    return tensor.movedim(batch_dim, 0)
