"""Micro-batch samplers: one registered function per layer type, plus the autograd fallback."""

from mbclip.samplers import conv, embedding, linear, norm, recurrent  # noqa: F401  (registration)
from mbclip.samplers.registry import (
    MICROBATCH_SAMPLERS,
    UNSUPPORTED_LAYERS,
    LayerCall,
    MicroBatchSampler,
    mark_unsupported,
    register_microbatch_sampler,
)

__all__ = [
    "MICROBATCH_SAMPLERS",
    "UNSUPPORTED_LAYERS",
    "LayerCall",
    "MicroBatchSampler",
    "mark_unsupported",
    "register_microbatch_sampler",
]
