"""``MicroBatchOptimizer``: Opacus's ``DPOptimizer`` clipping micro-batch gradients, noise off by default.

One step: collect the micro-batch gradients of every pass since the last step, check them against
autograd's plain gradient, drop non-finite micro-batches, clip (fixed, adaptive or per layer),
average over the micro-batches kept (plus Gaussian noise only when asked), run the user's optimizer,
and keep what happened in :attr:`MicroBatchOptimizer.last_step`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _generate_noise
from torch.optim import Optimizer

from mbclip import clipping as rules
from mbclip.errors import BatchError, ConfigurationError, NonFiniteGradientWarning, NoTrainingBackwardWarning
from mbclip.grad_module import MicroBatchGradients, MicroBatchGradSampleModule
from mbclip.microbatch_sums import GramCache, norms_of, weighted_sums_of

NONFINITE_POLICIES = ("skip", "raise")
# When the micro-batch gradients are checked against autograd's: on the first step, every step, or never.
VERIFY_MODES = ("first", "always", "never")
STATE_KEY = "mbclip"  # the optimizer's state_dict is the user's optimizer's, plus mbclip's settings under this key
STATE_FORMAT = 1

# Relative tolerance of the check "sum of micro-batch gradients == autograd's gradient", by dtype.
_CHECK_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


@dataclass
class StepDiagnostics:
    """What one optimizer step did, micro-batch by micro-batch (tensors detached, on the model's device).

    ``sample_weights[i]`` is the coefficient of sample ``i``'s gradient in the update (plain averaging
    gives every sample ``1 / B``); with ``clipping="per_layer"`` it has one column per parameter,
    as have ``clip_factors``. Dropped (non-finite) micro-batches have factor and weight 0.
    ``fraction_clipped`` and ``sample_weights`` are computed when first read, not at every step.
    """

    num_samples: int
    num_microbatches: int
    microbatch_sizes: torch.Tensor
    microbatch_norms: torch.Tensor
    clip_factors: torch.Tensor
    dropped_microbatches: int
    applied: bool
    noise_std: float
    # which kept micro-batches were scaled down, and what each micro-batch's factor is divided by for the weight of
    # one of its samples (the normalizer, times its size for the micro-batch mean): read by the properties below
    _clipped: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool), repr=False)
    _normalizer: float = field(default=1.0, repr=False)
    _mean_over_microbatch: bool = field(default=False, repr=False)

    @cached_property
    def fraction_clipped(self) -> float:
        """The fraction of the kept micro-batches whose gradient was scaled down."""
        return float(self._clipped.float().mean()) if self._clipped.numel() else 0.0

    @cached_property
    def sample_weights(self) -> torch.Tensor:
        """``[B]`` (``[B, P]`` per layer): the coefficient of each sample's gradient in the update."""
        factors, sizes = self.clip_factors, self.microbatch_sizes
        weights = factors / self._normalizer
        if self._mean_over_microbatch:
            weights = weights / sizes.to(factors.dtype).reshape((-1,) + (1,) * (factors.dim() - 1))
        return weights.repeat_interleave(sizes.long(), dim=0)


def _empty_diagnostics() -> StepDiagnostics:
    empty = torch.zeros(0)
    return StepDiagnostics(0, 0, empty, empty, empty, 0, False, 0.0)


class MicroBatchOptimizer(DPOptimizer):
    """Clips micro-batch gradients from a :class:`MicroBatchGradSampleModule` and steps ``optimizer``.

    The update is ``p.grad = (1 / M) * sum_j factor_j * g_j`` over the micro-batches since the last
    step (with noise: ``+ N(0, (sigma * C)^2) / M``). ``M`` is the number of micro-batches kept, or,
    on the Poisson-sampled DP path, the expected number, since a Poisson batch's size is private.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        grad_module: MicroBatchGradSampleModule,
        clipping: str = "fixed",
        max_grad_norm: Union[None, float, Sequence[float]] = None,
        noise_multiplier: float = 0.0,
        expected_batch_size: Optional[int] = None,
        nonfinite: str = "skip",
        verify_gradients: Union[bool, str] = "first",
        generator: Optional[torch.Generator] = None,
        secure_mode: bool = False,
    ):
        self.grad_module = grad_module
        self.clipping = clipping
        self.nonfinite = nonfinite
        self.verify_gradients = verify_mode(verify_gradients)
        # the grad module reads this at each forward: on checked steps autograd computes every p.grad as well
        grad_module.check_gradients = self.verify_gradients != "never"
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if clipping == "per_layer":
            bounds = [float(max_grad_norm)] * len(params) if _is_number(max_grad_norm) else list(max_grad_norm)
            self.max_grad_norms: Optional[List[float]] = bounds
            total_bound = math.sqrt(sum(c * c for c in bounds))
        else:
            self.max_grad_norms = None
            total_bound = float(max_grad_norm) if max_grad_norm is not None else 0.0
        super().__init__(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=total_bound,
            expected_batch_size=None,
            loss_reduction="sum",
            generator=generator,
            secure_mode=secure_mode,
        )
        self.loss_reduction = grad_module.loss_reduction
        self.expected_batch_size = expected_batch_size
        self.last_step: StepDiagnostics = _empty_diagnostics()
        self._passes_in_last_step = 0
        self._grads_replaced = False

    # -- Opacus hooks read these ---------------------------------------------------------------

    @property
    def accumulated_iterations(self) -> int:
        """Batches (forward/backward passes) that went into the last step; read by Opacus's accountants."""
        return max(self._passes_in_last_step, 1)

    def zero_grad(self, set_to_none: bool = True) -> None:
        skipped = self._is_last_step_skipped
        super().zero_grad(set_to_none)
        if not skipped:
            self.grad_module.zero_grad_passes()
        self._grads_replaced = False

    def attach_step_hook(self, fn: Callable[[MicroBatchOptimizer], None]) -> None:
        self.step_hook = fn

    # -- the step ------------------------------------------------------------------------------

    def pre_step(self, closure=None) -> bool:
        """Clip and average into ``p.grad``; ``False`` when the user's optimizer must not step."""
        self.grad_module.close_recomputation()  # before self.params reads requires_grad
        params = self.params  # a new list at each read (Opacus): read once per step
        collected = self.grad_module.collect(params)
        if collected is None:  # no sample reached backward (an empty batch, or no batch at all)
            return self._step_without_samples()
        if self._check_skip_next_step():
            self._is_last_step_skipped = True
            return False
        self._apply(collected, params)
        if not self.last_step.applied:
            warnings.warn(
                f"all {self.last_step.num_microbatches} micro-batch gradients of this step are not finite (NaN or "
                "Inf); the step was skipped and the parameters and optimizer state are unchanged. Check the inputs "
                "and the loss of this batch (optimizer.last_step has the norms).",
                NonFiniteGradientWarning,
                stacklevel=3,
            )
        return self._finish_step(len(collected.layouts))

    def _finish_step(self, num_passes: int) -> bool:
        """Close the step: forget its passes, remember that ``p.grad`` now holds the update, tell the accountant."""
        self._passes_in_last_step = num_passes
        self.grad_module._reset_passes()
        self._grads_replaced = True
        self._is_last_step_skipped = False
        if self.last_step.applied and self.step_hook:
            self.step_hook(self)
        return self.last_step.applied

    def _step_without_samples(self) -> bool:
        """An empty batch: a no-op without noise; on the DP path a noise-only step, as Opacus takes.

        Skipping the step on the Poisson-sampled path would reveal that the batch was empty, and the
        accountant counts every step, so there the update is the noise alone (divided by the expected count).
        """
        num_passes = self.grad_module.num_passes
        self.last_step = _empty_diagnostics()
        unsampled = self.grad_module.num_samples_without_backward()
        if unsampled:
            warnings.warn(
                f"step(): {unsampled} samples went through the model since the last step, but no plain "
                "loss.backward() reached a trained layer from them, so there are no micro-batch gradients and "
                "nothing was updated. A backward that names what it differentiates (loss.backward(inputs=...), "
                "torch.autograd.grad) does not feed mbclip's update, even when it names the parameters: call "
                "loss.backward() before step().",
                NoTrainingBackwardWarning,
                stacklevel=4,
            )
        if not (num_passes and self.noise_multiplier > 0 and self.expected_batch_size is not None):
            return False
        if self._check_skip_next_step():
            self._is_last_step_skipped = True
            return False
        normalizer = self._normalizer(num_passes, 0)
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            noise = _generate_noise(std=std, reference=p, generator=self.generator, secure_mode=self.secure_mode)
            p.grad = (noise / normalizer).to(p.dtype)
        self.last_step.applied = True
        self.last_step.noise_std = float(std / normalizer)
        return self._finish_step(num_passes)

    def _apply(self, collected: MicroBatchGradients, params: List[torch.nn.Parameter]) -> None:
        present = [(p, sums) for p, sums in zip(params, collected.sums) if sums is not None]
        grams = GramCache.of_shared_factors([sums for _, sums in present])  # shared factors' Gram matrices once
        raw_norms = torch.stack(norms_of([sums for _, sums in present], grams), dim=1)  # [M, P']: norms of the sums
        del grams  # the cached Gram matrices are not needed for the update
        scales = collected.scales.to(device=raw_norms.device, dtype=raw_norms.dtype)
        per_param_norms = raw_norms * scales.unsqueeze(1)  # norms of the micro-batch gradients
        norms = rules.total_norms(per_param_norms)
        finite = torch.isfinite(norms)
        num_dropped = 0 if bool(finite.all()) else int((~finite).sum())
        # Verification rides on the update's own pass over the gradients when all are finite (see
        # _weighted_sums_checked); with non-finite micro-batches it runs alone, on what is finite. Unchecked
        # steps (autograd computed no weight gradient beside the samplers) only make sure none went unsplit.
        checking = self.grad_module.check_gradients
        fused_check = checking and num_dropped == 0
        if checking and not fused_check:
            self._verify(collected)
        if not checking:
            self._check_nothing_unsplit(present, params)
        if num_dropped and self.nonfinite == "raise":
            raise BatchError(
                f"{num_dropped} of {norms.numel()} micro-batch gradients are not finite (NaN or Inf). "
                "Check the inputs and the loss of this batch, or pass nonfinite='skip' to drop such micro-batches."
            )
        sizes = collected.microbatch_sizes.to(norms.device)
        if num_dropped:  # clip what is finite; a dropped micro-batch gets factor 0
            kept = finite.nonzero().squeeze(1)
            num_kept = kept.numel()
            factors, clipped = self._clip_factors(norms[kept], per_param_norms[kept], present, params)
            full_factors = torch.zeros(
                (norms.numel(),) + tuple(factors.shape[1:]), dtype=factors.dtype, device=factors.device
            )
            full_factors[kept] = factors
        else:
            num_kept = norms.numel()
            factors, clipped = self._clip_factors(norms, per_param_norms, present, params)
            full_factors = factors
        # each micro-batch's sums enter the update with its clip factor times its scale, over the normalizer
        # (folded into these M weights rather than dividing M x params numbers)
        normalizer = self._normalizer(len(collected.layouts), num_kept)
        weights = full_factors * scales.reshape((-1,) + (1,) * (full_factors.dim() - 1)).to(full_factors.dtype)
        weights = weights / normalizer
        applied = num_kept > 0
        shared_row = weights.unsqueeze(0) if weights.dim() == 1 else None  # [1, M]: the same for every parameter
        summed_all: Optional[List[torch.Tensor]] = None  # every parameter's sum, when computed all at once
        if fused_check:
            summed_all = self._weighted_sums_checked(present, weights, raw_norms)
        elif applied and shared_row is not None and not num_dropped:
            summed_all = weighted_sums_of([sums for _, sums in present], shared_row)
        if checking and self.verify_gradients == "first":
            self.grad_module.check_gradients = False  # checked once: from now on samplers alone compute them
        if applied:
            for index, (p, sums) in enumerate(present):
                if summed_all is not None:
                    summed = summed_all[index]
                else:
                    row = shared_row if shared_row is not None else weights[:, index].unsqueeze(0)
                    summed = sums.weighted_sum(row, finite if num_dropped else None)[0]
                if self.noise_multiplier > 0:
                    noise = _generate_noise(
                        std=self.noise_multiplier * self.max_grad_norm,
                        reference=summed,
                        generator=self.generator,
                        secure_mode=self.secure_mode,
                    )
                    summed = summed + noise / normalizer
                if summed.shape != p.shape:
                    summed = summed.view_as(p)
                p.grad = summed if summed.dtype == p.dtype else summed.to(p.dtype)
        self.last_step = StepDiagnostics(
            num_samples=sum(layout.batch_size for layout in collected.layouts),
            num_microbatches=norms.numel(),
            microbatch_sizes=sizes.detach(),
            microbatch_norms=norms.detach(),
            clip_factors=full_factors.detach(),
            dropped_microbatches=num_dropped,
            applied=applied,
            noise_std=float(self.noise_multiplier * self.max_grad_norm / normalizer) if applied else 0.0,
            _clipped=clipped.detach(),
            _normalizer=normalizer,
            _mean_over_microbatch=self.grad_module.microbatch_reduction == "mean",
        )

    def _clip_factors(self, norms, per_param_norms, present, params):
        """Factors ``[M]`` (``[M, P]`` per layer) and which micro-batches were scaled down."""
        if self.clipping == "fixed":
            factors = rules.fixed_clip_factors(norms, self.max_grad_norm)
            return factors, factors < 1
        if self.clipping == "adaptive":
            factors = rules.adaptive_clip_factors(norms) if norms.numel() else norms
            return factors, norms > norms.min() if norms.numel() else norms.bool()
        bound_of = dict(zip(params, self.max_grad_norms))
        bounds = torch.tensor([bound_of[p] for p, _ in present], dtype=per_param_norms.dtype, device=norms.device)
        factors = rules.per_layer_clip_factors(per_param_norms, bounds)
        return factors, (factors < 1).any(dim=1)

    def _normalizer(self, num_passes: int, num_kept: int) -> float:
        if self.expected_batch_size is not None:  # Poisson DP path: the expected count, not the private one
            per_pass = math.ceil(self.expected_batch_size / self.grad_module.microbatch_size)
            return float(per_pass * num_passes)
        return float(max(num_kept, 1))

    def _weighted_sums_checked(self, present, weights, raw_norms) -> List[torch.Tensor]:
        """``sum_j weight_j G_j`` for every parameter, checked against autograd's ``p.grad`` in the same pass.

        One product per parameter with two rows of weights gives both the clipped sum and the plain gradient
        rebuilt from the micro-batch sums (their plain sum); the rounding bound of the check is
        ``sum_j ||G_j||`` from the norms the clipping already computed. All finite micro-batches only (the
        caller makes sure); raises before any ``p.grad`` is changed.
        """
        module = self.grad_module
        present_ids = {id(p) for p, _ in present}
        for p in self.params:  # parameters with a gradient mbclip could not split
            if id(p) not in present_ids and p.grad is not None and p.grad.abs().max() > 0:
                raise BatchError(self._unsplit_message(module.parameter_name(p)))
        bounds = raw_norms.sum(dim=0)  # [P']
        bounds = bounds + 1e-3 * bounds.norm()  # model-wide floor: a gradient cancelling to ~0 is rounding noise
        summed_all, rebuilt_all, excess = [], [], []
        for index, (p, sums) in enumerate(present):
            weight = weights if weights.dim() == 1 else weights[:, index]
            both = sums.weighted_sum(torch.stack([weight, torch.ones_like(weight)]))
            summed_all.append(both[0].view_as(p))
            rebuilt_all.append(both[1].view_as(p))
            actual = p.grad
            if actual is None:
                continue
            tolerance = self._check_tolerance(actual.dtype)
            error = (both[1].view_as(p).to(actual.dtype) - actual).norm().to(bounds.dtype)
            # > 0 only for a mismatch; NaN (non-finite p.grad) is not one, as before
            excess.append((error - tolerance * bounds[index] - 1e-30).nan_to_num(nan=-1.0).reshape(1))
        if excess and bool((torch.cat(excess) > 0).any()):  # one host sync for all parameters
            for index, ((p, _), rebuilt) in enumerate(zip(present, rebuilt_all)):
                actual = p.grad
                if actual is None or not torch.isfinite(actual).all():
                    continue
                tolerance = self._check_tolerance(actual.dtype)
                if (rebuilt.to(actual.dtype) - actual).norm() > tolerance * float(bounds[index]) + 1e-30:
                    raise BatchError(self._mismatch_message(module.parameter_name(p)))
        return summed_all

    def _check_nothing_unsplit(self, present, params) -> None:
        """On an unchecked step: autograd must have left no gradient that the micro-batch gradients miss.

        Parameters the samplers computed alone must still hold the ``p.grad`` they had at the forward;
        any other parameter without micro-batch gradients must have none from autograd either.
        """
        present_ids = {id(p) for p, _ in present}
        snapshots = self.grad_module.grad_snapshots
        for p in params:
            grad = p.grad
            if grad is None:  # nothing autograd could have left (the usual case: samplers alone ran)
                continue
            if p in self.grad_module.autograd_kept:
                continue  # some call of the step differentiated it with autograd on purpose
            if p in snapshots and p not in self.grad_module.autograd_written:
                before, version = snapshots[p]
                if grad is None or (grad is before and grad._version == version):
                    continue
            elif id(p) in present_ids or grad is None or not bool(grad.abs().max() > 0):
                continue
            raise BatchError(self._unsplit_message(self.grad_module.parameter_name(p)))

    # -- checkpoints ---------------------------------------------------------------------------

    def _settings(self) -> Dict[str, Any]:
        """What must agree between the run that saved a checkpoint and the one that loads it."""
        module = self.grad_module
        return {
            "clipping": self.clipping,
            "max_grad_norm": float(self.max_grad_norm),
            "max_grad_norms": None if self.max_grad_norms is None else [float(c) for c in self.max_grad_norms],
            "noise_multiplier": float(self.noise_multiplier),
            "expected_batch_size": self.expected_batch_size,
            "microbatch_size": module.microbatch_size,
            "microbatch_reduction": module.microbatch_reduction,
            "loss_reduction": module.loss_reduction,
        }

    def state_dict(self) -> Dict[str, Any]:
        """The user's optimizer's ``state_dict`` plus mbclip's settings and noise generator state (key ``"mbclip"``).

        Only tensors, numbers, strings, lists and dicts: loadable with ``torch.load(..., weights_only=True)``,
        and by the plain optimizer too (it ignores the extra key). Save it after ``step()``, not mid-accumulation.
        """
        state = self.original_optimizer.state_dict()
        state[STATE_KEY] = {
            "format": STATE_FORMAT,
            "settings": self._settings(),
            "noise_generator_state": None if self.generator is None else self.generator.get_state(),
            # with verify_gradients="first": the first step was checked, so a resumed run goes on unchecked
            # (the same computations as the run that never stopped)
            "first_step_checked": not self.grad_module.check_gradients,
        }
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (or a plain optimizer's); refuses one saved with other clipping settings."""
        if not isinstance(state_dict, dict):
            raise ConfigurationError(
                f"load_state_dict expects the dict from optimizer.state_dict(), got {type(state_dict).__name__}."
            )
        state = dict(state_dict)
        saved = state.pop(STATE_KEY, None)
        if saved is not None:
            self._check_saved_settings(saved)
        try:
            self.original_optimizer.load_state_dict(state)
        except (ValueError, KeyError, TypeError) as error:
            raise ConfigurationError(
                f"the optimizer state does not fit this optimizer ({error}). Load a checkpoint saved from the same "
                "kind of optimizer over the same parameters."
            ) from error
        generator_state = saved.get("noise_generator_state") if saved is not None else None
        if generator_state is not None and self.generator is not None:
            self.generator.set_state(generator_state)
        if saved is not None and saved.get("first_step_checked") is True and self.verify_gradients == "first":
            self.grad_module.check_gradients = False
        self.grad_module._reset_passes()
        self._grads_replaced = False

    def _check_saved_settings(self, saved: Any) -> None:
        if not isinstance(saved, dict) or saved.get("format") != STATE_FORMAT or "settings" not in saved:
            raise ConfigurationError(
                f"the optimizer checkpoint's '{STATE_KEY}' entry is not one this version of mbclip wrote "
                f"(format {STATE_FORMAT}). Save it again with optimizer.state_dict()."
            )
        ours = self._settings()
        different = [
            f"{key}: saved {saved['settings'].get(key)!r}, now {value!r}"
            for key, value in ours.items()
            if saved["settings"].get(key) != value
        ]
        if different:
            raise ConfigurationError(
                "the checkpoint was saved with other micro-batch clipping settings ("
                + "; ".join(different)
                + "). Call make_clipped with the settings of the saved run before loading, so training continues "
                "as it was."
            )
        if (saved.get("noise_generator_state") is None) != (self.generator is None) and self.noise_multiplier > 0:
            raise ConfigurationError(
                "the checkpoint and this optimizer disagree on noise_generator (one has a generator, the other "
                "uses torch's global RNG). Pass noise_generator to make_clipped as in the saved run."
            )

    def _verify(self, collected: MicroBatchGradients) -> None:
        """Every gradient autograd computed must be the sum of the micro-batch gradients mbclip computed.

        Rounding is judged against each parameter's own scale (sum of absolute micro-batch terms) plus a
        floor from the whole model's scale: a gradient that cancels to ~0 (a bias before a norm) is noise.
        """
        module = self.grad_module
        bounds = {p: module.gradient_magnitude_of(p) for p in self.params}
        floor = 1e-3 * math.sqrt(sum(b * b for b in bounds.values()))
        for p in self.params:
            rebuilt = module.plain_gradient_of(p)
            actual = p.grad
            name = module.parameter_name(p)
            if rebuilt is None:
                if actual is not None and actual.abs().max() > 0:
                    raise BatchError(self._unsplit_message(name))
                continue
            if actual is None or not (torch.isfinite(rebuilt).all() and torch.isfinite(actual).all()):
                continue
            tolerance = self._check_tolerance(actual.dtype)
            error = float((rebuilt.to(actual.dtype) - actual).norm())
            if error <= tolerance * (bounds[p] + floor) + 1e-30:
                continue
            raise BatchError(self._mismatch_message(name))

    @staticmethod
    def _unsplit_message(name: str) -> str:
        return (
            f"parameter '{name}' received a gradient that mbclip could not split into micro-batches: it "
            "is used outside the forward of the layer that owns it (a tied or functional use, a layer "
            "called on a tensor without the batch dimension and no enclosing layer with parameters, or a loss "
            "built from gradients: a gradient penalty through torch.autograd.grad(..., create_graph=True), which "
            "mbclip does not split). Use the layer through its forward, or register a sampler for the module that "
            "uses it."
        )

    def _check_tolerance(self, dtype: torch.dtype) -> float:
        """Relative tolerance of the check; under autocast autograd's gradient carries the half dtype's rounding."""
        return max(_CHECK_TOLERANCE.get(d, 1e-4) for d in {dtype, *self.grad_module.low_precision_seen})

    def _mismatch_message(self, name: str) -> str:
        message = f"the micro-batch gradients of '{name}' do not add up to the gradient autograd computed"
        if self._grads_replaced:
            return message + ": gradients were not cleared since the last step. Call optimizer.zero_grad() first."
        return message + (
            ". A layer mixes samples (e.g. a custom normalisation over the batch, or a loss that is not a sum of "
            "per-sample terms), uses the parameter outside its forward, or the loss is built from gradients (a "
            "gradient penalty through torch.autograd.grad(..., create_graph=True), which mbclip does not split). "
            "Fix the model, or register a sampler for the layer."
        )


def verify_mode(verify_gradients: Union[bool, str]) -> str:
    """``"first"``, ``"always"`` or ``"never"`` (``True`` means ``"always"``, ``False`` ``"never"``)."""
    if verify_gradients is True:
        return "always"
    if verify_gradients is False:
        return "never"
    if not isinstance(verify_gradients, str) or verify_gradients not in VERIFY_MODES:
        raise ConfigurationError(
            f"verify_gradients={verify_gradients!r}: use one of {VERIFY_MODES}, or True ('always') / False ('never')."
        )
    return verify_gradients


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
