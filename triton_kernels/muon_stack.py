"""Triton kernel: Muon's momentum for a whole shape bucket, writing the Newton–Schulz inputs into one stack.

    for each i:  buf_i <- lerp(buf_i, grad_i, 1 - beta)
                 out[i] <- lerp(grad_i, buf_i, beta) (Nesterov) or buf_i,   cast to out's dtype

With normalize, also out[i] <- out[i] / (safety·‖out[i]‖_F + eps), Newton–Schulz's normalization:
the momentum kernel writes each program's sum of squares of the stored values to a (P, chunks)
table of partials (no atomics: the result does not depend on scheduling); one program per matrix
sums its partials in a fixed order into a denominator, and a last kernel over the stack scales it in place.

`fastoptim.reference.muon_momentum_stack_` is the specification. One launch per dtype combination of
(buf, grad) covers every matrix of the bucket, through the chunk table of `_common` (int64
addresses of the i-th buf, grad and stack slice, element count, chunk index per row): no temporary
Nesterov tensor and no copy into the stack, which the per-matrix op followed by a copy would cost.
Bytes per element: 2·|buf| + |grad| + |out| (+ 2·|out| for the normalization pass).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._registry import register_kernel
from ._common import (
    CHUNK,
    MAX_GRID_Y,
    TL_DTYPES,
    chunk_tables,
    device_guard,
    lerp,
    table_pointer,
    unsupported_lists,
)
from .sophia import BLOCK, NUM_WARPS

_MAX_GRID_Y = MAX_GRID_Y  # module-level, so a test can lower it


@triton.jit
def _momentum_stack_block(buf_ptr, grad_ptr, out_ptr, offsets, mask, beta, NESTEROV: tl.constexpr):
    """One block of the momentum; returns the sum of squares of the values stored in the stack."""
    buf_dtype = buf_ptr.dtype.element_ty
    # The reference casts grad to buf's dtype before the EMA, and rounds the new buffer before the
    # Nesterov lerp reads it; round the same way.
    grad = tl.load(grad_ptr + offsets, mask=mask).to(buf_dtype).to(tl.float32)
    buf = tl.load(buf_ptr + offsets, mask=mask).to(tl.float32)
    updated = lerp(buf, grad, 1.0 - beta).to(buf_dtype)
    tl.store(buf_ptr + offsets, updated, mask=mask)
    if NESTEROV:
        ns_input = lerp(grad, updated.to(tl.float32), beta).to(buf_dtype)
    else:
        ns_input = updated
    stored = ns_input.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offsets, stored, mask=mask)
    value = tl.where(mask, stored.to(tl.float32), 0.0)
    return tl.sum(value * value, axis=0)


@triton.jit
def _momentum_stack_kernel(
    table_ptr,
    partials_ptr,
    out_base,
    matrix_bytes,
    max_chunks,
    beta,
    BUF_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    NESTEROV: tl.constexpr,
    NORMALIZE: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Bytes per element: reads buf and grad, writes buf and the stack: 2·|buf| + |grad| + |out|."""
    row_ptr = table_ptr + tl.program_id(0).to(tl.int64) * 5
    buf_ptr = table_pointer(row_ptr, 0, BUF_DTYPE, ALIGNED)
    grad_ptr = table_pointer(row_ptr, 1, GRAD_DTYPE, ALIGNED)
    out_ptr = table_pointer(row_ptr, 2, OUT_DTYPE, ALIGNED)
    numel = tl.load(row_ptr + 3)
    chunk = tl.load(row_ptr + 4)
    chunk_start = chunk * CHUNK
    sum_squares = tl.zeros((), dtype=tl.float32)
    for block in range(0, tl.minimum(numel - chunk_start, CHUNK), BLOCK):
        offsets = chunk_start + block + tl.arange(0, BLOCK)
        if chunk_start + block + BLOCK <= numel:
            sum_squares += _momentum_stack_block(
                buf_ptr, grad_ptr, out_ptr, offsets, tl.full((BLOCK,), 1, tl.int1), beta, NESTEROV
            )
        else:
            sum_squares += _momentum_stack_block(buf_ptr, grad_ptr, out_ptr, offsets, offsets < numel, beta, NESTEROV)
    if NORMALIZE:
        # Which matrix of the stack: from the slice's address (the table holds addresses, not indices).
        matrix = (tl.load(row_ptr + 2) - out_base) // matrix_bytes
        tl.store(partials_ptr + matrix * max_chunks + chunk, sum_squares)


@triton.jit
def _denominator_kernel(partials_ptr, denominators_ptr, max_chunks, safety, eps, CHUNKS_BLOCK: tl.constexpr):
    """denominators[i] <- safety·sqrt(Σ partials[i]) + eps, one program per matrix (computed once, not by
    every program of the normalization: those would each re-read all of the matrix's partials)."""
    matrix = tl.program_id(0).to(tl.int64)
    chunks = tl.arange(0, CHUNKS_BLOCK)
    partials = tl.load(partials_ptr + matrix * max_chunks + chunks, mask=chunks < max_chunks, other=0.0)
    tl.store(denominators_ptr + matrix, safety * tl.sqrt_rn(tl.sum(partials, axis=0)) + eps)


@triton.jit
def _normalize_kernel(out_ptr, denominators_ptr, numel, BLOCK: tl.constexpr):
    """out[i] <- out[i] / denominators[i], grid (blocks of a matrix, matrices). Bytes per element: 2·|out|."""
    matrix = tl.program_id(1).to(tl.int64)
    denominator = tl.load(denominators_ptr + matrix)
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    pointers = out_ptr + matrix * numel + offsets
    values = tl.load(pointers, mask=mask).to(tl.float32)
    tl.store(pointers, tl.div_rn(values, denominator).to(out_ptr.dtype.element_ty), mask=mask)


def _supports(bufs, grads, out, *_) -> str | None:
    return unsupported_lists(bufs=bufs, grads=grads, out=[out])


@register_kernel("muon_momentum_stack_", "triton", supports=_supports)
def muon_momentum_stack_(
    bufs: list[torch.Tensor],
    grads: list[torch.Tensor],
    out: torch.Tensor,
    beta: float,
    nesterov: bool,
    normalize: bool = False,
    safety: float = 1.0,
    eps: float = 1e-7,
) -> None:
    if not bufs or out.numel() == 0:
        return
    outs = list(out.unbind(0))  # views: the stack's slices
    numel = out[0].numel()
    max_chunks = triton.cdiv(numel, CHUNK)
    # Every (matrix, chunk) partial is written by exactly one program, so no zero-fill is needed.
    partials = torch.empty((len(bufs), max_chunks), dtype=torch.float32, device=out.device) if normalize else out
    with device_guard(out):
        for dtypes, aligned, table in chunk_tables((bufs, grads, outs), out.device):
            _momentum_stack_kernel[(table.shape[0],)](
                table,
                partials,
                out.data_ptr(),
                numel * out.element_size(),
                max_chunks,
                beta,
                *(TL_DTYPES[dtype] for dtype in dtypes),
                NESTEROV=nesterov,
                NORMALIZE=normalize,
                ALIGNED=aligned,
                CHUNK=CHUNK,
                BLOCK=BLOCK,
                num_warps=NUM_WARPS,
            )
        if normalize:
            denominators = torch.empty(len(bufs), dtype=torch.float32, device=out.device)
            _denominator_kernel[(len(bufs),)](
                partials, denominators, max_chunks, safety, eps, CHUNKS_BLOCK=triton.next_power_of_2(max_chunks)
            )
            # A grid's second axis holds at most 65535 matrices: longer stacks are normalized in slices.
            for first in range(0, len(bufs), _MAX_GRID_Y):
                matrices = min(len(bufs) - first, _MAX_GRID_Y)
                _normalize_kernel[(triton.cdiv(numel, BLOCK), matrices)](
                    out[first:], denominators[first:], numel, BLOCK=BLOCK, num_warps=NUM_WARPS
                )
