"""The public ops: validation, backend choice, and torch.library registration.

Each public function checks its arguments (raising before any tensor changes), picks a backend
(`fastoptim.backends.select`), and calls the `fastoptim::<name>` custom op, whose implementation
runs that backend. The custom ops have fake implementations, so `torch.compile` traces through
them without a graph break and `torch.library.opcheck` passes.

A custom op may not return a tensor that aliases an input; where the math would (the non-Nesterov
momentum returns the buffer itself) or where a result is optional (Sophia's unclipped fraction), the
wrapper allocates the output and the op writes into it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import List  # torch < 2.7 infers op schemas from typing.List only, not list[...]

import torch
from torch import Tensor

from . import _validation as check
from . import backends
from .coefficients import Schedule, resolve

# --------------------------------------------------------------------------------------------------
# torch.library custom ops. `backend` is what the caller chose ("auto" under torch.compile); the
# implementation resolves it at run time on the actual tensors.


@torch.library.custom_op("fastoptim::newton_schulz", mutates_args=())
def _newton_schulz_op(
    G: Tensor,
    coefficients: List[float],
    safety: float,
    eps: float,
    compute_dtype: torch.dtype,
    normalized: bool,
    backend: str,
) -> Tensor:
    schedule = Schedule.from_flat(coefficients, safety)
    args = (G, schedule, eps, compute_dtype, normalized)
    return backends.implementation("newton_schulz", backend, G.device, args)(*args).contiguous()


@_newton_schulz_op.register_fake
def _(G, coefficients, safety, eps, compute_dtype, normalized, backend):
    return G.new_empty(G.shape, dtype=compute_dtype)


@torch.library.custom_op("fastoptim::muon_momentum_", mutates_args=("buf", "nesterov_out"))
def _muon_momentum_op(buf: Tensor, grad: Tensor, nesterov_out: Tensor | None, beta: float, backend: str) -> None:
    args = (buf, grad, nesterov_out, beta)
    backends.implementation("muon_momentum_", backend, buf.device, args)(*args)


@_muon_momentum_op.register_fake
def _(buf, grad, nesterov_out, beta, backend):
    return None


@torch.library.custom_op("fastoptim::muon_momentum_stack_", mutates_args=("bufs", "out"))
def _muon_momentum_stack_op(
    bufs: List[Tensor],
    grads: List[Tensor],
    out: Tensor,
    beta: float,
    nesterov: bool,
    normalize: bool,
    safety: float,
    eps: float,
    backend: str,
) -> None:
    args = (bufs, grads, out, beta, nesterov, normalize, safety, eps)
    backends.implementation("muon_momentum_stack_", backend, out.device, args)(*args)


@_muon_momentum_stack_op.register_fake
def _(bufs, grads, out, beta, nesterov, normalize, safety, eps, backend):
    return None


@torch.library.custom_op("fastoptim::muon_apply_", mutates_args=("param",))
def _muon_apply_op(
    param: Tensor, update: Tensor, lr: float, weight_decay: float, scale: float, cautious: bool, backend: str
) -> None:
    args = (param, update, lr, weight_decay, scale, cautious)
    backends.implementation("muon_apply_", backend, param.device, args)(*args)


@_muon_apply_op.register_fake
def _(param, update, lr, weight_decay, scale, cautious, backend):
    return None


@torch.library.custom_op("fastoptim::normuon_step_", mutates_args=("param", "second_moment"))
def _normuon_step_op(
    param: Tensor,
    update: Tensor,
    second_moment: Tensor,
    lr: float,
    weight_decay: float,
    beta2: float,
    eps: float,
    scale: float,
    cautious: bool,
    backend: str,
) -> None:
    args = (param, update, second_moment, lr, weight_decay, beta2, eps, scale, cautious)
    backends.implementation("normuon_step_", backend, param.device, args)(*args)


@_normuon_step_op.register_fake
def _(param, update, second_moment, lr, weight_decay, beta2, eps, scale, cautious, backend):
    return None


@torch.library.custom_op("fastoptim::sophia_step_", mutates_args=("params", "exp_avgs", "unclipped_out"))
def _sophia_step_op(
    params: List[Tensor],
    grads: List[Tensor],
    exp_avgs: List[Tensor],
    hessians: List[Tensor],
    unclipped_out: Tensor | None,
    lr: float,
    beta1: float,
    rho: float,
    weight_decay: float,
    eps: float,
    backend: str,
) -> None:
    args = (params, grads, exp_avgs, hessians, unclipped_out, lr, beta1, rho, weight_decay, eps)
    backends.implementation("sophia_step_", backend, params[0].device, args)(*args)


@_sophia_step_op.register_fake
def _(params, grads, exp_avgs, hessians, unclipped_out, lr, beta1, rho, weight_decay, eps, backend):
    return None


@torch.library.custom_op("fastoptim::hessian_ema_", mutates_args=("hessians",))
def _hessian_ema_op(hessians: List[Tensor], estimates: List[Tensor], beta2: float, backend: str) -> None:
    args = (hessians, estimates, beta2)
    backends.implementation("hessian_ema_", backend, hessians[0].device, args)(*args)


@_hessian_ema_op.register_fake
def _(hessians, estimates, beta2, backend):
    return None


# --------------------------------------------------------------------------------------------------
# Public functions


def _backend_arg(backend: object) -> str:
    if not isinstance(backend, str) or backend not in backends.CHOICES:
        raise ValueError(f"backend must be one of {backends.CHOICES}, got {backend!r}")
    return backend


def newton_schulz(
    G: Tensor,
    steps: int | None = None,
    coefficients: str | Sequence[Sequence[float]] | Schedule = "jordan",
    eps: float = 1e-7,
    compute_dtype: torch.dtype = torch.bfloat16,
    backend: str = "auto",
    normalized: bool = False,
) -> Tensor:
    """Orthogonalize each matrix of G (..., m, n) by the quintic Newton–Schulz iteration.

    See `fastoptim.reference.newton_schulz` for the exact computation and
    `fastoptim.coefficients` for the schedules ("jordan", "polar_express", "you", or a list of
    (a, b, c) triples; steps=None runs the schedule's own length). Returns a new (..., m, n) tensor
    in compute_dtype. normalized=True: G is already X₀ = G/(safety·‖G‖_F + eps) (as
    `muon_momentum_stack_(normalize=True)` writes it), so the normalization pass is skipped.
    """
    check.tensor("G", G, min_ndim=2)
    schedule = resolve(coefficients, steps)
    eps = check.non_negative("eps", eps)
    compute_dtype = check.compute_dtype("compute_dtype", compute_dtype)
    normalized = check.boolean("normalized", normalized)
    args = (G, schedule, eps, compute_dtype, normalized)
    name = backends.eager_select("newton_schulz", _backend_arg(backend), G.device, args)
    return _newton_schulz_op(G, schedule.flat(), schedule.safety, eps, compute_dtype, normalized, name)


def muon_momentum_(
    buf: Tensor, grad: Tensor, beta: float = 0.95, nesterov: bool = True, backend: str = "auto"
) -> Tensor:
    """buf <- lerp(buf, grad, 1 - beta) in place; returns the Newton–Schulz input:
    lerp(grad, buf, beta) as a new tensor of buf's dtype if nesterov, else buf itself. grad is not changed."""
    check.tensor("buf", buf)
    check.tensor("grad", grad)
    check.same_shape("grad", grad, "buf", buf)
    check.same_device("grad", grad, "buf", buf)
    beta = check.beta("beta", beta)
    nesterov = check.boolean("nesterov", nesterov)
    nesterov_out = torch.empty_like(buf, memory_format=torch.contiguous_format) if nesterov else None
    name = backends.eager_select("muon_momentum_", _backend_arg(backend), buf.device, (buf, grad, nesterov_out, beta))
    with torch.no_grad():
        _muon_momentum_op(buf, grad, nesterov_out, beta, name)
    return nesterov_out if nesterov else buf


def muon_momentum_stack_(
    bufs: Sequence[Tensor],
    grads: Sequence[Tensor],
    out: Tensor,
    beta: float = 0.95,
    nesterov: bool = True,
    backend: str = "auto",
    normalize: bool = False,
    safety: float = 1.0,
    eps: float = 1e-7,
) -> None:
    """`muon_momentum_` for P same-size matrices at once, writing the Newton–Schulz inputs into the
    (P, m, n) stack `out` (any floating dtype: e.g. the compute dtype). Each buf_i/grad_i may have any
    shape with m·n elements (a conv kernel is read as its (out, -1) matrix). With normalize, each
    out[i] is also divided by (safety·‖out[i]‖_F + eps), Newton–Schulz's normalization (then call
    `newton_schulz(..., normalized=True)`); see `fastoptim.reference.muon_momentum_stack_`.
    Mutates bufs and out."""
    bufs = check.tensor_list("bufs", bufs)
    grads = check.tensor_list("grads", grads)
    check.matching_lists(("bufs", "grads"), (bufs, grads))
    check.tensor("out", out, min_ndim=3)
    if out.dim() != 3 or out.shape[0] != len(bufs):
        raise ValueError(f"out must be a ({len(bufs)}, m, n) stack, one matrix per buf, got {tuple(out.shape)}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    size = out.shape[1] * out.shape[2]
    for i, buf in enumerate(bufs):
        if buf.numel() != size:
            raise ValueError(f"bufs[{i}] must have out's m·n = {size} elements, got shape {tuple(buf.shape)}")
        check.same_device(f"bufs[{i}]", buf, "out", out)
    beta = check.beta("beta", beta)
    nesterov = check.boolean("nesterov", nesterov)
    normalize = check.boolean("normalize", normalize)
    safety = check.positive("safety", safety)
    eps = check.non_negative("eps", eps)
    if not bufs:
        _backend_arg(backend)
        return
    args = (bufs, grads, out, beta, nesterov, normalize, safety, eps)
    name = backends.eager_select("muon_momentum_stack_", _backend_arg(backend), out.device, args)
    with torch.no_grad():
        _muon_momentum_stack_op(*args, name)


def _check_update_pair(param: Tensor, update: Tensor) -> None:
    check.tensor("param", param, min_ndim=2)
    check.tensor("update", update, min_ndim=2)
    check.same_shape("update", update, "param", param)
    check.same_device("update", update, "param", param)


def muon_apply_(
    param: Tensor,
    update: Tensor,
    lr: float,
    weight_decay: float = 0.0,
    scale: float = 1.0,
    cautious: bool = False,
    backend: str = "auto",
) -> None:
    """p <- p·(1 - lr·wd) (cautious: only where update·p >= 0); p <- p - lr·scale·update. In place on param."""
    _check_update_pair(param, update)
    lr = check.non_negative("lr", lr)
    weight_decay = check.non_negative("weight_decay", weight_decay)
    scale = check.real("scale", scale)
    cautious = check.boolean("cautious", cautious)
    args = (param, update, lr, weight_decay, scale, cautious)
    name = backends.eager_select("muon_apply_", _backend_arg(backend), param.device, args)
    with torch.no_grad():
        _muon_apply_op(*args, name)


def normuon_step_(
    param: Tensor,
    update: Tensor,
    second_moment: Tensor,
    lr: float,
    weight_decay: float = 0.0,
    beta2: float = 0.95,
    eps: float = 1e-10,
    scale: float = 1.0,
    cautious: bool = False,
    backend: str = "auto",
) -> None:
    """NorMuon's row normalization of the orthogonalized update and the step (see
    `fastoptim.reference.normuon_step_`); cautious: weight decay only where the normalized update and
    the parameter agree in sign. Mutates param and second_moment (shape (..., m), one value per row)."""
    _check_update_pair(param, update)
    check.tensor("second_moment", second_moment)
    expected = tuple(param.shape[:-1])
    if tuple(second_moment.shape) != expected:
        raise ValueError(
            f"second_moment must have shape {expected} (one value per row of param), got {tuple(second_moment.shape)}"
        )
    check.same_device("second_moment", second_moment, "param", param)
    lr = check.non_negative("lr", lr)
    weight_decay = check.non_negative("weight_decay", weight_decay)
    beta2 = check.beta("beta2", beta2)
    eps = check.positive("eps", eps)
    scale = check.real("scale", scale)
    cautious = check.boolean("cautious", cautious)
    args = (param, update, second_moment, lr, weight_decay, beta2, eps, scale, cautious)
    name = backends.eager_select("normuon_step_", _backend_arg(backend), param.device, args)
    with torch.no_grad():
        _normuon_step_op(*args, name)


def sophia_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    hessians: Sequence[Tensor],
    lr: float,
    beta1: float = 0.965,
    rho: float = 0.04,
    weight_decay: float = 0.1,
    eps: float = 1e-15,
    return_unclipped: bool = False,
    backend: str = "auto",
) -> Tensor | None:
    """Sophia's clipped step over lists of tensors (see `fastoptim.reference.sophia_step_`).
    Mutates params and exp_avgs. With return_unclipped, returns the fraction of coordinates not
    clipped as a float32 0-dim tensor on the device (no host synchronization); else None."""
    params = check.tensor_list("params", params)
    grads = check.tensor_list("grads", grads)
    exp_avgs = check.tensor_list("exp_avgs", exp_avgs)
    hessians = check.tensor_list("hessians", hessians)
    check.matching_lists(
        ("params", "grads", "exp_avgs", "hessians"), (params, grads, exp_avgs, hessians)
    )
    lr = check.non_negative("lr", lr)
    beta1 = check.beta("beta1", beta1)
    rho = check.positive("rho", rho)
    weight_decay = check.non_negative("weight_decay", weight_decay)
    eps = check.positive("eps", eps)
    return_unclipped = check.boolean("return_unclipped", return_unclipped)
    device = params[0].device if params else torch.device("cpu")
    unclipped_out = torch.zeros((), dtype=torch.float32, device=device) if return_unclipped else None
    if params:
        args = (params, grads, exp_avgs, hessians, unclipped_out, lr, beta1, rho, weight_decay, eps)
        name = backends.eager_select("sophia_step_", _backend_arg(backend), device, args)
        with torch.no_grad():
            _sophia_step_op(*args, name)
    else:
        _backend_arg(backend)
    return unclipped_out


def hessian_ema_(
    hessians: Sequence[Tensor], estimates: Sequence[Tensor], beta2: float = 0.99, backend: str = "auto"
) -> None:
    """h <- lerp(h, ĥ, 1 - beta2) for each pair of the lists, in place on hessians."""
    hessians = check.tensor_list("hessians", hessians)
    estimates = check.tensor_list("estimates", estimates)
    check.matching_lists(("hessians", "estimates"), (hessians, estimates))
    beta2 = check.beta("beta2", beta2)
    if not hessians:
        _backend_arg(backend)
        return
    args = (hessians, estimates, beta2)
    name = backends.eager_select("hessian_ema_", _backend_arg(backend), hessians[0].device, args)
    with torch.no_grad():
        _hessian_ema_op(hessians, estimates, beta2, name)


__all__ = [
    "newton_schulz",
    "muon_momentum_",
    "muon_momentum_stack_",
    "muon_apply_",
    "normuon_step_",
    "sophia_step_",
    "hessian_ema_",
]
