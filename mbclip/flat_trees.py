"""Flatten a layer call's inputs and outputs into leaves, and rebuild them, without reference cycles.

``torch.utils._pytree.tree_flatten`` defines a recursive helper per call, a function/cell cycle that only the
garbage collector frees. Called several times per layer and step, those cycles made Python's collector run a full
collection every few dozen steps (about 0.25 s each on a model of a few hundred thousand objects). Layers take and
return flat structures (a tensor, a tuple of tensors, arguments and keywords of tensors and options) almost always:
those take the fast path here; anything nested goes through ``tree_flatten`` as before.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Dict, List, Sequence, Tuple

from torch.utils._pytree import tree_flatten, tree_unflatten

Rebuild = Callable[[List[Any]], Any]
_CONTAINERS = (tuple, list, dict)


def _is_leaf(value: Any) -> bool:
    return not isinstance(value, _CONTAINERS)


def _only_leaf(leaves: List[Any]) -> Any:
    return leaves[0]


def _rebuild_call(num_args: int, keys: Tuple[str, ...], leaves: List[Any]) -> Tuple[tuple, Dict[str, Any]]:
    return tuple(leaves[:num_args]), dict(zip(keys, leaves[num_args:]))


def flatten(tree: Any) -> Tuple[List[Any], Rebuild]:
    """``(leaves, rebuild)`` with ``rebuild(leaves)`` giving ``tree`` back (with the new leaves)."""
    if _is_leaf(tree):
        return [tree], _only_leaf
    if type(tree) in (tuple, list) and all(map(_is_leaf, tree)):
        return list(tree), type(tree)
    leaves, spec = tree_flatten(tree)
    return leaves, partial(tree_unflatten, treespec=spec)


def flatten_call(args: Sequence[Any], kwargs: Dict[str, Any]) -> Tuple[List[Any], Rebuild]:
    """Leaves of a call's ``(args, kwargs)``; ``rebuild(leaves)`` gives ``(args tuple, kwargs dict)``."""
    if all(map(_is_leaf, args)) and all(map(_is_leaf, kwargs.values())):
        return list(args) + list(kwargs.values()), partial(_rebuild_call, len(args), tuple(kwargs))
    leaves, spec = tree_flatten((tuple(args), dict(kwargs)))
    return leaves, partial(tree_unflatten, treespec=spec)
