"""Triton kernels: NorMuon's row-normalized update and step, for a stack of updates O (..., m, n).

    v <- lerp(v, mean_j(O_ij²), 1 - beta2)             one value per row; v is (..., m)
    Ô = O / (√v + eps) · ‖O‖_F / (‖Ô‖_F + eps)
    p <- p·(1 - lr·wd) - lr·scale·Ô

Z. Li et al., "NorMuon: Making Muon more efficient and scalable" (arXiv:2510.05491). The
specification is `fastoptim.reference.normuon_step_`.

Three launches, O read twice:
1. `_row_stats_kernel`, one program per tile of BLOCK_M rows of one matrix: the row sums s_i of O²,
   the v update, and the tile's partial sums of ‖O‖² = Σ s_i and ‖Ô‖² = Σ s_i / (√v_i + eps)²
   (Ô's norm comes from the row sums; O is not reduced a second time).
2. `_norm_ratio_kernel`, one program per matrix: adds the tiles' partial sums in a fixed order and
   writes ‖O‖ / (‖Ô‖ + eps). Partial sums plus a fixed-order reduction, instead of float atomics,
   keep the step bit-for-bit deterministic.
3. `_apply_kernel`, one program per BLOCK_M x BLOCK_N tile: reads O and p, writes p.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._registry import register_kernel
from ._common import device_guard, lerp, unsupported_tensors

ROW_TILE_ELEMENTS = 4096  # elements of O per row-stats iteration (BLOCK_M x BLOCK_N)
APPLY_TILE_ELEMENTS = 4096
MAX_BLOCK_N = 1024
NUM_WARPS = 4


@triton.jit
def _row_stats_kernel(
    update_ptr,
    second_moment_ptr,
    partials_ptr,
    m,
    n,
    mean_divisor,
    tiles_per_matrix,
    one_minus_beta2,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Bytes per element of O: |O| read once (plus 2·|v| per row)."""
    tile = tl.program_id(0)
    matrix = tile // tiles_per_matrix
    rows = (tile % tiles_per_matrix) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < m
    global_rows = matrix.to(tl.int64) * m + rows
    row_starts = global_rows * n
    row_sums = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for col_start in range(0, n, BLOCK_N):
        cols = col_start + tl.arange(0, BLOCK_N)
        mask = row_mask[:, None] & (cols < n)[None, :]
        o = tl.load(update_ptr + row_starts[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        row_sums += tl.sum(o * o, axis=1)
    v_dtype = second_moment_ptr.dtype.element_ty
    # The reference rounds the row mean to v's dtype before the EMA; n = 0 gives a mean of 0.
    row_means = tl.div_rn(row_sums, mean_divisor).to(v_dtype).to(tl.float32)
    v = tl.load(second_moment_ptr + global_rows, mask=row_mask).to(tl.float32)
    v = lerp(v, row_means, one_minus_beta2).to(v_dtype)
    tl.store(second_moment_ptr + global_rows, v, mask=row_mask)
    row_scale = tl.div_rn(tl.full((BLOCK_M,), 1.0, tl.float32), tl.sqrt_rn(v.to(tl.float32)) + eps)
    norm_sq = tl.sum(tl.where(row_mask, row_sums, 0.0), axis=0)
    normalized_sq = tl.sum(tl.where(row_mask, row_sums * row_scale * row_scale, 0.0), axis=0)
    tl.store(partials_ptr + tile.to(tl.int64) * 2, norm_sq)
    tl.store(partials_ptr + tile.to(tl.int64) * 2 + 1, normalized_sq)


@triton.jit
def _norm_ratio_kernel(partials_ptr, ratio_ptr, tiles_per_matrix, eps, BLOCK: tl.constexpr):
    """Bytes: 8 per row tile, 4 per matrix."""
    matrix = tl.program_id(0).to(tl.int64)
    norm_sq = tl.zeros((BLOCK,), dtype=tl.float32)
    normalized_sq = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, tiles_per_matrix, BLOCK):
        tiles = start + tl.arange(0, BLOCK)
        mask = tiles < tiles_per_matrix
        offsets = (matrix * tiles_per_matrix + tiles) * 2
        norm_sq += tl.load(partials_ptr + offsets, mask=mask, other=0.0)
        normalized_sq += tl.load(partials_ptr + offsets + 1, mask=mask, other=0.0)
    norm = tl.sqrt_rn(tl.sum(norm_sq, axis=0))
    normalized = tl.sqrt_rn(tl.sum(normalized_sq, axis=0))
    tl.store(ratio_ptr + matrix, tl.div_rn(norm, normalized + eps))


@triton.jit
def _apply_kernel(
    param_ptr,
    update_ptr,
    second_moment_ptr,
    ratio_ptr,
    m,
    n,
    row_tiles,
    col_tiles,
    decay,
    step,
    eps,
    CAUTIOUS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Bytes per element: reads p and O, writes p: 2·|p| + |O| (12 in fp32; v and the ratio are
    per row / per matrix)."""
    tile = tl.program_id(0)
    tiles_per_matrix = row_tiles * col_tiles
    matrix = tile // tiles_per_matrix
    within = tile % tiles_per_matrix
    rows = (within // col_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (within % col_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < m
    mask = row_mask[:, None] & (cols < n)[None, :]
    global_rows = matrix.to(tl.int64) * m + rows
    offsets = (global_rows * n)[:, None] + cols[None, :]
    v = tl.load(second_moment_ptr + global_rows, mask=row_mask, other=0.0).to(tl.float32)
    row_scale = tl.div_rn(tl.full((BLOCK_M,), 1.0, tl.float32), tl.sqrt_rn(v) + eps)
    ratio = tl.load(ratio_ptr + matrix)
    o = tl.load(update_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(param_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    o_hat = (o * row_scale[:, None]) * ratio
    decayed = p * decay
    if CAUTIOUS:  # decay only where the step and the parameter agree in sign
        decayed = tl.where(o_hat * p >= 0, decayed, p)
    result = decayed - step * o_hat
    tl.store(param_ptr + offsets, result.to(param_ptr.dtype.element_ty), mask=mask)


def _tile(rows: int, cols: int, elements: int) -> tuple[int, int]:
    block_n = min(triton.next_power_of_2(max(cols, 1)), MAX_BLOCK_N)
    block_m = max(1, min(elements // block_n, triton.next_power_of_2(max(rows, 1))))
    return block_m, block_n


def _supports(param, update, second_moment, *_) -> str | None:
    return unsupported_tensors(param=param, update=update, second_moment=second_moment)


@register_kernel("normuon_step_", "triton", supports=_supports)
def normuon_step_(
    param: torch.Tensor,
    update: torch.Tensor,
    second_moment: torch.Tensor,
    lr: float,
    weight_decay: float,
    beta2: float,
    eps: float,
    scale: float,
    cautious: bool = False,
) -> None:
    m, n = param.shape[-2], param.shape[-1]
    if m == 0 or second_moment.numel() == 0:
        return
    matrices = second_moment.numel() // m
    device = param.device
    with device_guard(param):
        block_m, block_n = _tile(m, n, ROW_TILE_ELEMENTS)
        tiles_per_matrix = triton.cdiv(m, block_m)
        partials = torch.empty((matrices * tiles_per_matrix, 2), dtype=torch.float32, device=device)
        _row_stats_kernel[(matrices * tiles_per_matrix,)](
            update,
            second_moment,
            partials,
            m,
            n,
            float(max(n, 1)),
            tiles_per_matrix,
            1.0 - beta2,
            eps,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            num_warps=NUM_WARPS,
        )
        if n == 0:
            return  # v moved toward 0; param has no elements
        ratio = torch.empty((matrices,), dtype=torch.float32, device=device)
        reduce_block = min(triton.next_power_of_2(tiles_per_matrix), 1024)
        _norm_ratio_kernel[(matrices,)](partials, ratio, tiles_per_matrix, eps, BLOCK=reduce_block)
        block_m, block_n = _tile(m, n, APPLY_TILE_ELEMENTS)
        row_tiles, col_tiles = triton.cdiv(m, block_m), triton.cdiv(n, block_n)
        _apply_kernel[(matrices * row_tiles * col_tiles,)](
            param,
            update,
            second_moment,
            ratio,
            m,
            n,
            row_tiles,
            col_tiles,
            1.0 - lr * weight_decay,
            lr * scale,
            eps,
            CAUTIOUS=cautious,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            num_warps=NUM_WARPS,
        )
