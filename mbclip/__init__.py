"""mbclip: micro-batch clipping on Opacus, exact to the last float."""

from mbclip.engine import MicroBatchClipping
from mbclip.errors import (
    BatchError,
    ConfigurationError,
    MbclipError,
    NonFiniteGradientWarning,
    NoTrainingBackwardWarning,
    PrivacyError,
    UnsupportedModuleError,
)
from mbclip.grad_module import MicroBatchGradSampleModule
from mbclip.layout import MicroBatchLayout
from mbclip.optimizer import MicroBatchOptimizer, StepDiagnostics
from mbclip.samplers import LayerCall, register_microbatch_sampler

__version__ = "0.1.0"

__all__ = [
    "BatchError",
    "ConfigurationError",
    "LayerCall",
    "MbclipError",
    "MicroBatchClipping",
    "MicroBatchGradSampleModule",
    "MicroBatchLayout",
    "MicroBatchOptimizer",
    "NonFiniteGradientWarning",
    "NoTrainingBackwardWarning",
    "PrivacyError",
    "StepDiagnostics",
    "UnsupportedModuleError",
    "register_microbatch_sampler",
]
