"""The brute-force reference every test compares against.

Each micro-batch runs alone through plain autograd; its gradient is clipped as the issue defines;
the clipped gradients are averaged. Nothing of mbclip is used here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, List, Sequence, Union

import torch
from opacus.grad_sample import GradSampleModule
from torch import nn

# per_sample_losses(model, samples) -> losses [len(samples)]; samples is a slice or an index tensor
PerSampleLosses = Callable[[nn.Module, slice], torch.Tensor]


@dataclass
class Reference:
    update: List[torch.Tensor]  # one per parameter
    norms: torch.Tensor  # [M]
    factors: torch.Tensor  # [M] or [M, P]
    gradients: List[List[torch.Tensor]]  # [M][P], unclipped micro-batch gradients


def reference_update(
    model: nn.Module,
    per_sample_losses: PerSampleLosses,
    batch_size: int,
    microbatch_size: int,
    clipping: str = "fixed",
    max_grad_norm: Union[None, float, Sequence[float]] = None,
    microbatch_reduction: str = "mean",
) -> Reference:
    """The reference update of ``model``'s trainable parameters, computed on a deep copy (``model`` is untouched).

    ``model`` must be the plain model: a wrapped one (mbclip's or Opacus's hooks) would carry its hooks and its
    recorded passes into the copy, and the reference would no longer be independent of mbclip.
    """
    wrapped = [name or "the model itself" for name, m in model.named_modules() if _carries_sample_hooks(m)]
    if wrapped:
        raise TypeError(
            f"reference_update needs the plain model, and '{wrapped[0]}' carries per-sample gradient hooks: pass a "
            "copy taken before wrapping (copy.deepcopy(model)), given the current weights with weights_into if the "
            "wrapped model has trained since."
        )
    model = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    gradients = []
    for start in range(0, batch_size, microbatch_size):
        losses = per_sample_losses(model, slice(start, min(start + microbatch_size, batch_size)))
        loss = losses.mean() if microbatch_reduction == "mean" else losses.sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        gradients.append([torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)])
    return clip_and_average(gradients, clipping, max_grad_norm)


def weights_into(plain: nn.Module, trained: nn.Module) -> nn.Module:
    """``plain`` (a copy of the model taken before wrapping) with ``trained``'s parameters and buffers now: the
    model to give :func:`reference_update` for a wrapped model that has trained since."""
    plain.load_state_dict(trained.state_dict())
    return plain


def _carries_sample_hooks(module: nn.Module) -> bool:
    """A wrapper (``GradSampleModule`` and its subclasses, mbclip's among them) or a module hooked by one."""
    return isinstance(module, GradSampleModule) or hasattr(module, "autograd_grad_sample_hooks")


def clip_and_average(
    gradients: List[List[torch.Tensor]], clipping: str, max_grad_norm: Union[None, float, Sequence[float]]
) -> Reference:
    """Clip each micro-batch gradient (a list over parameters) as the issue defines, then average them."""
    per_param = torch.stack([torch.stack([g.norm() for g in gs]) for gs in gradients])  # [M, P]
    norms = per_param.norm(dim=1)
    if clipping == "fixed":
        factors = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    elif clipping == "adaptive":
        factors = norms.min() / (norms + 1e-6)
    elif clipping == "per_layer":
        num_params = per_param.shape[1]
        bounds = max_grad_norm if isinstance(max_grad_norm, (list, tuple)) else [max_grad_norm] * num_params
        factors = (torch.tensor(bounds, dtype=per_param.dtype) / (per_param + 1e-6)).clamp(max=1.0)
    else:
        raise ValueError(clipping)
    num = len(gradients)
    update = []
    for i in range(per_param.shape[1]):
        total = torch.zeros_like(gradients[0][i])
        for j, gs in enumerate(gradients):
            factor = factors[j] if factors.dim() == 1 else factors[j, i]
            total = total + factor * gs[i]
        update.append(total / num)
    return Reference(update, norms, factors, gradients)


def assert_close_update(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor], rtol: float = 1e-10) -> None:
    """Relative agreement over the whole flat update vector (and per parameter, scaled by the whole)."""
    flat_actual = torch.cat([a.reshape(-1) for a in actual])
    flat_expected = torch.cat([e.reshape(-1) for e in expected])
    scale = flat_expected.norm().clamp_min(1e-300)
    error = (flat_actual - flat_expected).norm()
    assert error <= rtol * scale, f"relative error {float(error / scale):.3e} > {rtol:.1e}"
