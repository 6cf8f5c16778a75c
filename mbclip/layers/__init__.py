"""Layers mbclip swaps into a user's model while it is wrapped (state_dict-compatible, swapped back on unwrap)."""

from mbclip.layers.batchnorm import (
    MicroBatchBatchNorm1d,
    MicroBatchBatchNorm2d,
    MicroBatchBatchNorm3d,
    check_batchnorms,
    swap_in_batchnorms,
    swap_out_batchnorms,
)

__all__ = [
    "MicroBatchBatchNorm1d",
    "MicroBatchBatchNorm2d",
    "MicroBatchBatchNorm3d",
    "check_batchnorms",
    "swap_in_batchnorms",
    "swap_out_batchnorms",
]
