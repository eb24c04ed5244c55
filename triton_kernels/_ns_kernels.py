"""Triton kernels of the Newton–Schulz iteration; the launcher and the FLOP counts are in newton_schulz.py.

Every kernel takes pointers plus explicit strides, runs one matrix of the stack per program_id(1) and
forms its batch and row offsets in int64 (`_batch_offset`, `_row_offset`): a stack such as
320 x 2560 x 3072 puts batch offsets past 2^31 elements. Products accumulate in fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import combine_scaled_sums, pow2, rescale_exponent


@triton.jit
def _batch_offset(batch, batch_stride):
    """Element offset of matrix `batch` of a stack, in int64 whatever the width of its operands."""
    return batch.to(tl.int64) * batch_stride


@triton.jit
def _row_offset(index, stride):
    """Element offsets index * stride in int64 (a single matrix can hold more than 2^31 elements)."""
    return index.to(tl.int64) * stride


@triton.jit
def _sum_squares_kernel(
    g_ptr, partial_ptr, m, n, stride_gb, stride_gm, stride_gn, num_partials,
    ACC_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """partial[b, p] = sum of G[b]² over the tiles p, p + P, p + 2P, ... of matrix b (P = num_partials),
    and partial[b, P + p] its exponent e (the sum is partial·4^e; 0 unless the squares of finite entries
    overflowed, and then the tiles are summed again divided by 2^e: `rescale_exponent`).

    Several programs per matrix keep a lone large matrix from being read by a single SM; the partial
    sums are finished in the scale kernel, so the result does not depend on atomics' order.
    """
    WIDE: tl.constexpr = ACC_DTYPE == tl.float64
    part = tl.program_id(0)
    batch = tl.program_id(1)
    g_ptr += _batch_offset(batch, stride_gb)
    tiles_c = tl.cdiv(n, BLOCK_C)
    num_tiles = tl.cdiv(m, BLOCK_R) * tiles_c
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC_DTYPE)
    peak = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC_DTYPE)
    for tile in range(part, num_tiles, num_partials):
        rows = (tile // tiles_c) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = (tile % tiles_c) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (rows[:, None] < m) & (cols[None, :] < n)
        ptrs = g_ptr + _row_offset(rows, stride_gm)[:, None] + _row_offset(cols, stride_gn)[None, :]
        x = tl.load(ptrs, mask=mask, other=0.0).to(ACC_DTYPE)
        acc += x * x
        peak = tl.maximum(peak, tl.abs(x))
    total = tl.sum(acc)
    exponent = rescale_exponent(total, tl.max(peak), WIDE)
    if exponent != 0:  # rare: finite entries whose squares overflow; read the tiles again, scaled
        scale = pow2(-exponent, WIDE)
        acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC_DTYPE)
        for tile in range(part, num_tiles, num_partials):
            rows = (tile // tiles_c) * BLOCK_R + tl.arange(0, BLOCK_R)
            cols = (tile % tiles_c) * BLOCK_C + tl.arange(0, BLOCK_C)
            mask = (rows[:, None] < m) & (cols[None, :] < n)
            ptrs = g_ptr + _row_offset(rows, stride_gm)[:, None] + _row_offset(cols, stride_gn)[None, :]
            x = tl.load(ptrs, mask=mask, other=0.0).to(ACC_DTYPE) * scale
            acc += x * x
        total = tl.sum(acc)
    row = partial_ptr + _batch_offset(batch, 2 * num_partials)
    tl.store(row + part, total)
    tl.store(row + num_partials + part, exponent.to(ACC_DTYPE))


@triton.jit
def _scale_cast_kernel(
    g_ptr, partial_ptr, x_ptr, m, n, stride_gb, stride_gm, stride_gn, stride_xb, safety, eps,
    ACC_DTYPE: tl.constexpr, NUM_PARTIALS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """X[b] = G[b] / (safety·‖G[b]‖_F + eps), computed in ACC_DTYPE, stored in X's dtype (m x n rows).

    Overflow-safe as fastoptim.reference.frobenius_normalized: with ‖G‖² = total·4^e (e = 0 unless the
    squares overflowed), X = (G·2^-e) / (safety·√total + eps·2^-e), the same bits as G / (safety·‖G‖ + eps)
    when e = 0."""
    WIDE: tl.constexpr = ACC_DTYPE == tl.float64
    tile = tl.program_id(0)
    batch = tl.program_id(1)
    row = partial_ptr + _batch_offset(batch, 2 * NUM_PARTIALS)
    partials = tl.load(row + tl.arange(0, NUM_PARTIALS))
    exponents = tl.load(row + NUM_PARTIALS + tl.arange(0, NUM_PARTIALS)).to(tl.int32)
    total, exponent = combine_scaled_sums(partials, exponents, WIDE)
    scale = pow2(-exponent, WIDE)
    # IEEE-rounded sqrt and division (tl.sqrt and "/" compile to sqrt.approx.ftz / div.full on a GPU: up
    # to 2 ulp off, and a subnormal ‖G‖² would be flushed to zero); fp64 is IEEE either way.
    if ACC_DTYPE == tl.float64:
        denominator = tl.sqrt(total) * safety + eps * scale
    else:
        denominator = tl.sqrt_rn(total) * safety + eps * scale
    tiles_c = tl.cdiv(n, BLOCK_C)
    rows = (tile // tiles_c) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (tile % tiles_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < m) & (cols[None, :] < n)
    g_ptrs = g_ptr + _batch_offset(batch, stride_gb) + _row_offset(rows, stride_gm)[:, None]
    g = tl.load(g_ptrs + _row_offset(cols, stride_gn)[None, :], mask=mask, other=0.0).to(ACC_DTYPE) * scale
    if ACC_DTYPE == tl.float64:
        x = (g / denominator).to(x_ptr.dtype.element_ty)
    else:
        x = tl.div_rn(g, denominator).to(x_ptr.dtype.element_ty)
    x_ptrs = x_ptr + _batch_offset(batch, stride_xb) + _row_offset(rows, n)[:, None] + cols[None, :]
    tl.store(x_ptrs, x, mask=mask)


@triton.jit
def _tile_product(
    p_ptr, q_ptr, rows, cols, num_rows, num_cols, K, stride_pi, stride_pk, stride_qk, stride_qj,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """(P Q)[rows, cols] in fp32, P[i, k] at p_ptr + i·stride_pi + k·stride_pk, Q[k, j] likewise (the
    pointer path: masked loads, cp.async on sm_80 and sm_90).

    UPCAST converts 16-bit tiles to fp32 before tl.dot: the interpreter's bf16 dot is wrong, and the
    fp32 dot of bf16 values is what the GPU's bf16 dot with fp32 accumulation computes. "ieee" keeps
    fp32 operands out of TF32, as torch's fp32 matmul does by default (16-bit operands ignore it).
    """
    ks = tl.arange(0, BLOCK_K)
    p_rows = p_ptr + _row_offset(rows, stride_pi)[:, None]
    q_cols = q_ptr + _row_offset(cols, stride_qj)[None, :]
    row_mask = rows[:, None] < num_rows
    col_mask = cols[None, :] < num_cols
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        k_mask = k < K
        p = tl.load(p_rows + _row_offset(k, stride_pk)[None, :], mask=row_mask & k_mask[None, :], other=0.0)
        q = tl.load(q_cols + _row_offset(k, stride_qk)[:, None], mask=k_mask[:, None] & col_mask, other=0.0)
        if UPCAST:
            p = p.to(tl.float32)
            q = q.to(tl.float32)
        acc = tl.dot(p, q, acc, input_precision="ieee")
    return acc


@triton.jit
def _descriptor_tile(
    desc, batch, first_row, first_col, TRANSPOSED: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
):
    """The ROWS x COLS tile at (first_row, first_col) of matrix `batch` of an operand read through a 3-D
    descriptor over its row-major storage (batch, r, c). TRANSPOSED: the storage holds the operand's
    transpose (Xᵀ of X Xᵀ, of XᵀX), so the descriptor's block is COLS x ROWS, transposed in shared memory.
    Rows and columns past the matrix's edge read as zeros (the descriptor's bounds are per matrix)."""
    if TRANSPOSED:
        tile = tl.trans(tl.reshape(desc.load([batch, first_col, first_row]), (COLS, ROWS)))
    else:
        tile = tl.reshape(desc.load([batch, first_row, first_col]), (ROWS, COLS))
    return tile


@triton.jit
def _tile_product_tma(
    p_desc, q_desc, batch, first_row, first_col, K,
    P_TRANSPOSED: tl.constexpr, Q_TRANSPOSED: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """(P Q)[first_row:+BLOCK_M, first_col:+BLOCK_N] of matrix `batch` in fp32, P and Q read by TMA (the
    descriptor path: no masks, the copy engine zero-fills past the edges)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        p = _descriptor_tile(p_desc, batch, first_row, k0, P_TRANSPOSED, BLOCK_M, BLOCK_K)
        q = _descriptor_tile(q_desc, batch, k0, first_col, Q_TRANSPOSED, BLOCK_K, BLOCK_N)
        if UPCAST:
            p = p.to(tl.float32)
            q = q.to(tl.float32)
        acc = tl.dot(p, q, acc, input_precision="ieee")
    return acc


@triton.jit
def _symmetric_tile(
    p_ptr, q_ptr, addend_ptr, out_ptr, tile, batch, matrix, size, K,
    stride_pb, stride_pi, stride_pk, stride_qb, stride_qk, stride_qj, alpha, beta,
    HAS_ADDEND: tl.constexpr, UPCAST: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
    TMA: tl.constexpr, P_TRANSPOSED: tl.constexpr, Q_TRANSPOSED: tl.constexpr,
):
    """Tile `tile` (of the upper triangle of the tile grid) of matrix `batch`, which starts at element
    `matrix` (int64) of OUT and ADDEND: see _symmetric_product_kernel."""
    # tile = hi·(hi + 1)/2 + lo with lo <= hi; the float root can be off by one, so correct it.
    hi = ((tl.sqrt(8.0 * tile + 1.0) - 1.0) * 0.5).to(tl.int32)
    hi = tl.where((hi + 1) * (hi + 2) // 2 <= tile, hi + 1, hi)
    hi = tl.where(hi * (hi + 1) // 2 > tile, hi - 1, hi)
    lo = tile - hi * (hi + 1) // 2
    rows = lo * BLOCK + tl.arange(0, BLOCK)
    cols = hi * BLOCK + tl.arange(0, BLOCK)
    if TMA:
        acc = _tile_product_tma(p_ptr, q_ptr, batch, lo * BLOCK, hi * BLOCK, K, P_TRANSPOSED, Q_TRANSPOSED,
                                UPCAST, BLOCK, BLOCK, BLOCK_K)
    else:
        acc = _tile_product(
            p_ptr + _batch_offset(batch, stride_pb), q_ptr + _batch_offset(batch, stride_qb),
            rows, cols, size, size, K, stride_pi, stride_pk, stride_qk, stride_qj, UPCAST, BLOCK, BLOCK, BLOCK_K,
        )
    in_range = (rows[:, None] < size) & (cols[None, :] < size)
    tile_offsets = matrix + _row_offset(rows, size)[:, None] + cols[None, :]
    if HAS_ADDEND:
        if TMA:  # addend_ptr is a descriptor too: no per-element addresses for this load
            addend = _descriptor_tile(addend_ptr, batch, lo * BLOCK, hi * BLOCK, False, BLOCK, BLOCK)
        else:
            addend = tl.load(addend_ptr + tile_offsets, mask=in_range, other=0.0)
        acc = acc * alpha + beta * addend.to(tl.float32)
    else:
        acc = acc * alpha
    result = acc.to(out_ptr.dtype.element_ty)
    mirror_offsets = matrix + _row_offset(cols, size)[:, None] + rows[None, :]
    mirror_in_range = (cols[:, None] < size) & (rows[None, :] < size)
    # A triangle mask varies along a row, so a masked triangle compiles to one 2-byte store per element;
    # the edge masks are constant over runs of 8 columns (size % 16 == 0), so whole tiles store 16 bytes
    # at a time. An off-diagonal tile stores itself and its mirror whole; the diagonal tile stores itself
    # once, its strict lower half taken from its own transpose (exactly symmetric, each element written
    # once), not as two triangle-masked stores (scalar, and 40% more registers: past two CTAs per SM).
    if lo == hi:
        tl.store(out_ptr + tile_offsets, tl.where(rows[:, None] <= cols[None, :], result, tl.trans(result)),
                 mask=in_range)
    else:
        tl.store(out_ptr + tile_offsets, result, mask=in_range)
        tl.store(out_ptr + mirror_offsets, tl.trans(result), mask=mirror_in_range)


@triton.jit
def _symmetric_product_kernel(
    p_ptr, q_ptr, addend_ptr, out_ptr, size, K,
    stride_pb, stride_pi, stride_pk, stride_qb, stride_qk, stride_qj, stride_ob, alpha, beta,
    HAS_ADDEND: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
    num_matrices=1, PERSISTENT: tl.constexpr = False,
    TMA: tl.constexpr = False, P_TRANSPOSED: tl.constexpr = False, Q_TRANSPOSED: tl.constexpr = False,
):
    """OUT = alpha·(P Q) + beta·ADDEND for a product P Q known to be symmetric (size x size).

    One work item per tile on or above the diagonal (the upper triangle of the tile grid); it writes its
    tile and the transpose, so half the tiles' products are computed. On a diagonal tile the upper half
    (diagonal included) is kept and the strict lower half is taken from the tile's transpose, so OUT is
    exactly symmetric and no element is written twice. OUT and ADDEND are contiguous stacks. FLOPs per
    tile: 2·BLOCK²·K; the stores are whole 16-byte vectors.

    Grid launch: program_id(0) is the tile, program_id(1) the matrix. PERSISTENT: a 1-D grid of any size
    whose programs take the num_matrices x triangle work items in turn, matrix-major (programs running
    together share a matrix in L2). TMA: p_ptr and q_ptr are 3-D tensor descriptors over the storage of
    P and Q (P_TRANSPOSED / Q_TRANSPOSED: of Pᵀ / Qᵀ) and their strides are not read.
    """
    if PERSISTENT:
        tiles = tl.cdiv(size, BLOCK)
        triangle = tiles * (tiles + 1) // 2
        for item in range(tl.program_id(0), triangle * num_matrices, tl.num_programs(0)):
            batch = item // triangle
            _symmetric_tile(
                p_ptr, q_ptr, addend_ptr, out_ptr, item % triangle, batch, _batch_offset(batch, stride_ob), size, K,
                stride_pb, stride_pi, stride_pk, stride_qb, stride_qk, stride_qj, alpha, beta,
                HAS_ADDEND, UPCAST, BLOCK, BLOCK_K, TMA, P_TRANSPOSED, Q_TRANSPOSED,
            )
    else:
        tile = tl.program_id(0)
        batch = tl.program_id(1)
        _symmetric_tile(
            p_ptr, q_ptr, addend_ptr, out_ptr, tile, batch, _batch_offset(batch, stride_ob), size, K,
            stride_pb, stride_pi, stride_pk, stride_qb, stride_qk, stride_qj, alpha, beta,
            HAS_ADDEND, UPCAST, BLOCK, BLOCK_K, TMA, P_TRANSPOSED, Q_TRANSPOSED,
        )


@triton.jit
def _axpy_tile(
    p_ptr, q_ptr, x_ptr, out_ptr, pid, batch, matrix, M, N, K,
    stride_pb, stride_pi, stride_pk, stride_qb, stride_qk, stride_qj, alpha,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, TMA: tl.constexpr, P_TRANSPOSED: tl.constexpr, Q_TRANSPOSED: tl.constexpr,
):
    """Tile `pid` of matrix `batch`, which starts at element `matrix` (int64) of X and OUT: see
    _product_axpy_kernel."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    group_width = GROUP_M * tiles_n
    first_m = (pid // group_width) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_width) % group_rows
    pid_n = (pid % group_width) // group_rows
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if TMA:
        acc = _tile_product_tma(p_ptr, q_ptr, batch, pid_m * BLOCK_M, pid_n * BLOCK_N, K, P_TRANSPOSED, Q_TRANSPOSED,
                                UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        acc = _tile_product(
            p_ptr + _batch_offset(batch, stride_pb), q_ptr + _batch_offset(batch, stride_qb),
            rows, cols, M, N, K, stride_pi, stride_pk, stride_qk, stride_qj,
            UPCAST, BLOCK_M, BLOCK_N, BLOCK_K,
        )
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    offsets = matrix + _row_offset(rows, N)[:, None] + cols[None, :]
    acc += alpha * tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _product_axpy_kernel(
    p_ptr, q_ptr, x_ptr, out_ptr, M, N, K,
    stride_pb, stride_pi, stride_pk, stride_qb, stride_qk, stride_qj, stride_xb, alpha,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    num_matrices=1, PERSISTENT: tl.constexpr = False,
    TMA: tl.constexpr = False, P_TRANSPOSED: tl.constexpr = False, Q_TRANSPOSED: tl.constexpr = False,
):
    """OUT = P Q + alpha·X (M x N; X and OUT contiguous stacks). Tiles are visited in groups of
    GROUP_M tile rows so that the programs running together share their P and Q tiles in L2.

    Grid launch: program_id(0) is the tile, program_id(1) the matrix; PERSISTENT and TMA as in
    _symmetric_product_kernel (work items matrix-major, each matrix's tiles in the grouped order)."""
    if PERSISTENT:
        tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for item in range(tl.program_id(0), tiles * num_matrices, tl.num_programs(0)):
            batch = item // tiles
            _axpy_tile(
                p_ptr, q_ptr, x_ptr, out_ptr, item % tiles, batch, _batch_offset(batch, stride_xb), M, N, K,
                stride_pb, stride_pi, stride_pk, stride_qb, stride_qk, stride_qj, alpha,
                UPCAST, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, TMA, P_TRANSPOSED, Q_TRANSPOSED,
            )
    else:
        pid = tl.program_id(0)
        batch = tl.program_id(1)
        _axpy_tile(
            p_ptr, q_ptr, x_ptr, out_ptr, pid, batch, _batch_offset(batch, stride_xb), M, N, K,
            stride_pb, stride_pi, stride_pk, stride_qb, stride_qk, stride_qj, alpha,
            UPCAST, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, TMA, P_TRANSPOSED, Q_TRANSPOSED,
        )
