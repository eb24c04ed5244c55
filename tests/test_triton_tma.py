"""The Triton Newton–Schulz products' other paths (issue 15): TMA tensor descriptors and the persistent launch.

Under TRITON_INTERPRET=1 the interpreter emulates host-side tensor descriptors, so every path runs here:
descriptors (FASTOPTIM_TRITON_TMA=1, the interpreter being a target where they are legal), the persistent
launch (FASTOPTIM_TRITON_PERSISTENT=1: three programs looping over every work item) and both together, for
the standard and the Gram iteration, against the torch reference and bit for bit against the default
pointer/grid path. Blocks of 16 put several tiles on each side of small matrices. The launches are
recorded, so a case meant for descriptors fails if it fell back to pointers (and an odd shape, which
must fall back, fails if it did not). What the GPU compiler makes of the descriptor kernels (TMA copies,
wgmma, registers) is checked by tests/test_triton_compile.py.
"""

from __future__ import annotations

import pytest
import torch
from ops_testing import assert_matrix_close, device_for

from fastoptim import reference
from fastoptim.coefficients import resolve

pytest.importorskip("triton")
from fastoptim.triton_kernels import _ns_kernels as kernels  # noqa: E402
from fastoptim.triton_kernels import gram_newton_schulz as gram  # noqa: E402
from fastoptim.triton_kernels import newton_schulz as ns  # noqa: E402

pytestmark = pytest.mark.triton

BLOCK_16 = ns._Config(block=16, block_k=16, num_warps=4, num_stages=2)
# (TMA, persistent) settings besides the default (pointers, grid).
PATHS = [pytest.param("1", "0", id="tma"), pytest.param("0", "1", id="persistent"),
         pytest.param("1", "1", id="tma-persistent")]
# fp32 stacks whose rows are 16-byte multiples (descriptors legal): batched wide, tall, 1 x N, and a
# size that is no multiple of the block (partial edge tiles); all cross the 16-blocks.
ALIGNED = [(2, 40, 56), (56, 36), (20, 44)]
# 1 x 48: X's rows take descriptors, its 1 x 1 Gram matrix (4-byte rows) cannot: A·A and B·X use pointers.
MIXED = [(1, 48)]
ODD = [(3, 33, 70)]  # rows of 70 fp32 (280 bytes): no descriptor, the pointer path


class _Recorder:
    """Stands in for a kernel: records each launch's TMA and PERSISTENT constexprs and grid, then launches."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((kwargs.get("TMA", False), kwargs.get("PERSISTENT", False), grid))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.fixture
def launches(monkeypatch):
    recorded = []
    for name in ("_symmetric_product_kernel", "_product_axpy_kernel"):
        monkeypatch.setattr(kernels, name, _Recorder(getattr(kernels, name), recorded))
    return recorded


def _set_paths(monkeypatch, tma: str, persistent: str) -> None:
    monkeypatch.setenv(ns.TMA_ENV, tma)
    monkeypatch.setenv(ns.PERSISTENT_ENV, persistent)


def _default(monkeypatch, run):
    _set_paths(monkeypatch, "0", "0")
    return run()


@pytest.mark.parametrize("tma, persistent", PATHS)
@pytest.mark.parametrize("shape", ALIGNED + MIXED + ODD, ids=str)
def test_newton_schulz_paths_match_reference_and_default(monkeypatch, launches, tma, persistent, shape):
    G = torch.randn(shape, device=device_for("triton"))
    schedule = resolve("jordan", 2)

    def run():
        return ns._newton_schulz(G, schedule, 1e-7, torch.float32, config=BLOCK_16, poison=True)

    expected = _default(monkeypatch, run)
    launches.clear()
    _set_paths(monkeypatch, tma, persistent)
    out = run()
    assert_matrix_close(out, reference.newton_schulz(G, None, schedule, 1e-7, torch.float32))
    assert torch.equal(out, expected)  # same tiles, same accumulation order: the same bits
    descriptors = {tma == "1" and shape in ALIGNED + MIXED, tma == "1" and shape in ALIGNED}
    assert len(launches) == 3 * 2 and {used for used, _, _ in launches} == descriptors
    if tma == "1" and shape in MIXED:  # per step: X Xᵀ by descriptors, A·A and B·X by pointers
        assert [used for used, _, _ in launches] == [True, False, False] * 2
    assert {looped for _, looped, _ in launches} == {persistent == "1"}
    if persistent == "1":  # at most three programs (fewer only for fewer work items), each looping
        grids = {grid for _, _, grid in launches}
        assert all(len(grid) == 1 and grid[0] <= ns._PERSISTENT_PROGRAMS_INTERPRETER for grid in grids)
        assert (ns._PERSISTENT_PROGRAMS_INTERPRETER,) in grids or shape in MIXED


@pytest.mark.parametrize("tma, persistent", PATHS)
@pytest.mark.parametrize("shape", [(2, 40, 56), (56, 36), (3, 33, 70)], ids=str)
def test_gram_newton_schulz_paths_match_reference_and_default(monkeypatch, launches, tma, persistent, shape):
    G = torch.randn(shape, device=device_for("triton"))
    schedule = resolve("jordan", 3)

    def run():
        return gram._gram_newton_schulz(G, schedule, 1e-7, torch.float32, restarts=(1,), config=BLOCK_16,
                                        poison=True)

    expected = _default(monkeypatch, run)
    launches.clear()
    _set_paths(monkeypatch, tma, persistent)
    out = run()
    reference_out = reference.gram_newton_schulz(G, None, schedule, 1e-7, torch.float32, restarts=(1,))
    assert_matrix_close(out, reference_out)
    assert torch.equal(out, expected)
    assert {used for used, _, _ in launches} == {tma == "1" and shape != (3, 33, 70)}
    assert {looped for _, looped, _ in launches} == {persistent == "1"}


@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float16])
def test_16bit_descriptors_match_the_pointer_path(monkeypatch, launches, compute_dtype):
    """16-bit stacks (upcast to an fp32 dot in the interpreter, as the pointer path is): the descriptor
    blocks of a 16-bit operand, wide and tall, and the tall form's transposed operand."""
    G = torch.randn(2, 24, 40, device=device_for("triton"))
    schedule = resolve("jordan", 2)
    for stack in (G, G.mT.contiguous()):
        def run(stack=stack):
            return ns._newton_schulz(stack, schedule, 1e-7, compute_dtype, config=BLOCK_16, poison=True)

        expected = _default(monkeypatch, run)
        launches.clear()
        _set_paths(monkeypatch, "1", "0")
        assert torch.equal(run(), expected)
        assert {used for used, _, _ in launches} == {True}


# --------------------------------------------------------------------------------------------------
# Which path a launch takes


@pytest.mark.parametrize("setting", ["", "0", "1"])
def test_tma_selection(monkeypatch, setting):
    """Unset: descriptors on sm_90 for 16-bit compute only; 0: never; 1: every compute dtype on sm_90 and
    later and in the interpreter (CPU tensors), never on sm_80 (no TMA)."""
    monkeypatch.setenv(ns.TMA_ENV, setting)
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    bf16, f16, f32 = torch.bfloat16, torch.float16, torch.float32
    allowed = {(arch, dtype): ns._tma_allowed(gpu, arch, dtype) for arch in (80, 90, 100) for dtype in (bf16, f16, f32)}
    interpreter = {dtype: ns._tma_allowed(cpu, None, dtype) for dtype in (bf16, f32)}
    if setting == "0":
        assert not any(allowed.values()) and not any(interpreter.values())
    elif setting == "":
        assert {key for key, value in allowed.items() if value} == {(90, bf16), (90, f16)}
        assert not any(interpreter.values())
    else:
        assert {key for key, value in allowed.items() if value} == {(arch, dtype) for arch in (90, 100)
                                                                    for dtype in (bf16, f16, f32)}
        assert all(interpreter.values())


def test_bad_settings_are_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv(ns.TMA_ENV, "yes")
    with pytest.raises(ValueError, match=ns.TMA_ENV):
        ns._tma_allowed(torch.device("cpu"), None, torch.float32)
    monkeypatch.setenv(ns.TMA_ENV, "0")
    monkeypatch.setenv(ns.PERSISTENT_ENV, "2")
    with pytest.raises(ValueError, match=ns.PERSISTENT_ENV):
        ns._path(torch.device("cpu"), torch.float32)


def test_descriptor_requirements():
    """A descriptor needs a 16-byte aligned base, 16-byte aligned batch and row strides and a unit last
    stride; where one operand fails, the product takes the pointer path for both."""
    stack = torch.zeros(3, 16, 24)  # rows of 96 bytes
    assert ns._descriptor(stack, False, 16, 8).block_shape == [1, 16, 8]
    assert ns._descriptor(stack, True, 16, 8).block_shape == [1, 8, 16]  # the storage's block of a transpose
    assert ns._descriptor(torch.zeros(3 * 16 * 24 + 1)[1:].view(3, 16, 24), False, 16, 16) is None  # base
    assert ns._descriptor(torch.zeros(3, 16, 23), False, 16, 16) is None  # 92-byte rows
    assert ns._descriptor(torch.zeros(3, 16, 26)[:, :, :24], False, 16, 16) is None  # 104-byte rows
    assert ns._descriptor(torch.zeros(3, 24, 16).mT, False, 16, 16) is None  # column-major
    assert ns._descriptor(torch.zeros(3, 16, 24, dtype=torch.bfloat16)[:, :, :8], False, 16, 16) is not None
    assert ns._descriptor(torch.zeros(3, 16, 12, dtype=torch.bfloat16), False, 16, 16) is None  # 24-byte rows
    path = ns._Path(tma=True, programs=None)
    p, q, strides, constexprs = ns._operands(path, stack, False, stack, True, 16, 16, 8)
    assert constexprs == {"TMA": True, "P_TRANSPOSED": False, "Q_TRANSPOSED": True}
    assert strides == (16 * 24, 24, 1, 16 * 24, 1, 24)  # Q = Xᵀ: the pointer strides of the transpose
    odd = torch.zeros(3, 24, 23)
    p, q, _, constexprs = ns._operands(path, stack, False, odd, False, 16, 16, 8)
    assert constexprs == {} and p is stack and q is odd
    _, _, _, constexprs = ns._operands(ns._Path(tma=False, programs=None), stack, False, stack, False, 16, 16, 8)
    assert constexprs == {}


def test_persistent_grid_size():
    """The grid launch is (tiles, batch); the persistent one min(work items, SMs x resident CTAs): two per SM
    for the capped 128-row tiles, one uncapped, three programs in the interpreter."""
    capped = ns._Config(128, 64, 8, 3, ns._TWO_CTAS_PER_SM)
    uncapped = ns._Config(128, 64, 8, 3)
    grid = ns._Path(tma=False, programs=None)
    assert ns._grid(grid, capped, 21, 48) == ((21, 48), {})
    gpu = ns._Path(tma=False, programs=132)
    assert ns._grid(gpu, capped, 21, 48) == ((264,), {"num_matrices": 48, "PERSISTENT": True})
    assert ns._grid(gpu, uncapped, 21, 48) == ((132,), {"num_matrices": 48, "PERSISTENT": True})
    assert ns._grid(gpu, capped, 21, 2) == ((42,), {"num_matrices": 2, "PERSISTENT": True})  # fewer items
    interpreter = ns._Path(tma=False, programs=0)
    assert ns._grid(interpreter, BLOCK_16, 6, 2) == ((3,), {"num_matrices": 2, "PERSISTENT": True})
