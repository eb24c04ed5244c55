"""Triton kernel: Muon's momentum for a whole shape bucket, writing the Newton–Schulz inputs into one stack.

    for each i:  buf_i <- lerp(buf_i, grad_i, 1 - beta)
                 out[i] <- lerp(grad_i, buf_i, beta) (Nesterov) or buf_i,   cast to out's dtype

With normalize, also out[i] <- out[i] / (safety·‖out[i]‖_F + eps), Newton–Schulz's normalization:
the momentum kernel writes each program's sum of squares of the stored values to a (P, chunks)
table of partials (no atomics: the result does not depend on scheduling); one program per matrix
sums its partials in a fixed order into a denominator, and a last kernel over the stack scales it in place.
The norms are overflow-safe (`_common.rescale_exponent`, `combine_scaled_sums`; the same bits as the plain
formula wherever that one does not overflow). A float16 stack cannot hold a momentum above 65504: there the
momentum kernel stores nothing and sums the squares of the values before the cast, and the last kernel
recomputes each value from the new buffer (and the gradient, for Nesterov) and writes it normalized.

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
    combine_scaled_sums,
    device_guard,
    lerp,
    pow2,
    rescale_exponent,
    stack_pointer,
    table_pointer,
    unsupported_lists,
)
from .sophia import BLOCK, NUM_WARPS

_MAX_GRID_Y = MAX_GRID_Y  # module-level, so a test can lower it


@triton.jit
def _momentum_stack_block(buf_ptr, grad_ptr, out_ptr, offsets, mask, beta, NESTEROV: tl.constexpr,
                          STORE: tl.constexpr):
    """One block of the momentum; returns the sum of squares and the largest |value| of the values stored
    in the stack (STORE), or of the Newton–Schulz inputs before their cast (not STORE: nothing is stored)."""
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
    if STORE:
        stored = ns_input.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + offsets, stored, mask=mask)
        value = tl.where(mask, stored.to(tl.float32), 0.0)
    else:
        value = tl.where(mask, ns_input.to(tl.float32), 0.0)
    return tl.sum(value * value, axis=0), tl.max(tl.abs(value), axis=0)


@triton.jit
def _ns_input_block(buf_ptr, grad_ptr, offsets, mask, beta, NESTEROV: tl.constexpr):
    """The Newton–Schulz input of one block again, in fp32, from the new buffer (and the gradient): the
    same roundings as `_momentum_stack_block`."""
    updated = tl.load(buf_ptr + offsets, mask=mask, other=0.0)
    if NESTEROV:
        buf_dtype = buf_ptr.dtype.element_ty
        grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(buf_dtype).to(tl.float32)
        return lerp(grad, updated.to(tl.float32), beta).to(buf_dtype).to(tl.float32)
    return updated.to(tl.float32)


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
    STORE: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Bytes per element: reads buf and grad, writes buf and the stack: 2·|buf| + |grad| + |out| (not STORE:
    the stack is written by `_recompute_normalize_kernel`). Partials row i: each chunk's sum of squares, then
    each chunk's exponent (`_common.rescale_exponent`)."""
    row_ptr = table_ptr + tl.program_id(0).to(tl.int64) * 5
    buf_ptr = table_pointer(row_ptr, 0, BUF_DTYPE, ALIGNED)
    grad_ptr = table_pointer(row_ptr, 1, GRAD_DTYPE, ALIGNED)
    out_ptr = stack_pointer(row_ptr, 2, out_base, OUT_DTYPE, ALIGNED)
    numel = tl.load(row_ptr + 3)
    chunk = tl.load(row_ptr + 4)
    chunk_start = chunk * CHUNK
    sum_squares = tl.zeros((), dtype=tl.float32)
    largest = tl.zeros((), dtype=tl.float32)
    chunk_end = tl.minimum(numel - chunk_start, CHUNK)
    for block in range(0, chunk_end, BLOCK):
        offsets = chunk_start + block + tl.arange(0, BLOCK)
        if chunk_start + block + BLOCK <= numel:
            block_sum, block_max = _momentum_stack_block(
                buf_ptr, grad_ptr, out_ptr, offsets, tl.full((BLOCK,), 1, tl.int1), beta, NESTEROV, STORE
            )
        else:
            block_sum, block_max = _momentum_stack_block(
                buf_ptr, grad_ptr, out_ptr, offsets, offsets < numel, beta, NESTEROV, STORE
            )
        sum_squares += block_sum
        largest = tl.maximum(largest, block_max)
    if NORMALIZE:
        exponent = rescale_exponent(sum_squares, largest, False)
        if exponent != 0:  # rare: finite values whose squares overflow; sum them again, scaled
            tl.debug_barrier()  # this program's stores to out are visible to all its threads
            scale = pow2(-exponent, False)
            sum_squares = tl.zeros((), dtype=tl.float32)
            for block in range(0, chunk_end, BLOCK):
                offsets = chunk_start + block + tl.arange(0, BLOCK)
                mask = offsets < numel
                if STORE:
                    value = tl.load(out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
                else:
                    value = _ns_input_block(buf_ptr, grad_ptr, offsets, mask, beta, NESTEROV)
                value = tl.where(mask, value * scale, 0.0)
                sum_squares += tl.sum(value * value, axis=0)
        # Which matrix of the stack: from the slice's byte offset in the stack.
        matrix = tl.load(row_ptr + 2) // matrix_bytes
        tl.store(partials_ptr + matrix * 2 * max_chunks + chunk, sum_squares)
        tl.store(partials_ptr + matrix * 2 * max_chunks + max_chunks + chunk, exponent.to(tl.float32))


@triton.jit
def _denominator_kernel(partials_ptr, denominators_ptr, max_chunks, safety, eps, CHUNKS_BLOCK: tl.constexpr):
    """denominators[i] <- safety·sqrt(Σ partials[i]) + eps and denominators[P + i] <- 1, one program per matrix
    (computed once, not by every program of the normalization: those would each re-read all of the matrix's
    partials). Overflow-safe: with ‖U_i‖² = total·4^e, safety·sqrt(total) + eps·2^-e and the scale 2^-e
    (e = 0, scale 1: the plain formula's bits, unless the squares overflowed)."""
    matrix = tl.program_id(0).to(tl.int64)
    chunks = tl.arange(0, CHUNKS_BLOCK)
    row = partials_ptr + matrix * 2 * max_chunks
    partials = tl.load(row + chunks, mask=chunks < max_chunks, other=0.0)
    exponents = tl.load(row + max_chunks + chunks, mask=chunks < max_chunks, other=0.0).to(tl.int32)
    total, exponent = combine_scaled_sums(partials, exponents, False)
    scale = pow2(-exponent, False)
    tl.store(denominators_ptr + matrix, safety * tl.sqrt_rn(total) + eps * scale)
    tl.store(denominators_ptr + tl.num_programs(0) + matrix, scale)


@triton.jit
def _normalize_kernel(out_ptr, denominators_ptr, scales_ptr, numel, BLOCK: tl.constexpr):
    """out[i] <- out[i]·scale[i] / denominators[i], grid (blocks of a matrix, matrices). Bytes per element:
    2·|out|."""
    matrix = tl.program_id(1).to(tl.int64)
    denominator = tl.load(denominators_ptr + matrix)
    scale = tl.load(scales_ptr + matrix)
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    pointers = out_ptr + matrix * numel + offsets
    values = tl.load(pointers, mask=mask).to(tl.float32) * scale
    tl.store(pointers, tl.div_rn(values, denominator).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _recompute_normalize_kernel(
    table_ptr,
    denominators_ptr,
    num_matrices,
    out_base,
    matrix_bytes,
    beta,
    BUF_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    NESTEROV: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out[i] <- U_i·scale[i] / denominators[i] with U_i recomputed from the new buffer (and the gradient),
    one program per chunk-table row (the float16 stack). Bytes per element: |buf| (+ |grad|) + |out|."""
    row_ptr = table_ptr + tl.program_id(0).to(tl.int64) * 5
    buf_ptr = table_pointer(row_ptr, 0, BUF_DTYPE, ALIGNED)
    grad_ptr = table_pointer(row_ptr, 1, GRAD_DTYPE, ALIGNED)
    out_ptr = stack_pointer(row_ptr, 2, out_base, OUT_DTYPE, ALIGNED)
    numel = tl.load(row_ptr + 3)
    chunk_start = tl.load(row_ptr + 4) * CHUNK
    matrix = tl.load(row_ptr + 2) // matrix_bytes
    denominator = tl.load(denominators_ptr + matrix)
    scale = tl.load(denominators_ptr + num_matrices + matrix)
    for block in range(0, tl.minimum(numel - chunk_start, CHUNK), BLOCK):
        offsets = chunk_start + block + tl.arange(0, BLOCK)
        mask = offsets < numel
        value = _ns_input_block(buf_ptr, grad_ptr, offsets, mask, beta, NESTEROV) * scale
        tl.store(out_ptr + offsets, tl.div_rn(value, denominator).to(OUT_DTYPE), mask=mask)


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
    # Row i: every chunk's sum of squares, then every chunk's exponent.
    partials = torch.empty((len(bufs), 2 * max_chunks), dtype=torch.float32, device=out.device) if normalize else out
    # A float16 stack is written normalized from the recomputed values (`_recompute_normalize_kernel`).
    store = not (normalize and out.dtype == torch.float16)
    with device_guard(out):
        for dtypes, aligned, table in chunk_tables((bufs, grads, outs), out.device, stacks={2: out}):
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
                STORE=store,
                ALIGNED=aligned,
                CHUNK=CHUNK,
                BLOCK=BLOCK,
                num_warps=NUM_WARPS,
            )
        if normalize:
            denominators = torch.empty(2 * len(bufs), dtype=torch.float32, device=out.device)  # then the scales
            _denominator_kernel[(len(bufs),)](
                partials, denominators, max_chunks, safety, eps, CHUNKS_BLOCK=triton.next_power_of_2(max_chunks)
            )
        if normalize and not store:
            for dtypes, aligned, table in chunk_tables((bufs, grads, outs), out.device, stacks={2: out}):
                _recompute_normalize_kernel[(table.shape[0],)](
                    table,
                    denominators,
                    len(bufs),
                    out.data_ptr(),
                    numel * out.element_size(),
                    beta,
                    *(TL_DTYPES[dtype] for dtype in dtypes),
                    NESTEROV=nesterov,
                    ALIGNED=aligned,
                    CHUNK=CHUNK,
                    BLOCK=BLOCK,
                    num_warps=NUM_WARPS,
                )
        elif normalize:
            # A grid's second axis holds at most 65535 matrices: longer stacks are normalized in slices.
            for first in range(0, len(bufs), _MAX_GRID_Y):
                matrices = min(len(bufs) - first, _MAX_GRID_Y)
                _normalize_kernel[(triton.cdiv(numel, BLOCK), matrices)](
                    out[first:], denominators[first:], denominators[len(bufs) + first :], numel, BLOCK=BLOCK,
                    num_warps=NUM_WARPS,
                )
