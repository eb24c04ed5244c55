"""Triton kernels: the batched quintic Newton–Schulz iteration of Muon (K. Jordan et al., 2024).

Per matrix of a stack G (..., m, n), as `fastoptim.reference.newton_schulz`:

    X = G / (safety·‖G‖_F + eps)                      in fp32 (fp64 for fp64 G), cast to compute_dtype
    for each (a, b, c) of the schedule:
        wide (m <= n): A = X Xᵀ;  B = b A + c A²;  X = a X + B X
        tall (m > n):  A = XᵀX;   B = b A + c A²;  X = a X + X B

Kernels (in _ns_kernels.py), all batched over the stack with int64 batch offsets:
1. `_sum_squares_kernel`: partial sums of G² per matrix, P programs per matrix (P large when the stack
   is too short to fill the GPU, 1 for long stacks). A single kernel per matrix would read a lone
   8192² matrix with one SM; atomics would make the norm depend on scheduling.
2. `_scale_cast_kernel`: finishes the sum, and writes X = G / (safety·‖G‖ + eps) in compute_dtype. It
   reads G a second time; that pass costs O(m·n) bytes against the iteration's O(s²·l) FLOPs.
3. per iteration, three launches, all with fp32 accumulation:
   - `_symmetric_product_kernel` for A = X Xᵀ (tall: XᵀX, by strides: no transposed copy): only tiles on or
     above the diagonal are computed, each stored with its transpose.
   - `_symmetric_product_kernel` for B = c·A·A + b·A (A·A is symmetric; b·A fused into the epilogue).
   - `_product_axpy_kernel` for X' = B X + a·X (tall: X B + a·X), a·X fused into the epilogue.

FLOPs per iteration and matrix, with Gram size s = min(m, n) and l = max(m, n):
    X Xᵀ ≈ s²·l  (half of 2s²l, by symmetry);  A·A ≈ s³  (half of 2s³);  B·X = 2s²·l
    total ≈ 3s²l + s³, against 4s²l + 2s³ for three plain GEMMs.
Workspaces, allocated once per call: A and B (s x s each) and two X buffers that alternate.
Tiles (`_configs`): a table keyed on s; on a GPU, a launch whose 128-row grid would not give every SM a
program takes 64-row tiles (the small-grid rule), and on sm_90 aligned 16-bit 128-row tiles are capped at
128 registers per thread so that two CTAs share an SM. tests/test_triton_compile.py checks the compiled
kernels (16-byte epilogue stores, wgmma, registers, spills, the rule at 768 x 3072 on 132 SMs).

Operand loads (`_operands`): on sm_90 the products read P and Q through TMA tensor descriptors
(`FASTOPTIM_TRITON_TMA`: unset, on for 16-bit compute on sm_90; 0, never; 1, also fp32 and anywhere
descriptors run, the interpreter included). Host-side descriptors (triton.tools.tensor_descriptor, triton
>= 3.4: the same class on the GPU machines' 3.6 and this 3.8), not device-side tl.make_tensor_descriptor:
a host descriptor is a kernel parameter (a CUtensorMap passed by value), so a CUDA graph captures it like
any argument, and there is no global-memory scratch and no process-wide triton.set_allocator for a library
to install. A stack (batch, r, c) is one 3-D descriptor with blocks (1, rows, cols): its bounds are per
matrix, so a tile past a matrix's last row or column reads zeros, as the masked loads do. A 2-D
descriptor over the flattened (batch·r, c) would let a K step along rows (A·A's Q, B·X's X) read the next
matrix's rows; per-matrix descriptors would be one launch (or one device-side descriptor) per matrix.
An operand stored transposed (Xᵀ in X Xᵀ and XᵀX) is read as blocks of its storage and transposed in
shared memory. The pointer path (masked loads, cp.async) remains for sm_80, for fp32 compute and
wherever a requirement fails: base, batch and row strides 16-byte aligned, unit last stride (16-bit
m, n multiples of 8). tests/test_triton_compile.py checks cp.async.bulk.tensor and wgmma in the sm_90
kernels.

Launch (`_grid`): a grid of (tiles, batch) programs, or, with FASTOPTIM_TRITON_PERSISTENT=1, a persistent
grid of min(work items, SMs x resident CTAs) programs that take the batch x tiles work items in turn,
matrix-major. The grid stays the default: on GPT-2 small's stacks (16-bit, 128-row tiles capped to two
CTAs per SM: 264 slots on 132 SMs; s = 768 gives 6 x 6 tiles, 21 of them on or above the diagonal)

    stack           launch                 work items   waves (items / 264)   last wave full
    48 x 768x768    X Xᵀ, A·A (each)       1008         3.82 -> 4              82% (95.5% overall)
                    B·X                    1728         6.55 -> 7              55% (93.5%)
    12 x 768x3072   X Xᵀ, A·A              252          0.95 -> 1              95%
                    B·X                    1728         6.55 -> 7              55% (93.5%)
    12 x 768x2304   X Xᵀ, A·A              252          0.95 -> 1              95%
                    B·X                    1296         4.91 -> 5              91% (98.2%)

every work item of a launch costs the same (same K), so a persistent grid runs the same number of rounds
with the same last partial round: it cannot remove this tail, it saves only the per-CTA launch and
prologue and orders the work for L2. Whether that pays is for a GPU benchmark to say; nothing here has
been measured on one.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._registry import register_kernel
from ..coefficients import Schedule
from . import _ns_kernels as kernels
from ._common import MAX_GRID_Y, device_guard

try:  # host-side TMA descriptors: triton >= 3.4 (3.6 on the GPU machines, 3.8 here)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton: the pointer path only
    TensorDescriptor = None

COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# A CUDA grid's second axis holds at most 65535 programs: longer stacks are launched in chunks.
_MAX_BATCH_PER_LAUNCH = MAX_GRID_Y  # module-level, so a test can lower it
# Tile of the two element-wise prologue kernels.
_BLOCK_R, _BLOCK_C = 32, 128
# Programs per matrix of the norm reduction aim at this many programs in all (per SM on a GPU).
_REDUCTION_PROGRAMS_PER_SM = 4
_REDUCTION_PROGRAMS_INTERPRETER = 8
_MAX_PARTIALS = 256
_GROUP_M = 8
TMA_ENV = "FASTOPTIM_TRITON_TMA"  # 0: pointer loads only; 1: descriptors wherever legal; unset: on sm_90
PERSISTENT_ENV = "FASTOPTIM_TRITON_PERSISTENT"  # 1: persistent product launches; 0 or unset: the grid
# Descriptors by default for 16-bit compute only: they feed wgmma from shared memory. fp32 compute ("ieee",
# FMA dots) reads its tiles into registers anyway, and compiled with descriptors it spills (sm_90: 255
# registers and 344-11408 bytes of spills per kernel, against none for the pointer path's 64-row tiles);
# FASTOPTIM_TRITON_TMA=1 still forces them for fp32.
_TMA_DEFAULT_DTYPES = (torch.bfloat16, torch.float16)
_TMA_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Resident CTAs per SM of the product kernels by tile (the capped 128-row tiles: two, `_ctas_per_sm`).
_PERSISTENT_CTAS_PER_SM = {128: 1, 64: 2, 32: 4, 16: 4}
_PERSISTENT_PROGRAMS_INTERPRETER = 3  # fewer programs than work items: every program loops


@dataclass(frozen=True)
class _Config:
    block: int  # square tile of the symmetric products; BLOCK_M = BLOCK_N of the update
    block_k: int
    num_warps: int
    num_stages: int
    max_registers: int | None = None  # ptxas' .maxnreg; None: ptxas chooses


# Keyed on the Gram size s = min(m, n): (largest s, config for 16-bit compute). fp32 halves BLOCK_K
# so that num_stages buffers of 128 x BLOCK_K fp32 tiles fit in shared memory.
_CONFIGS: tuple[tuple[float, _Config], ...] = (
    (64, _Config(32, 32, 4, 2)),
    (512, _Config(64, 64, 4, 3)),
    (float("inf"), _Config(128, 64, 8, 3)),
)
# 128 x 128 16-bit tiles with 8 warps on Hopper (wgmma): at most 128 registers per thread (65536 / 512
# threads) so that two CTAs share an SM (2 x 96 KiB of shared memory fits 227 KiB); ptxas alone takes
# 104-138 there. Only for sizes that are multiples of 16 (unaligned tiles load element by element and
# would spill under the cap) and not on Ampere (mma.sync holds operand fragments in registers: it
# spills under the cap). tests/test_triton_compile.py checks registers and spills of both.
_TWO_CTAS_PER_SM = 128


def _config(gram_size: int, compute_dtype: torch.dtype) -> _Config:
    config = next(config for largest, config in _CONFIGS if gram_size <= largest)
    if compute_dtype == torch.float32:
        config = _Config(config.block, max(16, config.block_k // 2), config.num_warps, config.num_stages)
    return config


def _configs(
    batch: int, m: int, n: int, compute_dtype: torch.dtype, multiprocessors: int | None, arch: int | None = None
) -> tuple[_Config, _Config]:
    """(config of the two symmetric products, config of the update product) for a (batch, m, n) stack.

    Small-grid rule: a launch whose grid of 128-row tiles has fewer programs than the GPU has SMs
    (batch·T(T+1)/2 Gram tiles with T = ceil(s/128); batch·ceil(m/128)·ceil(n/128) update tiles)
    leaves SMs idle for its whole duration, so it takes 64-row tiles instead (about 4x the programs).
    One 768 x 3072 matrix: 21 Gram tiles of 128 on 132 SMs -> 78 tiles of 64; its update keeps 144
    tiles of 128. `multiprocessors` and `arch` (compute capability, 90 for sm_90) are None off a GPU
    (the interpreter): the table alone decides.
    """
    size = min(m, n)
    base = _config(size, compute_dtype)

    def sized(programs_at_base: int) -> _Config:
        config = base
        if base.block == 128 and multiprocessors is not None and programs_at_base < multiprocessors:
            config = _config(_CONFIGS[1][0], compute_dtype)  # the 64-row tiles of the table
        aligned = m % 16 == 0 and n % 16 == 0
        if config.block == 128 and compute_dtype != torch.float32 and aligned and (arch or 0) >= 90:
            config = _Config(config.block, config.block_k, config.num_warps, config.num_stages, _TWO_CTAS_PER_SM)
        return config

    tiles = triton.cdiv(size, base.block)
    gram = sized(batch * tiles * (tiles + 1) // 2)
    update = sized(batch * triton.cdiv(m, base.block) * triton.cdiv(n, base.block))
    return gram, update


@functools.cache
def _multiprocessor_count(device: torch.device) -> int | None:
    """SMs of the GPU a launch runs on; None for CPU tensors (the interpreter)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _arch(device: torch.device) -> int | None:
    """Compute capability of the GPU as one number (90 for sm_90); None for CPU tensors."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


@functools.cache
def _target_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return _REDUCTION_PROGRAMS_INTERPRETER
    return _REDUCTION_PROGRAMS_PER_SM * _multiprocessor_count(device)


def _num_partials(batch: int, m: int, n: int, device: torch.device) -> int:
    per_matrix = triton.cdiv(_target_programs(device), batch)
    tiles = triton.cdiv(m, _BLOCK_R) * triton.cdiv(n, _BLOCK_C)
    return min(triton.next_power_of_2(per_matrix), triton.next_power_of_2(tiles), _MAX_PARTIALS)


def _tma_setting() -> str:
    setting = os.environ.get(TMA_ENV, "").strip()
    if setting not in ("", "0", "1"):
        raise ValueError(f"{TMA_ENV} must be 0, 1 or unset, got {setting!r}")
    return setting


def _persistent_setting() -> bool:
    setting = os.environ.get(PERSISTENT_ENV, "").strip()
    if setting not in ("", "0", "1"):
        raise ValueError(f"{PERSISTENT_ENV} must be 0, 1 or unset, got {setting!r}")
    return setting == "1"


@dataclass(frozen=True)
class _Path:
    """How one call launches its products: `tma` (descriptors wherever every operand allows them) and
    `programs` (None: the grid launch; else the SM count the persistent grid is sized from, 0 off a GPU)."""

    tma: bool
    programs: int | None


def _tma_allowed(device: torch.device, arch: int | None, dtype: torch.dtype) -> bool:
    """Whether this call's products may read through descriptors (each operand is checked as well, by
    `_descriptor`). Unset FASTOPTIM_TRITON_TMA: on sm_90 for 16-bit compute; 1: for every compute dtype
    wherever descriptors run (sm_90 and later, and the interpreter, which emulates them); 0: never."""
    setting = _tma_setting()
    if setting == "0" or TensorDescriptor is None:
        return False
    if setting == "1":
        return dtype in _TMA_DTYPES and (device.type == "cpu" or (arch or 0) >= 90)
    return arch == 90 and dtype in _TMA_DEFAULT_DTYPES


def _path(device: torch.device, dtype: torch.dtype) -> _Path:
    programs = None
    if _persistent_setting():
        programs = _multiprocessor_count(device) or 0
    return _Path(_tma_allowed(device, _arch(device), dtype), programs)


def _ctas_per_sm(config: _Config) -> int:
    """CTAs of a product kernel resident on one SM (`_PERSISTENT_CTAS_PER_SM`; two for the capped
    128-row tiles); tests/test_triton_compile.py checks that the compiled kernels fit that many."""
    if config.max_registers == _TWO_CTAS_PER_SM:
        return 2
    return _PERSISTENT_CTAS_PER_SM[config.block]


def _grid(path: _Path, config: _Config, tiles: int, batch: int) -> tuple[tuple[int, ...], dict]:
    """The grid of a product launch and its persistent arguments: (tiles, batch) for the grid launch,
    else min(work items, SMs x resident CTAs) programs (`_PERSISTENT_PROGRAMS_INTERPRETER` off a GPU)."""
    if path.programs is None:
        return (tiles, batch), {}
    programs = path.programs * _ctas_per_sm(config) if path.programs else _PERSISTENT_PROGRAMS_INTERPRETER
    return (min(tiles * batch, programs),), {"num_matrices": batch, "PERSISTENT": True}


def _descriptor(storage: torch.Tensor, transposed: bool, rows: int, cols: int):
    """A 3-D descriptor over a (batch, r, c) stack for rows x cols tiles of the operand it holds (of its
    transpose: cols x rows blocks of the storage), or None where TMA's requirements fail: a 16-byte aligned
    base, 16-byte aligned batch and row strides, a unit last stride."""
    itemsize = storage.element_size()
    if (storage.stride(-1) != 1 or storage.data_ptr() % 16
            or any(stride * itemsize % 16 for stride in storage.stride()[:-1])):
        return None
    block = [1, cols, rows] if transposed else [1, rows, cols]
    return TensorDescriptor(storage, list(storage.shape), list(storage.stride()), block)


def _operands(path: _Path, p, p_transposed: bool, q, q_transposed: bool, block_m: int, block_n: int,
              block_k: int) -> tuple[object, object, tuple[int, ...], dict]:
    """(P argument, Q argument, their six strides, constexprs) of a product P Q whose operands are stored as
    (batch, r, c) stacks p and q, holding P and Q or, where flagged, their transposes: descriptors when the
    path allows them and both operands meet the requirements, else the tensors (the pointer path)."""
    def strides(storage, transposed):
        batch, row = storage.stride(0), storage.stride(1)
        return (batch, 1, row) if transposed else (batch, row, 1)

    pointer_strides = strides(p, p_transposed) + strides(q, q_transposed)
    if path.tma:
        p_descriptor = _descriptor(p, p_transposed, block_m, block_k)
        q_descriptor = _descriptor(q, q_transposed, block_k, block_n)
        if p_descriptor is not None and q_descriptor is not None:
            constexprs = {"TMA": True, "P_TRANSPOSED": p_transposed, "Q_TRANSPOSED": q_transposed}
            return p_descriptor, q_descriptor, pointer_strides, constexprs
    return p, q, pointer_strides, {}


def _options(config: _Config, upcast: bool) -> dict:
    options = {"UPCAST": upcast, "BLOCK_K": config.block_k, "num_warps": config.num_warps,
               "num_stages": config.num_stages}
    if config.max_registers is not None:
        options["maxnreg"] = config.max_registers
    return options


def _symmetric_product(
    path: _Path, config: _Config, upcast: bool, p, p_transposed: bool, q, q_transposed: bool,
    addend: torch.Tensor, out: torch.Tensor, size: int, K: int, alpha: float, beta: float, has_addend: bool,
) -> None:
    """out = alpha·(P Q) + beta·addend (size x size stacks) for a symmetric P Q: `_operands` says how P and Q
    are stored, `path` how the kernel is launched."""
    tiles = triton.cdiv(size, config.block)
    grid, persistent = _grid(path, config, tiles * (tiles + 1) // 2, out.shape[0])
    p_arg, q_arg, strides, constexprs = _operands(
        path, p, p_transposed, q, q_transposed, config.block, config.block, config.block_k)
    addend_arg = addend
    if constexprs and has_addend:  # the addend is read through a descriptor as well, or nothing is
        addend_arg = _descriptor(addend, False, config.block, config.block)
        if addend_arg is None:
            p_arg, q_arg, constexprs, addend_arg = p, q, {}, addend
    kernels._symmetric_product_kernel[grid](
        p_arg, q_arg, addend_arg, out, size, K, *strides, out.stride(0), alpha, beta,
        HAS_ADDEND=has_addend, BLOCK=config.block, **_options(config, upcast), **persistent, **constexprs,
    )


def _product_axpy(
    path: _Path, config: _Config, upcast: bool, p: torch.Tensor, q: torch.Tensor, x: torch.Tensor,
    out: torch.Tensor, K: int, alpha: float,
) -> None:
    """out = P Q + alpha·x for row-major stacks p (batch, M, K) and q (batch, K, N)."""
    batch, M, N = out.shape
    grid, persistent = _grid(path, config, triton.cdiv(M, config.block) * triton.cdiv(N, config.block), batch)
    p_arg, q_arg, strides, constexprs = _operands(path, p, False, q, False, config.block, config.block,
                                                  config.block_k)
    kernels._product_axpy_kernel[grid](
        p_arg, q_arg, x, out, M, N, K, *strides, x.stride(0), alpha,
        BLOCK_M=config.block, BLOCK_N=config.block, GROUP_M=_GROUP_M, **_options(config, upcast), **persistent,
        **constexprs,
    )


def _launch_chunk(
    G, partials, x_buffers, gram, schedule, eps, config, upcast, normalized=False, update_config=None
) -> None:
    """The whole iteration for a stack G (batch, m, n) short enough for one grid (`config` for the
    symmetric products, `update_config` for B·X, by default the same); step i reads
    x_buffers[i % 2] and writes the other, so the result lands in x_buffers[steps % 2]. With a
    normalized G already in the compute dtype and contiguous, step 0 reads G itself (never writes it):
    no copy pass into x_buffers[0]."""
    batch, m, n = G.shape
    size, tall = min(m, n), m > n
    x, x_next = x_buffers
    if normalized:  # G is X₀ already (muon_momentum_stack_(normalize=True))
        if schedule.triples and G.dtype == x.dtype and G.is_contiguous():
            x = G
        else:
            x.copy_(G)  # a cast into the workspace
    else:
        acc_dtype = tl.float64 if partials.dtype == torch.float64 else tl.float32
        num_partials = partials.shape[1] // 2  # sums, then their exponents
        kernels._sum_squares_kernel[(num_partials, batch)](
            G, partials, m, n, *G.stride(), num_partials,
            ACC_DTYPE=acc_dtype, BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C,
        )
        tiles = triton.cdiv(m, _BLOCK_R) * triton.cdiv(n, _BLOCK_C)
        kernels._scale_cast_kernel[(tiles, batch)](
            G, partials, x, m, n, *G.stride(), x.stride(0), schedule.safety, eps,
            ACC_DTYPE=acc_dtype, NUM_PARTIALS=num_partials, BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C,
        )
    A, B = gram
    update_config = update_config or config
    path = _path(G.device, x.dtype)
    for a, b, c in schedule.triples:
        # A = X Xᵀ reads X's rows twice (P = X, Q = Xᵀ); A = XᵀX its columns (P = Xᵀ, Q = X).
        _symmetric_product(path, config, upcast, x, tall, x, not tall, A, A, size, max(m, n), 1.0, 0.0, False)
        # B = c·A·A + b·A, with Q read row-major as A itself (A is symmetric).
        _symmetric_product(path, config, upcast, A, False, A, False, A, B, size, size, c, b, True)
        left, right = (x, B) if tall else (B, x)
        _product_axpy(path, update_config, upcast, left, right, x, x_next, size, a)
        # G (when step 0 read it) is never a destination: the next step writes x_buffers[0].
        x, x_next = x_next, (x_buffers[0] if x is G else x)


def _newton_schulz(
    G: torch.Tensor,
    schedule: Schedule,
    eps: float,
    compute_dtype: torch.dtype,
    normalized: bool = False,
    *,
    config: _Config | None = None,
    poison: bool = False,
) -> torch.Tensor:
    """The launcher. `config` overrides the block table and `poison` fills every workspace and the
    output with NaN before the kernels run (tests use both; an element left unwritten then shows)."""
    shape, device = G.shape, G.device
    m, n = shape[-2], shape[-1]
    if G.numel() == 0:
        return torch.empty(shape, dtype=compute_dtype, device=device)
    stack = G.reshape(-1, m, n)  # a view for any layout whose leading dims flatten; strides are kept
    batch, size, steps = stack.shape[0], min(m, n), len(schedule.triples)
    gram_config, update_config = (
        (config, config) if config
        else _configs(batch, m, n, compute_dtype, _multiprocessor_count(device), _arch(device))
    )

    def workspace(*dims: int, dtype: torch.dtype = compute_dtype) -> torch.Tensor:
        if poison:
            return torch.full(dims, float("nan"), dtype=dtype, device=device)
        return torch.empty(dims, dtype=dtype, device=device)

    acc_dtype = torch.float64 if G.dtype == torch.float64 else torch.float32
    partials = workspace(batch, 2 * _num_partials(batch, m, n, device), dtype=acc_dtype)  # sums, exponents
    x_buffers = (workspace(batch, m, n), workspace(batch, m, n) if steps else None)
    gram = workspace(2, batch, size, size) if steps else workspace(2, 0, 1, 1)
    upcast = device.type == "cpu" and compute_dtype != torch.float32
    with device_guard(G):  # Triton launches on the current device, not the tensors'
        for start in range(0, batch, _MAX_BATCH_PER_LAUNCH):
            chunk = slice(start, min(batch, start + _MAX_BATCH_PER_LAUNCH))
            _launch_chunk(
                stack[chunk], partials[chunk], tuple(x[chunk] if x is not None else None for x in x_buffers),
                (gram[0, chunk], gram[1, chunk]), schedule, eps, gram_config, upcast, normalized, update_config,
            )
    return x_buffers[steps % 2].view(shape)


def _why_not_newton_schulz(
    G: torch.Tensor, schedule: Schedule, eps: float, compute_dtype: torch.dtype, normalized: bool = False
) -> str | None:
    if compute_dtype not in COMPUTE_DTYPES:
        return f"compute_dtype {compute_dtype} is not supported by tl.dot (float32, bfloat16, float16 are)"
    if not G.dtype.is_floating_point:
        return f"G must be a real floating-point tensor, got {G.dtype}"
    return None


@register_kernel("newton_schulz", "triton", supports=_why_not_newton_schulz)
def newton_schulz(
    G: torch.Tensor, schedule: Schedule, eps: float, compute_dtype: torch.dtype, normalized: bool = False
) -> torch.Tensor:
    """fastoptim::newton_schulz on the Triton backend: a new contiguous (..., m, n) compute_dtype tensor."""
    return _newton_schulz(G, schedule, eps, compute_dtype, normalized)
