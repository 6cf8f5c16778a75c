"""Deliver the gradient of a layer's outputs once per backward, even after in-place ops on them.

A tensor hook on an output fires with the output's own gradient even when the output is later
changed in place (``nn.ReLU(inplace=True)``). One case escapes it: when the output is a *view*
(``nn.Linear`` on a 3-D input returns a view of a 2-D matmul result), an in-place op rebases the
view and drops its backward node, so its hook never fires. The view's base keeps its node, so the
base is hooked too and the view is replayed on the base's gradient (``Tensor._view_func``).

Several tensors share one hook (:func:`_all_grads_hook`) that fires once all of them that this backward reaches
have their gradient, like torch's ``register_multi_grad_hook(mode="all")``, but also when one of them is a root of
the backward (a reentrant checkpoint's re-run returns a layer's output directly), which torch's never fires for.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, ContextManager, Iterator, List, Optional, Sequence

import torch
from torch.utils.hooks import RemovableHandle

GradsCallback = Callable[[List[Optional[torch.Tensor]]], None]

_state = threading.local()


@contextmanager
def _flag_set(name: str) -> Iterator[None]:
    """Set a thread-local flag for the block (nesting restores the outer value)."""
    previous = getattr(_state, name, False)
    setattr(_state, name, True)
    try:
        yield
    finally:
        setattr(_state, name, previous)


def suspended() -> ContextManager[None]:
    """Make every output hook a no-op (state untouched) inside the block.

    For nested ``autograd.grad`` calls made from within a hook (the autograd fallback): they walk
    parts of the same graph and would otherwise fire, or use up, hooks meant for the outer backward.
    """
    return _flag_set("suspended")


class InputBoundary(torch.autograd.Function):
    """Identity on a layer's inputs that the autograd fallback's nested backward does not cross.

    The fallback differentiates a layer's outputs with respect to its parameters through the recorded graph;
    without a boundary that walk would go on past the layer's inputs and count a parameter's uses *before* the
    call too (a layer applied twice in a row, weights shared across depth). In the model's own backward it passes
    gradients through unchanged.
    """

    @staticmethod
    def forward(ctx, *tensors: torch.Tensor):
        return tuple(t.detach() for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        return tuple(None if is_suspended() else g for g in grads)


def unrecorded() -> ContextManager[None]:
    """Layer calls inside the block are not recorded: a sampler running its own layer's code again (in backward,
    where a call is otherwise taken for activation checkpointing's re-run of a pass)."""
    return _flag_set("unrecorded")


def is_unrecorded() -> bool:
    return getattr(_state, "unrecorded", False)


def is_suspended() -> bool:
    """Inside :func:`suspended`: output hooks (and the keeper nodes' deliveries) do nothing."""
    return getattr(_state, "suspended", False)


def on_output_gradients(
    tensors: Sequence[torch.Tensor], callback: GradsCallback, watched: Sequence[torch.Tensor] = ()
) -> List[RemovableHandle]:
    """Call ``callback(grads)`` once per backward with the gradient of each of ``tensors`` (or ``None``).

    ``watched``: a layer's own intermediate tensors (never changed in place) whose gradients the sampler
    reads too; they follow the outputs' in ``grads``, and the callback waits until they are computed.

    Returns the hook handles. Remove them once no backward will come: torch's multi-tensor hook holds the
    tensors' graph nodes, and with a watched tensor upstream of an output that is a reference cycle through the
    autograd graph, which Python's garbage collector cannot see (the whole graph would leak).
    """
    if len(tensors) == 1 and not watched:
        return _hook_single(tensors[0], callback)
    bases = [t._base for t in tensors if t._is_view()]
    targets, replays = [], []
    for tensor in tensors:
        use_base = tensor._is_view() and sum(b is tensor._base for b in bases) == 1
        targets.append(tensor._base if use_base else tensor)
        replays.append(tensor._view_func if use_base else None)
    targets += list(watched)
    replays += [None] * len(watched)

    def on_grads(grads: Sequence[Optional[torch.Tensor]]) -> None:
        if is_suspended():
            return
        callback([g if replay is None or g is None else _replay(replay, g) for g, replay in zip(grads, replays)])

    return _all_grads_hook(targets, on_grads)


def _all_grads_hook(tensors: Sequence[torch.Tensor], callback: GradsCallback) -> List[RemovableHandle]:
    """Call ``callback(grads)`` once per backward, when every tensor of ``tensors`` that the backward reaches has its
    gradient (``None`` for the others).

    The count of expected gradients is the tensors whose node the engine will execute, plus each tensor whose hook
    fires although its node is not counted: a root of the backward, whose hook runs first. A final callback of the
    backward fires what is still pending, so a miscount can only delay the callback, never lose it.
    """
    grad_fns = [t.grad_fn if t.grad_fn is not None else t.view_as(t).grad_fn.next_functions[0][0] for t in tensors]
    pending: dict = {}  # graph task -> [expected count, gradients so far, how many arrived]
    lock = threading.Lock()

    def fire(task: int) -> None:
        state = pending.pop(task, None)
        if state is not None:
            callback(state[1])

    def hook_for(index: int):
        def on_grad(grad: torch.Tensor) -> None:
            task = torch._C._current_graph_task_id()
            with lock:
                state = pending.get(task)
                if state is None:
                    expected = sum(map(torch._C._will_engine_execute_node, grad_fns))
                    state = pending[task] = [expected, [None] * len(grad_fns), 0]
                    torch.autograd.Variable._execution_engine.queue_callback(lambda: fire(task))
                if not torch._C._will_engine_execute_node(grad_fns[index]):
                    state[0] += 1  # a root of this backward
                state[1][index] = grad
                state[2] += 1
                done = state[2] >= state[0]
            if done:
                fire(task)

        return on_grad

    return [t.register_hook(hook_for(i)) for i, t in enumerate(tensors)]


def _hook_single(tensor: torch.Tensor, callback: GradsCallback) -> List[RemovableHandle]:
    if not tensor._is_view():
        return [tensor.register_hook(lambda grad: None if is_suspended() else callback([grad]))]
    view_fired = [False]
    replay = tensor._view_func

    def on_view(grad: torch.Tensor) -> None:
        if is_suspended():
            return
        view_fired[0] = True
        callback([grad])

    def on_base(grad: torch.Tensor) -> None:
        if is_suspended():
            return
        if view_fired[0]:  # the view's own hook already delivered this backward's gradient
            view_fired[0] = False
            return
        callback([_replay(replay, grad)])

    return [tensor.register_hook(on_view), tensor._base.register_hook(on_base)]


def _replay(view_func, grad: torch.Tensor) -> torch.Tensor:
    """The view of ``grad`` that ``view_func`` makes of the base.

    ``Tensor._view_func`` returns ``None`` on an expanded gradient (stride 0, what ``.sum()`` sends back), so the
    gradient is made contiguous first (free when it already is).
    """
    return view_func(grad.contiguous())
