"""How a batch of B samples splits into contiguous micro-batches of b samples."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch


@dataclass(frozen=True)
class MicroBatchLayout:
    """Samples ``i`` of a batch belong to micro-batch ``i // microbatch_size``; the last may be smaller."""

    batch_size: int
    microbatch_size: int

    @property
    def num_microbatches(self) -> int:
        return -(-self.batch_size // self.microbatch_size)

    @property
    def padded_size(self) -> int:
        """Batch size rounded up to a whole number of micro-batches."""
        return self.num_microbatches * self.microbatch_size

    def microbatch_size_list(self) -> List[int]:
        """Number of samples in each micro-batch, as ``M`` Python ints."""
        if not self.num_microbatches:
            return []
        last = self.batch_size - (self.num_microbatches - 1) * self.microbatch_size
        return [self.microbatch_size] * (self.num_microbatches - 1) + [last]

    def microbatch_sizes(self, device=None, dtype=torch.float64) -> torch.Tensor:
        """Number of samples in each micro-batch, shape ``[M]``."""
        return torch.tensor(self.microbatch_size_list(), device=device, dtype=dtype)

    def microbatch_index(self, device=None) -> torch.Tensor:
        """Micro-batch id of every sample, shape ``[B]``."""
        return torch.arange(self.batch_size, device=device) // self.microbatch_size

    def microbatch_slices(self) -> List[slice]:
        """Each micro-batch's samples as a slice of dim 0 (the last may be shorter)."""
        b = self.microbatch_size
        return [slice(start, min(start + b, self.batch_size)) for start in range(0, self.batch_size, b)]

    def group(self, tensor: torch.Tensor) -> torch.Tensor:
        """``[B, ...] -> [M, b, ...]``; the ragged last micro-batch is padded with zeros.

        Zero padding is exact for every sum over samples: a padded sample adds nothing.
        """
        if tensor.shape[0] != self.batch_size:
            raise ValueError(f"expected {self.batch_size} samples on dim 0, got shape {tuple(tensor.shape)}")
        missing = self.padded_size - self.batch_size
        if missing:
            pad = tensor.new_zeros((missing,) + tuple(tensor.shape[1:]))
            tensor = torch.cat([tensor, pad], dim=0)
        return tensor.reshape((self.num_microbatches, self.microbatch_size) + tuple(tensor.shape[1:]))

    def sum_per_microbatch(self, tensor: torch.Tensor) -> torch.Tensor:
        """``[B, ...] -> [M, ...]``: the sum over each micro-batch's samples (at b = 1 the tensor itself, no copy)."""
        if self.microbatch_size == 1 and tensor.shape[0] == self.batch_size:
            return tensor
        return self.group(tensor).sum(dim=1)

    def channel_sums(self, tensor: torch.Tensor) -> torch.Tensor:
        """``[B, C, *positions] -> [M, C]``: the sum over each micro-batch's samples and positions, in one reduction
        (a bias of a convolution or of a channel-wise norm)."""
        grouped = self.group(tensor)  # [M, b, C, *positions], a view unless the last micro-batch is padded
        return grouped.sum(dim=(1,) + tuple(range(3, grouped.dim())))
