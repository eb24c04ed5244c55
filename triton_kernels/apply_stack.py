"""Triton kernels: Muon's and NorMuon's parameter step for a whole shape bucket, in one pass over the list.

    muon_apply_stack_:    for each i:  p_i <- p_i·(1 - lr·wd)  (cautious: only where U_i·p_i >= 0)
                                       p_i <- p_i - lr·scale·U_i
    normuon_step_stack_:  for each i:  v_i <- lerp(v_i, mean_row(O_i²), 1 - beta2)
                                       Ô_i = O_i / (√v_i + eps) · ‖O_i‖_F / (‖Ô_i‖_F + eps)
                                       p_i <- p_i·(1 - lr·wd) - lr·scale·Ô_i

p_i: P parameters of m·n elements each (any shape, contiguous: a weight, a conv kernel, an expert of a
bank), U_i / O_i: the i-th matrix of one contiguous (P, m, n) update stack, v_i: m row moments each.
K. Jordan et al., "Muon" (2024); Z. Li et al., "NorMuon" (arXiv:2510.05491); cautious weight decay:
L. Chen et al. (arXiv:2510.12402). The specification is `fastoptim.reference.muon_apply_stack_` /
`normuon_step_stack_`: each equals a loop of the per-matrix op, and these kernels compute exactly what
`muon.py` and `normuon.py` compute per matrix (same formulas, tiles and reduction order), so a bucket
steps bit for bit like a loop of per-matrix calls — in a number of launches independent of P.

Lists go through the chunk tables of `_common` (int64 addresses, element count, chunk index per row;
one launch per dtype combination):
- muon_apply_stack_: table (param, update slice), one program per CHUNK elements of a matrix; one launch.
  Bytes per element: 2·|p| + |U| (12 in fp32, 10 for fp32 parameters with a bf16 update).
- normuon_step_stack_: table (second moment, param, update slice), whose first list has m elements, so
  a row is one block of CHUNK rows of one matrix (the whole matrix when m <= CHUNK). Three launches:
  1. `_row_stats_stack_kernel`, one program per tile of BLOCK_M rows: row sums of O², the v update, and
     the tile's partial sums of ‖O‖² and ‖Ô‖², into a (P·tiles, 2) table of partials;
  2. `normuon._norm_ratio_kernel`, one program per matrix: the partials summed in a fixed order (no float
     atomics: bit-reproducible), ‖O‖ / (‖Ô‖ + eps);
  3. `_apply_stack_kernel`, one program per BLOCK_M x BLOCK_N tile: reads O and p, writes p.
  Bytes per element: 2·|O| + 2·|p| (O read twice), plus 2·|v| + 4 per row.

lr and weight_decay may be 0-dim tensors: the kernels load them and compute 1 - lr·wd and lr·scale in
fp32 (the float path passes both rounded once from double, as torch rounds the reference's scalars).
Offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._registry import register_kernel
from ._common import (
    CHUNK,
    TL_DTYPES,
    chunk_tables,
    device_guard,
    lerp,
    stack_pointer,
    table_pointer,
    unsupported_lists,
    unsupported_tensors,
)
from .muon import BLOCK
from .normuon import APPLY_TILE_ELEMENTS, NUM_WARPS, ROW_TILE_ELEMENTS, _norm_ratio_kernel, _tile

MAX_RATIO_BLOCK = 1024  # tiles summed per step of the norm-ratio reduction (as normuon.py)


@triton.jit
def _step_scalars(
    lr_ptr, weight_decay_ptr, keep, step, lr, weight_decay, scale, LR_TENSOR: tl.constexpr,
    WEIGHT_DECAY_TENSOR: tl.constexpr,
):
    """(1 - lr·wd, lr·scale): as given (rounded on the host), or computed in fp32 from a tensor's value."""
    if LR_TENSOR or WEIGHT_DECAY_TENSOR:
        if LR_TENSOR:
            lr = tl.load(lr_ptr).to(tl.float32)
        if WEIGHT_DECAY_TENSOR:
            weight_decay = tl.load(weight_decay_ptr).to(tl.float32)
        keep = 1.0 - lr * weight_decay
        step = lr * scale
    return keep, step


@triton.jit
def _muon_apply_block(param_ptr, update_ptr, offsets, mask, keep, step, CAUTIOUS: tl.constexpr):
    # muon._muon_apply_kernel's arithmetic, element for element.
    param = tl.load(param_ptr + offsets, mask=mask).to(tl.float32)
    update = tl.load(update_ptr + offsets, mask=mask).to(tl.float32)
    decayed = param * keep
    if CAUTIOUS:
        decayed = tl.where(update * param >= 0, decayed, param)
    result = decayed - step * update
    tl.store(param_ptr + offsets, result.to(param_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _muon_apply_stack_kernel(
    table_ptr,
    updates_base,
    lr_ptr,
    weight_decay_ptr,
    keep,
    step,
    lr,
    weight_decay,
    scale,
    PARAM_DTYPE: tl.constexpr,
    UPDATE_DTYPE: tl.constexpr,
    LR_TENSOR: tl.constexpr,
    WEIGHT_DECAY_TENSOR: tl.constexpr,
    CAUTIOUS: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per chunk-table row (param, update slice, numel, chunk). Bytes per element: 2·|p| + |U|."""
    row_ptr = table_ptr + tl.program_id(0).to(tl.int64) * 4
    param_ptr = table_pointer(row_ptr, 0, PARAM_DTYPE, ALIGNED)
    update_ptr = stack_pointer(row_ptr, 1, updates_base, UPDATE_DTYPE, ALIGNED)
    numel = tl.load(row_ptr + 2)
    chunk_start = tl.load(row_ptr + 3) * CHUNK
    keep, step = _step_scalars(
        lr_ptr, weight_decay_ptr, keep, step, lr, weight_decay, scale, LR_TENSOR, WEIGHT_DECAY_TENSOR
    )
    for block in range(0, tl.minimum(numel - chunk_start, CHUNK), BLOCK):
        offsets = chunk_start + block + tl.arange(0, BLOCK)
        if chunk_start + block + BLOCK <= numel:
            _muon_apply_block(param_ptr, update_ptr, offsets, tl.full((BLOCK,), 1, tl.int1), keep, step, CAUTIOUS)
        else:
            _muon_apply_block(param_ptr, update_ptr, offsets, offsets < numel, keep, step, CAUTIOUS)


@triton.jit
def _row_stats_stack_kernel(
    table_ptr,
    partials_ptr,
    updates_base,
    matrix_bytes,
    m,
    n,
    mean_divisor,
    tiles_per_matrix,
    tiles_per_chunk,
    one_minus_beta2,
    eps,
    MOMENT_DTYPE: tl.constexpr,
    UPDATE_DTYPE: tl.constexpr,
    WRITE_PARTIALS: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """normuon._row_stats_kernel for the tile `tile` of a table row's block of CHUNK rows.
    Bytes per element of O: |O| read once (plus 2·|v| per row)."""
    program = tl.program_id(0)
    entry = program // tiles_per_chunk
    row_ptr = table_ptr + entry.to(tl.int64) * 5
    second_moment_ptr = table_pointer(row_ptr, 0, MOMENT_DTYPE, ALIGNED)
    update_ptr = stack_pointer(row_ptr, 2, updates_base, UPDATE_DTYPE, ALIGNED)
    tile = tl.load(row_ptr + 4) * (CHUNK // BLOCK_M) + program % tiles_per_chunk  # within the matrix
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < m
    row_starts = rows * n
    row_sums = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for col_start in range(0, n, BLOCK_N):
        cols = col_start + tl.arange(0, BLOCK_N)
        mask = row_mask[:, None] & (cols < n)[None, :]
        o = tl.load(update_ptr + row_starts[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        row_sums += tl.sum(o * o, axis=1)
    v_dtype = second_moment_ptr.dtype.element_ty
    # The reference rounds the row mean to v's dtype before the EMA; n = 0 gives a mean of 0.
    row_means = tl.div_rn(row_sums, mean_divisor).to(v_dtype).to(tl.float32)
    v = tl.load(second_moment_ptr + rows, mask=row_mask).to(tl.float32)
    v = lerp(v, row_means, one_minus_beta2).to(v_dtype)
    tl.store(second_moment_ptr + rows, v, mask=row_mask)
    if WRITE_PARTIALS:
        row_scale = tl.div_rn(tl.full((BLOCK_M,), 1.0, tl.float32), tl.sqrt_rn(v.to(tl.float32)) + eps)
        norm_sq = tl.sum(tl.where(row_mask, row_sums, 0.0), axis=0)
        normalized_sq = tl.sum(tl.where(row_mask, row_sums * row_scale * row_scale, 0.0), axis=0)
        # Which matrix: from the update slice's byte offset in the stack. The last block of a matrix with
        # more than CHUNK rows has tiles past its end: they write nothing.
        matrix = tl.load(row_ptr + 2) // matrix_bytes
        index = (matrix * tiles_per_matrix + tile) * 2
        in_matrix = tile < tiles_per_matrix
        tl.store(partials_ptr + index, norm_sq, mask=in_matrix)
        tl.store(partials_ptr + index + 1, normalized_sq, mask=in_matrix)


@triton.jit
def _apply_stack_kernel(
    table_ptr,
    ratio_ptr,
    lr_ptr,
    weight_decay_ptr,
    updates_base,
    matrix_bytes,
    m,
    n,
    tiles_per_chunk,
    col_tiles,
    keep,
    step,
    lr,
    weight_decay,
    scale,
    eps,
    MOMENT_DTYPE: tl.constexpr,
    PARAM_DTYPE: tl.constexpr,
    UPDATE_DTYPE: tl.constexpr,
    LR_TENSOR: tl.constexpr,
    WEIGHT_DECAY_TENSOR: tl.constexpr,
    CAUTIOUS: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """normuon._apply_kernel for one BLOCK_M x BLOCK_N tile of a table row's block of CHUNK rows.
    Bytes per element: reads p and O, writes p: 2·|p| + |O|."""
    program = tl.program_id(0)
    entry = program // tiles_per_chunk
    within = program % tiles_per_chunk
    row_ptr = table_ptr + entry.to(tl.int64) * 5
    second_moment_ptr = table_pointer(row_ptr, 0, MOMENT_DTYPE, ALIGNED)
    param_ptr = table_pointer(row_ptr, 1, PARAM_DTYPE, ALIGNED)
    update_ptr = stack_pointer(row_ptr, 2, updates_base, UPDATE_DTYPE, ALIGNED)
    rows = tl.load(row_ptr + 4) * CHUNK + (within // col_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (within % col_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < m
    mask = row_mask[:, None] & (cols < n)[None, :]
    offsets = (rows * n)[:, None] + cols[None, :]
    keep, step = _step_scalars(
        lr_ptr, weight_decay_ptr, keep, step, lr, weight_decay, scale, LR_TENSOR, WEIGHT_DECAY_TENSOR
    )
    v = tl.load(second_moment_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    row_scale = tl.div_rn(tl.full((BLOCK_M,), 1.0, tl.float32), tl.sqrt_rn(v) + eps)
    ratio = tl.load(ratio_ptr + tl.load(row_ptr + 2) // matrix_bytes)
    o = tl.load(update_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(param_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    o_hat = (o * row_scale[:, None]) * ratio
    decayed = p * keep
    if CAUTIOUS:  # decay only where the step and the parameter agree in sign
        decayed = tl.where(o_hat * p >= 0, decayed, p)
    result = decayed - step * o_hat
    tl.store(param_ptr + offsets, result.to(param_ptr.dtype.element_ty), mask=mask)


def _scalar_arguments(lr, weight_decay, scale: float, placeholder: torch.Tensor) -> dict:
    """The kernels' hyper-parameter arguments: host-rounded keep/step, or the tensors to load."""
    lr_tensor = isinstance(lr, torch.Tensor)
    weight_decay_tensor = isinstance(weight_decay, torch.Tensor)
    if lr_tensor or weight_decay_tensor:
        keep = step = 0.0  # computed in the kernel
    else:
        keep, step = 1.0 - lr * weight_decay, lr * scale
    return dict(
        lr_ptr=lr if lr_tensor else placeholder,
        weight_decay_ptr=weight_decay if weight_decay_tensor else placeholder,
        keep=keep,
        step=step,
        lr=0.0 if lr_tensor else lr,
        weight_decay=0.0 if weight_decay_tensor else weight_decay,
        scale=scale,
        LR_TENSOR=lr_tensor,
        WEIGHT_DECAY_TENSOR=weight_decay_tensor,
    )


def _supports_muon(params, updates, *_) -> str | None:
    return unsupported_tensors(updates=updates) or unsupported_lists(params=params)


@register_kernel("muon_apply_stack_", "triton", supports=_supports_muon)
def muon_apply_stack_(
    params: list[torch.Tensor],
    updates: torch.Tensor,
    lr: float | torch.Tensor,
    weight_decay: float | torch.Tensor,
    scale: float,
    cautious: bool = False,
) -> None:
    if not params or updates.numel() == 0:
        return
    scalars = _scalar_arguments(lr, weight_decay, scale, updates)
    with device_guard(updates):
        for dtypes, aligned, table in chunk_tables(
            (params, list(updates.unbind(0))), updates.device, stacks={1: updates}
        ):
            _muon_apply_stack_kernel[(table.shape[0],)](
                table,
                updates.data_ptr(),
                **scalars,
                PARAM_DTYPE=TL_DTYPES[dtypes[0]],
                UPDATE_DTYPE=TL_DTYPES[dtypes[1]],
                CAUTIOUS=cautious,
                ALIGNED=aligned,
                CHUNK=CHUNK,
                BLOCK=BLOCK,
                num_warps=NUM_WARPS,
            )


def _supports_normuon(params, updates, second_moments, *_) -> str | None:
    return unsupported_tensors(updates=updates) or unsupported_lists(params=params, second_moments=second_moments)


@register_kernel("normuon_step_stack_", "triton", supports=_supports_normuon)
def normuon_step_stack_(
    params: list[torch.Tensor],
    updates: torch.Tensor,
    second_moments: list[torch.Tensor],
    lr: float | torch.Tensor,
    weight_decay: float | torch.Tensor,
    beta2: float,
    eps: float,
    scale: float,
    cautious: bool = False,
) -> None:
    matrices, m, n = updates.shape
    if matrices == 0 or m == 0:
        return
    device = updates.device
    # Rows of second_moments' chunks: a block of up to CHUNK rows of one matrix (tiles divide CHUNK).
    tables = chunk_tables((second_moments, params, list(updates.unbind(0))), device, stacks={2: updates})
    chunk_rows = min(m, CHUNK)
    updates_base, matrix_bytes = updates.data_ptr(), max(m * n * updates.element_size(), 1)
    with device_guard(updates):
        block_m, block_n = _tile(m, n, ROW_TILE_ELEMENTS)
        tiles_per_matrix = triton.cdiv(m, block_m)
        tiles_per_chunk = triton.cdiv(chunk_rows, block_m)
        # Every (matrix, tile) partial is written by exactly one program: no zero-fill needed.
        partials = torch.empty((matrices * tiles_per_matrix, 2), dtype=torch.float32, device=device)
        for dtypes, aligned, table in tables:
            _row_stats_stack_kernel[(table.shape[0] * tiles_per_chunk,)](
                table,
                partials,
                updates_base,
                matrix_bytes,
                m,
                n,
                float(max(n, 1)),
                tiles_per_matrix,
                tiles_per_chunk,
                1.0 - beta2,
                eps,
                MOMENT_DTYPE=TL_DTYPES[dtypes[0]],
                UPDATE_DTYPE=TL_DTYPES[dtypes[2]],
                WRITE_PARTIALS=n > 0,
                ALIGNED=aligned,
                CHUNK=CHUNK,
                BLOCK_M=block_m,
                BLOCK_N=block_n,
                num_warps=NUM_WARPS,
            )
        if n == 0:
            return  # v moved toward 0; the params have no elements
        ratio = torch.empty((matrices,), dtype=torch.float32, device=device)
        reduce_block = min(triton.next_power_of_2(tiles_per_matrix), MAX_RATIO_BLOCK)
        _norm_ratio_kernel[(matrices,)](partials, ratio, tiles_per_matrix, eps, BLOCK=reduce_block)
        block_m, block_n = _tile(m, n, APPLY_TILE_ELEMENTS)
        col_tiles = triton.cdiv(n, block_n)
        tiles_per_chunk = triton.cdiv(chunk_rows, block_m) * col_tiles
        scalars = _scalar_arguments(lr, weight_decay, scale, ratio)
        for dtypes, aligned, table in tables:
            _apply_stack_kernel[(table.shape[0] * tiles_per_chunk,)](
                table,
                ratio,
                updates_base=updates_base,
                matrix_bytes=matrix_bytes,
                m=m,
                n=n,
                tiles_per_chunk=tiles_per_chunk,
                col_tiles=col_tiles,
                eps=eps,
                **scalars,
                MOMENT_DTYPE=TL_DTYPES[dtypes[0]],
                PARAM_DTYPE=TL_DTYPES[dtypes[1]],
                UPDATE_DTYPE=TL_DTYPES[dtypes[2]],
                CAUTIOUS=cautious,
                ALIGNED=aligned,
                CHUNK=CHUNK,
                BLOCK_M=block_m,
                BLOCK_N=block_n,
                num_warps=NUM_WARPS,
            )
