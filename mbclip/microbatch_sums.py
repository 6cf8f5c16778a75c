"""Micro-batch sums of one parameter's gradients: formed ``[M, *shape]``, or kept as factors (ghost norms).

A sampler's answer for a weight used as ``x @ W.T`` is ``G_j = sum_r g_r a_r^T`` over the rows ``r`` of
micro-batch ``j``. Forming every ``G_j`` costs ``M x params`` memory. Kept as its factors (output gradients
``g`` and activations ``a``), its norm comes from Gram matrices, ``||G_j||^2 = sum_{r,s} (g_r . g_s)(a_r . a_s)``
(the "ghost norm"), and the clipped update ``sum_j w_j G_j`` is one matmul of the weighted output gradients
with the activations: the book-keeping pass, as cheap as autograd's own weight gradient.
:func:`outer_product_sums` picks the cheaper form per layer and call.
"""

from __future__ import annotations

from collections import Counter
from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn.functional as F

LOW_PRECISION = (torch.float16, torch.bfloat16)
# Bound on the elements of one chunk of Gram matrices [chunk, n, n] (memory of the ghost norms).
MAX_GRAM_ELEMENTS = 1 << 24
# Formed sums of one call up to this many numbers (1 MiB in float32), and at most FORMED_MEMORY_SLACK times the
# numbers of their factors, are formed even where the factors are smaller (see prefers_factors): on CPU they stay in
# the caches from the sampler to the step, where the Gram matrices cost about what forming does. The rel-pos
# conformer at b = 4 (its 144 x 144 weights: 8 micro-batches of 60 rows) went from 1.28-1.34x to 1.25-1.30x a plain
# step (four interleaved A/B runs).
CACHED_FORMED_ELEMENTS = 1 << 18
FORMED_MEMORY_SLACK = 1.5


class FormedSums:
    """Micro-batch sums held as one tensor ``[M, *shape]``."""

    def __init__(self, sums: torch.Tensor):
        self.sums = sums

    @property
    def num_microbatches(self) -> int:
        return self.sums.shape[0]

    def norms(self, grams: Optional[GramCache] = None) -> torch.Tensor:
        """``[M]``: the L2 norm of each micro-batch sum, in float32 at least."""
        sums = _at_least_float32(self.sums)
        return torch.linalg.vector_norm(sums, dim=tuple(range(1, sums.dim()))) if sums.dim() > 1 else sums.abs()

    def weighted_sum(self, weights: torch.Tensor, kept: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[K, *shape]``: ``sum_j weights[k, j] * G_j``; ``kept`` (bool ``[M]``) leaves out dropped micro-batches."""
        flat, order = _rows_in_memory_order(self.sums)
        if weights.dtype != flat.dtype or weights.device != flat.device:
            weights = weights.to(device=flat.device, dtype=flat.dtype)
        if kept is not None:  # a dropped (non-finite) micro-batch must not reach the sum, not even as 0 * NaN
            flat, weights = flat[kept], weights[:, kept]
        if weights.shape == (1, 1):  # one micro-batch (b = B): a scaling, cheaper than a matmul with k = 1
            return _in_parameter_order(flat * weights, self.sums, order)
        return _in_parameter_order(torch.mm(weights, flat), self.sums, order)

    def weighted_total(self, weights: torch.Tensor) -> torch.Tensor:
        """``[*shape]``: ``sum_j weights[j] * G_j`` for ``weights`` ``[M]`` of the sums' dtype and device (the step's
        update: one row, nothing dropped, in as few operations as the sum takes)."""
        flat, order = _rows_in_memory_order(self.sums)
        return _in_parameter_order(torch.mm(weights.view(1, -1), flat), self.sums, order)[0]

    def formed(self) -> torch.Tensor:
        return self.sums


def _rows_in_memory_order(sums: torch.Tensor) -> Tuple[torch.Tensor, Optional[List[int]]]:
    """``[M, n]``: formed sums as rows without a copy, and the order of their dims in memory where it is not the
    parameter's (a sampler that computed them in another layout hands back a permuted view)."""
    if sums.dim() > 2 and not sums.is_contiguous():
        order = [0] + sorted(range(1, sums.dim()), key=sums.stride, reverse=True)
        in_memory = sums.permute(order)
        if in_memory.is_contiguous():
            return in_memory.reshape(sums.shape[0], -1), order
    return sums.reshape(sums.shape[0], -1), None


def _in_parameter_order(rows: torch.Tensor, sums: torch.Tensor, order: Optional[List[int]]) -> torch.Tensor:
    """``[K, n]`` products of :func:`_rows_in_memory_order`'s rows -> ``[K, *shape]``, contiguous."""
    if order is None:
        return rows.view((rows.shape[0],) + tuple(sums.shape[1:]))
    in_memory = rows.view((rows.shape[0],) + tuple(sums.shape[d] for d in order[1:]))
    return in_memory.permute([0] + [order.index(d) for d in range(1, sums.dim())]).contiguous()


class FactoredSums:
    """Micro-batch sums ``G_j = backprops_j^T @ activations_j`` kept as their factors.

    ``backprops``: ``[M, n, out]``, ``activations``: ``[M, n, in]`` (rows of each micro-batch; zero rows pad
    a ragged micro-batch exactly); ``shape``: the parameter's shape (``out * in`` elements).
    """

    def __init__(self, backprops: torch.Tensor, activations: torch.Tensor, shape: Sequence[int]):
        self.backprops = backprops
        self.activations = activations
        self.shape = tuple(shape)

    @property
    def num_microbatches(self) -> int:
        return self.backprops.shape[0]

    def norms(self, grams: Optional[GramCache] = None) -> torch.Tensor:
        """``[M]`` ghost norms from the Gram matrices of the two factors, chunked to bound memory; ``grams`` shares
        the Gram matrices of a factor that other parameters' sums use too."""
        return _root(self.squared_norms(grams))

    def squared_norms(self, grams: Optional[GramCache] = None) -> torch.Tensor:
        """``[M]`` squared ghost norms (rounding may leave a tiny negative one: :func:`_root` clamps it)."""
        grams = grams if grams is not None else GramCache(set())
        rows = self.backprops.shape[1]
        chunk = max(1, MAX_GRAM_ELEMENTS // max(rows * rows, 1))
        squared = []
        for first in range(0, self.num_microbatches, chunk):
            g, a = (grams.gram(t, first, first + chunk) for t in (self.backprops, self.activations))
            squared.append((g * a).sum(dim=(1, 2)))
        return squared[0] if len(squared) == 1 else torch.cat(squared)

    def weighted_sum(self, weights: torch.Tensor, kept: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[K, *shape]``: one matmul per row of ``weights`` over every micro-batch's rows at once."""
        factors = self
        if kept is not None:
            factors = FactoredSums(self.backprops[kept], self.activations[kept], self.shape)
            weights = weights[:, kept]
        weights = weights.to(device=self.backprops.device, dtype=self.backprops.dtype)
        totals = [factors.weighted_total(row) for row in weights]
        return totals[0].unsqueeze(0) if len(totals) == 1 else torch.stack(totals)  # one row: no copy

    def weighted_total(self, weights: torch.Tensor) -> torch.Tensor:
        """``[*shape]``: one matmul over every micro-batch's rows, each micro-batch's weight scaling its rows of the
        narrower factor; ``weights`` ``[M]`` of the factors' dtype and device."""
        backprops, activations = self.backprops, self.activations
        out_features, in_features = backprops.shape[-1], activations.shape[-1]
        if out_features <= in_features:
            scaled = (backprops * weights.view(-1, 1, 1)).reshape(-1, out_features)
            total = torch.mm(scaled.t(), activations.reshape(-1, in_features))
        else:
            scaled = (activations * weights.view(-1, 1, 1)).reshape(-1, in_features)
            total = torch.mm(backprops.reshape(-1, out_features).t(), scaled)
        return total.view(self.shape)

    def formed(self) -> torch.Tensor:
        return torch.bmm(self.backprops.transpose(1, 2), self.activations).view((-1,) + self.shape)


class IndexedSums:
    """Micro-batch sums of rows scattered into a table, ``G_j[v] = sum_{r in j, index_r = v} g_r`` (an embedding).

    ``rows``: ``[M, n, d]`` gradient rows, ``indices``: ``[M, n]`` their table rows, ``num_rows``: the table size.
    Norms come from the Gram matrix of the rows masked to equal indices; the update is one ``index_add_``.
    """

    def __init__(self, rows: torch.Tensor, indices: torch.Tensor, num_rows: int):
        self.rows = rows
        self.indices = indices
        self.num_rows = num_rows

    @property
    def num_microbatches(self) -> int:
        return self.rows.shape[0]

    def norms(self, grams: Optional[GramCache] = None) -> torch.Tensor:
        return _root(self.squared_norms(grams))

    def squared_norms(self, grams: Optional[GramCache] = None) -> torch.Tensor:
        rows = self.rows.shape[1]
        chunk = max(1, MAX_GRAM_ELEMENTS // max(rows * rows, 1))
        squared = []
        for first in range(0, self.num_microbatches, chunk):
            index = self.indices[first : first + chunk]
            same_row = index.unsqueeze(2) == index.unsqueeze(1)
            squared.append((_compute_gram(self.rows[first : first + chunk]) * same_row).sum(dim=(1, 2)))
        return squared[0] if len(squared) == 1 else torch.cat(squared)

    def weighted_sum(self, weights: torch.Tensor, kept: Optional[torch.Tensor] = None) -> torch.Tensor:
        rows, indices = self.rows, self.indices
        if kept is not None:
            rows, indices, weights = rows[kept], indices[kept], weights[:, kept]
        weights = weights.to(device=rows.device, dtype=rows.dtype)
        flat_index = indices.reshape(-1)
        sums = []
        for row in weights:
            table = rows.new_zeros(self.num_rows, rows.shape[-1])
            sums.append(table.index_add_(0, flat_index, (rows * row.view(-1, 1, 1)).reshape(-1, rows.shape[-1])))
        return sums[0].unsqueeze(0) if len(sums) == 1 else torch.stack(sums)

    def weighted_total(self, weights: torch.Tensor) -> torch.Tensor:
        return self.weighted_sum(weights.view(1, -1))[0]

    def formed(self) -> torch.Tensor:
        num_microbatches, _, width = self.rows.shape
        offsets = torch.arange(num_microbatches, device=self.indices.device).unsqueeze(1) * self.num_rows
        table = self.rows.new_zeros(num_microbatches * self.num_rows, width)
        table.index_add_(0, (self.indices + offsets).reshape(-1), self.rows.reshape(-1, width))
        return table.view(num_microbatches, self.num_rows, width)


class StackedSums:
    """Consecutive runs of micro-batches (one per forward pass) of one parameter, in order."""

    def __init__(self, parts: List[MicroBatchSums]):
        self.parts = parts

    @property
    def num_microbatches(self) -> int:
        return sum(part.num_microbatches for part in self.parts)

    def _ranges(self):
        first = 0
        for part in self.parts:
            yield part, slice(first, first + part.num_microbatches)
            first += part.num_microbatches

    def norms(self, grams: Optional[GramCache] = None) -> torch.Tensor:
        return torch.cat([part.norms(grams) for part in self.parts])

    def weighted_sum(self, weights: torch.Tensor, kept: Optional[torch.Tensor] = None) -> torch.Tensor:
        total = None
        for part, rows in self._ranges():
            piece = part.weighted_sum(weights[:, rows], None if kept is None else kept[rows])
            total = piece if total is None else total + piece
        return total

    def weighted_total(self, weights: torch.Tensor) -> torch.Tensor:
        total = None
        for part, rows in self._ranges():
            dtype, device = _dtype_and_device(part)
            piece = part.weighted_total(weights[rows].to(dtype=dtype, device=device))
            total = piece if total is None else total + piece
        return total

    def formed(self) -> torch.Tensor:
        return torch.cat([part.formed() for part in self.parts])


MicroBatchSums = Union[FormedSums, FactoredSums, IndexedSums, StackedSums]


def _single_formed(sums: Sequence[MicroBatchSums]) -> List[int]:
    """Indices of formed sums of one micro-batch (b >= B): for those, one foreach call does every parameter."""
    return [i for i, part in enumerate(sums) if isinstance(part, FormedSums) and part.num_microbatches == 1]


def norms_of(sums: Sequence[MicroBatchSums], grams: Optional[GramCache] = None) -> List[torch.Tensor]:
    """Each parameter's ``[M]`` norms; single formed micro-batches in one ``_foreach_norm`` (as ``clip_grad_norm_``),
    not one call per parameter, and the square roots of every ghost norm in one operation."""
    norms: List[Optional[torch.Tensor]] = [None] * len(sums)
    single = _single_formed(sums)
    if single:
        for i, norm in zip(single, torch._foreach_norm([_at_least_float32(sums[i].sums) for i in single])):
            norms[i] = norm.reshape(1)
    squared: Dict[int, torch.Tensor] = {}
    for i, part in enumerate(sums):
        if norms[i] is None:
            if isinstance(part, (FactoredSums, IndexedSums)):
                squared[i] = part.squared_norms(grams)
            else:
                norms[i] = part.norms(grams)
    if len({(t.dtype, t.device) for t in squared.values()}) == 1:
        for i, root in zip(squared, _root(torch.stack(list(squared.values()))).unbind(0)):
            norms[i] = root
    else:
        for i, value in squared.items():
            norms[i] = _root(value)
    return norms


def _root(squared_norms: torch.Tensor) -> torch.Tensor:
    return squared_norms.clamp_min(0).sqrt()


def weighted_sums_of(sums: Sequence[MicroBatchSums], weights: torch.Tensor) -> List[torch.Tensor]:
    """``sum_j weights[0, j] G_j`` for every parameter (one row of weights shared by all, nothing dropped), shaped
    like the parameter; single formed micro-batches are scaled in one ``_foreach_mul``."""
    summed: List[Optional[torch.Tensor]] = [None] * len(sums)
    like_weights = (weights.dtype, weights.device)
    single = [
        i
        for i in _single_formed(sums)
        if (sums[i].sums.dtype, sums[i].sums.device) == like_weights and sums[i].sums.is_contiguous()
    ]
    if single:
        scaled = torch._foreach_mul([sums[i].sums[0] for i in single], weights.reshape(()))
        for i, tensor in zip(single, scaled):
            summed[i] = tensor
    rows: Dict[Tuple[torch.dtype, torch.device], torch.Tensor] = {like_weights: weights.reshape(-1)}
    for i, (total, part) in enumerate(zip(summed, sums)):
        if total is None:
            kind = _dtype_and_device(part)
            row = rows.get(kind)
            if row is None:  # the weights converted once per dtype and device, not once per parameter
                row = rows[kind] = weights.reshape(-1).to(dtype=kind[0], device=kind[1])
            summed[i] = part.weighted_total(row)
    return summed


def _dtype_and_device(sums: MicroBatchSums) -> Tuple[torch.dtype, torch.device]:
    """The dtype and device a sum's weights must have (those of its first part, for stacked passes)."""
    if isinstance(sums, StackedSums):
        return _dtype_and_device(sums.parts[0])
    if isinstance(sums, FormedSums):
        tensor = sums.sums
    elif isinstance(sums, FactoredSums):
        tensor = sums.backprops
    else:
        tensor = sums.rows
    return tensor.dtype, tensor.device


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() if tensor.dtype in LOW_PRECISION else tensor


FactorKey = Tuple[object, ...]


def _factor_key(tensor: torch.Tensor) -> FactorKey:
    """Equal for two views of the same numbers (same memory, shape and strides), as factors often are."""
    return (tensor.device, tensor.dtype, tensor.data_ptr(), tuple(tensor.shape), tensor.stride())


class GramCache:
    """Gram matrices ``t_j t_j^T`` of the factors that several parameters' sums share, computed once per step.

    An LSTM layer's input and hidden weights share their gate gradients, a rel-pos attention's q, k and v
    projections their input: their ghost norms then need that factor's Gram matrices once. Only factors used more
    than once are kept (each Gram matrix is smaller than its factor), and only for one step's norms.
    """

    def __init__(self, shared: Set[FactorKey]):
        self._shared = shared
        self._grams: Dict[Tuple[FactorKey, int], torch.Tensor] = {}

    @classmethod
    def of_shared_factors(cls, sums: Sequence[Optional[MicroBatchSums]]) -> GramCache:
        counts = Counter(_factor_key(t) for part in sums for t in _factors_of(part))
        return cls({key for key, count in counts.items() if count > 1})

    def gram(self, tensor: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """The Gram matrices of micro-batches ``first:last`` of ``tensor``."""
        part = tensor if first == 0 and last >= tensor.shape[0] else tensor[first:last]
        if not self._shared:
            return _compute_gram(part)
        key = _factor_key(tensor)
        if key not in self._shared:
            return _compute_gram(part)
        gram = self._grams.get((key, first))
        if gram is None:
            gram = self._grams[(key, first)] = _compute_gram(part)
        return gram


def _factors_of(sums: Optional[MicroBatchSums]) -> Iterator[torch.Tensor]:
    if isinstance(sums, FactoredSums):
        yield sums.backprops
        yield sums.activations
    elif isinstance(sums, StackedSums):
        for part in sums.parts:
            yield from _factors_of(part)


def pads_gram_rows(tensor: torch.Tensor) -> bool:
    """Whether :func:`_compute_gram` adds one zero row to ``[M, n, d]`` first (CPU, ``n % 8 == 7``, large enough)."""
    rows, features = tensor.shape[1], tensor.shape[2]
    large = rows >= GRAM_PADDING_MIN_ROWS and features >= GRAM_PADDING_MIN_FEATURES
    return tensor.device.type == "cpu" and rows % 8 == 7 and large


# On CPU a batched matmul ``[M, n, d] @ [M, d, n]`` with n one short of a multiple of 8 (15, 23, 31, ... rows) ran
# 1.1-2x slower than with one zero row more, copy included (AMD EPYC, d >= 128; the rel-pos conformer's 15 frames
# per sample at b = 1); a zero row changes no other entry. Fewer rows or features: the copy costs more than it saves.
GRAM_PADDING_MIN_ROWS = 15
GRAM_PADDING_MIN_FEATURES = 128


def _compute_gram(tensor: torch.Tensor) -> torch.Tensor:
    """``[M, n, n]``: each micro-batch's row dot products, through one more (zero) row where that is faster."""
    tensor = _at_least_float32(tensor)
    if pads_gram_rows(tensor):
        rows = tensor.shape[1]
        padded = F.pad(tensor, (0, 0, 0, 1))
        return torch.bmm(padded, padded.transpose(1, 2))[:, :rows, :rows]
    return torch.bmm(tensor, tensor.transpose(1, 2))


def prefers_factors(rows: int, out_features: int, in_features: int, num_microbatches: int = 1) -> bool:
    """The cost model: keep factors when they are smaller than the formed sums, unless the formed sums are small.

    Per micro-batch, factors hold ``rows * (out + in)`` numbers and formed sums ``out * in``: keeping the smaller
    bounds the memory by what the layer's activations and output gradients take anyway. Both paths run one matmul of
    ``rows * out * in`` per micro-batch (forming, or the factored update); then factors add the Gram matrices
    (``rows^2 * (out + in)``), formed sums passes over ``M * out * in`` numbers (norms, weighted sum). Those passes
    are cheap while the formed sums are small and stay in the caches, and the Gram matrices dear while the factors
    are about as large as the formed sums: then the sums are formed (:data:`CACHED_FORMED_ELEMENTS`,
    :data:`FORMED_MEMORY_SLACK`). Forming every Linear sum of the transformer LM at b = 1 was faster on CPU (1.15x
    against 1.3x a plain step) but took 1.96x its peak memory: large sums stay factored.
    """
    formed, factors = out_features * in_features, rows * (out_features + in_features)
    if factors >= formed:
        return False
    small = num_microbatches * formed <= CACHED_FORMED_ELEMENTS and formed <= FORMED_MEMORY_SLACK * factors
    return not small


def outer_product_sums(
    backprops: torch.Tensor, activations: torch.Tensor, shape: Optional[Sequence[int]] = None
) -> Union[torch.Tensor, FactoredSums]:
    """``sum_r g_r a_r^T`` per micro-batch from ``[M, n, out]`` and ``[M, n, in]``: formed or factored, the cheaper."""
    num_microbatches, rows, out_features = backprops.shape
    in_features = activations.shape[-1]
    shape = tuple(shape) if shape is not None else (out_features, in_features)
    if prefers_factors(rows, out_features, in_features, num_microbatches):
        return FactoredSums(backprops, activations, shape)
    return torch.bmm(backprops.transpose(1, 2), activations).view((-1,) + shape)


def prefers_indexed(rows: int, num_rows: int) -> bool:
    """The cost model for tables: keep the rows when a micro-batch has fewer of them than the table."""
    return rows < num_rows


def scattered_row_sums(rows: torch.Tensor, indices: torch.Tensor, num_rows: int) -> Union[torch.Tensor, IndexedSums]:
    """Table gradients per micro-batch from ``[M, n, d]`` rows and ``[M, n]`` indices: indexed when ``n`` rows take
    less memory than the formed ``[M, num_rows, d]`` tables, else formed."""
    indexed = IndexedSums(rows, indices, num_rows)
    return indexed if prefers_indexed(rows.shape[1], num_rows) else indexed.formed()


def as_sums(value: Union[torch.Tensor, MicroBatchSums]) -> MicroBatchSums:
    return FormedSums(value) if isinstance(value, torch.Tensor) else value


def add_sums(first: MicroBatchSums, second: MicroBatchSums) -> MicroBatchSums:
    """Two contributions to the same micro-batches (a layer called twice in one pass)."""
    if isinstance(first, FactoredSums) and isinstance(second, FactoredSums) and first.shape == second.shape:
        # G_j = g1_j^T a1_j + g2_j^T a2_j = [g1_j; g2_j]^T [a1_j; a2_j]: still factored, rows concatenated
        return FactoredSums(
            torch.cat([first.backprops, second.backprops], dim=1),
            torch.cat([first.activations, second.activations], dim=1),
            first.shape,
        )
    if isinstance(first, IndexedSums) and isinstance(second, IndexedSums) and first.num_rows == second.num_rows:
        rows = torch.cat([first.rows, second.rows], dim=1)
        return IndexedSums(rows, torch.cat([first.indices, second.indices], dim=1), first.num_rows)
    return FormedSums(first.formed() + second.formed())


def stack_passes(parts: List[MicroBatchSums]) -> MicroBatchSums:
    """One object over the micro-batches of several passes (formed sums are concatenated once)."""
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(part, FormedSums) for part in parts):
        return FormedSums(torch.cat([part.sums for part in parts], dim=0))
    return StackedSums(parts)
