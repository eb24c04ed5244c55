"""Triton kernels: Gram Newton–Schulz (J. Zhang, N. Amsel, B. Chen, T. Dao, 2026), as
`fastoptim.reference.gram_newton_schulz`: newton_schulz's polynomial run on the s x s Gram matrix.

Per matrix of a stack (batch, m, n), wide form (m <= n; a tall matrix reads Xᵀ through its strides):

    X = X₀                          newton_schulz's own prologue (its launcher with no steps)
    R = X Xᵀ                        _symmetric_product_kernel (upper-triangle tiles, mirrored)
    for k, (a, b, c):               P = aI + Z is never formed: a rides in the epilogues
        Z = c·R·R + b·R             _symmetric_product_kernel
        if neither the last iteration nor a restart follows:
            T = R·Z + a·R = R P     _symmetric_product_kernel (R and P commute: R P is symmetric)
            R = Z·T + a·T = P R P   _symmetric_product_kernel
        Q = Z + a·I                 after a (re)start: `_add_identity_kernel`, in place on Z
          or Z·Q + a·Q = P Q        _symmetric_product_kernel (P and Q are polynomials of one R)
        restart after k:            X <- Q X (tall: X Q; Q is symmetric), _product_axpy_kernel; R = X Xᵀ
    return Q X                      _product_axpy_kernel

FLOPs per matrix (s = min(m, n), l = max(m, n)): s²l for R, s³ per s x s product (half of 2s³: only
tiles on or above the diagonal are computed), 2s²l per product with X; `fastoptim.ns_methods.flops`
counts them (768 x 3072, 5 steps, one restart: 38s³ against the standard kernels' 65s³).
Workspaces, once per call: five s x s matrices (R, Z, T, Q and the next Q) and two m x n buffers that
alternate (a restart's X replaces the one before; the result lands in the other).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._registry import register_kernel
from ..coefficients import Schedule
from . import newton_schulz as standard
from ._common import MAX_GRID_Y, device_guard
from ._ns_kernels import _batch_offset, _row_offset

_MAX_BATCH_PER_LAUNCH = MAX_GRID_Y  # module-level, so a test can lower it
_DIAGONAL_BLOCK = 128


@triton.jit
def _add_identity_kernel(z_ptr, size, stride_zb, alpha, BLOCK: tl.constexpr):
    """Z[b] <- Z[b] + alpha·I in place (size elements of a contiguous size x size matrix), in fp32."""
    part = tl.program_id(0)
    batch = tl.program_id(1)
    index = part * BLOCK + tl.arange(0, BLOCK)
    mask = index < size
    ptrs = z_ptr + _batch_offset(batch, stride_zb) + _row_offset(index, size + 1)
    z = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, (z + alpha).to(z_ptr.dtype.element_ty), mask=mask)


def _launch_chunk(x_buffers, squares, schedule, restarts, config, upcast, tall, update_config=None) -> int:
    """The iteration for a stack short enough for one grid. x_buffers[0] holds X₀ and both are
    (batch, m, n); squares are five (batch, s, s) workspaces. `config` is that of the s x s products,
    `update_config` (default: the same) that of the products with X. Returns the index of the buffer
    holding the result. The products launch as the standard launcher's (`standard._path`: descriptors
    on sm_90, the grid or the persistent launch)."""
    batch, m, n = x_buffers[0].shape
    size, length = min(m, n), max(m, n)
    R, Z, T, Q, Q_next = squares
    update_config = update_config or config
    path = standard._path(R.device, R.dtype)

    def symmetric(p, q, addend, out, alpha, beta):
        """out = alpha·(p q) + beta·addend, for s x s p, q (row-major) whose product is symmetric."""
        standard._symmetric_product(path, config, upcast, p, False, q, False, addend, out, size, size, alpha, beta,
                                    True)

    def gram(x):
        """R = X Xᵀ (tall: XᵀX), reading X's rows (columns) twice through strides."""
        standard._symmetric_product(path, config, upcast, x, tall, x, not tall, R, R, size, length, 1.0, 0.0, False)

    def apply(q, x, out):
        """out = Q X (tall: X Q)."""
        left, right = (x, q) if tall else (q, x)
        standard._product_axpy(path, update_config, upcast, left, right, x, out, size, 0.0)

    current = 0
    gram(x_buffers[current])
    fresh, last = True, len(schedule.triples)
    for k, (a, b, c) in enumerate(schedule.triples, start=1):
        symmetric(R, R, R, Z, c, b)
        if k not in restarts and k < last:
            symmetric(R, Z, R, T, 1.0, a)
            symmetric(Z, T, T, R, 1.0, a)
        if fresh:
            diagonal_grid = (triton.cdiv(size, _DIAGONAL_BLOCK), batch)
            _add_identity_kernel[diagonal_grid](Z, size, Z.stride(0), a, BLOCK=_DIAGONAL_BLOCK)
            Q, Z = Z, Q  # Z's buffer holds Q now; the old Q's is free for the next Z
        else:
            symmetric(Z, Q, Q, Q_next, 1.0, a)
            Q, Q_next = Q_next, Q
        fresh = False
        if k in restarts:
            apply(Q, x_buffers[current], x_buffers[1 - current])
            current = 1 - current
            gram(x_buffers[current])
            fresh = True
    apply(Q, x_buffers[current], x_buffers[1 - current])
    return 1 - current


def _gram_newton_schulz(
    G: torch.Tensor,
    schedule: Schedule,
    eps: float,
    compute_dtype: torch.dtype,
    normalized: bool = False,
    restarts: tuple[int, ...] = (),
    *,
    config: standard._Config | None = None,
    poison: bool = False,
) -> torch.Tensor:
    """The launcher. `config` overrides the block table and `poison` fills every workspace with NaN
    before the kernels run (tests use both)."""
    shape, device = G.shape, G.device
    m, n = shape[-2], shape[-1]
    X0 = standard._newton_schulz(G, Schedule((), schedule.safety), eps, compute_dtype, normalized, poison=poison)
    if G.numel() == 0 or not schedule.triples:
        return X0
    size, batch = min(m, n), X0.numel() // (m * n)
    # The standard launcher's rule (small grids, the register cap): `config` (tests) overrides both.
    config, update_config = (config, config) if config else standard._configs(
        batch, m, n, compute_dtype, standard._multiprocessor_count(device), standard._arch(device)
    )

    def workspace(*dims: int) -> torch.Tensor:
        if poison:
            return torch.full(dims, float("nan"), dtype=compute_dtype, device=device)
        return torch.empty(dims, dtype=compute_dtype, device=device)

    stack = X0.view(-1, m, n)
    batch = stack.shape[0]
    x_buffers = (stack, workspace(batch, m, n))
    squares = workspace(5, batch, size, size)
    upcast = device.type == "cpu" and compute_dtype != torch.float32
    result = 0
    with device_guard(G):  # Triton launches on the current device, not the tensors'
        for start in range(0, batch, _MAX_BATCH_PER_LAUNCH):
            chunk = slice(start, min(batch, start + _MAX_BATCH_PER_LAUNCH))
            result = _launch_chunk(
                tuple(x[chunk] for x in x_buffers), tuple(squares[i, chunk] for i in range(5)), schedule,
                restarts, config, upcast, m > n, update_config,
            )
    return x_buffers[result].view(shape)  # the same buffer for every chunk: it depends on the schedule only


def _why_not_gram_newton_schulz(G, schedule, eps, compute_dtype, normalized=False, restarts=()) -> str | None:
    return standard._why_not_newton_schulz(G, schedule, eps, compute_dtype, normalized)


@register_kernel("gram_newton_schulz", "triton", supports=_why_not_gram_newton_schulz)
def gram_newton_schulz(
    G: torch.Tensor, schedule: Schedule, eps: float, compute_dtype: torch.dtype, normalized: bool = False,
    restarts: tuple[int, ...] = (),
) -> torch.Tensor:
    """fastoptim::gram_newton_schulz on the Triton backend: a new contiguous (..., m, n) compute_dtype tensor."""
    return _gram_newton_schulz(G, schedule, eps, compute_dtype, normalized, restarts)
