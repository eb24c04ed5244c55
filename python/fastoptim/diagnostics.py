"""Diagnostics cheap enough to log every N steps: spectra, neuron-norm balance, Sophia's clipping,
gradient noise.

Every function takes stacks (..., m, n) and returns tensors on the input's device (one value per
matrix of the stack), computed in float32 (float64 when the input is float64), without a host
synchronization; `as_floats` turns results into Python floats when the caller wants them (that is
the one sync). Power iterations run a fixed number of iterations from a random start drawn from a
generator seeded by `seed`, so the same call gives the same numbers.

- `orthogonality_error(X)`: ‖X Xᵀ - I‖_F / √k on the smaller side k = min(m, n) (the Gram matrix is
  k x k): the RMS deviation of the Gram matrix from the identity; 0 for an exactly orthogonal
  (semi-orthogonal) X, e.g. the polar factor Newton–Schulz approximates.
- `singular_value_range(X)`: (σ_min, σ_max) over the k = min(m, n) singular values; exact
  (`torch.linalg.svdvals`) or estimated by power iteration.
- `spectral_norm`, `condition_number` σ_max/σ_min, `stable_rank` ‖W‖_F²/‖W‖_2² (a soft count of
  the directions carrying the energy, between 1 and rank W): power iteration on the k x k Gram
  matrix for σ_max² (error shrinking like (σ_2/σ_1)^(2·iters)), inverse iteration through one
  Cholesky factorization of it for σ_min² (like (σ_min/σ_(k-1))^(2·iters); a singular Gram matrix
  gives σ_min = 0); ``method="svd"`` is exact. The Gram matrix squares the condition number, so in
  float32 the estimate resolves condition numbers up to about 1e3: pass float64 or use the SVD
  beyond that.
- `row_norm_cv(M)`, `normuon_row_cv(O, v)`: the coefficient of variation (std/mean, population std)
  of per-neuron (row) norms, before and after NorMuon's row normalization O / (√v + eps) — the
  imbalance NorMuon removes (Z. Li et al., "NorMuon", arXiv:2510.05491).
- `sophia_win_rate`: the fraction of coordinates where Sophia's step is not clipped,
  |m / max(rho·h, eps)| < 1 (the official code logs it and tunes rho to keep it in 0.1–0.5; pass
  the effective rho, i.e. rho·bs for SophiaG).
- `gradient_noise_scale`, `noise_scale_from_norms`: the simple noise scale
  B_simple = tr(Σ) / |G|² of S. McCandlish, J. Kaplan, D. Amodei et al., "An Empirical Model of
  Large-Batch Training" (arXiv:1812.06162, Appendix A), estimated without bias from the squared norms
  of gradients at two batch sizes B_small < B_big:
      |G|²   ≈ (B_big |G_big|² - B_small |G_small|²) / (B_big - B_small)
      tr(Σ)  ≈ (|G_small|² - |G_big|²) / (1/B_small - 1/B_big)
  B_simple approximates the critical batch size (the batch beyond which larger batches stop paying
  off linearly). One estimate is noisy (it can even be negative); average the numerator and the
  denominator separately over steps (`NoiseScaleEMA`), as the paper does.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import _validation as check
from ._geometry import matrix_form
from .reference import power_of_two_scale

METHODS = ("power", "svd")
_TINY = 1e-30


# --------------------------------------------------------------------------------------------------
# Helpers


def _acc(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _iters(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"iters must be an integer >= 1, got {value!r}")
    return int(value)


def _method(value: object) -> str:
    if value not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {value!r}")
    return str(value)


def _seed(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"seed must be an integer, got {type(value).__name__} {value!r}")
    return int(value)


def _scaled(X: Tensor) -> tuple[Tensor, Tensor]:
    """(X·s, s) in the accumulation dtype, s a power of two per matrix (`reference.power_of_two_scale`): exact,
    and the Gram matrices and sums of squares of X·s cannot overflow (a float32 matrix with entries above
    ~1e19 would give inf and NaN). Scale-invariant statistics are computed from X·s as they are."""
    Y = X.to(_acc(X))
    s = power_of_two_scale(Y)
    return Y * s, s


def _gram(X: Tensor) -> Tensor:
    """X Xᵀ (m <= n) or XᵀX (m > n): the k x k Gram matrix of the smaller side, in the accumulation dtype."""
    Y = X.to(_acc(X))
    return Y @ Y.mT if Y.shape[-2] <= Y.shape[-1] else Y.mT @ Y


def _top_eigenvalue(A: Tensor, iters: int, seed: int) -> Tensor:
    """Largest eigenvalue of each symmetric PSD matrix of A (..., k, k): power iteration, Rayleigh quotient."""
    generator = torch.Generator(device=A.device)
    generator.manual_seed(seed)
    v = torch.randn((*A.shape[:-1], 1), generator=generator, device=A.device, dtype=A.dtype)
    v = v / torch.linalg.vector_norm(v, dim=-2, keepdim=True).clamp_min(_TINY)
    for _ in range(iters):
        v = A @ v
        v = v / torch.linalg.vector_norm(v, dim=-2, keepdim=True).clamp_min(_TINY)
    return (v.mT @ (A @ v)).squeeze(-1).squeeze(-1).clamp_min(0.0)


def _bottom_eigenvalue(A: Tensor, iters: int, seed: int) -> Tensor:
    """Smallest eigenvalue of each symmetric PSD matrix of A (..., k, k): inverse iteration through one
    Cholesky factorization (k³/3 flops, then k² per iteration), Rayleigh quotient; 0 where A is singular."""
    L, info = torch.linalg.cholesky_ex(A)  # info instead of an exception: no host synchronization
    generator = torch.Generator(device=A.device)
    generator.manual_seed(seed)
    v = torch.randn((*A.shape[:-1], 1), generator=generator, device=A.device, dtype=A.dtype)
    v = v / torch.linalg.vector_norm(v, dim=-2, keepdim=True).clamp_min(_TINY)
    for _ in range(iters):
        v = torch.cholesky_solve(v, L)
        v = v / torch.linalg.vector_norm(v, dim=-2, keepdim=True).clamp_min(_TINY)
    value = (v.mT @ (A @ v)).squeeze(-1).squeeze(-1)
    return torch.where(info == 0, value, torch.zeros_like(value)).nan_to_num(0.0).clamp_min(0.0)


def _eigen_range(X: Tensor, iters: int, seed: int) -> tuple[Tensor, Tensor]:
    """(σ_min², σ_max²) of each matrix of X: power iteration and inverse iteration on the Gram matrix."""
    A = _gram(X)
    return _bottom_eigenvalue(A, iters, seed + 1), _top_eigenvalue(A, iters, seed)


def _matrix(name: str, X: object) -> Tensor:
    X = check.tensor(name, X, min_ndim=2)
    if X.shape[-2] == 0 or X.shape[-1] == 0:
        raise ValueError(f"{name} must have non-empty matrices, got shape {tuple(X.shape)}")
    return X


# --------------------------------------------------------------------------------------------------
# Spectra


def orthogonality_error(X: Tensor) -> Tensor:
    """‖X Xᵀ - I‖_F / √k per matrix of X (..., m, n), with k = min(m, n) (the smaller Gram matrix)."""
    X = _matrix("X", X)
    A = _gram(X)
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    return torch.linalg.matrix_norm(A - eye, ord="fro") / math.sqrt(A.shape[-1])


def singular_value_range(X: Tensor, method: str = "svd", iters: int = 50, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(σ_min, σ_max) per matrix of X over its min(m, n) singular values: exact ("svd") or power iteration."""
    X = _matrix("X", X)
    if _method(method) == "svd":
        s = torch.linalg.svdvals(X.to(_acc(X)))
        return s[..., -1], s[..., 0]
    Y, s = _scaled(X)
    low, high = _eigen_range(Y, _iters(iters), _seed(seed))
    s = s.squeeze(-1).squeeze(-1)
    return low.sqrt() / s, high.sqrt() / s


def spectral_norm(W: Tensor, method: str = "power", iters: int = 30, seed: int = 0) -> Tensor:
    """‖W‖_2 = σ_max per matrix of W (..., m, n)."""
    W = _matrix("W", W)
    if _method(method) == "svd":
        return torch.linalg.svdvals(W.to(_acc(W)))[..., 0]
    Y, s = _scaled(W)
    return _top_eigenvalue(_gram(Y), _iters(iters), _seed(seed)).sqrt() / s.squeeze(-1).squeeze(-1)


def condition_number(W: Tensor, method: str = "power", iters: int = 50, seed: int = 0) -> Tensor:
    """σ_max / σ_min per matrix of W over its min(m, n) singular values (inf when σ_min = 0)."""
    low, high = singular_value_range(_scaled(_matrix("W", W))[0], method, iters, seed)  # scale-invariant
    return torch.where(low > 0, high / low.clamp_min(_TINY), torch.full_like(high, math.inf))


def stable_rank(W: Tensor, method: str = "power", iters: int = 30, seed: int = 0) -> Tensor:
    """‖W‖_F² / ‖W‖_2² per matrix of W (0 for a zero matrix)."""
    W, _ = _scaled(_matrix("W", W))  # scale-invariant
    frobenius_sq = W.square().sum(dim=(-2, -1))
    top = spectral_norm(W, method, iters, seed).square()
    return frobenius_sq / top.clamp_min(_TINY)


# --------------------------------------------------------------------------------------------------
# Neuron-norm balance (NorMuon)


def row_norm_cv(M: Tensor) -> Tensor:
    """Coefficient of variation std/mean (population std) of the row norms of each matrix of M (..., m, n)."""
    M, _ = _scaled(_matrix("M", M))  # scale-invariant
    norms = torch.linalg.vector_norm(M, dim=-1)
    mean = norms.mean(dim=-1)
    std = norms.std(dim=-1, correction=0)
    return std / mean.clamp_min(_TINY)


def normuon_row_cv(update: Tensor, second_moment: Tensor | None = None, eps: float = 1e-10) -> tuple[Tensor, Tensor]:
    """(CV before, CV after) of the row norms of an orthogonalized update O (..., m, n) and of NorMuon's
    normalized Ô = O / (√v + eps). `second_moment` v (..., m) is NorMuon's state; None uses this
    update's own mean row square, v_i = mean_j O_ij² (then every row of Ô has RMS ≈ 1 and the CV
    after is ≈ 0). NorMuon's norm-preserving rescale multiplies all rows alike and leaves the CV as is."""
    O = _matrix("update", update).to(_acc(update))
    eps = check.non_negative("eps", eps)
    if second_moment is None:
        v = O.square().mean(dim=-1)
    else:
        check.tensor("second_moment", second_moment)
        if tuple(second_moment.shape) != tuple(O.shape[:-1]):
            raise ValueError(
                f"second_moment must have shape {tuple(O.shape[:-1])} (one value per row of update), "
                f"got {tuple(second_moment.shape)}"
            )
        check.same_device("second_moment", second_moment, "update", update)
        v = second_moment.to(O.dtype)
    normalized = O / (v.clamp_min(0.0).sqrt() + eps).unsqueeze(-1)
    return row_norm_cv(O), row_norm_cv(normalized)


# --------------------------------------------------------------------------------------------------
# Sophia


def sophia_win_rate(
    exp_avg: Tensor | Sequence[Tensor], hessian: Tensor | Sequence[Tensor], rho: float, eps: float = 1e-15
) -> Tensor:
    """Fraction of coordinates with |m / max(rho·h, eps)| < 1 (not clipped), over one tensor or lists of
    tensors; a float32 0-dim tensor (0 when there are no coordinates)."""
    exp_avgs = [exp_avg] if isinstance(exp_avg, Tensor) else check.tensor_list("exp_avg", exp_avg)
    hessians = [hessian] if isinstance(hessian, Tensor) else check.tensor_list("hessian", hessian)
    for i, (m, h) in enumerate(zip(exp_avgs, hessians)):
        check.tensor(f"exp_avg[{i}]", m)
        check.tensor(f"hessian[{i}]", h)
    check.matching_lists(("exp_avg", "hessian"), (exp_avgs, hessians))
    rho = check.positive("rho", rho)
    eps = check.positive("eps", eps)
    device = exp_avgs[0].device if exp_avgs else torch.device("cpu")
    count = torch.zeros((), dtype=torch.float32, device=device)
    total = 0
    for m, h in zip(exp_avgs, hessians):
        acc = torch.float64 if torch.float64 in (m.dtype, h.dtype) else torch.float32
        ratio = m.to(acc) / torch.clamp(rho * h.to(acc), min=eps)
        count = count + (ratio.abs() < 1).sum(dtype=torch.float32)
        total += m.numel()
    return count / max(total, 1)


# --------------------------------------------------------------------------------------------------
# Gradient noise scale (McCandlish et al. 2018)


class NoiseScale(NamedTuple):
    """B_simple = tr(Σ)/|G|², with its numerator and denominator (0-dim tensors)."""

    b_simple: Tensor
    trace_covariance: Tensor
    gradient_sq_norm: Tensor


def _scalar(name: str, value: object) -> Tensor:
    if isinstance(value, Tensor):
        check.tensor(name, value)
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar (one element), got shape {tuple(value.shape)}")
        return value.reshape(()).to(_acc(value))
    return torch.tensor(check.real(name, value), dtype=torch.float64)


def noise_scale_from_norms(
    small_sq_norm: Tensor | float, big_sq_norm: Tensor | float, batch_small: float, batch_big: float
) -> NoiseScale:
    """The unbiased estimates of |G|², tr(Σ) and B_simple from |G_small|² and |G_big|², the squared
    norms of gradients averaged over batches of batch_small < batch_big examples (see the module)."""
    small = _scalar("small_sq_norm", small_sq_norm)
    big = _scalar("big_sq_norm", big_sq_norm)
    b_small = check.positive("batch_small", batch_small)
    b_big = check.positive("batch_big", batch_big)
    if b_big <= b_small:
        raise ValueError(f"batch_big ({b_big}) must be > batch_small ({b_small})")
    if small.device != big.device:
        big = big.to(small.device)
    gradient_sq_norm = (b_big * big - b_small * small) / (b_big - b_small)
    trace_covariance = (small - big) / (1.0 / b_small - 1.0 / b_big)
    return NoiseScale(trace_covariance / gradient_sq_norm, trace_covariance, gradient_sq_norm)


def _sq_norm(grad: Sequence[Tensor]) -> Tensor:
    return sum(g.to(_acc(g)).square().sum() for g in grad)


def gradient_noise_scale(micro_grads: Sequence[Tensor | Sequence[Tensor]], micro_batch_size: int) -> NoiseScale:
    """B_simple from K >= 2 gradients of disjoint micro-batches of `micro_batch_size` examples each.

    Each item of `micro_grads` is one micro-batch's gradient: a tensor, or a list of tensors (one per
    parameter, same shapes in every item). Small batch: B_small = micro_batch_size and |G_small|² the
    mean of the K squared norms; big batch: B_big = K·micro_batch_size and |G_big|² the squared norm
    of the mean gradient. Both are unbiased (E|g_b|² = |G|² + tr(Σ)/b), so is the result's numerator and
    denominator.
    """
    if isinstance(micro_grads, Tensor) or not isinstance(micro_grads, Sequence) or len(micro_grads) < 2:
        raise TypeError("micro_grads must be a list of at least 2 micro-batch gradients (tensors or lists of tensors)")
    b = check.positive("micro_batch_size", micro_batch_size)
    items = [
        [g] if isinstance(g, Tensor) else check.tensor_list(f"micro_grads[{k}]", g) for k, g in enumerate(micro_grads)
    ]
    for k, item in enumerate(items):
        for j, g in enumerate(item):
            check.tensor(f"micro_grads[{k}][{j}]", g)
        check.matching_lists(("micro_grads[0]", f"micro_grads[{k}]"), (items[0], item))
    K = len(items)
    small = sum(_sq_norm(item) for item in items) / K
    mean_grad = [sum(item[j].to(_acc(item[j])) for item in items) / K for j in range(len(items[0]))]
    big = _sq_norm(mean_grad)
    return noise_scale_from_norms(small, big, b, K * b)


class NoiseScaleEMA:
    """Exponential moving averages of tr(Σ) and |G|² (separately), and B_simple as their ratio."""

    def __init__(self, beta: float = 0.95) -> None:
        self.beta = check.beta("beta", beta)
        self.trace_covariance: Tensor | None = None
        self.gradient_sq_norm: Tensor | None = None

    def update(self, estimate: NoiseScale) -> Tensor:
        """Fold in one `NoiseScale`; returns the smoothed B_simple (a 0-dim tensor)."""
        if not isinstance(estimate, NoiseScale):
            raise TypeError(f"estimate must be a NoiseScale, got {type(estimate).__name__}")
        if self.trace_covariance is None or self.gradient_sq_norm is None:
            self.trace_covariance = estimate.trace_covariance.clone()
            self.gradient_sq_norm = estimate.gradient_sq_norm.clone()
        else:
            self.trace_covariance = torch.lerp(self.trace_covariance, estimate.trace_covariance, 1.0 - self.beta)
            self.gradient_sq_norm = torch.lerp(self.gradient_sq_norm, estimate.gradient_sq_norm, 1.0 - self.beta)
        return self.b_simple()

    def b_simple(self) -> Tensor:
        if self.trace_covariance is None or self.gradient_sq_norm is None:
            raise ValueError("NoiseScaleEMA has no estimate yet: call update() first")
        return self.trace_covariance / self.gradient_sq_norm


# --------------------------------------------------------------------------------------------------
# Optimizer-level summary and conversion to floats


@torch.no_grad()
def optimizer_diagnostics(optimizer: torch.optim.Optimizer, iters: int = 20, seed: int = 0) -> dict[str, Tensor]:
    """A small summary of an optimizer's matrices and state, as 0-dim tensors (no host sync).

    Matrices are those the optimizer orthogonalizes: the parameters of ndim >= 2 in groups not
    marked ``use_muon=False``, read by the group's ``matrix_view`` (a 3-D expert bank is one matrix
    per expert; 4-D conv kernels flatten to (shape[0], -1); see `fastoptim._geometry`), batched by
    shape. Keys present when they apply:
    ``weight_stable_rank_mean``, ``weight_condition_number_max`` (power iteration),
    ``momentum_row_cv_mean`` (row-norm CV of Muon's momentum buffers: the imbalance NorMuon targets),
    ``sophia_win_rate`` (groups with ``rho``; the effective rho is rho·bs when the group has ``bs``).
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    iters = _iters(iters)
    buckets: dict[tuple, list[Tensor]] = {}
    momenta: dict[tuple, list[Tensor]] = {}
    sophia_m, sophia_h, sophia_rho = [], [], []
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "rho" in group and "hessian" in state and "exp_avg" in state:
                sophia_m.append(state["exp_avg"])
                sophia_h.append(state["hessian"])
                sophia_rho.append(group["rho"] * group.get("bs", 1))
            if p.dim() < 2 or group.get("use_muon", True) is False or p.numel() == 0:
                continue
            _, m, n = matrix_form(p.shape, group.get("matrix_view", "auto"))
            key = ((m, n), p.dtype, p.device)
            buckets.setdefault(key, []).extend(p.detach().reshape(-1, m, n))
            if "momentum_buffer" in state:
                momenta.setdefault(key, []).extend(state["momentum_buffer"].reshape(-1, m, n))
    out: dict[str, Tensor] = {}
    if buckets:
        ranks, conds = [], []
        for mats in buckets.values():
            stack = torch.stack(mats)
            ranks.append(stable_rank(stack, iters=iters, seed=seed).float())
            conds.append(condition_number(stack, iters=iters, seed=seed).float())
        device = ranks[0].device
        out["weight_stable_rank_mean"] = torch.cat([r.to(device) for r in ranks]).mean()
        out["weight_condition_number_max"] = torch.cat([c.to(device) for c in conds]).max()
    if momenta:
        cvs = [row_norm_cv(torch.stack(mats)).float() for mats in momenta.values()]
        out["momentum_row_cv_mean"] = torch.cat([c.to(cvs[0].device) for c in cvs]).mean()
    if sophia_m:
        if len(set(sophia_rho)) == 1:
            out["sophia_win_rate"] = sophia_win_rate(sophia_m, sophia_h, sophia_rho[0])
        else:  # groups with different rho: weight each by its coordinate count
            total = sum(m.numel() for m in sophia_m)
            rate = sum(sophia_win_rate(m, h, r) * m.numel() for m, h, r in zip(sophia_m, sophia_h, sophia_rho))
            out["sophia_win_rate"] = rate / max(total, 1)
    return out


def as_floats(values: Any) -> Any:
    """Tensors -> Python floats (a 0-dim tensor to a float, others to nested lists), through a mapping,
    NamedTuple, tuple or list; everything else unchanged. This is where the host synchronizes."""
    if isinstance(values, Tensor):
        return values.detach().double().cpu().tolist()
    if isinstance(values, Mapping):
        return {k: as_floats(v) for k, v in values.items()}
    if isinstance(values, tuple) and hasattr(values, "_fields"):
        return type(values)(*(as_floats(v) for v in values))
    if isinstance(values, (list, tuple)):
        return type(values)(as_floats(v) for v in values)
    return values


__all__ = [
    "METHODS",
    "NoiseScale",
    "NoiseScaleEMA",
    "as_floats",
    "condition_number",
    "gradient_noise_scale",
    "noise_scale_from_norms",
    "normuon_row_cv",
    "optimizer_diagnostics",
    "orthogonality_error",
    "row_norm_cv",
    "singular_value_range",
    "sophia_win_rate",
    "spectral_norm",
    "stable_rank",
]
