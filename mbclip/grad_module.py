"""``MicroBatchGradSampleModule``: Opacus's ``GradSampleModule`` grouped into micro-batches.

Flow of one pass: the wrapper's ``forward`` opens a *pass* (one batch) and notes its size; a
forward hook on every hooked layer keeps the call's inputs in a keeper node on its outputs (or, for recorded
layers and the autograd fallback, hangs a hook on the output tensors); when their gradient arrives in
``backward`` the layer's sampler (or the autograd fallback) turns it into micro-batch sums of per-sample
gradients, added up per parameter and per pass.
The optimizer then asks :meth:`collect` for the micro-batch gradients of every pass since the last
step and, on checked steps, checks them against the plain gradient autograd computed beside them.

On unchecked steps (``check_gradients = False``) autograd is spared the weight gradients that a
sampler computes anyway: a layer's parameters stop requiring grad for the duration of its forward,
so backward computes only the input gradients plus, once, the sampler's micro-batch sums.

A *whole pass* (unchecked step, the batch is one micro-batch: ``microbatch_size >= B``) records nothing: its one
micro-batch gradient is autograd's own gradient. When its backward reaches the model's output, every ``p.grad``
is set aside; at the end of that backward the new ``p.grad`` is taken as the pass's sums and the old one put back.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache, partial
from types import MethodType
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from opacus.grad_sample import GradSampleModule
from torch import nn
from torch.nn.utils.rnn import PackedSequence
from torch.utils._pytree import tree_flatten

from mbclip.errors import BatchError, ConfigurationError, UnsupportedModuleError
from mbclip.flat_trees import flatten, flatten_call
from mbclip.layers.batchnorm import check_batchnorms, swap_in_batchnorms, swap_out_batchnorms
from mbclip.layout import MicroBatchLayout
from mbclip.microbatch_sums import FormedSums, MicroBatchSums, add_sums, as_sums, stack_passes
from mbclip.output_hooks import GradsCallback, InputBoundary, is_suspended, is_unrecorded, on_output_gradients
from mbclip.samplers import MICROBATCH_SAMPLERS, UNSUPPORTED_LAYERS, LayerCall, MicroBatchSampler
from mbclip.samplers.autograd_fallback import autograd_microbatch_sums, infer_batch_dim
from mbclip.samplers.registry import WATCHED_ATTRIBUTE, ForwardMark, mark_forward

LOSS_REDUCTIONS = ("mean", "sum")
LOW_PRECISION = (torch.float16, torch.bfloat16)
MICROBATCH_REDUCTIONS = ("mean", "sum")


@dataclass(frozen=True)
class HookedLayer:
    """A layer mbclip hooks: with its registered sampler, or ``sampler=None`` for the autograd fallback."""

    name: str
    module: nn.Module
    sampler: Optional[MicroBatchSampler]
    # the layer's parameters (all, and its own without children's), listed once: module.parameters() walks
    # the module tree, too slow to repeat at every call
    parameters: Tuple[nn.Parameter, ...] = ()
    own_parameters: Tuple[nn.Parameter, ...] = ()

    def trainable(self, recurse: bool = True) -> List[nn.Parameter]:
        return [p for p in (self.parameters if recurse else self.own_parameters) if p.requires_grad]


def trainable(module: nn.Module, recurse: bool = True) -> List[nn.Parameter]:
    return [p for p in module.parameters(recurse=recurse) if p.requires_grad]


def _parameters_of(module: nn.Module) -> Tuple[Tuple[nn.Parameter, ...], Tuple[nn.Parameter, ...]]:
    return tuple(module.parameters()), tuple(module.parameters(recurse=False))


def plan_hooks(model: nn.Module) -> List[HookedLayer]:
    """Which layers get hooks and how; raises ``UnsupportedModuleError`` naming any layer mbclip refuses.

    Pure: reads the model, changes nothing, so the engine can call it before wiring anything.
    """
    plan: List[HookedLayer] = []

    def visit(name: str, module: nn.Module) -> None:
        if not trainable(module):
            return
        label = name or "the model itself"
        module_type = type(module)
        if module_type in UNSUPPORTED_LAYERS:
            raise UnsupportedModuleError(f"layer '{label}' ({module_type.__name__}): {UNSUPPORTED_LAYERS[module_type]}")
        sampler = MICROBATCH_SAMPLERS.get(module_type)
        if sampler is not None:
            reason = sampler.check(module) if sampler.check else None
            if reason:
                raise UnsupportedModuleError(f"layer '{label}' ({module_type.__name__}) cannot be sampled: {reason}")
            plan.append(HookedLayer(name, module, sampler, *_parameters_of(module)))
            return
        if trainable(module, recurse=False):
            plan.append(HookedLayer(name, module, None, *_parameters_of(module)))
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    return plan


class _Delivery:
    """Where a :class:`_Keep` node sends its outputs' gradients in backward: the call's sampler, until the step
    removes it (as it removes output hooks; a backward through an old graph then samples nothing)."""

    __slots__ = ("callback",)

    def __init__(self) -> None:
        self.callback: Optional[GradsCallback] = None

    def remove(self) -> None:
        self.callback = None


_NO_DELIVERY = _Delivery()  # for outputs routed only to require grad (recorded layers): never given a callback


class _Keep(torch.autograd.Function):
    """Identity on a sampled layer's outputs that holds the call's input tensors as saved tensors.

    Autograd then frees them right after the layer's backward (unless the graph is retained, for a second
    backward), checks that nothing changed them in place since the forward, and the outputs require grad
    even when the layer's parameters are switched off and its input needs no gradient (the first layer).
    Its backward hands the outputs' gradients to ``delivery`` (``None`` for an output this backward does not
    reach): the node sees every output's gradient at once, so no output needs a hook of its own.
    """

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, delivery: _Delivery, num_kept: int, *tensors: torch.Tensor):
        ctx.delivery = delivery
        ctx.num_kept = num_kept
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*tensors[:num_kept])
        if len(tensors) == num_kept + 1:  # one output (most layers): returned alone, cheaper than a tuple of one
            return tensors[num_kept].detach()
        return tuple(t.detach() for t in tensors[num_kept:])

    @staticmethod
    def backward(ctx, *grads):
        callback = ctx.delivery.callback
        if callback is not None and not is_suspended():
            callback(list(grads))
        return (None, None, None) + (None,) * ctx.num_kept + grads


# ``Function.apply``'s Python wrapper (functorch checks, unwrapping dead wrappers) costs as much as the node
# itself; outside functorch transforms it ends in this C ``apply``, which the keeper node calls directly (its
# tensors are the layer's own inputs and outputs, which the layer has just computed with).
_keep_apply_c = super(torch.autograd.Function, _Keep).apply
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", None)


def _keep_apply(*args):
    if _functorch_active is None or _functorch_active():  # another torch, or inside vmap/grad: the public path
        return _Keep.apply(*args)
    return _keep_apply_c(*args)


def _targets(node) -> bool:
    """Whether the running backward delivers a gradient to the leaf whose ``AccumulateGrad`` is ``node``.

    A plain ``backward()`` reaches every leaf of its graph; ``torch.autograd.grad`` and ``backward(inputs=...)``
    only the tensors they name (torch refuses to say so for a leaf that ``autograd.grad`` names: it is one).
    """
    try:
        return torch._C._will_engine_execute_node(node)
    except RuntimeError:
        return True


class _Anchors(dict):
    """Per device: the scalar leaf that every keeper node takes (what makes tapped outputs require grad) and its
    ``AccumulateGrad`` node, held so that every graph uses that one node. A copy of the model (``copy.deepcopy``,
    pickling) starts empty: autograd nodes cannot be copied, and a copy gets leaves of its own."""

    def __deepcopy__(self, memo) -> _Anchors:
        return _Anchors()

    def __reduce__(self):
        return (_Anchors, ())


class _StepRecords(list):
    """What the step's calls left behind (layer calls, hook handles), released at the step; a copy of the model
    (``copy.deepcopy``, pickling) starts empty, as the autograd nodes they refer to belong to the original's graph."""

    def __deepcopy__(self, memo) -> _StepRecords:
        return _StepRecords()

    def __reduce__(self):
        return (_StepRecords, ())


def _detached_call(args, kwargs) -> Tuple[tuple, Dict]:
    leaves, rebuild = flatten_call(args, kwargs)
    return rebuild([t.detach() if isinstance(t, torch.Tensor) else t for t in leaves])


def _bounded_inputs(args, kwargs):
    """``(args, kwargs)`` with every input that requires grad behind an :class:`InputBoundary` (one per tensor
    object, so ``attention(x, x, x)`` still sees one tensor three times); ``None`` when there is none."""
    leaves, rebuild = flatten_call(args, kwargs)
    unique = {id(t): t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad}
    if not unique:
        return None
    bounded = dict(zip(unique, InputBoundary.apply(*unique.values())))
    leaves = [bounded.get(id(t), t) if isinstance(t, torch.Tensor) else t for t in leaves]
    return rebuild(leaves)


def _take_watched(output) -> Sequence[torch.Tensor]:
    """The tensors a recording forward marked with ``registry.watch`` on ``output``, removed from it."""
    watched = getattr(output, WATCHED_ATTRIBUTE, ())
    if watched:
        delattr(output, WATCHED_ATTRIBUTE)
    return watched


def _saved_tensors_readable() -> bool:
    """Whether a sampler may read what autograd saves now: not under saved-tensor hooks (non-reentrant activation
    checkpointing, offloading to CPU), whose unpacking may run once only, for autograd itself."""
    top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top_hooks is not None and top_hooks(False) is None


def _is_float_tensor(value) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


@lru_cache(maxsize=256)
def _layout(batch_size: int, microbatch_size: int) -> MicroBatchLayout:
    """One (immutable) layout object per batch size: built at every layer call otherwise."""
    return MicroBatchLayout(batch_size, microbatch_size)


def _first_tensor(args: Sequence, kwargs: Dict) -> Optional[object]:
    if args and isinstance(args[0], torch.Tensor):  # the usual call: the activations first
        return args[0]
    for leaf in list(args) + list(kwargs.values()):
        if isinstance(leaf, (torch.Tensor, PackedSequence)):
            return leaf
    leaves, _ = tree_flatten((args, kwargs))
    return next((leaf for leaf in leaves if isinstance(leaf, torch.Tensor)), None)


@dataclass
class MicroBatchGradients:
    """Every micro-batch seen since the last step, in order: pass by pass, in loader order within a pass.

    ``sums[i]`` holds parameter ``i``'s micro-batch sums of the gradients of the loss as backward saw it
    (``None``: no micro-batch touched it); they add up to autograd's ``p.grad``. Micro-batch ``j``'s
    gradient is ``scales[j] * sums[i][j]`` (``x B`` for a batch-mean loss, ``/ b`` for a micro-batch mean):
    the optimizer folds the scale into norms and weights instead of rescaling ``M x params`` numbers.
    """

    sums: List[Optional[MicroBatchSums]]
    microbatch_sizes: torch.Tensor  # [M], samples in each micro-batch
    layouts: List[MicroBatchLayout]  # one per pass that reached backward
    scales: torch.Tensor  # [M]

    @property
    def num_microbatches(self) -> int:
        return int(self.microbatch_sizes.numel())


class MicroBatchGradSampleModule(GradSampleModule):
    """A ``GradSampleModule`` that records micro-batch gradient sums (:meth:`collect`) instead of ``p.grad_sample``.

    With ``microbatch_size=1`` they are Opacus's per-sample gradients. mbclip keeps its own sampler
    registry (``mbclip.register_microbatch_sampler``); Opacus's registry is neither read nor changed.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        microbatch_size: int,
        batch_first: bool = True,
        loss_reduction: str = "mean",
        microbatch_reduction: str = "mean",
    ):
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ConfigurationError(f"loss_reduction={loss_reduction!r}: use one of {LOSS_REDUCTIONS}.")
        if microbatch_reduction not in MICROBATCH_REDUCTIONS:
            raise ConfigurationError(
                f"microbatch_reduction={microbatch_reduction!r}: use one of {MICROBATCH_REDUCTIONS}."
            )
        check_batchnorms(module, microbatch_size)
        self._plan = plan_hooks(module)
        self.microbatch_size = microbatch_size
        self.microbatch_reduction = microbatch_reduction
        super().__init__(module, batch_first=batch_first, loss_reduction=loss_reduction, strict=False)
        self._param_names = {p: name for name, p in module.named_parameters()}
        # True: autograd computes every p.grad too and the optimizer checks the micro-batch gradients against
        # them; False: samplers alone compute their layers' gradients (set by the optimizer, step by step).
        self.check_gradients = True
        self._anchors: Dict[torch.device, Tuple[torch.Tensor, object]] = _Anchors()
        self._reset_passes()
        # Last: BatchNorm normalises per micro-batch while wrapped; remove_hooks swaps the classes back.
        self._swapped_batchnorms = swap_in_batchnorms(module, self.current_layout)

    # -- Opacus extension points -------------------------------------------------------------

    @classmethod
    def validate(cls, module: nn.Module, *, strict: bool = False) -> list:
        """mbclip's own support check is :func:`plan_hooks`; buffers are fine here."""
        return []

    def add_hooks(self, *, loss_reduction: str = "mean", batch_first: bool = True, force_functorch=False) -> None:
        if hasattr(self._module, "autograd_grad_sample_hooks"):
            raise ConfigurationError("this model already carries per-sample gradient hooks; wrap the original model.")
        handles = []
        for layer in self._plan:
            before = partial(self._before_forward, layer=layer)
            handles.append(layer.module.register_forward_pre_hook(before, with_kwargs=True))
            hook = partial(self._on_forward, layer=layer)
            handles.append(layer.module.register_forward_hook(hook, with_kwargs=True))
            if layer.sampler is not None and layer.sampler.forward is not None:
                layer.module.forward = MethodType(layer.sampler.forward, layer.module)
        self._module.autograd_grad_sample_hooks = handles
        self.autograd_grad_sample_hooks = handles
        self.enable_hooks()

    def remove_hooks(self) -> None:
        super().remove_hooks()
        for layer in self._plan:
            if layer.sampler is not None and layer.sampler.forward is not None:
                layer.module.__dict__.pop("forward", None)  # back to the class's own forward
        self._reset_passes()
        swap_out_batchnorms(getattr(self, "_swapped_batchnorms", []))
        self._swapped_batchnorms = []

    def cleanup(self) -> None:
        """Remove every hook and parameter attribute of Opacus and mbclip (``to_standard_module`` calls this)."""
        super().cleanup()
        for p in self._module.parameters():
            if hasattr(p, "summed_grad"):  # set by Opacus's DPOptimizer on the parameters it optimizes
                del p.summed_grad
        self._reset_passes()

    def set_grad_sample_to_none(self) -> None:
        super().set_grad_sample_to_none()
        self._reset_passes()

    # -- passes --------------------------------------------------------------------------------

    def _reset_passes(self) -> None:
        # The calls recorded since the last step. A call's output hook (or its keeper node's delivery) holds the
        # call, and the call holds the keeper node and (some samplers) the outputs that hold the hook: a reference
        # cycle. Cutting the call's side here lets reference counting free all of it, with no work for Python's
        # garbage collector.
        for call in getattr(self, "_open_calls", ()):
            call.extra.clear()
            call.outputs = ()
            call.output_nodes = ()
        for handle in getattr(self, "_open_hooks", ()):  # output hooks and deliveries (output_hooks, _Delivery)
            handle.remove()
        # Plain Python state, set in one update of __dict__: nn.Module's __setattr__ (which looks for parameters,
        # buffers and submodules) would cost more than the rest of this reset, and it runs twice per step.
        vars(self).update(
            _pass_batch_sizes=[],  # List[int]: the batch size of each forward pass since the last step
            _current_pass=None,  # Optional[int]: the pass being recorded now
            _sums={},  # Dict[nn.Parameter, Dict[int, MicroBatchSums]]: per parameter and pass
            _claimed={},  # Dict[nn.Parameter, int]
            low_precision_seen=set(),  # half dtypes of output gradients since the last step (autocast)
            # per open sampled call: parameters made grad-free, the call's (batched, batch_dim), and its trainable
            # parameters
            _switched_off=[],
            # activation checkpointing: hooked calls still open in a forward that backward re-runs, and the graph
            # tasks (backward runs) in which each pass's gradients arrived, to tell which pass a re-run belongs to
            _recomputing=0,
            _pass_tasks={},  # Dict[int, set]
            _dropped_passes=set(),  # passes whose gradients zero_grad() discarded (see zero_grad_passes)
            _open_calls=_StepRecords(),
            _open_hooks=_StepRecords(),
            _sampling_pass=None,  # Optional[int]: the pass of the call whose sampler runs now
            # parameters whose gradients since the last step came from samplers alone, each with its p.grad (and
            # that tensor's version) when first switched off: autograd must not have touched it by the step
            grad_snapshots={},  # Dict[nn.Parameter, Tuple[Optional[torch.Tensor], int]]
            # sampled parameters that some call of the step left to autograd (their p.grad is autograd's, partly)
            autograd_kept={},  # Dict[nn.Parameter, None]
            # whole passes (see the module docstring), each with the trainable parameters at its forward, and the
            # other passes in which autograd wrote some p.grad (the fallback, kept parameters): sharing a backward
            # with a whole pass, they would mix into its gradient
            _whole_passes={},  # Dict[int, List[nn.Parameter]]
            _grad_writing_passes=set(),
            # parameters of calls that autograd differentiates (the fallback, samplers that need autograd): autograd
            # writes their p.grad in any pass, so a whole pass's snapshot of them says nothing at the step
            autograd_written={},  # Dict[nn.Parameter, None]
        )

    def current_layout(self) -> Optional[MicroBatchLayout]:
        """The micro-batch layout of the pass being recorded now; ``None`` outside a recorded forward."""
        if self._current_pass is None:
            return None
        return _layout(self._pass_batch_sizes[self._current_pass], self.microbatch_size)

    @property
    def num_passes(self) -> int:
        """Forward passes recorded since the last step (each one batch), less those zero_grad() discarded."""
        return len(self._pass_batch_sizes) - len(self._dropped_passes)

    def num_samples_without_backward(self) -> int:
        """Samples of the passes since the last step that no training backward reached (none dropped by zero_grad)."""
        passes = range(len(self._pass_batch_sizes))
        return sum(
            self._pass_batch_sizes[k]
            for k in passes
            if k not in self._dropped_passes and not any(k in per_pass for per_pass in self._sums.values())
        )

    def zero_grad_passes(self) -> None:
        """``optimizer.zero_grad()``: forget the micro-batch gradients of every backward so far.

        A forward whose backward is still to come stays recorded (``loss = model(x); optimizer.zero_grad();
        loss.backward()`` is a common loop order, and plain PyTorch trains the same with it); with none, all is
        reset as at a step.
        """
        passes = range(len(self._pass_batch_sizes))
        pending = [k for k in passes if k not in self._pass_tasks and k not in self._dropped_passes]
        if not pending:
            self._reset_passes()
            return
        done = {k for k in passes if k not in pending}
        for per_pass in self._sums.values():
            for k in done:
                per_pass.pop(k, None)
        self._dropped_passes |= done

    def forward(self, *args, **kwargs):
        if self._recomputing:
            self.close_recomputation()
        recording = self.hooks_enabled and self.training and torch.is_grad_enabled()
        whole = False
        if recording:
            batch_size = self._batch_size_of(args, kwargs)
            whole = self._is_whole_pass(batch_size)
            self._pass_batch_sizes.append(batch_size)
            # plain state set in __dict__ (see _reset_passes): nn.Module's __setattr__ costs more per pass
            vars(self).update(_current_pass=len(self._pass_batch_sizes) - 1, _claimed={})
            if whole:
                self._open_whole_pass(self._current_pass)
        try:
            output = self._module(*args, **kwargs)
            if whole:
                self._hook_whole_pass(self._current_pass, output)
            return output
        finally:
            vars(self)["_current_pass"] = None
            while self._switched_off:  # a forward that raised: give every parameter its requires_grad back
                for p in self._switched_off.pop()[0]:
                    p.requires_grad_(True)

    # -- whole passes: one micro-batch, its gradient from autograd ------------------------------

    def _is_whole_pass(self, batch_size: int) -> bool:
        """An unchecked pass of one micro-batch, with every earlier pass of the step through its backward (so that
        no other pass's backward can write ``p.grad`` while this one's gradient is taken)."""
        if self.check_gradients or not 0 < batch_size <= self.microbatch_size:
            return False
        if torch._C._current_graph_task_id() >= 0:  # a forward inside backward (checkpointing the whole model)
            return False
        return all(k in self._pass_tasks or k in self._dropped_passes for k in range(len(self._pass_batch_sizes)))

    def _open_whole_pass(self, pass_index: int) -> None:
        params = trainable(self._module)
        for p in params:  # autograd's p.grad is put back after each backward: at the step it must be unchanged
            if p not in self.grad_snapshots:
                self.grad_snapshots[p] = (p.grad, p.grad._version if p.grad is not None else 0)
        self._whole_passes[pass_index] = params

    def _hook_whole_pass(self, pass_index: int, output) -> None:
        leaves, _ = flatten(output)
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor) and leaf.requires_grad:
                self._open_hooks.append(leaf.register_hook(partial(self._on_whole_pass_output_grad, pass_index)))

    def _on_whole_pass_output_grad(self, pass_index: int, grad: torch.Tensor) -> None:
        """The pass's backward reached the model's output (once per backward): set every ``p.grad`` aside before
        autograd accumulates into it, and take the pass's gradient when this backward ends."""
        task = torch._C._current_graph_task_id()
        tasks = self._pass_tasks.setdefault(pass_index, set())
        if task in tasks or not self.hooks_enabled:
            return None
        tasks.add(task)
        self._dropped_passes.discard(pass_index)
        params = self._whole_passes[pass_index]
        set_aside = [p.grad for p in params]
        for p in params:
            p.grad = None
        take = partial(self._take_whole_pass_gradient, pass_index, task, set_aside)
        torch.autograd.Variable._execution_engine.queue_callback(take)
        return None

    def _take_whole_pass_gradient(self, pass_index: int, task: int, set_aside: List[Optional[torch.Tensor]]) -> None:
        params = self._whole_passes[pass_index]
        grads = [p.grad for p in params]
        for p, grad in zip(params, set_aside):
            p.grad = grad
        shared = [k for k, tasks in self._pass_tasks.items() if k != pass_index and task in tasks]
        if any(k in self._whole_passes or k in self._grad_writing_passes for k in shared):
            raise BatchError(
                f"one backward() covered {len(shared) + 1} forward passes, and one of them is a whole micro-batch "
                "(microbatch_size >= its batch size), whose gradient mbclip takes from autograd: their gradients "
                "cannot be told apart. Call backward() after each forward pass (several forward/backward pairs "
                "before one step() are fine)."
            )
        for p, grad in zip(params, grads):
            if grad is not None:
                self._take_gradient(p, pass_index, grad)

    def _take_untracked_whole_pass(self, pass_index: int) -> None:
        """At the step, a whole pass whose backward never reached the model's output (its output holds no tensor
        mbclip can hook, or the loss was taken elsewhere): ``p.grad`` is its gradient if it was ``None`` at the
        forward and no other pass wrote it; otherwise refused."""
        changed = []
        for p in self._whole_passes[pass_index]:
            before, version = self.grad_snapshots[p]
            if p.grad is not None and not (p.grad is before and p.grad._version == version):
                changed.append((p, before))
        if not changed:
            return  # no backward reached this pass
        if any(before is not None or p in self.autograd_written for p, before in changed):
            raise BatchError(
                "the backward of a whole micro-batch (microbatch_size >= its batch size) did not pass through the "
                "model's output tensors, so mbclip cannot tell its gradient from what p.grad held before. Return "
                "tensors (or tuples, lists or dicts of them) from the model and take the loss from them, and call "
                "optimizer.zero_grad() before the forward."
            )
        for p, _ in changed:
            grad, p.grad = p.grad, None
            self._take_gradient(p, pass_index, grad)

    def _take_gradient(self, param: nn.Parameter, pass_index: int, grad: torch.Tensor) -> None:
        """Autograd's ``grad`` of ``param`` as a whole pass's one micro-batch sum."""
        grad = grad.detach()
        if grad.layout != torch.strided:
            grad = grad.to_dense()
        if grad.dtype in LOW_PRECISION:
            grad = grad.float()
        self._add_sums(param, pass_index, FormedSums(grad.unsqueeze(0)))

    def _add_sums(self, param: nn.Parameter, pass_index: int, microbatch_sums: MicroBatchSums) -> None:
        per_pass = self._sums.setdefault(param, {})
        if pass_index in per_pass:
            per_pass[pass_index] = add_sums(per_pass[pass_index], microbatch_sums)
        else:
            per_pass[pass_index] = microbatch_sums

    def _batch_size_of(self, args: Sequence, kwargs: Dict) -> int:
        first = _first_tensor(args, kwargs)
        if isinstance(first, PackedSequence):
            return int(first.batch_sizes[0]) if first.batch_sizes.numel() else 0
        if first is None or first.dim() == 0:
            raise BatchError(
                "mbclip reads the batch size from the model's first tensor input, and this call has none with a "
                "batch dimension. Pass the batch as a tensor [B, ...] (or [T, B, ...] with batch_first=False)."
            )
        batch_dim = 0 if self.batch_first or first.dim() < 2 else 1
        return int(first.shape[batch_dim])

    # -- forward: keep each call's inputs, hook its outputs ------------------------------------

    def _call_batch_dim(self, layer: HookedLayer, args, kwargs) -> Tuple[bool, Optional[int]]:
        """``(batched, batch_dim)`` of a call: ``batched`` is False for a sampled layer called on a tensor
        without the batch (a projection of positional encodings shared by all samples, say), whose
        per-sample gradients live in the enclosing layer."""
        batch_size = self._pass_batch_sizes[self._current_pass]
        sampler = layer.sampler
        first = _first_tensor(args, kwargs)
        if not (isinstance(first, torch.Tensor) and first.dim() > 0):
            return True, None
        if sampler is not None and sampler.batch_dim is not None:
            batch_dim = sampler.batch_dim if first.shape[sampler.batch_dim] == batch_size else None
        else:
            batch_dim = infer_batch_dim(first.shape, batch_size, self.batch_first)
        return not (batch_dim is None and sampler is not None), batch_dim

    def close_recomputation(self) -> None:  # also called by the optimizer before it reads its parameters
        """Close the calls of a checkpointed re-run that torch stopped early.

        Non-reentrant checkpointing stops a re-run as soon as it has the tensors it needs, from inside a layer's
        forward, so that call's forward hook never runs: give its parameters their ``requires_grad`` back.
        Called when the next gradients arrive, at the next forward and before collecting.
        """
        while self._switched_off:
            for p in self._switched_off.pop()[0]:
                p.requires_grad_(True)
        self._recomputing = 0
        self._current_pass = None

    def _recomputed_pass(self) -> Optional[int]:
        """The pass a forward that runs inside backward re-runs (``torch.utils.checkpoint``), or ``None``.

        Backward re-runs a checkpointed region of some pass; the calls must then do exactly what they did in
        that pass (same per-micro-batch BatchNorm, same parameters switched off, same tensors saved). The pass is
        the one whose gradients this backward is computing: among the passes, those whose gradients arrived in
        this graph task or in none yet. With several such passes (several forwards, then one backward) it is
        ambiguous, and refused.
        """
        task = torch._C._current_graph_task_id()
        if task < 0 or not self._pass_batch_sizes or not (self.hooks_enabled and torch.is_grad_enabled()):
            return None
        if is_unrecorded():  # a sampler running its layer's code again, not a re-run of the pass
            return None
        if self._sampling_pass is not None:
            return self._sampling_pass
        candidates = [k for k in range(len(self._pass_batch_sizes)) if task in self._pass_tasks.get(k, (task,))]
        if len(candidates) != 1:
            raise BatchError(
                "a checkpointed region (torch.utils.checkpoint) was re-run in a backward that covers "
                f"{len(candidates)} forward passes, and mbclip cannot tell which one it belongs to. With activation "
                "checkpointing, call backward() after each forward pass (several forward/backward pairs before one "
                "step() are fine)."
            )
        return candidates[0]

    def _before_forward(self, module: nn.Module, args, kwargs, *, layer: HookedLayer):
        """Before a recorded call: switch off the gradients autograd need not compute (unchecked steps), and put a
        boundary on the inputs of calls that the autograd fallback will differentiate. In a whole pass: only tell a
        layer with a recording forward to run the class's own."""
        sampler = layer.sampler
        recording_forward = sampler is not None and sampler.forward is not None
        if self._current_pass is None or self._recomputing:
            recomputed = self._recomputed_pass()
            if recomputed is None or recomputed in self._whole_passes:
                if recording_forward:  # a whole pass re-run by checkpointing: as its forward ran, the class's own
                    mark_forward(module, ForwardMark(class_forward=recomputed is not None))
                return None
            self._current_pass = recomputed  # until this call's forward hook: the pass this re-run belongs to
            self._recomputing += 1
        elif self._current_pass in self._whole_passes:
            if recording_forward:
                mark_forward(module, ForwardMark(class_forward=True))
            return None
        if recording_forward:
            mark_forward(module, ForwardMark(layout=self.current_layout()))
        uses_autograd = sampler is None or (
            sampler.needs_autograd is not None and sampler.needs_autograd(module, args, kwargs)
        )
        if uses_autograd:
            self._grad_writing_passes.add(self._current_pass)
            self.autograd_written.update(dict.fromkeys(layer.trainable()))
        if sampler is not None:
            switched: List[nn.Parameter] = []
            trainable = layer.trainable()
            batched_dim = self._call_batch_dim(layer, args, kwargs)  # the forward hook reads it from the stack too
            if not self.check_gradients and self._pass_batch_sizes[self._current_pass] > 0:
                if batched_dim[0] and not uses_autograd:
                    switched = trainable
                    for p in switched:
                        p.requires_grad_(False)
                else:  # this call's gradients go through autograd, so autograd writes p.grad for these parameters
                    self.autograd_kept.update(dict.fromkeys(trainable))
                    self._grad_writing_passes.add(self._current_pass)
            self._switched_off.append((switched, batched_dim, trainable))
        return _bounded_inputs(args, kwargs) if uses_autograd else None

    def _on_forward(self, module: nn.Module, args, kwargs, output, *, layer: HookedLayer):
        if not self._recomputing:
            return self._record_call(module, args, kwargs, output, layer)
        try:  # a call re-run by activation checkpointing: done exactly as in its pass
            return self._record_call(module, args, kwargs, output, layer)
        finally:
            self._recomputing -= 1
            if not self._recomputing:
                self._current_pass = None

    def _record_call(self, module: nn.Module, args, kwargs, output, layer: HookedLayer):
        if self._current_pass is None or self._current_pass in self._whole_passes:
            return None
        switched, batched_dim, trainable = self._switched_off.pop() if layer.sampler is not None else ([], None, [])
        for p in switched:
            p.requires_grad_(True)
        batch_size = self._pass_batch_sizes[self._current_pass]
        leaves, rebuild_output = flatten(output)
        for p in switched:
            if p not in self.grad_snapshots:
                self.grad_snapshots[p] = (p.grad, p.grad._version if p.grad is not None else 0)
        sampler = layer.sampler
        # Watched tensors are read once and dropped: the hooks hold the watched tensors' graph nodes, not the
        # tensors, so those that backward does not need are freed after the forward.
        watched = _take_watched(leaves[0]) if leaves and sampler is not None and sampler.forward is not None else ()
        kept_by_node = sampler is not None and not watched
        # Every output that needs a gradient (or needed none only because the parameters were off) goes through a
        # keeper node (_Keep) on the anchor. For samplers it holds the call's inputs with autograd's lifetime and
        # delivers the outputs' gradients; recorded layers (watched intermediates, delivered after the layer's
        # backward) and the fallback keep their inputs themselves and hook its outputs. A backward that does not
        # reach the anchor's AccumulateGrad is not a training backward (``torch.autograd.grad``,
        # ``backward(inputs=...)``) and samples nothing (see _on_output_grads).
        routed = [i for i, t in enumerate(leaves) if _is_float_tensor(t) and (t.requires_grad or switched)]
        if batch_size == 0 or not (routed or any(isinstance(t, torch.Tensor) and t.requires_grad for t in leaves)):
            return None
        batched, batch_dim = batched_dim if batched_dim is not None else self._call_batch_dim(layer, args, kwargs)
        if not batched:  # a sampled layer on a tensor without the batch: the enclosing layer covers it
            return None
        input_leaves, rebuild_inputs = flatten_call(args, kwargs)
        kept = [i for i, t in enumerate(input_leaves) if isinstance(t, torch.Tensor)] if kept_by_node else []
        hooked_leaves = list(leaves)
        anchor_node = None  # with no float output routed (a complex one, say), every backward samples the call
        if routed:
            kept_inputs = [input_leaves[i] for i in kept]
            to_route = [leaves[i] for i in routed]
            delivery = _Delivery() if kept_by_node else _NO_DELIVERY
            anchor, anchor_node = self._anchor(to_route[0])
            outputs = _keep_apply(anchor, delivery, len(kept), *kept_inputs, *to_route)
            outputs = (outputs,) if len(to_route) == 1 else outputs
            for i, t in zip(routed, outputs):
                hooked_leaves[i] = t
        replaced = rebuild_output(hooked_leaves) if routed else None  # what the forward hook returns
        needs_grad = [i for i, t in enumerate(hooked_leaves) if isinstance(t, torch.Tensor) and t.requires_grad]
        if not needs_grad:
            return replaced
        if sampler is not None:
            params = trainable
        else:
            params = layer.trainable(recurse=False) + [p for p in layer.trainable() if p not in self._claimed]
            params = list(dict.fromkeys(params))
        for p in params:
            self._claimed[p] = self._current_pass
        keep_node = hooked_leaves[routed[0]].grad_fn if kept else None
        detached_args, detached_kwargs = ((), {}) if keep_node is not None else _detached_call(args, kwargs)
        call = LayerCall(
            args=detached_args,
            kwargs=detached_kwargs,
            layout=_layout(batch_size, self.microbatch_size),
            batch_dim=batch_dim,
            batch_first=self.batch_first,
            pass_index=self._current_pass,
            outputs=leaves if (sampler is None or sampler.keep_outputs) else (),
            output_nodes=[t.grad_fn if isinstance(t, torch.Tensor) else None for t in leaves]
            if kept and sampler.keep_output_nodes and _saved_tensors_readable()
            else (),
        )
        if keep_node is not None:  # the tensors themselves live in the node only (None in the template)
            template = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in input_leaves]
            call.extra["inputs_from"] = (keep_node, template, rebuild_inputs, kept)
        self._open_calls.append(call)  # its references to the node and outputs are dropped at the step
        on_grads = partial(self._on_output_grads, module, layer, call, params, needs_grad, len(leaves), anchor_node)
        if kept_by_node and needs_grad == routed:  # the _Keep node delivers exactly these outputs' gradients
            delivery.callback = on_grads
            self._open_hooks.append(delivery)
        else:
            self._open_hooks.extend(on_output_gradients([hooked_leaves[i] for i in needs_grad], on_grads, watched))
        return replaced

    def _anchor(self, like: torch.Tensor) -> Tuple[torch.Tensor, object]:
        """A scalar leaf that requires grad, on ``like``'s device (what makes tapped outputs require grad), and its
        ``AccumulateGrad`` node."""
        anchor = self._anchors.get(like.device)
        if anchor is None:
            leaf = torch.zeros((), device=like.device, requires_grad=True)
            anchor = self._anchors[like.device] = (leaf, torch.autograd.graph.get_gradient_edge(leaf).node)
        return anchor

    # -- backward: micro-batch sums per parameter and pass -------------------------------------

    def _on_output_grads(
        self,
        module: nn.Module,
        layer: HookedLayer,
        call: LayerCall,
        params: List[nn.Parameter],
        needs_grad: List[int],
        num_leaves: int,
        anchor_node,
        grads: Sequence[Optional[torch.Tensor]],
    ) -> None:
        if not self.hooks_enabled:
            return
        if self._recomputing:
            self.close_recomputation()
        # the backward runs this pass's graph: a re-run of its checkpointed regions belongs to this pass
        self._pass_tasks.setdefault(call.pass_index, set()).add(torch._C._current_graph_task_id())
        if anchor_node is not None and not _targets(anchor_node):
            self._check_not_named(layer, params)
            return  # torch.autograd.grad or backward(inputs=...): gradients for the tensors named, not for training
        self._dropped_passes.discard(call.pass_index)  # a backward after zero_grad() counts, as in plain PyTorch
        # Samplers get the loss's own output gradients; the 1/B of a mean loss is undone once per
        # micro-batch in collect() (on [M, *p.shape]) instead of on every layer's output gradient here.
        grad_outputs: List[Optional[torch.Tensor]] = [None] * num_leaves
        call.watched_grads = [None if g is None else g.detach() for g in grads[len(needs_grad) :]]
        for index, grad in zip(needs_grad, grads):
            if grad is not None:
                if grad.dtype in LOW_PRECISION:  # autocast or a half model: samplers sum micro-batches in float32
                    self.low_precision_seen.add(grad.dtype)
                    if layer.sampler is not None:
                        grad = grad.float()
                grad_outputs[index] = grad.detach()
        if "inputs_from" in call.extra:
            call.args, call.kwargs = self._saved_inputs(layer, *call.extra["inputs_from"])
        # a checkpointed region re-run by a sampler's autograd call is its pass; set in __dict__, as nn.Module's
        # __setattr__ (twice per layer call) costs more than the rest of this bookkeeping
        vars(self)["_sampling_pass"] = call.pass_index
        try:
            if layer.sampler is not None:
                sums = layer.sampler.fn(module, call, grad_outputs)
            else:  # its nested autograd call runs with every output hook suspended (output_hooks.suspended)
                sums = autograd_microbatch_sums(module, call, grad_outputs, params)
        finally:
            vars(self)["_sampling_pass"] = None
        if "inputs_from" in call.extra:
            call.args, call.kwargs = (), {}  # autograd owns them: freed after this backward unless retained
        for param, microbatch_sums in sums.items():
            if microbatch_sums is None:
                continue
            self._add_sums(param, call.pass_index, as_sums(microbatch_sums))

    def _check_not_named(self, layer: HookedLayer, params: Sequence[nn.Parameter]) -> None:
        """Refuse a backward that names some of the model's parameters (``backward(inputs=[...])``,
        ``torch.autograd.grad(loss, params)``): their micro-batch gradients come from plain ``backward()`` only."""
        named = [p for p in params if _targets(torch.autograd.graph.get_gradient_edge(p).node)]
        if named:
            layer_name = layer.name or "the model itself"
            raise BatchError(
                "a backward that names tensors to differentiate (backward(inputs=...) or torch.autograd.grad) "
                f"includes '{self.parameter_name(named[0])}', a parameter of layer '{layer_name}'. mbclip computes "
                "the parameters' micro-batch gradients in a plain loss.backward() only: call that for the update (a "
                "backward that names only other tensors, such as the inputs, is fine)."
            )

    @staticmethod
    def _saved_inputs(layer: HookedLayer, node, input_leaves, rebuild_inputs, kept):
        """The call's ``(args, kwargs)`` back from the _Keep node's saved tensors (detached)."""
        try:
            saved = node.saved_tensors
        except RuntimeError as error:
            raise BatchError(
                f"an input of layer '{layer.name or 'the model itself'}' was changed in place after the layer ran "
                f"({error}). mbclip needs the layer's inputs as they were for its micro-batch gradients: make the "
                "later operation out of place (e.g. torch.relu(x) instead of x.relu_())."
            ) from error
        leaves = list(input_leaves)
        for i, tensor in zip(kept, saved):
            leaves[i] = tensor.detach()
        return rebuild_inputs(leaves)

    # -- what the optimizer reads --------------------------------------------------------------

    def collect(self, params: Sequence[nn.Parameter]) -> Optional[MicroBatchGradients]:
        """Micro-batch sums of ``params`` over every pass that reached backward; ``None`` if none did."""
        if self._recomputing:
            self.close_recomputation()
        for k in self._whole_passes:
            if k not in self._pass_tasks and k not in self._dropped_passes:
                self._take_untracked_whole_pass(k)
        passes = sorted({k for per_pass in self._sums.values() for k in per_pass})
        if not passes:
            return None
        layouts = [_layout(self._pass_batch_sizes[k], self.microbatch_size) for k in passes]
        device = next((p.device for p, per_pass in self._sums.items() if per_pass), None)
        # The sums hold gradients of the loss as backward saw it; one factor per micro-batch turns them into
        # micro-batch gradients: x B_k for a batch-mean loss, / (micro-batch size) for microbatch_reduction="mean".
        # Built as Python lists, then one tensor each: fewer small operations than a fill and a cat per pass.
        size_list: List[int] = []
        scale_list: List[float] = []
        for k, layout in zip(passes, layouts):
            size_list += layout.microbatch_size_list()
            scale_list += [float(self._loss_scale(k))] * layout.num_microbatches
        sizes = torch.tensor(size_list, device=device, dtype=torch.float64)
        scales = torch.tensor(scale_list, device=device, dtype=torch.float64)
        if self.microbatch_reduction == "mean":
            scales = scales / sizes
        collected: List[Optional[MicroBatchSums]] = []
        for p in params:
            per_pass = self._sums.get(p)
            if not per_pass:
                collected.append(None)
                continue
            if len(passes) == 1:  # one pass (the usual step): its sums as they are
                collected.append(per_pass[passes[0]])
                continue
            parts = [
                per_pass[k] if k in per_pass else FormedSums(p.new_zeros((layout.num_microbatches,) + tuple(p.shape)))
                for k, layout in zip(passes, layouts)
            ]
            collected.append(stack_passes(parts))
        return MicroBatchGradients(collected, sizes, layouts, scales)

    def _loss_scale(self, pass_index: int) -> int:
        """What the per-pass sums are multiplied by to become sums of per-sample gradients."""
        return self._pass_batch_sizes[pass_index] if self.loss_reduction == "mean" else 1

    def plain_gradient_of(self, p: nn.Parameter) -> Optional[torch.Tensor]:
        """The gradient autograd should hold for ``p``, rebuilt from the micro-batch sums (for checking)."""
        return self._reduce_passes(
            p, lambda sums: sums.weighted_sum(torch.ones(1, sums.num_microbatches, dtype=torch.float64))[0]
        )

    def gradient_magnitude_of(self, p: nn.Parameter) -> float:
        """Norm of the sum of absolute micro-batch sums: the scale of rounding in :meth:`plain_gradient_of`."""
        total = self._reduce_passes(p, lambda sums: sums.formed().abs().sum(dim=0))
        return float(total.norm()) if total is not None else 0.0

    def _reduce_passes(self, p: nn.Parameter, reduce) -> Optional[torch.Tensor]:
        per_pass = self._sums.get(p)
        if not per_pass:
            return None
        total = None
        for sums in per_pass.values():  # sums of the loss's gradients: they add up to p.grad as they are
            part = reduce(sums)
            total = part if total is None else total + part
        return total

    def parameter_name(self, p: nn.Parameter) -> str:
        return self._param_names.get(p, "<unnamed parameter>")

    def hooked_layers(self) -> Iterator[Tuple[str, str]]:
        """``(layer name, how)`` for every hooked layer: the sampler's name or ``autograd fallback``."""
        for layer in self._plan:
            yield layer.name, layer.sampler.fn.__name__ if layer.sampler else "autograd fallback"
