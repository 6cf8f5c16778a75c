"""Deliver the gradient of a layer's outputs once per backward, even after in-place ops on them.

A tensor hook on an output fires with the output's own gradient even when the output is later
changed in place (``nn.ReLU(inplace=True)``). One case escapes it: when the output is a *view*
(``nn.Linear`` on a 3-D input returns a view of a 2-D matmul result), an in-place op rebases the
view and drops its backward node, so its hook never fires. The view's base keeps its node, so the
base is hooked too and the view is replayed on the base's gradient (``Tensor._view_func``).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
from torch.autograd.graph import register_multi_grad_hook

GradsCallback = Callable[[List[Optional[torch.Tensor]]], None]


def on_output_gradients(tensors: Sequence[torch.Tensor], callback: GradsCallback) -> None:
    """Call ``callback(grads)`` once per backward with the gradient of each of ``tensors`` (or ``None``)."""
    if len(tensors) == 1:
        _hook_single(tensors[0], callback)
        return
    bases = [t._base for t in tensors if t._is_view()]
    targets, replays = [], []
    for tensor in tensors:
        use_base = tensor._is_view() and sum(b is tensor._base for b in bases) == 1
        targets.append(tensor._base if use_base else tensor)
        replays.append(tensor._view_func if use_base else None)

    def on_grads(grads: Sequence[Optional[torch.Tensor]]) -> None:
        callback([replay(g) if replay is not None and g is not None else g for g, replay in zip(grads, replays)])

    register_multi_grad_hook(targets, on_grads, mode="all")


def _hook_single(tensor: torch.Tensor, callback: GradsCallback) -> None:
    if not tensor._is_view():
        tensor.register_hook(lambda grad: callback([grad]))
        return
    # A count, not a flag: a nested autograd call inside the callback (the autograd fallback walks the
    # layer's graph again) fires both hooks once more before the outer base hook runs.
    view_deliveries = [0]
    replay = tensor._view_func

    def on_view(grad: torch.Tensor) -> None:
        view_deliveries[0] += 1
        callback([grad])

    def on_base(grad: torch.Tensor) -> None:
        if view_deliveries[0]:  # the view's own hook already delivered this backward's gradient
            view_deliveries[0] -= 1
            return
        callback([replay(grad)])

    tensor.register_hook(on_view)
    tensor._base.register_hook(on_base)
