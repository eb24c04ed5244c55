"""What the Triton kernel families share: torch's lerp, the device guard, the dtype/layout check,
and the multi-tensor chunk table.

Multi-tensor mechanism (Sophia, the Hessian EMA, Muon's bucket momentum): every tensor of the lists
is cut into chunks of CHUNK elements; one table row per chunk holds the i-th tensors' addresses (as
int64, from data_ptr()), the tensors' element count and the chunk's index within them. One program
handles one chunk: it loads its row and casts the addresses to typed pointers (`table_pointer`). A list of
a stack's slices (the Newton-Schulz stack of a bucket) holds byte offsets into the stack instead, added to
the stack's address, a kernel argument (`stack_pointer`): its tables then do not depend on where the stack
(allocated every step) lands, so they are reused from step to step, and by a CUDA graph's capture.
Nothing is copied or concatenated; tensors are grouped by their dtype combination (element types are
compile-time constants), one launch per group. Tables are cached by their content (addresses, sizes,
dtypes), so an optimizer whose state does not move builds and uploads each table once.

CUDA graphs: a table a capture uses is kept for the life of the process (`_captured_tables`), never
evicted: the graph holds its address, and freeing it would let the allocator hand that memory to another
tensor behind the graph's back. A capture first reuses a table an eager step built (the warm-up a capture
needs) for the same tensors, from any stream of the device: `torch.cuda.graph` synchronizes the device
before it captures, so that upload has finished. Tensors first seen by the capture (a whole training
step captured: gradients in the graph's pool) get a table built during the capture: its pinned host copy
becomes a copy node that every replay runs, so the host buffer is kept alive too. Where the installed
torch cannot pin memory during a capture, the error says what to do.
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


@triton.jit
def stack_pointer(row_ptr, column: tl.constexpr, base, dtype: tl.constexpr, ALIGNED: tl.constexpr):
    """The typed pointer to a stack's slice: `base` (the stack's address) plus the byte offset stored in
    column `column` of a chunk-table row (`chunk_tables(..., stacks=...)`)."""
    pointer = (tl.load(row_ptr + column) + base).to(tl.pointer_type(dtype))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


_Tables = list[tuple[tuple[torch.dtype, ...], bool, torch.Tensor]]
_table_cache: OrderedDict[tuple, _Tables] = OrderedDict()
_captured_tables: dict[tuple, _Tables] = {}  # tables a CUDA graph reads: never evicted
_host_rows: dict[int, torch.Tensor] = {}  # pinned host rows of tables uploaded during a capture


def _current_stream(device: torch.device) -> int | None:
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def chunk_tables(
    lists: tuple[list[torch.Tensor], ...], device: torch.device, stacks: dict[int, torch.Tensor] | None = None
) -> _Tables:
    """For each dtype combination of the i-th tensors of `lists`: (dtypes, aligned, table), where
    table is an int64 (chunks, len(lists) + 2) tensor on `device` with rows
    (address of each list's tensor..., numel, chunk index). Empty tensors get no rows. `stacks` maps
    the index of a list of slices of one stack tensor to that stack: that column holds each slice's byte
    offset in the stack (`stack_pointer`), and `aligned` also requires the stack's address to be aligned.

    The cache key holds the current stream: a table is uploaded (non-blocking) on the stream that built
    it, and only kernels on that stream are ordered after the upload. Rows are filled per tensor with
    numpy slices, not built as Python lists per chunk (a 7B-parameter list has ~430k chunks).
    Under a CUDA graph capture, see the module docstring."""
    stacks = stacks or {}
    bases = tuple(stacks[i].data_ptr() if i in stacks else 0 for i in range(len(lists)))
    entries = []
    for tensors in zip(*lists):
        numel = tensors[0].numel()
        if numel:
            addresses = tuple(t.data_ptr() - base for t, base in zip(tensors, bases))
            entries.append((tuple(t.dtype for t in tensors), addresses, numel))
    content = (device, CHUNK, tuple(sorted(stacks)), tuple(entries))
    key = (_current_stream(device), *content)
    tables = _cached_tables(key, content, entries, len(lists), device)
    if all(base % ALIGNMENT == 0 for base in bases):
        return tables
    return [(dtypes, False, table) for dtypes, _, table in tables]


def _cached_tables(key: tuple, content: tuple, entries: list, columns: int, device: torch.device) -> _Tables:
    if _capturing(device):
        return _captured(key, content, entries, columns, device)
    cached = _captured_tables.get(key)
    if cached is not None:
        return cached
    cached = _table_cache.get(key)
    if cached is not None:
        _table_cache.move_to_end(key)
        return cached
    tables = _build_tables(entries, columns, device)
    _table_cache[key] = tables
    if len(_table_cache) > TABLE_CACHE_SIZE:
        _table_cache.popitem(last=False)
    return tables


def _captured(key: tuple, content: tuple, entries: list, columns: int, device: torch.device) -> _Tables:
    """The tables a capture on `key`'s stream uses, moved out of the LRU cache so that they live as long
    as the graph: the capture stream's own, else one an eager step built for the same tensors on another
    stream of the device, else tables built now."""
    tables = _captured_tables.get(key)
    if tables is not None:
        return tables
    for cache in (_table_cache, _captured_tables):
        for cached_key, cached in list(cache.items()):
            if cached_key[1:] == content:
                _table_cache.pop(cached_key, None)
                _captured_tables[cached_key] = cached
                _captured_tables[key] = cached
                return cached
    try:
        tables = _build_tables(entries, columns, device, keep_host=True)
    except RuntimeError as error:
        raise RuntimeError(
            "fastoptim's Triton multi-tensor kernels (Muon's momentum and apply stacks, NorMuon, Sophia, the "
            "Hessian EMA) could not build a chunk table during this CUDA graph capture (this torch cannot "
            "copy pinned host memory while capturing): run the step eagerly once before capturing, on the "
            "same parameters, states and gradients, so the capture reuses its tables; or use backend='cuda'"
        ) from error
    _captured_tables[key] = tables
    return tables


def _build_tables(entries: list, columns: int, device: torch.device, keep_host: bool = False) -> _Tables:
    """The tables of `entries` on `device`; with keep_host, each CUDA table keeps its pinned host copy
    alive (`_host_rows`): a captured upload reads it again at every replay."""
    groups: dict[tuple[torch.dtype, ...], list[tuple[tuple[int, ...], int]]] = {}
    for dtypes, addresses, numel in entries:
        groups.setdefault(dtypes, []).append((addresses, numel))
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
            host = table.pin_memory()
            table = host.to(device, non_blocking=True)
            if keep_host:
                _host_rows[table.data_ptr()] = host
        tables.append((dtypes, aligned, table))
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
