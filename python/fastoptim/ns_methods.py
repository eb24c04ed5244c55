"""The two ways of running the Newton–Schulz iteration, their FLOP model, and how ``method="auto"`` picks.

Both compute the same polynomial of each matrix X (m x n): per (a, b, c) of the schedule,
X <- aX + b(XXᵀ)X + c(XXᵀ)²X.

- ``"standard"``: the iteration as written, on the m x n matrix every step (`fastoptim.reference.newton_schulz`).
- ``"gram"``: Gram Newton–Schulz (J. Zhang, N. Amsel, B. Chen, T. Dao, "Gram Newton-Schulz", 2026,
  github.com/Dao-AILab/gram-newton-schulz; also in microsoft/dion). With R = XXᵀ (s x s, s = min(m, n))
  and X_k = Q_k X_0, the polynomial P_k = aI + bR_k + cR_k² gives Q_{k+1} = P_k Q_k and
  R_{k+1} = P_k R_k P_k: the iteration runs on s x s matrices and X is multiplied by Q only where needed.
  In 16-bit arithmetic R and Q drift from the X they stand for (Q grows like 1/σ on a small singular value
  σ and amplifies R's rounding), so the iteration restarts: X <- QX, R <- XXᵀ, Q <- I
  (`fastoptim.reference.gram_newton_schulz`).

Restarts (`default_restarts`): after every second iteration, the last stretch holding two or three
iterations (5 steps: once, after iteration 2, Dao-AILab's default; 8 steps: after 2, 4 and 6). Measured
on the CPU in bfloat16 while choosing it (3 seeds x 4 matrices of 96 x 384, Gaussian, low-rank and
ill-conditioned with singular values down to 1e-5; jordan, you and polar_express at 3 to 8 steps): it
keeps Gram's error against float64 within 2x the standard method's in the same dtype (worst 1.8x; a
single restart after iteration 3 instead reached 4.6x with polar_express); without restarts the error
grows 10-1000x on ill-conditioned input, and restarting only every third iteration fails at 8 steps.
tests/test_ops_gram_newton_schulz.py keeps cases of each.

FLOPs (`flops`), per matrix, s = min(m, n), l = max(m, n), counting 2 FLOPs per multiply-add; a product
whose result is symmetric costs half (only its upper triangle is computed, as the Triton kernels and
the CUDA symmetric kernel do; ``symmetric=False`` counts every product as a full GEMM, as cuBLAS runs
them):
    standard, per iteration: XXᵀ (s²l), b·A + c·A² (s³), B·X (2s²l)                 -> 3s²l + s³
    gram: R = XXᵀ (s²l) once; per iteration P (s³), Q <- PQ (s³; free right after a (re)start, Q = P),
          R <- PRP (2s³; not after the last iteration nor before a restart); per restart X <- QX (2s²l)
          and R <- XXᵀ (s²l); at the end X <- QX (2s²l).
    (Q and P are polynomials of the same R, so every s x s product is symmetric.)
GPT-2 small's 768 x 3072 with 5 steps: standard 65s³, gram 38s³ (41.5% fewer); as full GEMMs 90s³ and
60s³ (33% fewer). `choose_method` ("auto") takes gram only where it has fewer FLOPs under both counts
(5 steps: l/s > 1.5), so it wins whichever kernels run its products.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

METHODS = ("standard", "gram", "auto")
# "auto" keeps matrices with a Gram side s below this on the standard method. Measured on the CPU in
# bfloat16 (20 seeds x 16 Gaussian s x 1.6s matrices, jordan and polar_express, 5 steps): Gram's error
# against float64 reached 3-460x the standard method's for s <= 12 (the restart after iteration 2 is
# not enough there), and stayed within 2.5x from s = 16 on; products that small are launch-bound anyway.
GRAM_MIN_SIZE = 64


def check_method(value: object, name: str = "method") -> str:
    """`value` if it is one of METHODS; else ValueError naming `name`."""
    if not isinstance(value, str) or value not in METHODS:
        raise ValueError(f"{name} must be one of {METHODS}, got {value!r}")
    return value


def default_restarts(steps: int) -> tuple[int, ...]:
    """The iterations after which Gram Newton–Schulz restarts by default: 2, 4, ... while at least two
    iterations follow (steps <= 3: none; 4 or 5: (2,); 6 or 7: (2, 4); 8: (2, 4, 6))."""
    return tuple(range(2, steps - 1, 2))


def check_restarts(restarts: object, steps: int, name: str = "restarts") -> tuple[int, ...]:
    """The restart iterations as a tuple: None gives `default_restarts(steps)`; else a sequence of
    strictly increasing integers r with 1 <= r < steps (the iteration after which to restart; () for
    none). ValueError naming `name` otherwise."""
    if restarts is None:
        return default_restarts(steps)
    if isinstance(restarts, (str, bytes)) or not isinstance(restarts, Sequence):
        raise ValueError(f"{name} must be None or a sequence of iteration numbers, got {restarts!r}")
    values = []
    for r in restarts:
        if isinstance(r, bool) or not isinstance(r, numbers.Integral) or not 1 <= r < steps:
            raise ValueError(
                f"{name} must hold integers r with 1 <= r < steps = {steps} (restart after iteration r), got "
                f"{list(restarts)!r}"
            )
        if values and r <= values[-1]:
            raise ValueError(f"{name} must be strictly increasing, got {list(restarts)!r}")
        values.append(int(r))
    return tuple(values)


def flops(
    m: int, n: int, steps: int = 5, method: str = "standard", restarts: Sequence[int] | None = None,
    *, symmetric: bool = True,
) -> int:
    """FLOPs of `method` ("standard" or "gram") on one m x n matrix with `steps` iterations (see the module
    docstring; restarts as in `check_restarts`, gram only). symmetric: products with a symmetric result
    count half."""
    if check_method(method) == "auto":
        raise ValueError("method must be 'standard' or 'gram' to count FLOPs, got 'auto'")
    s, l = min(m, n), max(m, n)

    def gram_product(k: int) -> int:  # an s x s result over an inner dimension k
        return s * s * k if symmetric else 2 * s * s * k

    if method == "standard":
        return steps * (gram_product(l) + gram_product(s) + 2 * s * s * l)
    restarts = check_restarts(restarts, steps)
    if steps == 0 or s == 0:
        return 0
    total, fresh = gram_product(l), True
    for t in range(1, steps + 1):
        total += gram_product(s) + (0 if fresh else gram_product(s))  # P, then Q <- PQ
        fresh = False
        if t in restarts:
            total += 2 * s * s * l + gram_product(l)
            fresh = True
        elif t < steps:
            total += 2 * gram_product(s)
    return total + 2 * s * s * l


def resolve_method(method: str, m: int, n: int, steps: int, restarts: Sequence[int] | None = None) -> str:
    """The method `fastoptim.ops.newton_schulz(..., method=method)` runs on m x n matrices: "standard" or
    "gram" ("auto" decided by `choose_method`)."""
    if check_method(method) == "auto":
        return choose_method(m, n, steps, restarts)
    return method


def op_name(method: str, m: int, n: int, steps: int, restarts: Sequence[int] | None = None) -> str:
    """The op that `fastoptim.ops.newton_schulz(..., method=method)` runs on m x n matrices (for
    `fastoptim.ops.check_call`): "newton_schulz" or "gram_newton_schulz"."""
    return "gram_newton_schulz" if resolve_method(method, m, n, steps, restarts) == "gram" else "newton_schulz"


def gemm_flops(m: int, n: int, steps: int, method: str = "standard", restarts: Sequence[int] | None = None) -> int:
    """FLOPs of Newton–Schulz on one m x n matrix with `method` ("auto" resolved for this shape), every
    product counted as a full GEMM (``flops(..., symmetric=False)``): the cost the distributed layouts
    balance over ranks (`fastoptim._geometry.assign_work`)."""
    method = resolve_method(method, m, n, steps, restarts)
    return flops(m, n, steps, method, restarts if method == "gram" else None, symmetric=False)


def check_options(
    method: object, restarts: object, steps: int, where: str = "ns_"
) -> tuple[str, tuple[int, ...] | None]:
    """An optimizer group's ``{where}method`` and ``{where}restarts``, checked: (method, restarts), with
    restarts None (the default restarts) or a tuple. restarts other than None needs method "gram" or "auto"
    (the standard method never restarts); ValueError naming the argument otherwise."""
    method = check_method(method, f"{where}method")
    refuse_restarts_with_standard(method, restarts, where)
    if restarts is None:
        return method, None
    return method, check_restarts(restarts, steps, f"{where}restarts")


def refuse_restarts_with_standard(method: str, restarts: object, where: str = "") -> None:
    """ValueError naming ``{where}restarts`` when restarts are given to the standard method (it never restarts)."""
    if method == "standard" and restarts is not None:
        raise ValueError(
            f"{where}restarts applies to {where}method='gram' or 'auto' only, got {where}restarts={restarts!r} "
            f"with {where}method='standard'"
        )


def choose_method(m: int, n: int, steps: int, restarts: Sequence[int] | None = None) -> str:
    """``"gram"`` where it needs fewer FLOPs than the standard method both counting symmetric products at
    half and as full GEMMs, on matrices with s >= GRAM_MIN_SIZE; else ``"standard"`` (square and small
    matrices, steps = 0)."""
    if steps == 0 or min(m, n) < GRAM_MIN_SIZE:
        return "standard"
    cheaper = all(
        flops(m, n, steps, "gram", restarts, symmetric=symmetric) < flops(m, n, steps, "standard", symmetric=symmetric)
        for symmetric in (True, False)
    )
    return "gram" if cheaper else "standard"
