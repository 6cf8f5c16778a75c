"""``MicroBatchClipping.make_clipped``: validate everything first, then wire the parts (no half-state).

Without noise mbclip is a training method: the user's data loader comes back unchanged and no
privacy figure exists. With ``noise_multiplier > 0`` the DP path starts: Poisson sampling through
Opacus's ``DPDataLoader``, and, only for ``microbatch_size == 1``, Opacus's accountant and
:meth:`MicroBatchClipping.get_epsilon`.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from opacus.accountants import create_accountant
from opacus.data_loader import DPDataLoader
from opacus.grad_sample import GradSampleModule
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from mbclip.clipping import CLIPPING_MODES
from mbclip.errors import ConfigurationError, PrivacyError
from mbclip.grad_module import LOSS_REDUCTIONS, MICROBATCH_REDUCTIONS, MicroBatchGradSampleModule, plan_hooks
from mbclip.optimizer import NONFINITE_POLICIES, MicroBatchOptimizer, verify_mode

ACCOUNTANTS = ("prv", "rdp", "gdp")
STATE_FORMAT = 1

NO_EPSILON_WITH_MICROBATCHES = (
    "no epsilon is claimed for microbatch_size > 1. Opacus's accountant analyses the Poisson-subsampled Gaussian "
    "mechanism on single samples. With contiguous micro-batches, adding or removing one sample shifts every later "
    "micro-batch boundary, so one sample can change many clipped micro-batch gradients and the per-step "
    "sensitivity is no longer max_grad_norm; no published analysis covers this. Use microbatch_size=1 for a "
    "proven guarantee."
)


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _check_choice(name: str, value, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigurationError(f"{name}={value!r} is not known: use one of {', '.join(map(repr, choices))}.")


class MicroBatchClipping:
    """Wraps a model, its optimizer and data loader for micro-batch clipping, the way Opacus's
    ``PrivacyEngine.make_private`` does for DP-SGD.

    ``accountant`` ("prv", "rdp" or "gdp") is used only on the proven DP path
    (``microbatch_size=1``, ``noise_multiplier > 0``, Poisson sampling).
    """

    def __init__(self, *, accountant: str = "prv", secure_mode: bool = False):
        _check_choice("accountant", accountant, ACCOUNTANTS)
        self.accountant_name = accountant
        self.accountant = None
        self.secure_mode = secure_mode
        self._no_epsilon_reason = "make_clipped has not been called yet."

    def make_clipped(
        self,
        *,
        module: nn.Module,
        optimizer: Optimizer,
        data_loader: Optional[DataLoader] = None,
        microbatch_size: int,
        max_grad_norm: Union[None, float, Sequence[float]] = None,
        clipping: str = "fixed",
        noise_multiplier: float = 0.0,
        loss_reduction: str = "mean",
        microbatch_reduction: str = "mean",
        batch_first: bool = True,
        poisson_sampling: Optional[bool] = None,
        nonfinite: str = "skip",
        verify_gradients: Union[bool, str] = "first",
        noise_generator: Optional[torch.Generator] = None,
    ) -> Tuple[MicroBatchGradSampleModule, MicroBatchOptimizer, Optional[DataLoader]]:
        """Return ``(module, optimizer, data_loader)`` ready for an unchanged training loop.

        ``microbatch_size`` may exceed the batch (one micro-batch: global clipping). With noise off,
        ``data_loader`` is returned as it is (same batches, same order). ``max_grad_norm`` is C for
        "fixed", ignored by "adaptive" (which must not be given one), and for "per_layer" either one
        bound per optimized parameter or one number used for every parameter.
        ``verify_gradients``: when to check that the micro-batch gradients add up to the gradient autograd
        computes beside them: ``"first"`` step only (later steps skip autograd's duplicate weight gradients),
        ``"always"`` (``True``), or ``"never"`` (``False``).
        """
        poisson = self._validate(
            module=module,
            optimizer=optimizer,
            data_loader=data_loader,
            microbatch_size=microbatch_size,
            max_grad_norm=max_grad_norm,
            clipping=clipping,
            noise_multiplier=noise_multiplier,
            loss_reduction=loss_reduction,
            microbatch_reduction=microbatch_reduction,
            poisson_sampling=poisson_sampling,
            nonfinite=nonfinite,
            batch_first=batch_first,
            verify_gradients=verify_gradients,
            noise_generator=noise_generator,
        )
        expected_batch_size = None
        if poisson:
            sample_rate = 1 / len(data_loader)
            expected_batch_size = max(1, round(sample_rate * len(data_loader.dataset)))
            data_loader = DPDataLoader.from_data_loader(data_loader)
        grad_module = MicroBatchGradSampleModule(
            module,
            microbatch_size=microbatch_size,
            batch_first=batch_first,
            loss_reduction=loss_reduction,
            microbatch_reduction=microbatch_reduction,
        )
        try:
            clipped_optimizer = MicroBatchOptimizer(
                optimizer,
                grad_module=grad_module,
                clipping=clipping,
                max_grad_norm=max_grad_norm,
                noise_multiplier=float(noise_multiplier),
                expected_batch_size=expected_batch_size,
                nonfinite=nonfinite,
                verify_gradients=verify_gradients,
                generator=noise_generator,
                secure_mode=self.secure_mode,
            )
            self._attach_accountant(clipped_optimizer, microbatch_size, noise_multiplier, poisson, data_loader)
        except Exception:
            self.unwrap(grad_module)  # no half-wrapped model left behind
            raise
        return grad_module, clipped_optimizer, data_loader

    # -- privacy -------------------------------------------------------------------------------

    def _attach_accountant(self, optimizer, microbatch_size, noise_multiplier, poisson, data_loader) -> None:
        self.accountant = None
        if noise_multiplier == 0:
            self._no_epsilon_reason = (
                "noise_multiplier is 0: without noise micro-batch clipping is a training method, not a privacy "
                "mechanism, and there is no epsilon to report."
            )
        elif microbatch_size != 1:
            self._no_epsilon_reason = NO_EPSILON_WITH_MICROBATCHES
        elif not poisson:
            self._no_epsilon_reason = (
                "Poisson sampling is off; the accountant's guarantee assumes Poisson-sampled batches. "
                "Pass poisson_sampling=True and a data_loader."
            )
        else:
            self.accountant = create_accountant(mechanism=self.accountant_name)
            optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=1 / len(data_loader)))

    def get_epsilon(self, delta: float) -> float:
        """Epsilon spent so far, only where proven: ``microbatch_size=1``, noise and Poisson sampling."""
        if self.accountant is None:
            raise PrivacyError(f"no epsilon: {self._no_epsilon_reason}")
        if not (isinstance(delta, float) and 0 < delta < 1):
            raise ConfigurationError(f"delta={delta!r} must be a float in (0, 1), e.g. 1e-5.")
        if len(self.accountant) == 0:
            return 0.0
        return float(self.accountant.get_epsilon(delta=delta))

    # -- checkpoints and unwrapping ------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """The engine's state: the accountant's history (plain lists), loadable with ``weights_only=True``."""
        history = None
        if self.accountant is not None:
            history = [[float(sigma), float(rate), int(steps)] for sigma, rate, steps in self.accountant.history]
        return {"format": STATE_FORMAT, "accountant": self.accountant_name, "history": history}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict` into an engine whose ``make_clipped`` ran with the saved run's settings."""
        if not isinstance(state_dict, dict) or state_dict.get("format") != STATE_FORMAT:
            raise ConfigurationError(
                "not a MicroBatchClipping state_dict of this mbclip version; pass the dict from engine.state_dict()."
            )
        if state_dict.get("accountant") != self.accountant_name:
            raise ConfigurationError(
                f"the checkpoint used accountant={state_dict.get('accountant')!r}, this engine "
                f"{self.accountant_name!r}. Create MicroBatchClipping(accountant=...) as in the saved run."
            )
        history = state_dict.get("history")
        if (history is None) != (self.accountant is None):
            raise ConfigurationError(
                "the checkpoint and this engine disagree on privacy accounting (one is on the DP path with an "
                "accountant, the other is not). Call make_clipped with the saved run's settings before loading."
            )
        if history is not None:
            self.accountant.history = [(float(sigma), float(rate), int(steps)) for sigma, rate, steps in history]

    @staticmethod
    def unwrap(
        module: MicroBatchGradSampleModule, optimizer: Optional[MicroBatchOptimizer] = None
    ) -> Tuple[nn.Module, Optional[Optimizer]]:
        """The user's original model (and optimizer) back, with no hook or attribute of mbclip or Opacus left.

        Both can be passed to ``make_clipped`` again. The wrappers must not be used afterwards.
        """
        if not isinstance(module, MicroBatchGradSampleModule):
            raise ConfigurationError(f"unwrap expects the module make_clipped returned, got {type(module).__name__}.")
        if optimizer is not None and not isinstance(optimizer, MicroBatchOptimizer):
            raise ConfigurationError(
                f"unwrap expects the optimizer make_clipped returned, got {type(optimizer).__name__}."
            )
        original = module.to_standard_module()
        if optimizer is None:
            return original, None
        optimizer.step_hook = None
        for p in optimizer.params:
            if hasattr(p, "summed_grad"):
                del p.summed_grad
            if hasattr(p, "grad_sample"):
                del p.grad_sample
        return original, optimizer.original_optimizer

    # -- validation: every check before anything changes ---------------------------------------

    def _validate(
        self,
        *,
        module,
        optimizer,
        data_loader,
        microbatch_size,
        max_grad_norm,
        clipping,
        noise_multiplier,
        loss_reduction,
        microbatch_reduction,
        poisson_sampling,
        nonfinite,
        batch_first=True,
        verify_gradients="first",
        noise_generator=None,
    ) -> bool:
        """Raise a ``ConfigurationError`` (or ``UnsupportedModuleError``) for any bad input; return Poisson on/off."""
        if not isinstance(module, nn.Module):
            raise ConfigurationError(f"module must be a torch.nn.Module, got {type(module).__name__}.")
        if isinstance(module, GradSampleModule) or hasattr(module, "autograd_grad_sample_hooks"):
            raise ConfigurationError(
                "module is already wrapped (by mbclip or Opacus). Pass the original model, or call "
                "to_standard_module() on the wrapper first."
            )
        if not isinstance(optimizer, Optimizer):
            raise ConfigurationError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}.")
        if hasattr(optimizer, "original_optimizer"):
            raise ConfigurationError("optimizer is already wrapped (by mbclip or Opacus). Pass the original optimizer.")
        if not _is_positive_int(microbatch_size):
            raise ConfigurationError(
                f"microbatch_size={microbatch_size!r} must be a positive integer (1 is per-sample clipping)."
            )
        _check_choice("clipping", clipping, CLIPPING_MODES)
        _check_choice("loss_reduction", loss_reduction, LOSS_REDUCTIONS)
        _check_choice("microbatch_reduction", microbatch_reduction, MICROBATCH_REDUCTIONS)
        _check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        if not isinstance(batch_first, bool):
            raise ConfigurationError(f"batch_first={batch_first!r} must be True or False.")
        verify_mode(verify_gradients)
        if noise_generator is not None and not isinstance(noise_generator, torch.Generator):
            raise ConfigurationError(
                f"noise_generator must be a torch.Generator or None, got {type(noise_generator).__name__}."
            )
        if not (isinstance(noise_multiplier, (int, float)) and not isinstance(noise_multiplier, bool)) or not (
            math.isfinite(noise_multiplier) and noise_multiplier >= 0
        ):
            raise ConfigurationError(
                f"noise_multiplier={noise_multiplier!r} must be a finite number >= 0 (0: no noise)."
            )
        trainable = [p for p in module.parameters() if p.requires_grad]
        if not trainable:
            raise ConfigurationError("the model has no trainable parameters (none with requires_grad=True).")
        optimized = [p for group in optimizer.param_groups for p in group["params"]]
        model_params = {id(p) for p in trainable}
        if any(id(p) not in model_params for p in optimized):
            raise ConfigurationError(
                "the optimizer holds parameters that are not trainable parameters of the model. Build the "
                "optimizer from model.parameters() of the same model."
            )
        self._validate_max_grad_norm(clipping, max_grad_norm, len(optimized))
        if clipping == "adaptive" and noise_multiplier > 0:
            raise ConfigurationError(
                "noise with clipping='adaptive' is refused: the adaptive bound (the smallest micro-batch norm) "
                "depends on the data, so noise calibrated to it hides nothing. Use clipping='fixed' with noise."
            )
        if poisson_sampling is None:
            poisson_sampling = noise_multiplier > 0 and data_loader is not None
        if poisson_sampling:
            if noise_multiplier == 0:
                raise ConfigurationError(
                    "poisson_sampling=True without noise: Poisson sampling belongs to the DP path. With noise off "
                    "mbclip keeps your data loader as it is; drop poisson_sampling or set noise_multiplier > 0."
                )
            if not isinstance(data_loader, DataLoader):
                raise ConfigurationError(
                    "poisson_sampling=True needs the torch DataLoader to resample; pass data_loader."
                )
        plan_hooks(module)  # raises UnsupportedModuleError naming the layer
        return bool(poisson_sampling)

    @staticmethod
    def _validate_max_grad_norm(clipping: str, max_grad_norm, num_params: int) -> None:
        if clipping == "adaptive":
            if max_grad_norm is not None:
                raise ConfigurationError(
                    "clipping='adaptive' needs no max_grad_norm (every micro-batch is scaled to the smallest "
                    "micro-batch norm of the step); drop max_grad_norm or use clipping='fixed'."
                )
            return
        if clipping == "per_layer" and isinstance(max_grad_norm, (list, tuple)):
            if len(max_grad_norm) != num_params:
                raise ConfigurationError(
                    f"clipping='per_layer' got {len(max_grad_norm)} bounds for {num_params} optimized parameters: "
                    "give one per parameter, in optimizer order, or one number for all."
                )
            bad = [c for c in max_grad_norm if not _is_positive_finite(c)]
            if bad:
                raise ConfigurationError(
                    f"every per-layer max_grad_norm must be a positive finite number, got {bad[0]!r}."
                )
            return
        if not _is_positive_finite(max_grad_norm):
            raise ConfigurationError(
                f"max_grad_norm={max_grad_norm!r} must be a positive finite number (the clipping bound C) "
                f"for clipping={clipping!r}."
            )
