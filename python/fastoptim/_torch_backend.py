"""The torch backend: `fastoptim.reference` registered for every op, in the calling convention of
the fastoptim::* ops (see ops.py): outputs that would alias an input are written into
caller-provided tensors instead of returned. No support predicates: it runs every op on every
device."""

from __future__ import annotations

import torch

from . import reference
from ._registry import register_kernel
from .coefficients import Schedule


@register_kernel("newton_schulz", "torch")
def newton_schulz(
    G: torch.Tensor, schedule: Schedule, eps: float, compute_dtype: torch.dtype, normalized: bool = False
) -> torch.Tensor:
    return reference.newton_schulz(G, None, schedule, eps, compute_dtype, normalized)


@register_kernel("gram_newton_schulz", "torch")
def gram_newton_schulz(
    G: torch.Tensor, schedule: Schedule, eps: float, compute_dtype: torch.dtype, normalized: bool,
    restarts: tuple[int, ...],
) -> torch.Tensor:
    return reference.gram_newton_schulz(G, None, schedule, eps, compute_dtype, normalized, restarts)


@register_kernel("muon_momentum_", "torch")
def muon_momentum_(
    buf: torch.Tensor, grad: torch.Tensor, nesterov_out: torch.Tensor | None, beta: float
) -> None:
    result = reference.muon_momentum_(buf, grad, beta, nesterov_out is not None)
    if nesterov_out is not None:
        nesterov_out.copy_(result)


@register_kernel("sophia_step_", "torch")
def sophia_step_(params, grads, exp_avgs, hessians, unclipped_out, lr, beta1, rho, weight_decay, eps) -> None:
    fraction = reference.sophia_step_(
        params, grads, exp_avgs, hessians, lr, beta1, rho, weight_decay, eps, unclipped_out is not None
    )
    if unclipped_out is not None:
        unclipped_out.copy_(fraction)


# The reference functions that already take the ops' arguments.
register_kernel("muon_momentum_stack_", "torch")(reference.muon_momentum_stack_)
register_kernel("muon_apply_", "torch")(reference.muon_apply_)
register_kernel("muon_apply_stack_", "torch")(reference.muon_apply_stack_)
register_kernel("normuon_step_", "torch")(reference.normuon_step_)
register_kernel("normuon_step_stack_", "torch")(reference.normuon_step_stack_)
register_kernel("hessian_ema_", "torch")(reference.hessian_ema_)
