"""The torch backend in the calling convention of the fastoptim::* ops (see ops.py): outputs that
would alias an input are written into caller-provided tensors instead of returned."""

from __future__ import annotations

import torch

from . import reference
from .coefficients import Schedule


def newton_schulz(
    G: torch.Tensor, schedule: Schedule, eps: float, compute_dtype: torch.dtype, normalized: bool = False
) -> torch.Tensor:
    return reference.newton_schulz(G, None, schedule, eps, compute_dtype, normalized)


def muon_momentum_(
    buf: torch.Tensor, grad: torch.Tensor, nesterov_out: torch.Tensor | None, beta: float
) -> None:
    result = reference.muon_momentum_(buf, grad, beta, nesterov_out is not None)
    if nesterov_out is not None:
        nesterov_out.copy_(result)


def sophia_step_(params, grads, exp_avgs, hessians, unclipped_out, lr, beta1, rho, weight_decay, eps) -> None:
    fraction = reference.sophia_step_(
        params, grads, exp_avgs, hessians, lr, beta1, rho, weight_decay, eps, unclipped_out is not None
    )
    if unclipped_out is not None:
        unclipped_out.copy_(fraction)


OPS = {
    "newton_schulz": newton_schulz,
    "muon_momentum_": muon_momentum_,
    "muon_momentum_stack_": reference.muon_momentum_stack_,
    "muon_apply_": reference.muon_apply_,
    "muon_apply_stack_": reference.muon_apply_stack_,
    "normuon_step_": reference.normuon_step_,
    "normuon_step_stack_": reference.normuon_step_stack_,
    "sophia_step_": sophia_step_,
    "hessian_ema_": reference.hessian_ema_,
}
