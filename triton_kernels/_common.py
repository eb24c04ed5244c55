"""What the Triton kernel families share: torch's lerp, the device guard, the dtype/layout check,
and the multi-tensor chunk table.

Multi-tensor mechanism (Sophia, the Hessian EMA, Muon's bucket momentum): every tensor of the lists
is cut into chunks of CHUNK elements; one table row per chunk holds the i-th tensors' addresses (as
int64, from data_ptr()), the tensors' element count and the chunk's index within them. One program
handles one chunk: it loads its row and casts the addresses to typed pointers (`table_pointer`).
Nothing is copied or concatenated; tensors are grouped by their dtype combination (element types are
compile-time constants), one launch per group. Tables are cached by their content (addresses, sizes,
dtypes), so an optimizer whose state does not move builds and uploads each table once.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict

import numpy as np
import torch
import triton
import triton.language as tl

from .._validation import KERNEL_DTYPES

TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
CHUNK = 16384  # elements per program of a multi-tensor kernel
ALIGNMENT = 16  # bytes: addresses all aligned to this are hinted so loads vectorize
MAX_GRID_Y = 65535  # programs on a CUDA grid's second axis: longer batches are launched in slices
TABLE_CACHE_SIZE = 16  # tables are ~48 bytes per 16K-element chunk (a 7B list: ~20 MB on the device)


@triton.jit
def lerp(start, end, weight):
    """torch.lerp's formula: start + w·(end - start) for |w| < 0.5, else end - (end - start)·(1 - w)
    (exact at both ends). Shared with the other op families of this package."""
    return tl.where(
        tl.abs(weight) < 0.5, start + weight * (end - start), end - (end - start) * (1.0 - weight)
    )


def device_guard(tensor: torch.Tensor):
    """Launch on the tensor's GPU (Triton launches on the current device)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def unsupported_tensors(**tensors: torch.Tensor | None) -> str | None:
    """None when every given tensor can be handled by these kernels, else the reason."""
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if tensor.dtype not in KERNEL_DTYPES:
            return f"{name} has dtype {tensor.dtype}; the Triton kernels take float32, bfloat16 or float16"
        if not tensor.is_contiguous():
            stride = tuple(tensor.stride())
            return f"{name} is not contiguous (stride {stride}); the Triton kernels need dense tensors"
    return None


def unsupported_lists(**lists: list[torch.Tensor]) -> str | None:
    for name, tensors in lists.items():
        for i, tensor in enumerate(tensors):
            reason = unsupported_tensors(**{f"{name}[{i}]": tensor})
            if reason is not None:
                return reason
    return None


@triton.jit
def table_pointer(row_ptr, column: tl.constexpr, dtype: tl.constexpr, ALIGNED: tl.constexpr):
    """The typed pointer stored (as an int64 address) in column `column` of a chunk-table row."""
    pointer = tl.load(row_ptr + column).to(tl.pointer_type(dtype))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


_table_cache: OrderedDict[tuple, list[tuple[tuple[torch.dtype, ...], bool, torch.Tensor]]] = OrderedDict()


def chunk_tables(
    lists: tuple[list[torch.Tensor], ...], device: torch.device
) -> list[tuple[tuple[torch.dtype, ...], bool, torch.Tensor]]:
    """For each dtype combination of the i-th tensors of `lists`: (dtypes, aligned, table), where
    table is an int64 (chunks, len(lists) + 2) tensor on `device` with rows
    (address of each list's tensor..., numel, chunk index). Empty tensors get no rows.

    The cache key holds the current stream: a table is uploaded (non-blocking) on the stream that built
    it, and only kernels on that stream are ordered after the upload. Rows are filled per tensor with
    numpy slices, not built as Python lists per chunk (a 7B-parameter list has ~430k chunks)."""
    entries = []
    for tensors in zip(*lists):
        numel = tensors[0].numel()
        if numel:
            entries.append((tuple(t.dtype for t in tensors), tuple(t.data_ptr() for t in tensors), numel))
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    key = (device, stream, CHUNK, tuple(entries))
    cached = _table_cache.get(key)
    if cached is not None:
        _table_cache.move_to_end(key)
        return cached
    groups: dict[tuple[torch.dtype, ...], list[tuple[tuple[int, ...], int]]] = {}
    for dtypes, addresses, numel in entries:
        groups.setdefault(dtypes, []).append((addresses, numel))
    columns = len(lists)
    tables = []
    for dtypes, members in groups.items():
        counts = [triton.cdiv(numel, CHUNK) for _, numel in members]
        rows = np.empty((sum(counts), columns + 2), dtype=np.int64)
        start = 0
        for (addresses, numel), count in zip(members, counts):
            block = rows[start : start + count]
            block[:, :columns] = addresses
            block[:, columns] = numel
            block[:, columns + 1] = np.arange(count)
            start += count
        aligned = all(address % ALIGNMENT == 0 for addresses, _ in members for address in addresses)
        table = torch.from_numpy(rows)
        if device.type == "cuda":
            table = table.pin_memory().to(device, non_blocking=True)
        tables.append((dtypes, aligned, table))
    _table_cache[key] = tables
    if len(_table_cache) > TABLE_CACHE_SIZE:
        _table_cache.popitem(last=False)
    return tables


# Overflow-safe Frobenius norms (fastoptim.reference.frobenius_normalized): a reduction whose sum of squares
# overflows although every entry is finite sums again with its entries scaled by a power of two, and reports
# (sum, exponent) meaning sum·4^exponent. Scaling by a power of two is exact, so wherever nothing overflows
# the exponent is 0 and every result is bit for bit what the unscaled formula gives.


@triton.jit
def exponent_of(x, WIDE: tl.constexpr):
    """floor(log2 |x|) of a normal float32 x (WIDE: float64), read from its exponent bits; zero and
    subnormals give -127 (-1023), infinities and NaN 128 (1024)."""
    if WIDE:
        return ((x.to(tl.int64, bitcast=True) >> 52) & 0x7FF).to(tl.int32) - 1023
    else:
        return ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127


@triton.jit
def pow2(exponent, WIDE: tl.constexpr):
    """2^exponent, exactly, as a float32 (WIDE: float64) for an integer exponent up to 127 (1023); 0 below
    the normal range (-126; -1022), where a term scaled by it is negligible beside the largest."""
    if WIDE:
        biased = exponent.to(tl.int64) + 1023
        return tl.where(biased < 1, 0.0, (tl.maximum(biased, 1) << 52).to(tl.float64, bitcast=True))
    else:
        biased = exponent.to(tl.int32) + 127
        return tl.where(biased < 1, 0.0, (tl.maximum(biased, 1) << 23).to(tl.float32, bitcast=True))


@triton.jit
def rescale_exponent(total, largest, WIDE: tl.constexpr):
    """The power of two to divide a block's entries by before summing their squares again: 0 (no rescale)
    unless the sum of squares `total` overflowed while the largest |entry| is finite; then floor(log2 largest),
    at most 126 (1022) so that 2^-exponent is a normal number."""
    overflowed = (total == float("inf")) & (largest < float("inf"))
    return tl.where(overflowed, tl.minimum(exponent_of(largest, WIDE), 1022 if WIDE else 126), 0)


@triton.jit
def combine_scaled_sums(sums, exponents, WIDE: tl.constexpr):
    """(total, exponent) with total·4^exponent = Σ_p sums[p]·4^exponents[p], summed in index order; when
    every exponent is 0 and the sum does not overflow, total is the plain sum bit for bit and exponent 0.
    If the plain sum of finite terms overflows, every term is divided by 4^g first (g <= 64, or 512)."""
    top = tl.max(exponents, axis=0)
    terms = sums * pow2(2 * (exponents - top), WIDE)
    total = tl.sum(terms, axis=0)
    largest_term = tl.max(terms, axis=0)
    extra = tl.where(
        (total == float("inf")) & (largest_term < float("inf")), exponent_of(largest_term, WIDE) // 2 + 1, 0
    )
    shrink = pow2(-extra, WIDE)  # applied twice: 4^-extra may be below the normal range, 2^-extra is not
    total = tl.where(extra > 0, tl.sum(terms * shrink * shrink, axis=0), total)
    return total, top + extra
