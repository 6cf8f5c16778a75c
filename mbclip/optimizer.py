"""``MicroBatchOptimizer``: Opacus's ``DPOptimizer`` clipping micro-batch gradients, noise off by default.

One step: collect the micro-batch gradients of every pass since the last step, check them against
autograd's plain gradient, drop non-finite micro-batches, clip (fixed, adaptive or per layer),
average over the micro-batches kept (plus Gaussian noise only when asked), run the user's optimizer,
and keep what happened in :attr:`MicroBatchOptimizer.last_step`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union

import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _generate_noise
from torch.optim import Optimizer

from mbclip import clipping as rules
from mbclip.errors import BatchError, ConfigurationError
from mbclip.grad_module import MicroBatchGradients, MicroBatchGradSampleModule

NONFINITE_POLICIES = ("skip", "raise")

# Relative tolerance of the check "sum of micro-batch gradients == autograd's gradient", by dtype.
_CHECK_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


@dataclass
class StepDiagnostics:
    """What one optimizer step did, micro-batch by micro-batch (tensors detached, on the model's device).

    ``sample_weights[i]`` is the coefficient of sample ``i``'s gradient in the update (plain averaging
    gives every sample ``1 / B``); with ``clipping="per_layer"`` it has one column per parameter,
    as have ``clip_factors``. Dropped (non-finite) micro-batches have factor and weight 0.
    """

    num_samples: int
    num_microbatches: int
    microbatch_sizes: torch.Tensor
    microbatch_norms: torch.Tensor
    clip_factors: torch.Tensor
    fraction_clipped: float
    sample_weights: torch.Tensor
    dropped_microbatches: int
    applied: bool
    noise_std: float


def _empty_diagnostics() -> StepDiagnostics:
    empty = torch.zeros(0)
    return StepDiagnostics(0, 0, empty, empty, empty, 0.0, empty, 0, False, 0.0)


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
        verify_gradients: bool = True,
        generator: Optional[torch.Generator] = None,
        secure_mode: bool = False,
    ):
        self.grad_module = grad_module
        self.clipping = clipping
        self.nonfinite = nonfinite
        self.verify_gradients = verify_gradients
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
            self.grad_module._reset_passes()
        self._grads_replaced = False

    def attach_step_hook(self, fn: Callable[["MicroBatchOptimizer"], None]) -> None:
        self.step_hook = fn

    # -- the step ------------------------------------------------------------------------------

    def pre_step(self, closure=None) -> bool:
        """Clip and average into ``p.grad``; ``False`` when the user's optimizer must not step."""
        collected = self.grad_module.collect(self.params)
        if collected is None:
            self.last_step = _empty_diagnostics()
            return False
        if self._check_skip_next_step():
            self._is_last_step_skipped = True
            return False
        self._apply(collected)
        self._passes_in_last_step = len(collected.layouts)
        self.grad_module._reset_passes()
        self._grads_replaced = True
        self._is_last_step_skipped = False
        if self.last_step.applied and self.step_hook:
            self.step_hook(self)
        return self.last_step.applied

    def _apply(self, collected: MicroBatchGradients) -> None:
        params = self.params
        present = [(p, g) for p, g in zip(params, collected.gradients) if g is not None]
        per_param_norms = rules.per_parameter_norms([g for _, g in present])  # [M, P']
        norms = rules.total_norms(per_param_norms)
        finite = torch.isfinite(norms)
        num_dropped = int((~finite).sum())
        # Verification rides on the update's own pass over the gradients when all are finite (see
        # _weighted_sums); with non-finite micro-batches it runs alone, on what is finite.
        fused_check = self.verify_gradients and num_dropped == 0 and collected.to_plain is not None
        if self.verify_gradients and not fused_check:
            self._verify(collected)
        if num_dropped and self.nonfinite == "raise":
            raise BatchError(
                f"{num_dropped} of {norms.numel()} micro-batch gradients are not finite (NaN or Inf). "
                "Check the inputs and the loss of this batch, or pass nonfinite='skip' to drop such micro-batches."
            )
        kept = finite.nonzero().squeeze(1)
        num_kept = kept.numel()
        sizes = collected.microbatch_sizes.to(norms.device)
        factors, clipped = self._clip_factors(norms[kept], per_param_norms[kept], present, params)
        full_factors = torch.zeros((norms.numel(),) + tuple(factors.shape[1:]), dtype=factors.dtype, device=factors.device)
        full_factors[kept] = factors
        normalizer = self._normalizer(collected, num_kept)
        applied = num_kept > 0
        if fused_check:
            summed_all = self._weighted_sums_checked(collected, present, factors, per_param_norms)
        if applied:
            for index, (p, g) in enumerate(present):
                if fused_check:
                    summed = summed_all[index]
                else:
                    factor = factors if factors.dim() == 1 else factors[:, index]
                    gradient = g if num_kept == g.shape[0] else g[kept]
                    summed = torch.einsum("i,i...", factor.to(device=g.device, dtype=g.dtype), gradient)
                if self.noise_multiplier > 0:
                    summed = summed + _generate_noise(
                        std=self.noise_multiplier * self.max_grad_norm,
                        reference=summed,
                        generator=self.generator,
                        secure_mode=self.secure_mode,
                    )
                p.grad = (summed / normalizer).view_as(p).to(p.dtype)
        per_microbatch_weight = full_factors / normalizer
        if self.grad_module.microbatch_reduction == "mean":
            per_microbatch_weight = per_microbatch_weight / sizes.to(factors.dtype).reshape(
                (-1,) + (1,) * (factors.dim() - 1)
            )
        self.last_step = StepDiagnostics(
            num_samples=int(sizes.sum()),
            num_microbatches=norms.numel(),
            microbatch_sizes=sizes.detach(),
            microbatch_norms=norms.detach(),
            clip_factors=full_factors.detach(),
            fraction_clipped=float(clipped.float().mean()) if num_kept else 0.0,
            sample_weights=per_microbatch_weight.repeat_interleave(sizes.long(), dim=0).detach(),
            dropped_microbatches=num_dropped,
            applied=applied,
            noise_std=float(self.noise_multiplier * self.max_grad_norm / normalizer) if applied else 0.0,
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

    def _normalizer(self, collected: MicroBatchGradients, num_kept: int) -> float:
        if self.expected_batch_size is not None:  # Poisson DP path: the expected count, not the private one
            per_pass = math.ceil(self.expected_batch_size / self.grad_module.microbatch_size)
            return float(per_pass * len(collected.layouts))
        return float(max(num_kept, 1))

    def _weighted_sums_checked(self, collected, present, factors, per_param_norms) -> List[torch.Tensor]:
        """``sum_j factor_j g_j`` for every parameter, checked against autograd's ``p.grad`` in the same pass.

        One matrix product per parameter, ``[2, M] @ [M, numel]``, gives both the clipped sum and the
        plain gradient rebuilt from the micro-batches (``sum_j to_plain_j g_j``); the rounding bound of
        the check is ``sum_j to_plain_j ||g_j||`` from the norms the clipping already computed. All
        finite micro-batches only (the caller makes sure); raises before any ``p.grad`` is changed.
        """
        module = self.grad_module
        present_ids = {id(p) for p, _ in present}
        for p in self.params:  # parameters with a gradient mbclip could not split
            if id(p) not in present_ids and p.grad is not None and p.grad.abs().max() > 0:
                self._verify(collected)  # raises with the explanation
        to_plain = collected.to_plain.to(per_param_norms.dtype)
        bounds = (to_plain.unsqueeze(1) * per_param_norms).sum(dim=0)  # [P']
        summed_all, rebuilt_all, excess = [], [], []
        for index, (p, g) in enumerate(present):
            factor = factors if factors.dim() == 1 else factors[:, index]
            weights = torch.stack([factor.to(g.dtype), collected.to_plain.to(device=g.device, dtype=g.dtype)])
            both = torch.mm(weights, g.reshape(g.shape[0], -1))
            summed_all.append(both[0].view_as(p))
            rebuilt_all.append(both[1].view_as(p))
            actual = p.grad
            if actual is None:
                continue
            tolerance = _CHECK_TOLERANCE.get(actual.dtype, 1e-4)
            error = (both[1].view_as(p).to(actual.dtype) - actual).norm().to(bounds.dtype)
            # > 0 only for a mismatch; NaN (non-finite p.grad) is not one, as before
            excess.append((error - tolerance * bounds[index] - 1e-30).nan_to_num(nan=-1.0).reshape(1))
        if excess and bool((torch.cat(excess) > 0).any()):  # one host sync for all parameters
            for index, ((p, _), rebuilt) in enumerate(zip(present, rebuilt_all)):
                actual = p.grad
                if actual is None or not torch.isfinite(actual).all():
                    continue
                tolerance = _CHECK_TOLERANCE.get(actual.dtype, 1e-4)
                rebuilt = rebuilt.to(actual.dtype)
                if (rebuilt - actual).norm() > tolerance * float(bounds[index]) + 1e-30:
                    raise BatchError(self._mismatch_message(module.parameter_name(p), rebuilt, actual))
        return summed_all

    def _verify(self, collected: MicroBatchGradients) -> None:
        """Every gradient autograd computed must be the sum of the micro-batch gradients mbclip computed."""
        module = self.grad_module
        for p, g in zip(self.params, collected.gradients):
            rebuilt = module.plain_gradient_of(p)
            actual = p.grad
            name = module.parameter_name(p)
            if rebuilt is None:
                if actual is not None and actual.abs().max() > 0:
                    raise BatchError(
                        f"parameter '{name}' received a gradient that mbclip could not split into micro-batches: it "
                        "is used outside the forward of the layer that owns it (a tied or functional use, or a layer "
                        "called on a tensor without the batch dimension and no enclosing layer with parameters). "
                        "Use the layer through its forward, or register a sampler for the module that uses it."
                    )
                continue
            if actual is None or not (torch.isfinite(rebuilt).all() and torch.isfinite(actual).all()):
                continue
            tolerance = _CHECK_TOLERANCE.get(actual.dtype, 1e-4)
            bound = module.gradient_magnitude_of(p)
            error = (rebuilt.to(actual.dtype) - actual).norm()
            if error <= tolerance * bound + 1e-30:
                continue
            raise BatchError(self._mismatch_message(name, rebuilt.to(actual.dtype), actual))

    def _mismatch_message(self, name: str, rebuilt: torch.Tensor, actual: torch.Tensor) -> str:
        ratio = float((rebuilt * actual).sum() / (rebuilt * rebuilt).sum().clamp_min(1e-300))
        message = f"the micro-batch gradients of '{name}' do not add up to the gradient autograd computed"
        if self._grads_replaced:
            return message + ": gradients were not cleared since the last step. Call optimizer.zero_grad() first."
        if self.loss_reduction == "mean" and ratio > 1.5:
            return message + f" (it is {ratio:.3g}x larger): the loss looks like a sum. Pass loss_reduction='sum'."
        if self.loss_reduction == "sum" and 0 < ratio < 0.75:
            return message + f" (it is {ratio:.3g}x): the loss looks like a batch mean. Pass loss_reduction='mean'."
        return message + (
            ". A layer mixes samples (e.g. BatchNorm, or a loss that is not a sum of per-sample terms), or uses "
            "the parameter outside its forward. Fix the model, or register a sampler for the layer."
        )


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
