"""The cuda backend: thin calls into fastoptim._C (hand-written kernels in csrc/), in the calling
convention of the fastoptim::* ops, each registered with the predicate that says which arguments
its kernel takes (`fastoptim._registry.register_kernel`); auto dispatch moves on to the next
backend for the others. `fastoptim.backends` imports this module only once ``_C`` loads."""

from __future__ import annotations

import functools
import os
from collections import defaultdict

import torch

from . import _C
from ._registry import register_kernel
from ._validation import KERNEL_DTYPES


def _support(*tensors: torch.Tensor | None) -> str | None:
    for t in tensors:
        if t is None:
            continue
        if t.dtype not in KERNEL_DTYPES:
            return f"its kernels take float32, bfloat16 or float16 tensors, got {t.dtype}"
        if not t.is_contiguous():
            return "its kernels take contiguous tensors"
    return None


def _list_support(*lists) -> str | None:
    for tensors in lists:
        reason = _support(*tensors)
        if reason is not None:
            return reason
    return None


def _groups(*lists):
    """Indices of the tensors grouped by their dtype combination: the kernels take one combination a launch."""
    groups = defaultdict(list)
    for i, tensors in enumerate(zip(*lists)):
        groups[tuple(t.dtype for t in tensors)].append(i)
    return groups.values()


def _split(value: float | torch.Tensor) -> tuple[float, torch.Tensor | None]:
    """A hyper-parameter as the bindings take it: (number, None), or (0.0, 0-dim tensor read on the device)."""
    return (0.0, value) if isinstance(value, torch.Tensor) else (value, None)


# --------------------------------------------------------------------------------------------------
# Newton–Schulz

# Per architecture ("sm_90", "sm_80", ...): the smallest Gram side s = min(m, n) from which the upper-triangle
# tensor-core kernel (csrc/symmetric_gemm.cu) beats cuBLASLt for X Xᵀ and A·A. An architecture absent here (or
# None) never takes it: entries come from measured rows only (bench_newton_schulz's fastoptim-cuda and
# fastoptim-cuda-symmetric medians, through `python bench/thresholds.py <bench.json>`), never from guesses.
# No GPU run has measured them yet.
SYMMETRIC_MIN_GRAM: dict[str, int | None] = {}


@functools.cache
def _arch(index: int) -> str:
    """"sm_XY" of CUDA device `index` (a host query, cached: no synchronization)."""
    return "sm_{}{}".format(*torch.cuda.get_device_capability(index))


def _use_symmetric(G: torch.Tensor, compute_dtype: torch.dtype) -> bool:
    """FASTOPTIM_NS_SYMMETRIC=1 forces the symmetric kernel (16-bit compute), 0 forbids it; unset: the table
    of G's architecture."""
    forced = os.environ.get("FASTOPTIM_NS_SYMMETRIC", "").strip()
    if compute_dtype == torch.float32 or forced == "0":
        return False
    if forced == "1":
        return True
    if not SYMMETRIC_MIN_GRAM or G.device.type != "cuda":
        return False
    threshold = SYMMETRIC_MIN_GRAM.get(_arch(G.device.index if G.device.index is not None else 0))
    return threshold is not None and min(G.shape[-2], G.shape[-1]) >= threshold


def _newton_schulz_support(G, schedule, eps, compute_dtype, normalized=False) -> str | None:
    if compute_dtype not in KERNEL_DTYPES:
        return f"its Newton–Schulz driver computes in float32, bfloat16 or float16, got {compute_dtype}"
    if G.dtype not in KERNEL_DTYPES:
        return f"its Newton–Schulz prologue reads float32, bfloat16 or float16 input, got {G.dtype}"
    if G.dim() > 3 and not G.is_contiguous():
        return "it takes a stack (..., m, n) with more than one leading dimension only when contiguous"
    return None


def _use_cublaslt() -> bool:
    """FASTOPTIM_NS_CUBLASLT=0 keeps the Newton–Schulz drivers on ATen's bmm/baddbmm (whose addend is copied
    into the output first); unset or 1: cuBLASLt with the addend and the output apart where the build links
    it (``_C.HAVE_CUBLASLT``). A problem cuBLASLt declines runs on ATen either way."""
    return os.environ.get("FASTOPTIM_NS_CUBLASLT", "").strip() != "0"


@register_kernel("newton_schulz", "cuda", supports=_newton_schulz_support)
def newton_schulz(G, schedule, eps, compute_dtype, normalized=False) -> torch.Tensor:
    return _C.newton_schulz(
        G, schedule.flat(), schedule.safety, eps, compute_dtype, _use_symmetric(G, compute_dtype), normalized,
        _use_cublaslt(),
    )


def _gemm(out: torch.Tensor, p: torch.Tensor, q: torch.Tensor, alpha: float = 1.0, beta: float = 0.0,
          addend: torch.Tensor | None = None) -> None:
    """out <- alpha·p@q + beta·addend (batched): ``_C.gemm_`` for CUDA tensors (cuBLASLt, no copy of the
    addend), torch's bmm/baddbmm for others (the CPU tests of the composition)."""
    if out.is_cuda:
        _C.gemm_(out, p, q, alpha, beta, addend, _use_cublaslt())
    elif addend is not None and beta != 0.0:
        torch.baddbmm(addend, p, q, beta=beta, alpha=alpha, out=out)
    else:
        torch.bmm(p, q, out=out)
        if alpha != 1.0:
            out.mul_(alpha)


def _gram_iterate(X: torch.Tensor, schedule, restarts: tuple[int, ...], symmetric: bool) -> torch.Tensor:
    """Gram Newton–Schulz (`fastoptim.reference.gram_newton_schulz`) from a contiguous (batch, m, n) X₀
    in the compute dtype: batched GEMMs (`_gemm`: cuBLASLt, the addend apart from the output), the a-terms
    in the GEMM epilogue (P = aI + Z with Z = cR² + bR is never formed; P Q = Z Q + aQ, R P = R Z + aR,
    P R P = Z (R P) + a (R P)), and with `symmetric` the upper-triangle kernel for R = XXᵀ and Z
    (csrc/symmetric_gemm.cu). Tall matrices use the transposed form through strides: R = XᵀX, X <- X Qᵀ.
    Without `symmetric` it runs on CPU tensors too (torch's GEMMs; the tests check the composition there)."""
    batch, m, n = X.shape
    tall, size = m > n, min(m, n)
    R, Z, T, Q, Q_next = torch.empty((5, batch, size, size), dtype=X.dtype, device=X.device).unbind(0)
    X_next = torch.empty_like(X)

    def gram(x: torch.Tensor) -> None:
        if symmetric:
            _C.symmetric_gemm(x, R, None, tall, 1.0, 0.0)
        elif tall:
            _gemm(R, x.mT, x)
        else:
            _gemm(R, x, x.mT)

    def apply(q: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> None:
        if tall:
            _gemm(out, x, q.mT)
        else:
            _gemm(out, q, x)

    gram(X)
    fresh, last = True, len(schedule.triples)
    for k, (a, b, c) in enumerate(schedule.triples, start=1):
        if symmetric:
            _C.symmetric_gemm(R, Z, R, False, c, b)  # R·Rᵀ = R² (R is symmetric)
        else:
            _gemm(Z, R, R, c, b, R)
        if k not in restarts and k < last:
            _gemm(T, R, Z, 1.0, a, R)
            _gemm(R, Z, T, 1.0, a, T)
        if fresh:
            Z.diagonal(dim1=-2, dim2=-1).add_(a)  # Q = P = Z + aI, in place
            Q, Z = Z, Q
        else:
            _gemm(Q_next, Z, Q, 1.0, a, Q)
            Q, Q_next = Q_next, Q
        fresh = False
        if k in restarts:
            apply(Q, X, X_next)
            X, X_next = X_next, X
            gram(X)
            fresh = True
    apply(Q, X, X_next)
    return X_next


def _gram_newton_schulz_support(G, schedule, eps, compute_dtype, normalized=False, restarts=()) -> str | None:
    return _newton_schulz_support(G, schedule, eps, compute_dtype, normalized)


@register_kernel("gram_newton_schulz", "cuda", supports=_gram_newton_schulz_support)
def gram_newton_schulz(G, schedule, eps, compute_dtype, normalized=False, restarts=()) -> torch.Tensor:
    # The hand-written prologue alone (no steps): X₀ exactly as the standard driver computes it.
    X = _C.newton_schulz(G, [], schedule.safety, eps, compute_dtype, False, normalized)
    if X.numel() == 0 or not schedule.triples:
        return X
    m, n = X.shape[-2], X.shape[-1]
    return _gram_iterate(X.view(-1, m, n), schedule, restarts, _use_symmetric(G, compute_dtype)).view(G.shape)


# --------------------------------------------------------------------------------------------------
# Muon


def _momentum_support(buf, grad, nesterov_out, beta) -> str | None:
    return _support(buf, grad, nesterov_out)


@register_kernel("muon_momentum_", "cuda", supports=_momentum_support)
def muon_momentum_(buf, grad, nesterov_out, beta) -> None:
    _C.muon_momentum_(buf, grad, nesterov_out, beta)


def _momentum_stack_support(bufs, grads, out, *_) -> str | None:
    return _list_support(bufs, grads, [out])


@register_kernel("muon_momentum_stack_", "cuda", supports=_momentum_stack_support)
def muon_momentum_stack_(bufs, grads, out, beta, nesterov, normalize=False, safety=1.0, eps=1e-7) -> None:
    if out.numel() == 0:
        return
    chunks = -(-out[0].numel() // _C.MULTI_TENSOR_CHUNK)
    # Every (matrix, chunk) partial (a sum, then its exponent) is written by exactly one block: no zero-fill.
    partials = torch.empty((out.shape[0], 2 * chunks), dtype=torch.float32, device=out.device) if normalize else None
    # The kernel takes bufs of one dtype and grads of one dtype: one launch per combination.
    groups = list(_groups(bufs, grads))
    for index in groups:
        _C.muon_momentum_stack_(
            [bufs[i] for i in index], [grads[i] for i in index], out, list(index), beta, nesterov, partials
        )
    if normalize and out.dtype == torch.float16:  # not written yet: normalized from the recomputed values
        # One call: the denominators once, then a launch per (buf, grad) dtype group inside.
        _C.muon_stack_recompute_(bufs, grads, out, list(range(len(bufs))), beta, nesterov, partials, safety, eps)
    elif normalize:
        _C.muon_stack_normalize_(out, partials, safety, eps)


def _apply_support(param, update, *_) -> str | None:
    return _support(param, update)


@register_kernel("muon_apply_", "cuda", supports=_apply_support)
def muon_apply_(param, update, lr, weight_decay, scale, cautious) -> None:
    _C.muon_apply_(param, update, lr, weight_decay, scale, cautious)


def _apply_stack_support(params, updates, *_) -> str | None:
    return _list_support(params, [updates])


@register_kernel("muon_apply_stack_", "cuda", supports=_apply_stack_support)
def muon_apply_stack_(params, updates, lr, weight_decay, scale, cautious) -> None:
    # One launch per parameter dtype for up to 128 matrices (the kernel arguments carry the pointer table).
    lr, lr_tensor = _split(lr)
    weight_decay, weight_decay_tensor = _split(weight_decay)
    _C.muon_apply_stack_(params, updates, lr, weight_decay, lr_tensor, weight_decay_tensor, scale, cautious)


# --------------------------------------------------------------------------------------------------
# NorMuon


def _normuon_support(param, update, second_moment, *_) -> str | None:
    if second_moment.dtype != torch.float32:
        return f"its NorMuon kernel takes a float32 second_moment, got {second_moment.dtype}"
    return _support(param, update, second_moment)


@register_kernel("normuon_step_", "cuda", supports=_normuon_support)
def normuon_step_(param, update, second_moment, lr, weight_decay, beta2, eps, scale, cautious) -> None:
    _C.normuon_step_(param, update, second_moment, lr, weight_decay, beta2, eps, scale, cautious)


def _normuon_stack_support(params, updates, second_moments, *_) -> str | None:
    if any(v.dtype != torch.float32 for v in second_moments):
        return "its NorMuon kernel takes float32 second_moments"
    return _list_support(params, [updates], second_moments)


@register_kernel("normuon_step_stack_", "cuda", supports=_normuon_stack_support)
def normuon_step_stack_(params, updates, second_moments, lr, weight_decay, beta2, eps, scale, cautious) -> None:
    # Three launches (row statistics, per-matrix norms, apply) for up to 128 matrices of one parameter dtype.
    lr, lr_tensor = _split(lr)
    weight_decay, weight_decay_tensor = _split(weight_decay)
    _C.normuon_step_stack_(params, updates, second_moments, lr, weight_decay, lr_tensor, weight_decay_tensor, beta2,
                           eps, scale, cautious)


# --------------------------------------------------------------------------------------------------
# Sophia


def _sophia_support(params, grads, exp_avgs, hessians, *_) -> str | None:
    reason = _list_support(params, grads, exp_avgs, hessians)
    if reason is None and any(g.dtype != p.dtype for p, g in zip(params, grads)):
        return "its Sophia kernel takes grads of the params' dtype"
    if reason is None and any(h.dtype != m.dtype for m, h in zip(exp_avgs, hessians)):
        return "its Sophia kernel takes hessians of the exp_avgs' dtype"
    return reason


@register_kernel("sophia_step_", "cuda", supports=_sophia_support)
def sophia_step_(params, grads, exp_avgs, hessians, unclipped_out, lr, beta1, rho, weight_decay, eps) -> None:
    counter = None
    if unclipped_out is not None:
        counter = torch.zeros(1, dtype=torch.int64, device=params[0].device)
    # The kernel takes params and grads of one dtype and exp_avgs and hessians of one dtype.
    for index in _groups(params, grads, exp_avgs, hessians):
        pick = [[tensors[i] for i in index] for tensors in (params, grads, exp_avgs, hessians)]
        _C.sophia_step_(*pick, counter, lr, beta1, rho, weight_decay, eps)
    if unclipped_out is not None:
        total = sum(p.numel() for p in params)
        unclipped_out.copy_((counter.to(torch.float64) / max(total, 1)).squeeze(0))


def _hessian_ema_support(hessians, estimates, beta2) -> str | None:
    return _list_support(hessians, estimates)


@register_kernel("hessian_ema_", "cuda", supports=_hessian_ema_support)
def hessian_ema_(hessians, estimates, beta2) -> None:
    for index in _groups(hessians, estimates):
        _C.hessian_ema_([hessians[i] for i in index], [estimates[i] for i in index], beta2)
