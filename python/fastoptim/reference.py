"""The torch backend: every fastoptim op in plain PyTorch. This file is the specification.

Written for clarity from the papers and the original implementations; kernels are tested against
it and it is tested against float64 math. It is never edited to make a kernel pass.

Arithmetic is done in float32 (float64 when any operand is float64) whatever the storage dtype,
and results are written back into the stored tensors in place. Input checking lives in
`fastoptim.ops`; these functions assume valid arguments.

Sources
- Muon: K. Jordan et al., "Muon: An optimizer for hidden layers in neural networks" (2024),
  https://kellerjordan.github.io/posts/muon/ and github.com/KellerJordan/Muon.
- NorMuon: Z. Li et al., "NorMuon: Making Muon more efficient and scalable" (arXiv:2510.05491),
  and its official code (normuon.py).
- Sophia: H. Liu et al., "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
  Pre-training" (arXiv:2305.14342), Algorithm 3, and its official code (sophia.py).
- Cautious weight decay: L. Chen et al., "Cautious Weight Decay" (arXiv:2510.12402).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._validation import accumulate_dtype
from .coefficients import Schedule, resolve
from .ns_methods import default_restarts


def newton_schulz(
    G: torch.Tensor,
    steps: int | None = None,
    coefficients: str | Sequence[Sequence[float]] | Schedule = "jordan",
    eps: float = 1e-7,
    compute_dtype: torch.dtype = torch.bfloat16,
    normalized: bool = False,
) -> torch.Tensor:
    """Approximate orthogonal polar factor of each matrix of a stack G (..., m, n).

        X = G / (safety·‖G‖_F + eps)        (in fp32, or fp64 when G or compute_dtype is fp64, then
                                             cast; overflow-safe: `frobenius_normalized`;
                                             normalized=True: X = G, already scaled, e.g. by
                                             muon_momentum_stack_(normalize=True))
        for each (a, b, c) of the schedule:
            A = X Xᵀ;  B = b A + c A²;  X = a X + B X          (wide form, m <= n)
            A = XᵀX;   B = b A + c A²;  X = a X + X B          (tall form, m > n)

    The two forms are the same polynomial (X XᵀX = X (XᵀX)); the tall form keeps the Gram matrix
    n x n, the smaller side, without transposing a copy. Every matmul runs in compute_dtype.
    Returns a new (..., m, n) tensor of dtype compute_dtype.
    """
    schedule = resolve(coefficients, steps)
    m, n = G.shape[-2], G.shape[-1]
    if normalized:
        X = G.to(compute_dtype, copy=True)
    else:
        X = frobenius_normalized(G.to(accumulate_dtype(G, compute_dtype)), schedule.safety, eps).to(compute_dtype)
    tall = m > n
    for a, b, c in schedule.triples:
        if tall:
            A = X.mT @ X
            B = b * A + c * (A @ A)
            X = a * X + X @ B
        else:
            A = X @ X.mT
            B = b * A + c * (A @ A)
            X = a * X + B @ X
    return X.contiguous()


def power_of_two_scale(U: torch.Tensor) -> torch.Tensor:
    """A power of two s (..., 1, 1) per matrix of a float32/float64 stack U that brings its largest |entry|
    into [0.5, 1) (clamped so that s is a normal number: the largest float32 scales to < 4); 1 for a zero,
    empty, infinite or NaN matrix. U·s is exact, and its sums of squares cannot overflow."""
    largest = U.abs().amax(dim=(-2, -1), keepdim=True) if U.numel() > 0 else U.new_ones(*U.shape[:-2], 1, 1)
    _, exponent = torch.frexp(largest)  # largest = mantissa·2^exponent, mantissa in [0.5, 1)
    finite_nonzero = torch.isfinite(largest) & (largest > 0)
    limit = 1022 if U.dtype == torch.float64 else 126
    exponent = torch.where(finite_nonzero, exponent, 0).clamp(-limit, limit)
    return torch.pow(2.0, -exponent.to(U.dtype))


def frobenius_normalized(U: torch.Tensor, safety: float, eps: float) -> torch.Tensor:
    """U / (safety·‖U‖_F + eps) for each matrix of a float32 or float64 stack U (..., m, n).

    Newton–Schulz is scale-invariant, so its normalization must not fail on a finite U: the sum of
    squares of a float32 matrix overflows once its entries pass ~1.8e19 (and ‖U‖_F itself can pass
    the largest float when U is finite). Each matrix is therefore scaled first by a power of two s
    taken from its largest |entry|,

        U / (safety·‖U‖_F + eps) = (U·s) / (safety·‖U·s‖_F + eps·s),

    and multiplying by a power of two is exact, so this rounds bit for bit as the unscaled formula
    wherever that one neither overflows nor underflows. A zero, infinite or NaN largest entry keeps
    s = 1 (a zero matrix gives 0 / eps = 0; a non-finite one stays non-finite).
    """
    s = power_of_two_scale(U)
    scaled = U * s
    frobenius = torch.linalg.matrix_norm(scaled, ord="fro", keepdim=True)
    return scaled / (frobenius * safety + eps * s)


def gram_newton_schulz(
    G: torch.Tensor,
    steps: int | None = None,
    coefficients: str | Sequence[Sequence[float]] | Schedule = "jordan",
    eps: float = 1e-7,
    compute_dtype: torch.dtype = torch.bfloat16,
    normalized: bool = False,
    restarts: Sequence[int] | None = None,
) -> torch.Tensor:
    """`newton_schulz`'s polynomial run on the Gram matrix: Gram Newton–Schulz (J. Zhang, N. Amsel,
    B. Chen, T. Dao, 2026, github.com/Dao-AILab/gram-newton-schulz).

        X = X₀                                  exactly newton_schulz's (steps=0: its normalization)
        R = X Xᵀ;  Q = I                        (s x s, s = m <= n)
        for k, (a, b, c) in enumerate(schedule, 1):
            P = aI + bR + cR²                   newton_schulz's step is X <- P X
            Q = P Q
            if k in restarts:                   re-anchor on the matrix itself
                X = Q X;  R = X Xᵀ;  Q = I
            elif k < len(schedule):
                R = P R P                       the Gram matrix of P X
        return Q X

    Every X_k = Q X and R = X_k X_kᵀ, so in exact arithmetic this is newton_schulz, with s x s products
    in the loop and products with X only at restarts and at the end (`fastoptim.ns_methods`: the FLOP
    count). In 16 bits R and Q drift from the X they stand for; the restarts bound the drift.
    restarts: iterations after which to restart, None for `fastoptim.ns_methods.default_restarts`.
    A tall matrix (m > n) runs the same on the view Xᵀ (R = XᵀX, n x n; no copy) and returns X Qᵀ.
    Every matmul runs in compute_dtype. Returns a new (..., m, n) tensor of dtype compute_dtype.
    """
    schedule = resolve(coefficients, steps)
    last = len(schedule.triples)
    restarts = default_restarts(last) if restarts is None else tuple(restarts)
    X = newton_schulz(G, 0, schedule, eps, compute_dtype, normalized)
    if last == 0:
        return X
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.mT
    identity = torch.eye(X.shape[-2], dtype=compute_dtype, device=X.device)
    R = X @ X.mT
    Q = identity
    for k, (a, b, c) in enumerate(schedule.triples, start=1):
        P = a * identity + b * R + c * (R @ R)
        Q = P @ Q
        if k in restarts:
            X = Q @ X
            R = X @ X.mT
            Q = identity
        elif k < last:
            R = P @ R @ P
    X = Q @ X
    return (X.mT if tall else X).contiguous()


def muon_momentum_(buf: torch.Tensor, grad: torch.Tensor, beta: float, nesterov: bool) -> torch.Tensor:
    """Muon's momentum as an EMA, in place on buf; returns the Newton–Schulz input.

        buf <- lerp(buf, grad, 1 - beta) = beta·buf + (1 - beta)·grad
        return lerp(grad, buf, beta) if nesterov else buf

    Unlike the original code (grad.lerp_(buf, beta)), grad is never overwritten: the Nesterov
    combination is a new tensor in buf's dtype.
    """
    buf.lerp_(grad.to(buf.dtype), 1.0 - beta)
    if nesterov:
        return grad.to(buf.dtype).lerp(buf, beta)
    return buf


def muon_momentum_stack_(
    bufs: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    out: torch.Tensor,
    beta: float,
    nesterov: bool,
    normalize: bool = False,
    safety: float = 1.0,
    eps: float = 1e-7,
) -> None:
    """`muon_momentum_` over a list of same-size matrices, writing the Newton–Schulz inputs into one
    stack: for each i, buf_i <- lerp(buf_i, grad_i, 1 - beta) and
    U_i = (lerp(grad_i, buf_i, beta) if nesterov else buf_i), viewed as (m, n), cast to out's dtype;
    out[i] <- U_i, or with normalize
    out[i] <- U_i / (safety·‖U_i‖_F + eps)      (fp32 arithmetic; fp64 for a float64 out; overflow-safe,
                                                 `frobenius_normalized`)
    — Newton–Schulz's normalization (then call newton_schulz(..., normalized=True)). The norm and the
    division are those of the stored U_i, as the official Muon code normalizes after its cast to
    bfloat16 — except for a float16 out, whose range (65504) a momentum can exceed: there U_i is
    normalized in fp32 before the cast (the normalized values always fit). This is how an
    optimizer fills the batched input of one shape bucket: one pass over the gradients, no per-matrix
    temporary, no copy, no separate normalization pass over a full-precision stack."""
    if normalize and out.dtype == torch.float16:
        # float16 holds at most 65504, a momentum may not: normalize U itself, then cast.
        for i, (buf, grad) in enumerate(zip(bufs, grads)):
            U = muon_momentum_(buf, grad, beta, nesterov).reshape(out.shape[1:]).to(torch.float32)
            out[i].copy_(frobenius_normalized(U, safety, eps))
        return
    for i, (buf, grad) in enumerate(zip(bufs, grads)):
        ns_input = muon_momentum_(buf, grad, beta, nesterov)
        out[i].copy_(ns_input.reshape(out.shape[1:]))
    if normalize:
        out.copy_(frobenius_normalized(out.to(accumulate_dtype(out)), safety, eps))


def muon_apply_(
    param: torch.Tensor,
    update: torch.Tensor,
    lr: float | torch.Tensor,
    weight_decay: float | torch.Tensor,
    scale: float,
    cautious: bool = False,
) -> None:
    """Decoupled weight decay, then the scaled step, in place on param.

        p <- p·(1 - lr·wd)        cautious: only where update·p >= 0 (Chen et al., "Cautious Weight Decay")
        p <- p - lr·scale·update

    lr and weight_decay may be 0-dim tensors on param's device (a scheduler's lr, read on the device):
    the same formula in tensor arithmetic, 1 - lr·wd and lr·scale then rounded in the tensors' dtype.
    """
    acc = accumulate_dtype(param, update)
    p = param.to(acc)
    u = update.to(acc)
    decayed = p * (1.0 - lr * weight_decay)
    if cautious:
        decayed = torch.where(u * p >= 0, decayed, p)
    param.copy_(decayed - (lr * scale) * u)


def normuon_step_(
    param: torch.Tensor,
    update: torch.Tensor,
    second_moment: torch.Tensor,
    lr: float | torch.Tensor,
    weight_decay: float | torch.Tensor,
    beta2: float,
    eps: float,
    scale: float,
    cautious: bool = False,
) -> None:
    """NorMuon's row-wise normalization of an orthogonalized update O (..., m, n), and the step.

        v <- lerp(v, mean_j(O_ij²), 1 - beta2)           one value per row i; v is (..., m)
        Ô = O / (√v + eps)                               each row divided by its RMS estimate
        Ô <- Ô · ‖O‖_F / (‖Ô‖_F + eps)                   the update keeps the norm of O
        p <- p·(1 - lr·wd)                               cautious: only where Ô·p >= 0
        p <- p - lr·scale·Ô

    scale = max(1, m/n)^½ reproduces the official code; 0.2·√max(m, n) gives the paper's
    AdamW-matched update RMS of 0.2. A matrix with no columns has row mean 0: the EMA moves v
    toward 0. lr and weight_decay may be 0-dim tensors, as in `muon_apply_`.
    """
    acc = accumulate_dtype(param, update, second_moment)
    O = update.to(acc)
    n = O.shape[-1]
    row_mean_square = (O * O).sum(dim=-1) / max(n, 1)
    second_moment.lerp_(row_mean_square.to(second_moment.dtype), 1.0 - beta2)
    row_scale = 1.0 / (second_moment.to(acc).sqrt() + eps)
    O_hat = O * row_scale.unsqueeze(-1)
    norm_O = torch.linalg.matrix_norm(O, ord="fro", keepdim=True)
    norm_O_hat = torch.linalg.matrix_norm(O_hat, ord="fro", keepdim=True)
    O_hat = O_hat * (norm_O / (norm_O_hat + eps))
    p = param.to(acc)
    decayed = p * (1.0 - lr * weight_decay)
    if cautious:
        decayed = torch.where(O_hat * p >= 0, decayed, p)
    param.copy_(decayed - (lr * scale) * O_hat)


def _as_shape(tensor: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, bool]:
    """tensor read in row-major order as `shape`: a view when its strides allow one, else a copy
    (returned with True: the caller writes the result back)."""
    try:
        return tensor.view(shape), False
    except RuntimeError:
        return tensor.reshape(shape), True


def muon_apply_stack_(
    params: Sequence[torch.Tensor],
    updates: torch.Tensor,
    lr: float | torch.Tensor,
    weight_decay: float | torch.Tensor,
    scale: float,
    cautious: bool = False,
) -> None:
    """`muon_apply_` for every matrix of a shape bucket, in place on params:

        for each i:  muon_apply_(params[i] read as (m, n), updates[i], lr, weight_decay, scale, cautious)

    params[i] may have any shape with m·n elements (a 2-D weight, a conv kernel read as its (out, -1)
    matrix, one expert bank[e] of a 3-D bank, a row block), and any strides: it is read and written
    in row-major order. updates is the (P, m, n) stack (e.g. the bf16 output of one batched
    Newton–Schulz). The step is elementwise, so updates[i] is simply read in params[i]'s shape.
    """
    for param, update in zip(params, updates):
        muon_apply_(param, update.view(param.shape), lr, weight_decay, scale, cautious)


def normuon_step_stack_(
    params: Sequence[torch.Tensor],
    updates: torch.Tensor,
    second_moments: Sequence[torch.Tensor],
    lr: float | torch.Tensor,
    weight_decay: float | torch.Tensor,
    beta2: float,
    eps: float,
    scale: float,
    cautious: bool = False,
) -> None:
    """`normuon_step_` for every matrix of a shape bucket, in place on params and second_moments:

        for each i:  normuon_step_(params[i] read as (m, n), updates[i], second_moments[i] read as (m,),
                                   lr, weight_decay, beta2, eps, scale, cautious)

    Each matrix keeps its own row statistics and Frobenius norms. params[i] as in
    `muon_apply_stack_`; second_moments[i] has m elements (a (m,) state tensor, or a slice of a larger
    one: one expert's rows of a bank's (E, m) state).
    """
    m, n = updates.shape[-2], updates.shape[-1]
    for param, update, second_moment in zip(params, updates, second_moments):
        matrix, matrix_copied = _as_shape(param, (m, n))
        moment, moment_copied = _as_shape(second_moment, (m,))
        normuon_step_(matrix, update, moment, lr, weight_decay, beta2, eps, scale, cautious)
        if matrix_copied:
            param.copy_(matrix.view(param.shape))
        if moment_copied:
            second_moment.copy_(moment.view(second_moment.shape))


def sophia_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    hessians: Sequence[torch.Tensor],
    lr: float,
    beta1: float,
    rho: float,
    weight_decay: float,
    eps: float,
    return_unclipped: bool = False,
) -> torch.Tensor | None:
    """Sophia's clipped, preconditioned step over a list of tensors (Liu et al., Algorithm 3).

        p <- p·(1 - lr·wd)
        m <- lerp(m, g, 1 - beta1)
        p <- p - lr·clip(m / max(rho·h, eps), -1, 1)

    With return_unclipped, returns the fraction of coordinates where |m / max(rho·h, eps)| < 1
    (the official code's "win rate"; 0 when there are no coordinates) as a float32 0-dim tensor
    on the parameters' device, without a host synchronization. Otherwise returns None.
    """
    unclipped = None
    total = 0
    for param, grad, exp_avg, hessian in zip(params, grads, exp_avgs, hessians):
        acc = accumulate_dtype(param, grad, exp_avg, hessian)
        exp_avg.lerp_(grad.to(exp_avg.dtype), 1.0 - beta1)
        ratio = exp_avg.to(acc) / torch.clamp(rho * hessian.to(acc), min=eps)
        p = param.to(acc) * (1.0 - lr * weight_decay)
        param.copy_(p - lr * ratio.clamp(-1.0, 1.0))
        if return_unclipped:
            count = (ratio.abs() < 1).sum(dtype=torch.float32)
            unclipped = count if unclipped is None else unclipped + count
            total += ratio.numel()
    if not return_unclipped:
        return None
    if unclipped is None:
        device = params[0].device if len(params) else torch.device("cpu")
        return torch.zeros((), dtype=torch.float32, device=device)
    return unclipped / max(total, 1)


def hessian_ema_(hessians: Sequence[torch.Tensor], estimates: Sequence[torch.Tensor], beta2: float) -> None:
    """The Hessian EMA of Sophia, over a list of tensors: h <- lerp(h, ĥ, 1 - beta2).

    ĥ is the estimator's output: g ⊙ g of a gradient on sampled labels (Gauss–Newton–Bartlett,
    SophiaG) or u ⊙ (H u) for a random u (Hutchinson, SophiaH).
    """
    for hessian, estimate in zip(hessians, estimates):
        hessian.lerp_(estimate.to(hessian.dtype), 1.0 - beta2)
