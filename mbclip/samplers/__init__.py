"""Micro-batch samplers: one registered function per layer type, plus the autograd fallback."""

from mbclip.samplers import attention, batchnorm, conv, embedding, linear, norm, recurrent  # noqa: F401
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
