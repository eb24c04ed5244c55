"""Triton kernel: Muon's momentum for a whole shape bucket, writing the Newton–Schulz inputs into one stack.

    for each i:  buf_i <- lerp(buf_i, grad_i, 1 - beta)
                 out[i] <- lerp(grad_i, buf_i, beta) (Nesterov) or buf_i,   cast to out's dtype

`fastoptim.reference.muon_momentum_stack_` is the specification. One launch per dtype combination of
(buf, grad) covers every matrix of the bucket, through the chunk table of the Sophia kernels (int64
addresses of the i-th buf, grad and stack slice, element count, chunk index per row): no temporary
Nesterov tensor and no copy into the stack, which the per-matrix op followed by a copy would cost.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .muon import device_guard, lerp
from .sophia import _TL_DTYPES, BLOCK, CHUNK, NUM_WARPS, _chunk_tables, _table_pointer, _unsupported_lists


@triton.jit
def _momentum_stack_block(buf_ptr, grad_ptr, out_ptr, offsets, mask, beta, NESTEROV: tl.constexpr):
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
    tl.store(out_ptr + offsets, ns_input.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _momentum_stack_kernel(
    table_ptr,
    beta,
    BUF_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    NESTEROV: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Bytes per element: reads buf and grad, writes buf and the stack: 2·|buf| + |grad| + |out|."""
    row_ptr = table_ptr + tl.program_id(0).to(tl.int64) * 5
    buf_ptr = _table_pointer(row_ptr, 0, BUF_DTYPE, ALIGNED)
    grad_ptr = _table_pointer(row_ptr, 1, GRAD_DTYPE, ALIGNED)
    out_ptr = _table_pointer(row_ptr, 2, OUT_DTYPE, ALIGNED)
    numel = tl.load(row_ptr + 3)
    chunk_start = tl.load(row_ptr + 4) * CHUNK
    for block in range(0, tl.minimum(numel - chunk_start, CHUNK), BLOCK):
        offsets = chunk_start + block + tl.arange(0, BLOCK)
        if chunk_start + block + BLOCK <= numel:
            _momentum_stack_block(buf_ptr, grad_ptr, out_ptr, offsets, tl.full((BLOCK,), 1, tl.int1), beta, NESTEROV)
        else:
            _momentum_stack_block(buf_ptr, grad_ptr, out_ptr, offsets, offsets < numel, beta, NESTEROV)


def muon_momentum_stack_(
    bufs: list[torch.Tensor], grads: list[torch.Tensor], out: torch.Tensor, beta: float, nesterov: bool
) -> None:
    if not bufs:
        return
    outs = list(out.unbind(0))  # views: the stack's slices
    with device_guard(out):
        for dtypes, aligned, table in _chunk_tables((bufs, grads, outs), out.device):
            _momentum_stack_kernel[(table.shape[0],)](
                table,
                beta,
                *(_TL_DTYPES[dtype] for dtype in dtypes),
                NESTEROV=nesterov,
                ALIGNED=aligned,
                CHUNK=CHUNK,
                BLOCK=BLOCK,
                num_warps=NUM_WARPS,
            )


def _supports(bufs, grads, out, beta, nesterov) -> str | None:
    return _unsupported_lists(bufs=bufs, grads=grads, out=[out])


OPS = {"muon_momentum_stack_": muon_momentum_stack_}
SUPPORTS = {"muon_momentum_stack_": _supports}
