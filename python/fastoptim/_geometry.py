"""How a parameter is read as matrices, and what each matrix costs: the geometry every layout shares.

A parameter of a matrix group is one or more *matrices*, each orthogonalized on its own:

- a 2-D weight (m, n) is one matrix;
- ``matrix_view="stack"`` (the default for 3-D tensors): every leading dimension indexes a matrix of
  the last two — an MoE expert bank (E, m, n) is E matrices (m, n), each with its own shape scale and
  (NorMuon) its own row statistics;
- ``matrix_view="flatten"`` (the default for 4-D and larger: conv kernels): one matrix
  (shape[0], numel / shape[0]) — a Conv2d kernel (out, in, kh, kw) reads as (out, in·kh·kw). A Conv1d
  kernel (out, in, k) is 3-D: give its group ``matrix_view="flatten"`` (`fastoptim.param_groups` does);
- ``matrix_view="transposed"``: weights stored (in, out), as transformers' GPT-2-style ``Conv1D``
  (y = x W + b): read like "stack", but the layer's matrix is the transpose of the stored one. The
  engine keeps the stored orientation for the momentum and Newton–Schulz (NS(Gᵀ) = NS(G)ᵀ), and only
  the orientation-dependent parts read (out, in): the shape scale and the row statistics (NorMuon's
  ``second_moment`` has one value per output neuron, shape (*batch, out)). NorMuon's apply then works on
  bucket-sized transposed copies of the Newton–Schulz output and of its direction (never of a parameter).
  No ``split_sizes`` and no DTensor parameters (refused when the group is added);
- ``split_sizes`` cuts the rows of every matrix into blocks orthogonalized separately (per-head or
  split-QKV).

A `Matrix` names one block by basic indexing — ``t[index][r0:r1]`` — so the same rule gives a view (never
a copy) of the parameter, its gradient, its momentum buffer and (rows only) its row statistics,
whatever their strides. Ops read such views in logical row-major order as (rows, cols) matrices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from torch import Tensor

from . import ns_methods

SCALE_MODES = ("original", "match_rms_adamw", "spectral")
MATRIX_VIEWS = ("auto", "stack", "flatten", "transposed")


def shape_scale(mode: str, m: int, n: int) -> float:
    """The learning-rate multiplier of an (m, n) update for a scale mode."""
    if mode == "original":
        return max(1.0, m / n) ** 0.5
    if mode == "match_rms_adamw":
        return 0.2 * math.sqrt(max(m, n))
    if mode == "spectral":
        return math.sqrt(m / n)
    raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {mode!r}")


def reads_as_stack(shape: Sequence[int], matrix_view: str) -> bool:
    """Whether a tensor of this shape is a stack of matrices (its leading dimensions index matrices)."""
    ndim = len(shape)
    return ndim >= 3 and (matrix_view in ("stack", "transposed") or (matrix_view == "auto" and ndim == 3))


def matrix_form(shape: Sequence[int], matrix_view: str) -> tuple[tuple[int, ...], int, int]:
    """(batch shape, m, n): the matrices a parameter of this shape is orthogonalized as."""
    shape = tuple(shape)
    if reads_as_stack(shape, matrix_view):
        return shape[:-2], shape[-2], shape[-1]
    m = shape[0]
    return (), m, (math.prod(shape[1:]))


def layer_form(shape: Sequence[int], matrix_view: str) -> tuple[tuple[int, ...], int, int]:
    """(batch shape, out, in): the matrices as the layer reads them — `matrix_form` with its last two sizes
    swapped for ``"transposed"`` (weights stored (in, out)). The shape scale and row statistics use it."""
    batch, m, n = matrix_form(shape, matrix_view)
    return (batch, n, m) if matrix_view == "transposed" else (batch, m, n)


def row_blocks(split_sizes: Sequence[int] | None, m: int) -> list[tuple[int, int]]:
    """Row ranges [r0, r1) of the blocks orthogonalized separately."""
    if split_sizes is None:
        return [(0, m)]
    bounds = [0]
    for size in split_sizes:
        bounds.append(bounds[-1] + size)
    return list(zip(bounds[:-1], bounds[1:]))


class Matrix(NamedTuple):
    """One matrix of a parameter: rows [r0, r1) of matrix `index` (an index into the batch dimensions)."""

    index: tuple[int, ...]
    r0: int
    r1: int
    whole: bool  # the whole tensor (no batch index, all rows): its views are the tensors themselves
    transposed: bool = False  # stored (in, out) (matrix_view="transposed"): its row statistics are per column

    @property
    def rows(self) -> int:
        return self.r1 - self.r0

    def of(self, t: Tensor) -> Tensor:
        """This matrix's view of a parameter-shaped tensor (parameter, gradient, momentum buffer)."""
        if self.whole:
            return t
        if self.index:
            t = t[self.index]
        return t[self.r0 : self.r1]

    def rows_of(self, row_state: Tensor) -> Tensor:
        """This matrix's view of a (*batch, m) per-row statistic ((*batch, out) when transposed: all of it, as a
        transposed matrix has no row blocks)."""
        if self.index:
            row_state = row_state[self.index]
        return row_state if self.transposed else row_state[self.r0 : self.r1]


def matrices(shape: Sequence[int], matrix_view: str, split_sizes: Sequence[int] | None) -> list[Matrix]:
    """The matrices of a parameter of this shape, in order (matrix-major, then row blocks)."""
    batch, m, n = matrix_form(shape, matrix_view)
    blocks = row_blocks(split_sizes, m)
    out = []
    for flat in range(math.prod(batch)):
        index = _unravel(flat, batch)
        for r0, r1 in blocks:
            out.append(Matrix(index, r0, r1, not index and (r0, r1) == (0, m), matrix_view == "transposed"))
    return out


def _unravel(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    index = []
    for size in reversed(shape):
        index.append(flat % size)
        flat //= size
    return tuple(reversed(index))


def newton_schulz_flops(
    m: int, n: int, steps: int, method: str = "standard", restarts: Sequence[int] | None = None
) -> int:
    """FLOPs of Newton–Schulz on one (m, n) matrix with `method` (and Gram's `restarts`), every product a full
    GEMM: standard, per iteration with s = min(m, n) and l = max(m, n), the Gram matrix (2s²l), the
    polynomial in it (2s³) and the product with X (2s²l); gram as `fastoptim.ns_methods.flops`."""
    return ns_methods.gemm_flops(m, n, steps, method, restarts)


def assign_work(buckets: Sequence[tuple[int, int]], world: int) -> list[list[int]]:
    """Owner rank of every item of every bucket, from (item count, FLOPs per item) per bucket.

    Each bucket is cut into min(count, world) near-equal chunks (a chunk stays one batched
    Newton–Schulz call); the chunks go, largest first, to the least-loaded rank (ties: the lower
    bucket, chunk and rank), so every rank computes the same answer.
    """
    chunks = []
    for b, (count, flops) in enumerate(buckets):
        parts = min(count, world)
        bounds = [count * c // parts for c in range(parts + 1)] if parts else [0]
        chunks += [(flops * (stop - start), b, start, stop) for start, stop in zip(bounds[:-1], bounds[1:])]
    owners = [[0] * count for count, _ in buckets]
    load = [0] * world
    for cost, b, start, stop in sorted(chunks, key=lambda c: (-c[0], c[1], c[2])):
        rank = min(range(world), key=lambda r: (load[r], r))
        load[rank] += cost
        owners[b][start:stop] = [rank] * (stop - start)
    return owners


def row_bounds(m: int, world: int) -> list[tuple[int, int]]:
    """Rows [start, stop) of each rank under Shard(0): torch.chunk's split (ceil(m/W) rows each)."""
    chunk = -(-m // world) if m else 0
    return [(min(r * chunk, m), min((r + 1) * chunk, m)) for r in range(world)]
