"""The errors mbclip raises: each names the problem and the fix."""

from __future__ import annotations


class MbclipError(Exception):
    """Base class of every error mbclip raises on purpose."""


class ConfigurationError(MbclipError, ValueError):
    """An argument to mbclip has a wrong value or type."""


class UnsupportedModuleError(MbclipError, NotImplementedError):
    """The model holds a layer whose micro-batch gradients mbclip cannot compute exactly."""


class BatchError(MbclipError, RuntimeError):
    """A batch, or the way the model was called on it, breaks an assumption of micro-batch clipping."""


class PrivacyError(MbclipError, RuntimeError):
    """A privacy figure was asked for where no guarantee is proven."""


class NonFiniteGradientWarning(RuntimeWarning):
    """Every micro-batch gradient of a step was NaN or Inf, so the step was skipped."""


class NoTrainingBackwardWarning(UserWarning):
    """A step found forward passes with samples but no plain ``loss.backward()`` through any of them: no update."""
